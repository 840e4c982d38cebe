"""The stages of static quantization up to the statistics, each a function returning a small frozen result:

    resolve(request)                              -> Setup      target CPU, settings, why that weight range
    load_and_prepare(request, timer)              -> Prepared   original, prepared model, fp32 reference, digest
    open_data(request, specs)                     -> Samples    calibration, held-back and search samples
    smooth(request, prepared, calib, ...)         -> Prepared   a new one, SmoothQuant applied (--smooth-alpha)
    place_nodes(request, settings, prepared, ...) -> Placed     graph, placement options, placement, recipe choices
    calibration_statistics(...)                   -> Statistics
    calibrated(request)                           -> Calibrated the results above, as they came out

The later stages (onnxq.commands.static_flow: speed guard, automatic search, accuracy target, recovery) never change
a result: `keep_float` and `widen` return a new Placed, and `trial_builder` writes the models they measure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

import onnx

from onnxq.commands.checks import check_finite_weights, check_not_qdq
from onnxq.commands.dynamic import rewrite_dynamic
from onnxq.commands.recipe import NodeChoice, activation_overrides, dynamic_nodes, pinned_int8, placement_changes
from onnxq.commands.request import (
    RANDOM_SAMPLES,
    QuantizeRequest,
    StageTimer,
    check_batch_size,
    check_speed_guard_options,
    holdout_fraction,
    resolve_settings,
    search_methods,
    searches,
)
from onnxq.commands.request_recipe import recipe_choices
from onnxq.cpu import TargetCpu, resolve_target
from onnxq.enums import NodeStatus
from onnxq.errors import DataError, ModelError, UsageError
from onnxq.model_io import load_model, model_digest
from onnxq.passes.prepare import PreparedModel, infer_types, prepare_model
from onnxq.passes.recovery import equalize_model
from onnxq.passes.simplify import scale_gates_first
from onnxq.passes.smooth import smooth_model, validate_alpha
from onnxq.paths import check_paths, quantize_paths
from onnxq.quant.ir import Graph, import_graph
from onnxq.quant.ops import HEAVY_OPS
from onnxq.quant.placement import Placement, PlacementOptions, place, tensors_to_observe, value_aliases
from onnxq.quant.plan import QuantPlan, QuantSettings, build_plan
from onnxq.quant.rewrite_qdq import write_qdq
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import InputSpec, SampleSource, model_input_specs, open_source, random_source, split_holdout
from onnxq.runtime.fusion import is_integer_kernel
from onnxq.runtime.session import ProgressFactory, no_progress
from onnxq.search.distributed import collect

CLIPS_NOTHING = frozenset({"global"})  # methods whose range holds every calibration value


@dataclass(frozen=True)
class Setup:
    """What `resolve` decided before reading the model: the CPU the model is for, and the settings
    (the weight range chosen for that CPU, and why)."""

    target: TargetCpu
    settings: QuantSettings
    weight_range_reason: str


@dataclass(frozen=True)
class Prepared:
    """The model as `load_and_prepare` (and `smooth`) made it: the user's original, the prepared model
    plans are written on, the model fp32 outputs come from (onnxq.passes.prepare.PreparedModel.reference),
    and the prepared model's digest (what statistics and plans are checked against)."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    reference: onnx.ModelProto
    notes: tuple[str, ...] = ()
    equalization: dict | None = None  # onnxq.passes.recovery's report, when --equalize was given
    smoothing: dict | None = None  # onnxq.passes.smooth's report, when --smooth-alpha was given

    @cached_property
    def digest(self) -> str:
        """Hashed once, on first use: a smoothed copy (a new Prepared) hashes its own model."""
        return model_digest(self.model)


@dataclass(frozen=True)
class Samples:
    """What `open_data` opened: samples to calibrate on, held-back samples the fidelity report measures on,
    and those the automatic search chooses by (each None when there are none)."""

    calib: SampleSource | None
    held: SampleSource | None
    search: SampleSource | None
    notes: tuple[str, ...] = ()

    def timing_feed(self) -> dict | None:
        """One real sample, batch 1, to time the model with."""
        source = self.held if self.held is not None and len(self.held) else self.calib
        return source.sample(0) if source is not None and len(source) else None


