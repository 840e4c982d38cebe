"""`quantize` end to end: prepare -> place -> statistics -> plan -> rewrite -> check -> report.

Each stage's result can be saved and reused: statistics (--save-stats/--load-stats)
and the plan (--save-plan) are files; the report says what every stage did and how long it took.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from . import __version__, auto, emulation
from .calibrate import DEFAULT_MEMORY_BUDGET
from .checks import check_finite_weights, check_not_qdq, check_targets, unmatched_excludes
from .cpu import TargetCpu, default_weight_range, resolve_target
from .data import (
    DataArg,
    ImagePreprocessing,
    InputSpec,
    SampleSource,
    model_input_specs,
    open_calibration,
    open_source,
    random_source,
    split_holdout,
)
from .distributed import RayOptions, collect, evaluator_for, scorer_for
from .dynamic import WeightOnlyOptions, rewrite_dynamic
from .errors import DataError, ModelError, OnnxqError, UsageError, first_line
from .evaluate import CachedReference, Fidelity, compare_models, load_metric
from .fusion import FusionReport, check_fusion, is_integer_kernel
from .ir import Graph, all_graphs, concrete_shapes, constant_values, import_graph, is_constant, node_label
from .latency import measured_speedup
from .layer_errors import probe_errors, probe_model
from .model_io import (
    externalize,
    load_model,
    model_bytes,
    model_digest,
    needs_external_data,
    save_model,
    weights_on_disk,
)
from .ops import DYNAMIC_OPS, HEAVY_OPS, MATMUL_OPS
from .outputs import transaction
from .paths import DATA, MODEL, OUTPUT, PathArg, check_paths, quantize_paths
from .placement import NodeDecision, Placement, PlacementOptions, place, tensors_to_observe, value_aliases
from .plan import QuantPlan, QuantSettings, build_plan
from .prepare import PreparedModel, prepare_model
from .recipe import (
    NodeChoice,
    Recipe,
    Rule,
    Selector,
    activation_overrides,
    adaround_nodes,
    dynamic_nodes,
    layer_options,
    node_list,
    pinned_int8,
    placement_changes,
)
from .recovery import RecoveryOptions, RecoveryResult, affordable_layers, equalize_model, find_layers, recover
from .report import build_report, json_safe
from .rewrite_qdq import write_qdq
from .rewrite_qop import write_qoperator
from .sensitivity import SearchResult, SensitivityResult, Target, measure_sensitivity, search_fallbacks
from .session import ProgressFactory, no_progress
from .smooth import smooth_model, validate_alpha
from .speed_guard import (
    MODES,
    GuardResult,
    compare_latency,
    default_profile_path,
    guard_groups,
    guarded_nodes,
    machine_key,
    run_speed_guard,
    table_guard,
)
from .speed_table import shipped_table
from .statistics import Statistics
from .weight_only import run_weight_only, target_gates

RANDOM_SAMPLES = 16
CLIPS_NOTHING = frozenset({"global"})  # methods whose range holds every calibration value
TARGET_SAMPLES = 32  # held-back samples the target search measures on (default)
EVAL_SAMPLES = 32  # held-back samples the fidelity report measures on (default; None: all)
HOLDOUT = 0.1  # share of --calib held back for the fidelity report without the automatic search


@dataclass
class DataOptions:
    calib: DataArg | None = None  # a path, or feeds from code (onnxq.loaders)
    eval_data: DataArg | None = None
    allow_random: bool = False
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --allow-random: open dimensions
    batch_size: int = 1
    max_samples: int | None = None
    images: ImagePreprocessing | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    ray: RayOptions | None = None  # calibrate (and search) on Ray (onnxq.distributed)


@dataclass
class QuantizeRequest:
    model: Path
    output: Path | None = None  # where quantize writes the model (sensitivity and calibrate write none)
    settings: QuantSettings = field(default_factory=QuantSettings)
    data: DataOptions = field(default_factory=DataOptions)
    weight_range: str = "auto"  # "auto" picks by this CPU (see onnxq.cpu)
    load_stats: Path | None = None
    save_stats: Path | None = None
    save_plan: Path | None = None
    exclude: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()  # nodes whose name matches stay float (folded into the recipe's rules)
    speed_guard: str = "table"  # "table", "measure" (time on this machine) or "off" (see onnxq.speed_guard)
    speed_profile: Path | None = None  # --speed-guard measure: None is the per-machine cache
    target_cpu: str | None = None  # a CPU class (avx2, avx512-vnni, amx, arm64, host) or a file describing it
    output_format: str = "qdq"  # or "qoperator": integer operators (onnxq.rewrite_qop)
    target: Target | None = None  # accuracy target: fall back to float until it holds (onnxq.sensitivity)
    metric: Path | None = None  # a Python file with score(references, candidates, feeds) for Target.min_metric
    target_samples: int = TARGET_SAMPLES
    eval_samples: int | None = EVAL_SAMPLES  # the fidelity report's first N held-back samples; None: all
    target_data: DataArg | None = None  # samples the target is measured on (default: the held-back ones)
    max_fallbacks: int | None = None
    sensitivity_samples: int = 16
    mode: str = "static"  # or "dynamic" / "weight-only" (onnxq.dynamic; no calibration)
    weight_only: WeightOnlyOptions = field(default_factory=WeightOnlyOptions)
    min_cosine: float | None = None
    min_sqnr: float | None = None
    fallback: str = "float"  # what the accuracy target turns sensitive layers into: "float" or "int16"
    recipe: Recipe = field(default_factory=Recipe)  # per-node rules (its settings are applied by the caller)
    recipe_path: Path | None = None  # the file `recipe` was read from: no output may replace it
    search: bool = False  # the automatic search (onnxq.auto); the CLI's default, off with --fast
    auto_target: float = auto.TARGET_AGREEMENT  # task agreement the search aims for
    budget_s: float = auto.BUDGET_S  # seconds the search may spend on candidates
    auto_dynamic: bool = True  # the search may quantize MatMul/Gemm/LSTM dynamically (not with --mode given)
    method_given: bool = False  # the search keeps the method (--method was given)
    holdout: float | None = None  # share of --calib never calibrated on; None: holdout_fraction's default
    save_recipe: Path | None = None  # write the effective recipe: reruns give the same model without searching
    smooth_alpha: float | None = None  # SmoothQuant before calibration (onnxq.smooth); None: off
    smooth_mul: bool = False  # smoothing may insert a Mul where 1/s has nowhere to fold
    # accuracy recovery (onnxq.recovery)
    equalize: bool = False
    bias_correction: bool = False
    adaround_seconds: float | None = None  # AdaRound on every layer it can, with this budget; None: not on all
    adaround_rules_seconds: float = 60.0  # the budget for the layers recipe rules (adaround: true) name


@dataclass
class QuantizeResult:
    report: dict
    plan: QuantPlan
    fidelity: Fidelity | None

    @property
    def gates_passed(self) -> bool:
        return all(g["passed"] for g in self.report["gates"])


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def resolve_settings(request: QuantizeRequest, target: TargetCpu) -> tuple[QuantSettings, str]:
    """Fill in the CPU-dependent weight range; returns the settings and why that range."""
    settings = request.settings
    if request.weight_range == "auto":
        chosen = default_weight_range(target.features)
        which = f"target CPU class {target.cpu_class} ({target.source})"
        why = (f"{which}: x86 without VNNI, uint8 x int8 products can saturate, weights limited to 7 bits"
               if chosen == "reduced" else f"{which}: accumulates int8 products without saturation")
    else:
        chosen, why = request.weight_range, "set by --weight-range"
    settings = QuantSettings(**{**settings.__dict__, "weight_range": chosen})
    settings.validate()
    return settings, why


def check_speed_guard_options(request: QuantizeRequest, target: TargetCpu) -> None:
    """Refuse speed-guard options that would do nothing, or decide for the wrong CPU."""
    if request.speed_guard not in MODES:
        raise UsageError(f"unknown --speed-guard {request.speed_guard!r}; choose one of {', '.join(MODES)}")
    if request.speed_profile is not None and request.speed_guard != "measure":
        raise UsageError("--speed-profile holds timings of --speed-guard measure; add --speed-guard measure "
                         "(the default table decides without timing)")
    if request.speed_guard == "measure" and request.speed_profile is None and not target.is_host:
        raise UsageError(f"--speed-guard measure times this machine, which says nothing about {target.source}: "
                         "use the default --speed-guard table, or a --speed-profile made on the target")


def open_data(request: QuantizeRequest, specs) -> tuple[SampleSource | None, SampleSource | None,
                                                       SampleSource | None, list[str]]:
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
    return calib, held, search, notes


def holdout_fraction(request: QuantizeRequest) -> float | None:
    """The share of --calib held back and never calibrated on: --holdout (or a recipe's) when given; else a
    quarter for the automatic search to choose by, or a tenth for the fidelity report without --eval-data."""
    if (request.data.calib is None and not request.data.allow_random) or request.load_stats is not None:
        return None
    if request.holdout is not None:
        return request.holdout
    if searches(request):
        return auto.SEARCH_HOLDOUT
    return HOLDOUT if request.data.eval_data is None else None


def search_methods(request: QuantizeRequest, method: str) -> tuple[str, ...]:
    """The calibration methods the automatic search measures: the given one, then `percentile` unless
    --method (or a recipe's) fixed it."""
    return (method,) if request.method_given else tuple(dict.fromkeys((method, "percentile")))


def search_may_go_dynamic(request: QuantizeRequest) -> bool:
    """Whether the automatic search may quantize layers at run time: not when --mode was given, nor when
    the user asked for what only static mode makes (QOperator, statistics to load or save, a plan)."""
    static_only = request.output_format != "qdq" or request.load_stats or request.save_stats or request.save_plan
    return request.search and request.auto_dynamic and not static_only


def searches(request: QuantizeRequest) -> bool:
    """Whether `quantize` runs the automatic search (onnxq.auto): static mode, no accuracy target of the user's."""
    return request.search and request.mode == "static" and request.target is None


def check_batch_size(batch_size: int, specs: list[InputSpec]) -> None:
    """Stacking samples on axis 0 needs a dynamic first dimension: say so before any inference runs."""
    if batch_size <= 1 or any(spec.shape == () for spec in specs):  # scalar inputs: batches never stack
        return
    for spec in specs:
        if spec.shape and spec.shape[0] is not None:
            raise UsageError(f"--batch-size {batch_size} stacks samples on axis 0, but input {spec.name} has a "
                             f"fixed first dimension of {spec.shape[0]}; use --batch-size 1 for this model")


@dataclass
class Calibrated:
    """Everything up to the statistics: what the speed guard, the target search and the plan build on."""

    request: QuantizeRequest
    target: TargetCpu
    settings: QuantSettings
    weight_range_reason: str
    original: onnx.ModelProto
    prepared: onnx.ModelProto
    reference: onnx.ModelProto  # what fp32 outputs come from (onnxq.prepare.PreparedModel.reference)
    digest: str
    graph: Graph
    options: PlacementOptions
    placement: Placement
    stats: Statistics
    calib: SampleSource | None
    held: SampleSource | None
    notes: list[str]
    timer: StageTimer
    choices: dict[str, NodeChoice] = field(default_factory=dict)  # the recipe's, by node label
    smoothing: dict | None = None  # onnxq.smooth's report, when --smooth-alpha was given
    recovery: dict = field(default_factory=dict)  # what onnxq.recovery did, for the report
    cached_reference: CachedReference | None = None  # fp32 outputs the target search computed (reused)
    searched_dynamic: frozenset[str] = frozenset()  # layers the automatic search quantizes dynamically
    searched_repair: auto.Candidate | None = None  # the automatic search's bias correction / AdaRound choice
    search_samples: SampleSource | None = None  # what the automatic search measures candidates on

    def keep_float(self, nodes: dict[str, str]) -> None:
        """Place again with these nodes (label -> why) kept in float, on top of earlier ones."""
        self.options = replace(self.options, keep_float={**self.options.keep_float, **nodes})
        self.placement = place(self.graph, self.options)
        _require_something_to_quantize(self.placement, self.dynamic)

    def widen(self, nodes: frozenset[str]) -> None:
        """Place again with these nodes' activations in 16 bits, on top of earlier ones."""
        self.options = replace(self.options, int16_nodes=self.options.int16_nodes | nodes)
        self.placement = place(self.graph, self.options)

    @property
    def dynamic(self) -> frozenset[str]:
        """Layers quantized dynamically beside the static ones (placed float, rewritten after): the
        recipe's and the automatic search's."""
        return dynamic_nodes(self.choices) | self.searched_dynamic

    def build(self, fallback_nodes: frozenset[str]) -> onnx.ModelProto:
        """The QDQ model with `fallback_nodes` also in the request's fallback precision (a trial; nothing is kept)."""
        if self.request.fallback == "int16":
            trial = replace(self.options, int16_nodes=self.options.int16_nodes | fallback_nodes)
        else:
            trial = replace(self.options, keep_float={**self.options.keep_float,
                                                      **dict.fromkeys(fallback_nodes, "trial")})
        return self.write(self.plan(place(self.graph, trial)))

    def write(self, plan: QuantPlan, dynamic: frozenset[str] | None = None,
              prepared: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The QDQ model of `plan` (on `prepared`, a recovered copy, or this prepared model), with the
        dynamic layers (the recipe's, or `dynamic`) rewritten."""
        model = write_qdq(self.prepared if prepared is None else prepared, plan)
        dynamic = self.dynamic if dynamic is None else dynamic
        if dynamic:
            model, _ = rewrite_dynamic(model, self.settings.weight_qtype, self.settings.per_channel, only=dynamic)
        return model

    def plan(self, placement: Placement | None = None, settings: QuantSettings | None = None) -> QuantPlan:
        placement = placement or self.placement
        return build_plan(self.graph, placement, self.stats, settings or self.settings, self.digest,
                          activation_overrides(self.graph, placement, self.choices))

    def recovery_options(self) -> RecoveryOptions:
        """Bias correction and AdaRound as the request, the recipe's adaround rules and the search ask."""
        request, searched = self.request, self.searched_repair
        rounded = adaround_nodes(self.choices) | (searched.adaround if searched is not None else frozenset())
        seconds = request.adaround_seconds
        if seconds is None and rounded:
            seconds = auto.ADAROUND_SECONDS if searched is not None and searched.adaround else \
                request.adaround_rules_seconds
        return RecoveryOptions(bias_correction=request.bias_correction or bool(searched and searched.bias_correction),
                               adaround_seconds=seconds, adaround_layers=rounded or None)

    def int8_layers(self) -> dict[str, str]:
        """Conv/MatMul/Gemm nodes currently int8 that no recipe rule pins: label -> op type."""
        pinned = pinned_int8(self.choices)
        return {d.name: d.op_type for d in self.placement.nodes
                if d.status == "int8" and d.op_type in HEAVY_OPS and d.name not in pinned}


def calibrated(request: QuantizeRequest, progress: ProgressFactory = no_progress, *,
               writes_model: bool = True) -> Calibrated:
    request = with_exclude_regex(request)
    timer = StageTimer()
    check_paths(quantize_paths(request, writes_model))
    target = resolve_target(request.target_cpu)
    check_speed_guard_options(request, target)
    settings, weight_range_reason = resolve_settings(request, target)
    if request.smooth_alpha is not None:
        validate_alpha(request.smooth_alpha)
        if request.load_stats is not None:
            raise UsageError("--smooth-alpha changes the model, so saved statistics do not fit it: "
                             "give --calib instead of --load-stats")
    with timer.stage("load"):
        original = load_model(request.model, lazy_weights=True)  # over 2 GiB: weights stay on disk
        check_not_qdq(original, request.model)
    with timer.stage("prepare"):
        prepared = prepare_model(original, request.model)
        check_finite_weights(prepared.model)
    recovery: dict = {}
    if request.equalize:
        with timer.stage("equalize"):
            prepared.model, recovery["equalization"] = equalize_model(prepared.model)
    specs = model_input_specs(original)
    calib, held, search_samples, notes = open_data(request, specs)
    smoothing = None
    if request.smooth_alpha is not None:
        with timer.stage("smooth"):
            smoothing = _smooth(request, prepared, calib, progress)
    digest = model_digest(prepared.model)
    with timer.stage("place"):
        graph = import_graph(prepared.model)
        choices, recipe_notes = _recipe_choices(request, graph)
        changes = placement_changes(choices)
        exclude = frozenset(request.exclude)
        options = PlacementOptions(per_channel=settings.per_channel, fold_activations=not settings.symmetric,
                                   exclude_nodes=exclude | changes.pop("exclude_nodes"), exclude_op_types=exclude,
                                   **changes)
        placement = place(graph, options)
    _require_something_to_quantize(placement, dynamic_nodes(choices))
    with timer.stage("calibrate"):
        stats = _statistics(request, prepared.model, placement.statistics_tensors, graph, calib, digest, progress,
                            histograms=needs_histograms(request, settings.method, choices))
    if request.save_stats is not None:
        stats.save(request.save_stats)
    return Calibrated(request, target, settings, weight_range_reason, original, prepared.model, prepared.reference,
                      digest, graph, options, placement, stats, calib, held, prepared.notes + recipe_notes + notes,
                      timer, choices, smoothing, recovery, search_samples=search_samples)


def with_exclude_regex(request: QuantizeRequest) -> QuantizeRequest:
    """--exclude-regex R as recipe rules after the user's (precision: float for every node whose name R matches),
    so placement, the saved recipe, the report and the notes on rules that select nothing all see them."""
    rules = []
    for pattern in request.exclude_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--exclude-regex {pattern!r} is not a regular expression: {exc}") from None
        rules.append(Rule(Selector(name_regex=pattern), precision="float", reason=f"--exclude-regex {pattern}"))
    if not rules:
        return request
    return replace(request, recipe=Recipe(request.recipe.settings, [*request.recipe.rules, *rules]), exclude_regex=())


def _recipe_choices(request: QuantizeRequest, graph: Graph, *, with_exclude: bool = False
                    ) -> tuple[dict[str, NodeChoice], list[str]]:
    """The recipe's choice per node, and notes on rules that select nothing or cannot apply.

    `with_exclude`: --exclude as float rules (static mode applies --exclude in the placement instead).
    """
    nodes = node_list(graph)
    rules = request.recipe.rules + (_exclude_rules(request, graph) if with_exclude else [])
    choices = Recipe(rules=rules).choices(nodes)
    notes = [f"recipe rule {n} ({request.recipe.rules[n - 1].match.to_dict()}) selects no node"
             for n in request.recipe.unmatched_rules(nodes)] + unmatched_excludes(request.exclude, nodes)
    if request.output_format == "qoperator" and any(c.precision == "int16" for c in choices.values()):
        raise UsageError("16-bit activations (recipe precision: int16) have no integer operators: use --format qdq")
    if request.mode == "static" and any(c.weights == "int4" for c in choices.values()):
        raise UsageError("int4 weights (recipe weights: int4) need --mode weight-only")
    ops = dict(nodes)
    wrong = [label for label, c in choices.items() if c.precision == "dynamic" and ops.get(label) not in DYNAMIC_OPS]
    if wrong or (request.mode == "weight-only" and any(c.precision == "dynamic" for c in choices.values())):
        what = f"{ops.get(wrong[0])} {wrong[0]}" if wrong else "--mode weight-only"
        raise UsageError(f"precision: dynamic applies to MatMul, Gemm and LSTM layers in static or dynamic mode, "
                         f"not to {what}")
    return choices, notes


def _exclude_rules(request: QuantizeRequest, graph: Graph) -> list[Rule]:
    """--exclude X as recipe rules: X selects an op type if the model has one by that name, else a node."""
    op_types = {op for _, op in node_list(graph)}
    return [Rule(Selector(op_type=(x,)) if x in op_types else Selector(name=x), precision="float",
                 reason="excluded by the user") for x in request.exclude]


def effective_recipe(request: QuantizeRequest, settings: QuantSettings, graph: Graph,
                     automatic: dict[str, tuple[str, str]], recovery: RecoveryOptions | None = None,
                     searched_adaround: frozenset[str] = frozenset()) -> Recipe:
    """The recipe that rebuilds this model without timing or searching: the settings as used, the
    user's rules, --exclude, and the speed guard's, the target search's and the automatic search's
    choices (`automatic`: label -> (precision, why); `recovery` as applied; `searched_adaround`: the
    layers the automatic search gave AdaRound) as rules."""
    values = {"mode": request.mode, "per_channel": settings.per_channel, "weight_range": settings.weight_range,
              "auto": False}  # the recipe holds the search's choice: rebuilding it searches nothing
    if holdout_fraction(request) is not None:  # a rebuild calibrates on the same samples
        values["holdout"] = holdout_fraction(request)
    if request.smooth_alpha is not None:
        values.update(smooth_alpha=request.smooth_alpha, smooth_mul=request.smooth_mul)
    if request.mode == "static":
        recovery = recovery or RecoveryOptions(request.bias_correction, request.adaround_seconds)
        values.update(method=settings.method, percentile=settings.percentile, symmetric=settings.symmetric,
                      speed_guard="off", format=request.output_format, equalize=request.equalize,
                      bias_correction=recovery.bias_correction, adaround=request.adaround_seconds is not None)
        if recovery.adaround_seconds is not None:
            values["adaround_seconds"] = recovery.adaround_seconds
    elif request.mode == "weight-only":
        values.update(weight_bits=request.weight_only.bits, block_size=request.weight_only.block_size,
                      weight_zero_points=not request.weight_only.symmetric, weight_method=request.weight_only.method)
    rules = request.recipe.rules + _exclude_rules(request, graph)
    rules += [Rule(Selector(name=label), precision=precision, reason=why)
              for label, (precision, why) in sorted(automatic.items())]
    rules += [Rule(Selector(name=label), adaround=True, reason="automatic search: AdaRound where it pays")
              for label in sorted(searched_adaround)]
    return Recipe({**request.recipe.settings, **values}, rules)


def _smooth(request: QuantizeRequest, prepared: PreparedModel, calib: SampleSource | None,
            progress: ProgressFactory) -> dict:
    """SmoothQuant the prepared model in place (onnxq.smooth); returns the report section."""
    assert request.smooth_alpha is not None
    if calib is None:
        raise UsageError("--smooth-alpha measures activation channels on calibration data: give --calib")
    result = smooth_model(prepared.model, request.smooth_alpha, calib, batch_size=request.data.batch_size,
                          insert_mul=request.smooth_mul, progress=progress)
    prepared.model = result.model
    return result.to_report()


def quantize(request: QuantizeRequest, progress: ProgressFactory = no_progress) -> QuantizeResult:
    """Quantize `request.model`; its outputs (model, statistics, plan, recipe) are all written at the end, or none."""
    if request.output is None:
        raise UsageError("quantize needs an output path for the int8 model (-o)")
    check_paths(quantize_paths(request))
    target = request.target or Target()
    check_targets(request.min_cosine, request.min_sqnr, target.min_cosine, target.min_sqnr_db, target.min_metric)
    request = with_exclude_regex(request)
    with transaction():
        if request.mode != "static":
            return quantize_without_calibration(request, progress)
        return quantize_static(request, progress)


def quantize_static(request: QuantizeRequest, progress: ProgressFactory = no_progress) -> QuantizeResult:
    if request.fallback == "int8":
        raise UsageError("--fallback int8 (int8 weights) is for --mode weight-only --weight-bits 4")
    if (request.target is not None and request.target_data is None and request.data.eval_data is None
            and request.data.calib is None):
        raise UsageError("an accuracy target needs samples to measure it on: give --eval-data or --calib")
    if (request.metric is None) != (request.target is None or request.target.min_metric is None):
        raise UsageError("--metric SCRIPT and --target-metric VALUE go together")
    if request.metric is not None:
        load_metric(request.metric)  # a broken script fails now, not after calibration
    if _recovery_needs_data(request) and request.data.calib is None and not request.data.allow_random:
        raise UsageError("--bias-correction and --adaround need calibration samples: give --calib (also with "
                         "--load-stats)")
    try:
        c = calibrated(request, progress)
    except NothingToQuantize as exc:
        if not search_may_go_dynamic(request):
            raise
        return _dynamic_instead(request, exc.message, progress)
    guard = _apply_speed_guard(c, progress)
    searched = _apply_search(c) if searches(request) else None
    if searched is not None and searched.chosen.candidate.mode == "dynamic":
        return _searched_dynamic(request, searched, c.timer, progress)
    target_report = _apply_accuracy_target(c, progress) if request.target is not None else None
    _apply_recovery(c, progress)
    timer = c.timer
    with timer.stage("plan"):
        plan = c.plan()
    if request.save_plan is not None:
        plan.save(request.save_plan)
    if request.save_recipe is not None:
        automatic = {label: ("float", why) for label, why in c.options.keep_float.items() if label not in c.dynamic}
        automatic.update({label: ("dynamic", "automatic search") for label in c.searched_dynamic})
        automatic.update({label: ("int16", "accuracy target") for label in c.options.int16_nodes
                          if label not in c.choices})
        rounded = c.searched_repair.adaround if c.searched_repair is not None else frozenset()
        effective_recipe(request, c.settings, c.graph, automatic, c.recovery_options(), rounded
                         ).save(request.save_recipe)
    with timer.stage("rewrite"):
        quantized = c.write(plan)
        if request.output_format == "qoperator":
            quantized = write_qoperator(quantized)
        plan.nodes = [NodeDecision(d.name, d.op_type, "dynamic", "int8, activations quantized at run time (recipe)")
                      if d.name in c.dynamic else d for d in plan.nodes]
    with timer.stage("check"):
        fusion = check_written_model(quantized, {d.name: d.status for d in plan.nodes})
    fidelity = None
    if c.held is not None:
        with timer.stage("evaluate"):
            fidelity = compare_models(c.reference, quantized, c.held, batch_size=request.data.batch_size,
                                      progress=progress, limit=request.eval_samples, cached=c.cached_reference)
    measured = None
    if searched is not None:
        with timer.stage("measure speed"):
            measured = _measured_speed(c, quantized)
    with timer.stage("write"):
        save_model(quantized, request.output)
    report = build_report(
        request=request, version=__version__, original=c.original, quantized_bytes=model_bytes(quantized),
        plan=plan, stats=c.stats, calib=c.calib, held=c.held, fidelity=fidelity, notes=c.notes,
        weight_range_reason=c.weight_range_reason, timings=timer.seconds,
        speed_guard=guard.to_report() if guard is not None else {"enabled": False}, fusion=fusion.to_dict(),
        recovery=c.recovery or None, target=c.target.to_dict(),
    )
    if c.smoothing is not None:
        report["smoothing"] = json_safe(c.smoothing)
    if searched is not None:
        report["auto"] = json_safe(searched.to_report())
        report["auto"]["measured"] = measured
    if target_report is not None:
        report["accuracy_target"] = json_safe(target_report)
        report["gates"] += target_gates(target_report)
    return QuantizeResult(report, plan, fidelity)


def _apply_search(c: Calibrated) -> auto.SearchOutcome | None:
    """The automatic default (onnxq.auto): search the candidates, then apply the chosen one to `c`."""
    request = c.request
    samples = c.search_samples
    if samples is None or not len(samples):
        c.notes.append("automatic search skipped: no held-back samples to measure candidates on (give --calib "
                       "or --eval-data)")
        return None
    with c.timer.stage("search"):
        reference = CachedReference(c.reference, samples, request.target_samples, level=emulation.LEVEL)
        c.cached_reference = reference
        outcome = auto.search(_search_space(c, reference), reference, target=request.auto_target,
                              budget_s=request.budget_s, scorer=scorer_for(request.data.ray, reference))
    chosen = outcome.chosen.candidate
    c.notes.extend(outcome.notes)
    if chosen.mode == "static":
        c.settings = replace(c.settings, method=chosen.method)
        c.searched_dynamic = chosen.dynamic
        c.searched_repair = chosen if chosen.bias_correction or chosen.adaround else None
        moved = {label: f"automatic search: kept float (own error rank {outcome.ranking.index(label) + 1})"
                 for label in chosen.keep_float}
        moved.update(dict.fromkeys(chosen.dynamic, "automatic search: int8 with activations quantized at run time"))
        if moved:
            c.keep_float(moved)
    return outcome


def _search_space(c: Calibrated, reference: CachedReference) -> auto.SearchSpace:
    request = c.request
    feed = reference.feeds[0] if reference.feeds else None
    shapes = concrete_shapes(c.prepared, {k: v.shape for k, v in feed.items()} if feed else None)
    table = shipped_table()
    speed_model = auto.SpeedModel.of(c.graph, shapes, table.row_class_for(c.target.cpu_class)[0], table)
    base_status = {d.name: ("int8" if d.status == "int8" else "float") for d in c.placement.nodes}
    pinned = pinned_int8(c.choices)
    user_float = {label for label, choice in c.choices.items() if choice.precision in ("float", "int16")}
    eligible = frozenset(label for sub in all_graphs(c.graph) for node in sub.nodes
                         if (label := node_label(node)) not in pinned | user_float and _runs_dynamically(node))
    users_recovery = c.recovery_options()

    def build(candidate: auto.Candidate) -> onnx.ModelProto:
        return emulation.emulated(written(candidate))

    def written(candidate: auto.Candidate) -> onnx.ModelProto:
        if candidate.mode == "dynamic":
            return rewrite_dynamic(c.prepared, c.settings.weight_qtype, c.settings.per_channel,
                                   layer_options({k: v for k, v in c.choices.items() if v.precision != "dynamic"}))[0]
        settings = replace(c.settings, method=candidate.method)
        moved = dict.fromkeys(candidate.keep_float | candidate.dynamic, "automatic search")
        options = replace(c.options, keep_float={**c.options.keep_float, **moved})
        placement = place(c.graph, options)
        recovery = _with_repair(users_recovery, candidate)
        if not recovery.needs_data:
            return c.write(c.plan(placement, settings), c.dynamic | candidate.dynamic)
        recovered = _recovered(c, placement, settings, recovery).model
        graph = import_graph(recovered)
        placement = place(graph, options)
        plan = build_plan(graph, placement, c.stats, settings, c.digest, activation_overrides(graph, placement,
                                                                                              c.choices))
        return c.write(plan, c.dynamic | candidate.dynamic, prepared=recovered)

    def speed(candidate: auto.Candidate) -> float:
        if candidate.mode == "dynamic":
            return speed_model.speedup({label: ("dynamic" if label in eligible else "float")
                                        for label in {*base_status, *eligible}})
        status = {**base_status, **dict.fromkeys(candidate.keep_float, "float"),
                  **dict.fromkeys(candidate.dynamic | c.dynamic, "dynamic")}
        return speed_model.speedup(status)

    def probe() -> auto.Probe:
        return probe_model(c.prepared, c.plan(), set(c.int8_layers()))

    def rank_layers() -> list[str]:
        return list(probe_errors(*probe(), reference.feeds))

    def adaround_layers(ranking: list[str]) -> frozenset[str]:
        layers = {layer.label: layer for layer in find_layers(c.graph, c.placement)[0]}
        return frozenset(affordable_layers([layers[label] for label in ranking if label in layers],
                                           auto.ADAROUND_LAYERS, auto.ADAROUND_SECONDS))

    methods = search_methods(request, c.settings.method)
    run_time = eligible if search_may_go_dynamic(request) else frozenset()
    return auto.SearchSpace(build, c.int8_layers(), run_time, methods, speed, rank_layers, adaround_layers,
                            can_repair=c.calib is not None and not users_recovery.needs_data, probe=probe)


def _with_repair(options: RecoveryOptions, candidate: auto.Candidate) -> RecoveryOptions:
    """The user's recovery options plus the candidate's bias correction and AdaRound layers."""
    if not (candidate.bias_correction or candidate.adaround):
        return options
    layers = (options.adaround_layers or frozenset()) | candidate.adaround
    return RecoveryOptions(bias_correction=options.bias_correction or candidate.bias_correction,
                           adaround_seconds=options.adaround_seconds or (auto.ADAROUND_SECONDS if layers else None),
                           adaround_layers=layers or None)


def _runs_dynamically(node: gs.Node) -> bool:
    """A MatMul/Gemm with a constant 2-D weight, or an LSTM: what dynamic quantization rewrites."""
    if node.op == "LSTM":
        return True
    return node.op in MATMUL_OPS and len(node.inputs) > 1 and is_constant(node.inputs[1]) \
        and constant_values(node.inputs[1]).ndim == 2


def _dynamic_instead(request: QuantizeRequest, why: str, progress: ProgressFactory) -> QuantizeResult:
    """Static mode has nothing to quantize (layers inside If branches, say): the automatic default then
    tries dynamic mode, which quantizes MatMul/Gemm/LSTM also in subgraphs."""
    try:
        result = quantize_without_calibration(replace(request, mode="dynamic"), progress)
    except ModelError:
        raise NothingToQuantize(why) from None
    detail = why.removeprefix("nothing to quantize").lstrip(": ")
    result.report["notes"].append(f"automatic: static mode has nothing to quantize ({detail}); dynamic mode "
                                  "quantizes the model instead")
    result.report["auto"] = {"chosen": "dynamic", "why": "static mode has nothing to quantize", "candidates": [],
                             "target_agreement": request.auto_target}
    return result


def _searched_dynamic(request: QuantizeRequest, outcome: auto.SearchOutcome, timer: StageTimer,
                      progress: ProgressFactory) -> QuantizeResult:
    """The search chose dynamic mode for the whole model: quantize it that way, reporting the search
    (and the stages that led to it in the times)."""
    result = quantize_without_calibration(replace(request, mode="dynamic"), progress)
    result.report["auto"] = json_safe(outcome.to_report())
    result.report["notes"] += outcome.notes
    result.report["timings_s"] = {**{f"{k} (static)" if k in result.report["timings_s"] else k: v
                                     for k, v in timer.seconds.items()}, **result.report["timings_s"]}
    return result


def _recovery_needs_data(request: QuantizeRequest) -> bool:
    return request.bias_correction or request.adaround_seconds is not None or any(
        rule.adaround for rule in request.recipe.rules)


def _apply_recovery(c: Calibrated, progress: ProgressFactory) -> None:
    """AdaRound / bias correction on the final placement (after the speed guard and the accuracy target)."""
    options = c.recovery_options()
    if not options.needs_data:
        return
    with c.timer.stage("recovery"):
        result = _recovered(c, c.placement, c.settings, options, progress)
        c.prepared = result.model
        c.graph = import_graph(result.model)
        c.placement = place(c.graph, c.options)
    c.recovery.update(result.report)


def _recovered(c: Calibrated, placement: Placement, settings: QuantSettings, options: RecoveryOptions,
               progress: ProgressFactory = no_progress) -> RecoveryResult:
    """The prepared model with bias correction / AdaRound for `placement` (layer inputs read from its QDQ model)."""
    plan = build_plan(c.graph, placement, c.stats, settings, c.digest,
                      activation_overrides(c.graph, placement, c.choices))
    return recover(c.prepared, write_qdq(c.prepared, plan), placement, plan, c.calib, options,
                   batch_size=c.request.data.batch_size, memory_budget=c.request.data.memory_budget, progress=progress)


def _apply_speed_guard(c: Calibrated, progress: ProgressFactory) -> GuardResult | None:
    request = c.request
    if request.speed_guard == "off":
        return None
    feed = _timing_feed(c.held, c.calib)
    nodes = guarded_nodes(c.graph, c.placement, pinned_int8(c.choices))
    with c.timer.stage("speed guard"):
        if request.speed_guard == "table":
            shapes = concrete_shapes(c.prepared, {k: v.shape for k, v in feed.items()} if feed else None)
            guard = table_guard(nodes, shapes, c.target)
        elif feed is None:
            c.notes.append("speed guard skipped: no sample to time the model with (give --calib or --eval-data)")
            return None
        else:
            key = json.dumps([c.digest, c.settings.symmetric, c.settings.per_channel, c.settings.weight_range,
                              sorted(request.exclude), request.recipe.to_dict()["rules"]])
            model_key = hashlib.sha256(key.encode()).hexdigest()[:16]
            path = request.speed_profile or default_profile_path(machine_key())
            guard = run_speed_guard(guard_groups(nodes), c.build, feed, path, model_key, progress,
                                    pinned=request.speed_profile is not None)
    c.notes.extend(guard.notes)
    if guard.keep_float:
        c.keep_float(guard.keep_float)
    return guard


def _apply_accuracy_target(c: Calibrated, progress: ProgressFactory) -> dict:
    """Keep the most sensitive int8 layers in float until the target holds (see onnxq.sensitivity)."""
    request = c.request
    target = request.target
    samples = (open_source(request.target_data, model_input_specs(c.original), request.data.images)
               if request.target_data is not None else c.held)
    assert target is not None and samples is not None
    with c.timer.stage("accuracy target"):
        reference = CachedReference(c.reference, samples, request.target_samples,
                                    load_metric(request.metric) if request.metric is not None else None)
        c.cached_reference = reference
        all_int8 = c.build(frozenset())
        start = reference.fidelity_of(all_int8)
        result = SearchResult([], True, [])
        ranking: list[str] = []
        if not target.met_by(start):
            candidates = c.int8_layers()
            evaluator = evaluator_for(request.data.ray, c.build, reference)
            ranking = measure_sensitivity(c.build, candidates, reference, progress, all_but=False,
                                          evaluator=evaluator).ranked_nodes()
            limit = request.max_fallbacks if request.max_fallbacks is not None else len(ranking)
            result = search_fallbacks(c.build, ranking, target, reference, limit, progress, evaluator=evaluator)
        if result.float_nodes and request.fallback == "int16":
            c.widen(frozenset(result.float_nodes))
        elif result.float_nodes:
            c.keep_float({node: f"accuracy target: kept float (sensitivity rank {ranking.index(node) + 1})"
                          for node in result.float_nodes})
        chosen = c.build(frozenset()) if result.float_nodes else all_int8
        final = reference.fidelity_of(chosen)
    feed = _timing_feed(c.held, c.calib)
    speed = None
    if result.float_nodes and feed is not None:
        before_ms, after_ms = compare_latency(all_int8, chosen, feed)
        speed = {"before_ms": before_ms, "after_ms": after_ms, "cost": round(after_ms / before_ms, 3)}
    return {"target": {"min_sqnr_db": target.min_sqnr_db, "min_cosine": target.min_cosine, "data": reference.source,
                       "min_metric": target.min_metric,
                       "metric_script": str(request.metric) if request.metric else None},
            "met": target.met_by(final), "samples": len(reference.feeds),
            "start": {"min_sqnr_db": start.min_sqnr, "min_cosine": start.min_cosine, "metric": start.metric},
            "final": {"min_sqnr_db": final.min_sqnr, "min_cosine": final.min_cosine, "metric": final.metric},
            "fallback": request.fallback, "float_nodes": result.float_nodes, "steps": result.steps, "speed": speed}


def sensitivity(request: QuantizeRequest, progress: ProgressFactory = no_progress) -> SensitivityResult:
    """Rank the int8 layers of `request.model` by measured sensitivity (no model is written)."""
    if request.data.eval_data is None and request.data.calib is None:
        raise UsageError("sensitivity needs samples to measure on: give --eval-data or --calib")
    c = calibrated(request, progress, writes_model=False)
    reference = CachedReference(c.reference, c.held, request.sensitivity_samples)
    return measure_sensitivity(c.build, c.int8_layers(), reference, progress)


def quantize_without_calibration(request: QuantizeRequest, progress: ProgressFactory = no_progress
                                 ) -> QuantizeResult:
    """--mode dynamic or weight-only: weights are quantized ahead, activations (if at all) at run time."""
    if request.mode not in ("dynamic", "weight-only"):
        raise UsageError(f"unknown mode {request.mode!r}; choose static, dynamic or weight-only")
    if request.output_format != "qdq" or request.load_stats or request.save_stats or request.save_plan:
        raise UsageError(f"--mode {request.mode} takes no --format qoperator, --load-stats, --save-stats or "
                         "--save-plan (it needs no calibration)")
    if request.smooth_alpha is not None:
        validate_alpha(request.smooth_alpha)
    if request.equalize or _recovery_needs_data(request):
        raise UsageError("--equalize, --bias-correction and --adaround (also as recipe rules) apply to --mode static "
                         "only")
    if request.target is not None and request.mode == "dynamic":
        raise UsageError("an accuracy target (--target-sqnr/--target-cosine/--target-metric) applies to --mode static "
                         "and weight-only")
    timer = StageTimer()
    check_paths(quantize_paths(request))
    target = resolve_target(request.target_cpu)
    settings, weight_range_reason = resolve_settings(request, target)
    if request.mode == "weight-only":  # float compute: no int8 products, nothing can saturate
        settings = QuantSettings(**{**settings.__dict__, "weight_range": "full"})
        weight_range_reason = "weight-only: float compute, full 8-bit weights"
    request.weight_only.validate()
    with timer.stage("load"):
        original = load_model(request.model, lazy_weights=True)  # over 2 GiB: weights stay on disk
        check_not_qdq(original, request.model)
    with timer.stage("prepare"):
        prepared = prepare_model(original, request.model)
        check_finite_weights(prepared.model)
    held_path = request.data.eval_data or request.data.calib
    held = open_source(held_path, model_input_specs(original), request.data.images) if held_path else None
    held_notes = [held.note("--eval-data" if request.data.eval_data else "--calib")] if held is not None else []
    smoothing = None
    if request.smooth_alpha is not None:  # fewer activation outliers help run-time quantization too
        calib = open_source(request.data.calib, model_input_specs(original),
                            request.data.images) if request.data.calib else None
        with timer.stage("smooth"):
            smoothing = _smooth(request, prepared, calib, progress)
    graph = import_graph(externalize(prepared.model, None, "weights"))  # names and op types: no weights held
    choices, recipe_notes = _recipe_choices(request, graph, with_exclude=True)
    weight_only = None
    with timer.stage("rewrite"):
        if request.mode == "dynamic":
            quantized, decisions = rewrite_dynamic(prepared.model, settings.weight_qtype, settings.per_channel,
                                                   layer_options(choices))
        else:  # onnxq.weight_only: int8 per channel, or int4 by --weight-method (+ embeddings, target search)
            weight_only = run_weight_only(request, prepared.model, prepared.reference, settings.weight_qtype,
                                          choices, held, progress)
            quantized, decisions = weight_only.model, weight_only.decisions
        notes, reference = list(prepared.notes), prepared.reference if held is not None else None
        del prepared  # the fp32 weights go unless the comparison needs them (a model over 2 GiB: half the memory)
        gc.collect()  # the rewrite's graph (reference cycles) holds arrays as large as the model
    if not any(d.status in ("int8", "int4") for d in decisions):
        reasons = Counter(f"{d.op_type}: {d.reason}" for d in decisions)
        detail = "; ".join(reason for reason, _ in reasons.most_common(2)) or "no Conv, MatMul or Gemm"
        raise ModelError(f"nothing to quantize in --mode {request.mode}"
                         f"{_already_quantized(n.op for n in graph.nodes)} ({detail})")
    with timer.stage("check"):  # only float nodes have a precision to keep here: int ones are rewritten ops
        fusion = check_written_model(quantized, {d.name: d.status for d in decisions if d.status == "float"})
    fidelity = None
    if held is not None:
        with timer.stage("evaluate"):
            fidelity = compare_models(reference, quantized, held, batch_size=request.data.batch_size,
                                      progress=progress, limit=request.eval_samples)
    with timer.stage("write"):
        save_model(quantized, request.output)
    if request.save_recipe is not None:
        recipe = effective_recipe(request, settings, graph, {})
        if weight_only is not None:
            recipe.rules += weight_only.rules
        recipe.save(request.save_recipe)
    plan = QuantPlan(settings=settings, nodes=decisions)
    fusion_view = fusion.to_dict()
    if request.mode == "weight-only":  # int8 weights feeding float ops are this mode's intended form
        fusion_view["expected_dequantized_weights"] = fusion_view.pop("dequantized_weights")
        fusion_view["avoidable"] = len(fusion.unfused_pairs)
    report = build_report(
        request=request, version=__version__, original=original, quantized_bytes=model_bytes(quantized), plan=plan,
        stats=Statistics(), calib=None, held=held, fidelity=fidelity,
        notes=notes + recipe_notes + [n for n in held_notes if n],
        weight_range_reason=weight_range_reason, timings=timer.seconds, speed_guard={"enabled": False},
        fusion=fusion_view, target=target.to_dict(),
    )
    if smoothing is not None:
        report["smoothing"] = json_safe(smoothing)
    if weight_only is not None:
        report["weight_only"] = json_safe(weight_only.report)
        if weight_only.target is not None:
            report["accuracy_target"] = json_safe(weight_only.target)
            report["gates"] += target_gates(weight_only.target)
    return QuantizeResult(report, plan, fidelity)


def _require_something_to_quantize(placement: Placement, dynamic: frozenset[str] = frozenset()) -> None:
    """Writing an int8 model with no int8 node would only be slower and larger: say why instead."""
    if dynamic or any(node.status in ("int8", "int16") for node in placement.nodes):
        return
    reasons = Counter(node.reason for node in placement.nodes if node.op_type in HEAVY_OPS)
    detail = "; ".join(f"{count} Conv/MatMul/Gemm: {reason}" for reason, count in reasons.most_common(2))
    hint = "; --speed-guard off quantizes anyway" if any(r.startswith("speed guard") for r in reasons) else ""
    already = _already_quantized(node.op_type for node in placement.nodes)
    why = f" ({detail}{hint})" if detail else ""
    if already:
        raise ModelError(f"nothing to quantize{already}{why}")
    raise NothingToQuantize("nothing to quantize: no node can run in int8"
                            + (why or " (the model has no Conv, MatMul or Gemm outside control-flow subgraphs)"))


class NothingToQuantize(ModelError):
    """Static placement found no layer to run in int8 (the automatic default may still go dynamic)."""


def _already_quantized(op_types: Iterable[str]) -> str:
    """': the model is already quantized (...)' when integer kernels are in it, else ''.

    Exported int8 models (onnxruntime's quantize_dynamic output, QOperator models) ship
    next to their fp32 originals; saying so beats "no Conv, MatMul or Gemm".
    """
    kernels = Counter(op for op in op_types if is_integer_kernel(op))
    if not kernels:
        return ""
    listed = ", ".join(f"{count} {op}" for op, count in kernels.most_common(3)) + (", ..." if len(kernels) > 3 else "")
    return f": the model is already quantized ({listed}); give onnxq its fp32 original"


MEASURE_MAX_BYTES = 512 * 1024**2  # larger models are not timed after the search (two sessions cost seconds)


def _measured_speed(c: Calibrated, quantized: onnx.ModelProto) -> dict | None:
    """The chosen model against fp32 on this machine, when it is the target: the speed table expected it
    faster, but small models lose to the float/int8 conversions the table does not count. Slower than fp32
    is said in a note (the model is written all the same: the user asked for int8)."""
    feed = _timing_feed(c.held, c.calib)
    if feed is None or not c.target.is_host or model_bytes(quantized) > MEASURE_MAX_BYTES:
        return None
    try:
        measured = measured_speedup(c.reference, quantized, feed)
    except OnnxqError:
        return None
    if measured["speedup"] < 1.0:
        c.notes.append(f"the int8 model ran at {measured['speedup']:.2f}x fp32 here (batch 1, one thread, "
                       f"{measured['runs']} interleaved runs): int8 does not pay on this model on this machine; "
                       "keep the fp32 model, or try --speed-guard measure (onnxq bench measures more)")
    return measured


def _timing_feed(held: SampleSource | None, calib: SampleSource | None) -> dict | None:
    """One real sample, batch 1, to time the model with."""
    source = held if held is not None and len(held) else calib
    return source.sample(0) if source is not None and len(source) else None


def needs_histograms(request: QuantizeRequest, method: str, choices: dict[str, NodeChoice]) -> bool:
    """Whether this run reads a histogram: not when every method in play is `global` and no statistics
    are saved (then calibration keeps extremes only). `max` reads only extremes too, but the report's
    fraction of values it clips is counted on the histogram."""
    methods = {choice.method for choice in choices.values() if choice.method}
    methods.update(search_methods(request, method) if searches(request) else (method,))
    return request.save_stats is not None or not methods <= CLIPS_NOTHING


def _statistics(request: QuantizeRequest, model: onnx.ModelProto, tensors: list[str], graph: Graph,
                calib: SampleSource | None, digest: str, progress: ProgressFactory, *,
                histograms: bool = True) -> Statistics:
    """Load statistics (checking they fit), or collect them for every tensor any setting may need."""
    if request.load_stats is not None:
        stats = Statistics.load(request.load_stats)
        if stats.model_digest and stats.model_digest != digest:
            raise DataError(f"{request.load_stats} was collected on a different model (digest {stats.model_digest}, "
                            f"this model {digest})")
        missing = [t for t in tensors if t not in stats.tensors]
        if missing:
            raise DataError(f"{request.load_stats} lacks statistics for {len(missing)} tensors (e.g. {missing[0]})")
        return stats
    assert calib is not None
    observe = tensors_to_observe(graph)
    stats = collect(model, observe, calib, request.data.ray, batch_size=request.data.batch_size,
                    memory_budget=request.data.memory_budget, progress=progress, aliases=value_aliases(graph, observe),
                    histograms=histograms)
    stats.model_digest = digest
    return stats


def check_written_model(model: onnx.ModelProto, planned: dict[str, str] | None = None) -> FusionReport:
    """The written model must pass onnx.checker and load in onnxruntime (failures are onnxq bugs).

    Loading it is also the fusion check: what onnxruntime runs in int8 after optimizing it, and
    whether each compute node runs at the precision planned (`planned`: label -> plan status).
    """
    try:
        if not needs_external_data(model) and not weights_on_disk(model):  # else onnxruntime loading it checks it
            onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        reason = first_line(exc)
        raise ModelError(f"internal error: the quantized model fails onnx.checker: {reason}") from None
    try:
        return check_fusion(model, planned)
    except ModelError as exc:
        raise ModelError(f"internal error: the quantized model does not load: {exc.message}") from None


def calibrate_only(model_path: Path, output: Path | None, data: DataOptions,
                   progress: ProgressFactory = no_progress) -> Statistics:
    """Collect (and save, unless `output` is None) statistics for every tensor quantize may need (for
    --load-stats later)."""
    check_paths([PathArg("MODEL", model_path, MODEL), PathArg("--calib", data.calib, DATA),
                 PathArg("-o", output, OUTPUT)])
    original = load_model(model_path, lazy_weights=True)
    prepared = prepare_model(original, model_path)
    graph = import_graph(prepared.model)
    tensors = tensors_to_observe(graph)
    specs = model_input_specs(original)
    check_batch_size(data.batch_size, specs)
    if data.calib is None:
        if not data.allow_random:
            raise UsageError("no calibration data: give --calib DATA (or --allow-random)")
        source = random_source(specs, RANDOM_SAMPLES, shapes=data.input_shapes).first(data.max_samples)
    else:
        source = open_calibration(data.calib, specs, data.images, data.max_samples)
    stats = collect(prepared.model, tensors, source, data.ray, batch_size=data.batch_size,
                    memory_budget=data.memory_budget, progress=progress, aliases=value_aliases(graph, tensors))
    stats.model_digest = model_digest(prepared.model)
    if output is not None:
        stats.save(output)
    return stats