@dataclass(frozen=True)
class Placed:
    """Which node runs at which precision. `place_nodes` makes the first; the speed guard, the automatic
    search and the accuracy target make new ones (`keep_float`, `widen`), and recovery places again on
    its recovered graph."""

    graph: Graph
    options: PlacementOptions
    placement: Placement
    choices: dict[str, NodeChoice] = field(default_factory=dict)  # the recipe's, by node label
    recipe_notes: tuple[str, ...] = ()  # rules that select nothing
    searched_dynamic: frozenset[str] = frozenset()  # layers the automatic search quantizes dynamically

    @property
    def dynamic(self) -> frozenset[str]:
        """Layers quantized dynamically beside the static ones (placed float, rewritten after): the
        recipe's and the automatic search's."""
        return dynamic_nodes(self.choices) | self.searched_dynamic

    def int8_layers(self) -> dict[str, str]:
        """Conv/MatMul/Gemm nodes int8 here that no recipe rule pins: label -> op type."""
        pinned = pinned_int8(self.choices)
        return {d.name: d.op_type for d in self.placement.nodes
                if d.status == NodeStatus.INT8 and d.op_type in HEAVY_OPS and d.name not in pinned}


@dataclass(frozen=True)
class Calibrated:
    """The results of the stages up to the statistics, as `calibrated` ran them (field: its stage)."""

    setup: Setup  # resolve
    prepared: Prepared  # load_and_prepare, then smooth
    samples: Samples  # open_data
    placed: Placed  # place_nodes
    stats: Statistics  # calibration_statistics

    @property
    def notes(self) -> list[str]:
        return [*self.prepared.notes, *self.placed.recipe_notes, *self.samples.notes]


def calibrated(request: QuantizeRequest, progress: ProgressFactory = no_progress, *, writes_model: bool = True,
               timer: StageTimer | None = None) -> Calibrated:
    """The stages up to the statistics (timed in `timer`): what the speed guard, the searches and the plan
    build on."""
    timer = timer or StageTimer()
    setup = resolve(request, writes_model)
    prepared = load_and_prepare(request, timer)
    samples = open_data(request, model_input_specs(prepared.original))
    if request.smooth_alpha is not None:
        prepared = smooth(request, prepared, samples.calib, timer, progress)
    placed = place_nodes(request, setup.settings, prepared, timer)
    require_something_to_quantize(placed.placement, placed.dynamic)
    stats = calibration_statistics(request, setup.settings, prepared, placed, samples.calib, timer, progress)
    return Calibrated(setup, prepared, samples, placed, stats)


def resolve(request: QuantizeRequest, writes_model: bool = True) -> Setup:
    """Check the request's paths and options; choose the target CPU and the settings for it."""
    check_paths(quantize_paths(request, writes_model))
    target = resolve_target(request.target_cpu)
    check_speed_guard_options(request, target)
    settings, weight_range_reason = resolve_settings(request, target)
    if request.smooth_alpha is not None:
        validate_alpha(request.smooth_alpha)
        if request.load_stats is not None:
            raise UsageError("--smooth-alpha changes the model, so saved statistics do not fit it: "
                             "give --calib instead of --load-stats")
    return Setup(target, settings, weight_range_reason)


def load_checked(request: QuantizeRequest, timer: StageTimer) -> tuple[onnx.ModelProto, PreparedModel]:
    """The model as loaded (refused if it is already quantized) and prepared (onnxq.passes.prepare; refused if a
    weight holds NaN or Inf): every mode starts here."""
    with timer.stage("load"):
        original = load_model(request.model, lazy_weights=True)  # over 2 GiB: weights stay on disk
        check_not_qdq(original, request.model)
    with timer.stage("prepare"):
        prepared = prepare_model(original, request.model)
        check_finite_weights(prepared.model)
    return original, prepared


def load_and_prepare(request: QuantizeRequest, timer: StageTimer) -> Prepared:
    """Load the model, prepare it and equalize it when asked."""
    original, prepared = load_checked(request, timer)
    model, equalization, notes = prepared.model, None, list(prepared.notes)
    if request.int8_gates:
        model, gates = scale_gates_first(model)
        if gates:
            model = infer_types(model)  # the new gate tensors' types, as prepare left every other tensor's
            notes.append(f"--int8-gates: {gates} gated products scaled by a constant (hard-swish) reassociated "
                         f"to x * (gate / c)")
    if request.equalize:
        with timer.stage("equalize"):
            model, equalization = equalize_model(model)
    return Prepared(original, model, prepared.reference, tuple(notes), equalization)


def smooth(request: QuantizeRequest, prepared: Prepared, calib: SampleSource | None, timer: StageTimer,
           progress: ProgressFactory) -> Prepared:
    """`prepared` with SmoothQuant applied (onnxq.passes.smooth): a new model, so a new digest."""
    with timer.stage("smooth"):
        model, report = smoothed_model(request, prepared.model, calib, progress)
    return replace(prepared, model=model, smoothing=report)


def smoothed_model(request: QuantizeRequest, model: onnx.ModelProto, calib: SampleSource | None,
                   progress: ProgressFactory) -> tuple[onnx.ModelProto, dict]:
    """SmoothQuant `model` with --smooth-alpha: the smoothed model and the report section."""
    assert request.smooth_alpha is not None
    if calib is None:
        raise UsageError("--smooth-alpha measures activation channels on calibration data: give --calib")
    result = smooth_model(model, request.smooth_alpha, calib, batch_size=request.data.batch_size,
                          insert_mul=request.smooth_mul, progress=progress)
    return result.model, result.to_report()


def open_data(request: QuantizeRequest, specs: list[InputSpec]) -> Samples:
    """Calibration, evaluation and search sources, following the rules in the README.

    The automatic search chooses on samples held back from --calib, never on --eval-data, so the
    fidelity reported on --eval-data is measured on samples nothing was chosen by.
    """
    options, notes = request.data, []
    calib: SampleSource | None = None
    if options.calib is not None:
        calib = open_source(options.calib, specs, options.images)
        notes += filter(None, [calib.note("--calib")])
    elif options.allow_random:
        calib = random_source(specs, RANDOM_SAMPLES, shapes=options.input_shapes)
        notes.append("calibrated on RANDOM data (--allow-random): ranges and fidelity say little about real inputs")
    elif request.load_stats is None:
        raise UsageError("no calibration data: give --calib DATA (or --load-stats FILE, or --allow-random)")
    held: SampleSource | None = None
    search: SampleSource | None = None
    back: SampleSource | None = None
    fraction = holdout_fraction(request)
    if calib is not None and fraction is not None:
        calib, back = split_holdout(calib, fraction)
        search = back if searches(request) else None
    if options.eval_data is not None:
        held = open_source(options.eval_data, specs, options.images)
        notes += filter(None, [held.note("--eval-data")])
    elif search is not None:
        held = search
        notes.append("fidelity is measured on the held-back samples the automatic search chose by (give "
                     "--eval-data for samples nothing was chosen on)")
    else:
        held = back
    if held is None and calib is not None:
        if request.load_stats is None:
            notes.append("only one calibration sample: fidelity is measured on it, not on held-back data")
        held = calib
    if search is None and searches(request):
        search = held
    if calib is not None:  # after the holdout: --max-samples cuts what is calibrated on
        calib = calib.first(options.max_samples, f"{calib.description} (max {options.max_samples})")
    if calib is not None or held is not None:
        check_batch_size(options.batch_size, specs)
    return Samples(calib, held, search, tuple(notes))


def place_nodes(request: QuantizeRequest, settings: QuantSettings, prepared: Prepared, timer: StageTimer) -> Placed:
    """Place the prepared model's nodes: --exclude and the recipe's rules, then what runs in int8."""
    with timer.stage("place"):
        graph = import_graph(prepared.model)
        choices, recipe_notes = recipe_choices(request, graph)
        changes = placement_changes(choices)
        exclude = frozenset(request.exclude)
        options = PlacementOptions(per_channel=settings.per_channel, fold_activations=not settings.symmetric,
                                   exclude_nodes=exclude | changes.pop("exclude_nodes"), exclude_op_types=exclude,
                                   int8_gates=request.int8_gates, **changes)
        placement = place(graph, options)
    return Placed(graph, options, placement, choices, tuple(recipe_notes))


def keep_float(placed: Placed, nodes: dict[str, str]) -> Placed:
    """`placed` placed again with these nodes (label -> why) kept in float, on top of earlier ones."""
    options = replace(placed.options, keep_float={**placed.options.keep_float, **nodes})
    result = replace(placed, options=options, placement=place(placed.graph, options))
    require_something_to_quantize(result.placement, result.dynamic)
    return result


def widen(placed: Placed, nodes: frozenset[str]) -> Placed:
    """`placed` placed again with these nodes' activations in 16 bits, on top of earlier ones."""
    options = replace(placed.options, int16_nodes=placed.options.int16_nodes | nodes)
    return replace(placed, options=options, placement=place(placed.graph, options))


def calibration_statistics(request: QuantizeRequest, settings: QuantSettings, prepared: Prepared, placed: Placed,
                           calib: SampleSource | None, timer: StageTimer, progress: ProgressFactory) -> Statistics:
    """The statistics the plan needs (collected on `calib`, or loaded), saved when --save-stats asks."""
    with timer.stage("calibrate"):
        stats = _statistics(request, prepared.model, placed.placement.statistics_tensors, placed.graph, calib,
                            prepared.digest, progress,
                            histograms=needs_histograms(request, settings.method, placed.choices))
    if request.save_stats is not None:
        stats.save(request.save_stats)
    return stats


def needs_histograms(request: QuantizeRequest, method: str, choices: dict[str, NodeChoice]) -> bool:
    """Whether this run reads a histogram: not when every method in play is `global` and no statistics
    are saved (then calibration keeps extremes only). `max` reads only extremes too, but the report's
    fraction of values it clips is counted on the histogram."""
    methods = {choice.method for choice in choices.values() if choice.method}
    methods.update(search_methods(request, method) if searches(request) else (method,))
    return request.save_stats is not None or not methods <= CLIPS_NOTHING


def _rewriting_options(request: QuantizeRequest) -> str:
    """The options that change the model before calibration, which `onnxq calibrate` does not apply."""
    given = [flag for flag, on in (("--smooth-alpha", request.smooth_alpha is not None),
                                   ("--equalize", request.equalize), ("--int8-gates", request.int8_gates)) if on]
    if not given:
        return ""
    verb, them = ("change", "them") if len(given) > 1 else ("changes", "it")
    return (f": {', '.join(given)} {verb} the model before calibration and `onnxq calibrate` does not apply {them}; "
            "save statistics with `quantize --save-stats` and the same options")


def _statistics(request: QuantizeRequest, model: onnx.ModelProto, tensors: list[str], graph: Graph,
                calib: SampleSource | None, digest: str, progress: ProgressFactory, *,
                histograms: bool = True) -> Statistics:
    """Load statistics (checking they fit), or collect them for every tensor any setting may need."""
    if request.load_stats is not None:
        stats = Statistics.load(request.load_stats)
        if stats.model_digest and stats.model_digest != digest:
            raise DataError(f"{request.load_stats} was collected on a different model (digest {stats.model_digest}, "
                            f"this model {digest}){_rewriting_options(request)}")
        missing = [t for t in tensors if t not in stats.tensors]
        if missing:
            raise DataError(f"{request.load_stats} lacks statistics for {len(missing)} tensors (e.g. {missing[0]})")
        return stats
    assert calib is not None
    observe = tensors_to_observe(graph, request.int8_gates)
    stats = collect(model, observe, calib, request.data.ray, batch_size=request.data.batch_size,
                    memory_budget=request.data.memory_budget, progress=progress, aliases=value_aliases(graph, observe),
                    histograms=histograms)
    stats.model_digest = digest
    return stats


# ---------------------------------------------------------------- plans and models from the results


def plan_for(placed: Placed, stats: Statistics, settings: QuantSettings, digest: str,
             placement: Placement | None = None) -> QuantPlan:
    """The plan of `placement` (default: `placed`'s) on `placed`'s graph."""
    placement = placement or placed.placement
    return build_plan(placed.graph, placement, stats, settings, digest,
                      activation_overrides(placed.graph, placement, placed.choices))


def write_model(model: onnx.ModelProto, plan: QuantPlan, settings: QuantSettings,
                dynamic: frozenset[str]) -> onnx.ModelProto:
    """The QDQ model of `plan` on `model`, with the `dynamic` layers quantized at run time."""
    quantized = write_qdq(model, plan)
    if dynamic:
        quantized, _ = rewrite_dynamic(quantized, settings.weight_qtype, settings.per_channel, only=dynamic)
    return quantized


def trial_builder(prepared: Prepared, placed: Placed, stats: Statistics, settings: QuantSettings,
                  fallback: str) -> Callable[[frozenset[str]], onnx.ModelProto]:
    """Builds the QDQ model of `placed` with some nodes also in `fallback` precision ("float" or "int16"):
    the trials the speed guard, the accuracy target and the sensitivity ranking measure (nothing is kept)."""

    def build(fallback_nodes: frozenset[str]) -> onnx.ModelProto:
        if fallback == NodeStatus.INT16:
            trial = replace(placed.options, int16_nodes=placed.options.int16_nodes | fallback_nodes)
        else:
            trial = replace(placed.options, keep_float={**placed.options.keep_float,
                                                        **dict.fromkeys(fallback_nodes, "trial")})
        plan = plan_for(placed, stats, settings, prepared.digest, place(placed.graph, trial))
        return write_model(prepared.model, plan, settings, placed.dynamic)

    return build


# ---------------------------------------------------------------- nothing to quantize


class NothingToQuantize(ModelError):
    """Static placement found no layer to run in int8 (the automatic default may still go dynamic)."""


def require_something_to_quantize(placement: Placement, dynamic: frozenset[str] = frozenset()) -> None:
    """Writing an int8 model with no int8 node would only be slower and larger: say why instead."""
    if dynamic or any(node.status in ("int8", "int16") for node in placement.nodes):
        return
    reasons = Counter(node.reason for node in placement.nodes if node.op_type in HEAVY_OPS)
    detail = "; ".join(f"{count} Conv/MatMul/Gemm: {reason}" for reason, count in reasons.most_common(2))
    hint = "; --speed-guard off quantizes anyway" if any(r.startswith("speed guard") for r in reasons) else ""
    already = already_quantized(node.op_type for node in placement.nodes)
    why = f" ({detail}{hint})" if detail else ""
    if already:
        raise ModelError(f"nothing to quantize{already}{why}")
    raise NothingToQuantize("nothing to quantize: no node can run in int8"
                            + (why or " (the model has no Conv, MatMul or Gemm outside control-flow subgraphs)"))


def already_quantized(op_types: Iterable[str]) -> str:
    """': the model is already quantized (...)' when integer kernels are in it, else ''.

    Exported int8 models (onnxruntime's quantize_dynamic output, QOperator models) ship
    next to their fp32 originals; saying so beats "no Conv, MatMul or Gemm".
    """
    kernels = Counter(op for op in op_types if is_integer_kernel(op))
    if not kernels:
        return ""
    listed = ", ".join(f"{count} {op}" for op, count in kernels.most_common(3)) + (", ..." if len(kernels) > 3 else "")
    return f": the model is already quantized ({listed}); give onnxq its fp32 original"
