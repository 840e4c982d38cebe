"""Static quantization: the stages up to the statistics (onnxq.commands.stages), then the later stages, then
plan -> rewrite -> check -> evaluate -> write -> report. Each later stage reads the results it names and
returns its own; none changes an earlier one:

    speed_guard_stage(...)     -> Guarded    a new Placed: layers int8 does not pay for kept float
    search_stage(...)          -> Searched   a new Placed and settings: the automatic search's choice
    accuracy_target_stage(...) -> Targeted   a new Placed: sensitive layers in float (or int16) until it holds
    recovery_stage(...)        -> Recovered  the model bias correction / AdaRound made, and its Placed
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import onnx
import onnx_graphsurgeon as gs

from onnxq import __version__
from onnxq.commands.dynamic import rewrite_dynamic
from onnxq.commands.dynamic_flow import quantize_without_calibration
from onnxq.commands.recipe import NodeChoice, activation_overrides, adaround_nodes, layer_options, pinned_int8
from onnxq.commands.report import TIMINGS, build_report, json_safe
from onnxq.commands.request import (
    QuantizeRequest,
    QuantizeResult,
    StageTimer,
    recovery_needs_data,
    search_may_go_dynamic,
    search_methods,
    searches,
)
from onnxq.commands.request_recipe import effective_recipe, recipe_choices
from onnxq.commands.stages import (
    NothingToQuantize,
    Placed,
    Prepared,
    Samples,
    Setup,
    calibrated,
    keep_float,
    plan_for,
    trial_builder,
    widen,
    write_model,
)
from onnxq.commands.weight_only import int8_embedding_tables, target_gates
from onnxq.commands.written import check_written_model
from onnxq.enums import Format, Mode, NodeStatus, SpeedGuard
from onnxq.errors import ModelError, OnnxqError, UsageError
from onnxq.model_io import model_bytes, save_model
from onnxq.passes.recovery import RecoveryOptions, RecoveryResult, affordable_layers, find_layers, recover
from onnxq.quant.ir import all_graphs, concrete_shapes, constant_values, import_graph, is_constant, node_label
from onnxq.quant.ops import MATMUL_OPS
from onnxq.quant.placement import NodeDecision, Placement, place
from onnxq.quant.plan import QuantSettings, build_plan
from onnxq.quant.rewrite_qdq import write_qdq
from onnxq.quant.rewrite_qop import write_qoperator
from onnxq.quant.statistics import Statistics
from onnxq.runtime import emulation
from onnxq.runtime.data import model_input_specs, open_source
from onnxq.runtime.evaluate import CachedReference, Fidelity, compare_models, load_metric
from onnxq.runtime.latency import measured_speedup
from onnxq.runtime.layer_errors import probe_errors, probe_model
from onnxq.runtime.session import ProgressFactory, no_progress
from onnxq.search import auto
from onnxq.search.distributed import evaluator_for, scorer_for
from onnxq.search.sensitivity import SearchResult, measure_sensitivity, search_fallbacks
from onnxq.search.speed_guard import (
    GuardResult,
    compare_latency,
    default_profile_path,
    guard_groups,
    guarded_nodes,
    machine_key,
    run_speed_guard,
    table_guard,
)
from onnxq.search.speed_table import shipped_table

MEASURE_MAX_BYTES = 512 * 1024**2  # larger models are not timed after the search (two sessions cost seconds)


@dataclass(frozen=True)
class Guarded:
    """What `speed_guard_stage` made: the placement with the layers int8 does not pay for kept float."""

    placed: Placed
    guard: GuardResult | None = None  # None: the guard is off, or had no sample to time with
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Searched:
    """What `search_stage` chose: the placement and settings of the chosen candidate, its bias correction /
    AdaRound, and the fp32 outputs it measured against. Without a search: the placement and settings given."""

    placed: Placed
    settings: QuantSettings
    outcome: auto.SearchOutcome | None = None  # None: no search ran
    repair: auto.Candidate | None = None  # the chosen candidate, when it asks for bias correction or AdaRound
    reference: CachedReference | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Targeted:
    """What `accuracy_target_stage` made: the placement that meets the target (or comes closest), the
    report section, and the fp32 outputs it measured against."""

    placed: Placed
    report: dict
    reference: CachedReference


@dataclass(frozen=True)
class Recovered:
    """What `recovery_stage` made: the model the plan is written on (the prepared one, with bias correction
    or AdaRound when asked), the placement on its graph, and what recovery did."""

    model: onnx.ModelProto
    placed: Placed
    report: dict = field(default_factory=dict)


def quantize_static(request: QuantizeRequest, progress: ProgressFactory = no_progress) -> QuantizeResult:
    check_static_request(request)
    timer = StageTimer()
    try:
        c = calibrated(request, progress, timer=timer)
    except NothingToQuantize as exc:
        if not search_may_go_dynamic(request):
            raise
        return _dynamic_instead(request, exc.message, progress)
    prepared, samples, stats = c.prepared, c.samples, c.stats
    guarded = speed_guard_stage(request, c.setup, prepared, samples, c.placed, stats, timer, progress)
    searched = (search_stage(request, c.setup, prepared, samples, guarded.placed, stats, timer)
                if searches(request) else Searched(guarded.placed, c.setup.settings))
    if searched.outcome is not None and searched.outcome.chosen.candidate.mode == Mode.DYNAMIC:
        return _searched_dynamic(request, searched.outcome, timer, progress)
    settings = searched.settings
    targeted = (accuracy_target_stage(request, prepared, samples, searched.placed, stats, settings, timer, progress)
                if request.target is not None else None)
    placed = targeted.placed if targeted is not None else searched.placed
    recovery = recovery_options(request, placed.choices, searched.repair)
    recovered = recovery_stage(request, prepared, samples, placed, stats, settings, recovery, timer, progress)
    placed = recovered.placed
    with timer.stage("plan"):
        plan = plan_for(placed, stats, settings, prepared.digest)
    if request.save_plan is not None:
        plan.save(request.save_plan)
    if request.save_recipe is not None:
        _save_recipe(request, settings, placed, recovery, searched.repair)
    with timer.stage("rewrite"):
        quantized = write_model(recovered.model, plan, settings, placed.dynamic)
        if request.output_format == Format.QOPERATOR:
            quantized = write_qoperator(quantized)
        plan.nodes = [NodeDecision(d.name, d.op_type, "dynamic", "int8, activations quantized at run time (recipe)")
                      if d.name in placed.dynamic else d for d in plan.nodes]
        table_choices, _ = recipe_choices(request, placed.graph, with_exclude=True)  # --exclude as float rules
        quantized, plan.nodes = int8_embedding_tables(quantized, table_choices, plan.nodes)
    with timer.stage("check"):
        fusion = check_written_model(quantized, {d.name: d.status for d in plan.nodes})
    fidelity = None
    if samples.held is not None:
        cached = targeted.reference if targeted is not None else searched.reference
        with timer.stage("evaluate"):
            fidelity = compare_models(prepared.reference, quantized, samples.held,
                                      batch_size=request.data.batch_size, progress=progress,
                                      limit=request.eval_samples, cached=cached)
    measured, measured_notes = None, []
    if searched.outcome is not None:
        with timer.stage("measure speed"):
            measured, measured_notes = _measured_speed(c.setup, prepared, samples, quantized)
    with timer.stage("write"):
        save_model(quantized, request.output)
    equalization = {"equalization": prepared.equalization} if prepared.equalization is not None else {}
    report = build_report(
        request=request, version=__version__, original=prepared.original, quantized_bytes=model_bytes(quantized),
        plan=plan, stats=stats, calib=samples.calib, held=samples.held, fidelity=fidelity,
        notes=[*c.notes, *guarded.notes, *searched.notes, *measured_notes, *_per_tensor_note(settings, fidelity)],
        weight_range_reason=c.setup.weight_range_reason, timings=timer.seconds,
        speed_guard=guarded.guard.to_report() if guarded.guard is not None else {"enabled": False},
        fusion=fusion.to_dict(), recovery={**equalization, **recovered.report} or None,
        target=c.setup.target.to_dict(),
    )
    if prepared.smoothing is not None:
        report["smoothing"] = json_safe(prepared.smoothing)
    if searched.outcome is not None:
        report["auto"] = json_safe(searched.outcome.to_report())
        report["auto"]["measured"] = measured
    if targeted is not None:
        report["accuracy_target"] = json_safe(targeted.report)
        report["gates"] += target_gates(targeted.report)
    return QuantizeResult(report, plan, fidelity)


def _per_tensor_note(settings: QuantSettings, fidelity: Fidelity | None) -> list[str]:
    """Per-tensor weight scales can erase a layer's small channels (depthwise convolutions with folded
    batch norm): say so when the answers collapse, since the user chose it."""
    agreement = fidelity.agreement if fidelity is not None else None
    if settings.per_channel or agreement is None or agreement >= 0.5:
        return []
    return [f"--per-tensor: the int8 model gives fp32's answer on only {agreement:.0%} of the held-back samples; "
            "one weight scale per tensor can erase the small output channels of a layer whose channels differ "
            "widely (depthwise convolutions with folded batch norm often do): per-channel weights (the default) "
            "keep them"]


def _save_recipe(request: QuantizeRequest, settings: QuantSettings, placed: Placed, recovery: RecoveryOptions,
                 repair: auto.Candidate | None) -> None:
    """--save-recipe: the final placement's automatic choices (speed guard, search, target) as rules."""
    assert request.save_recipe is not None
    automatic = {label: ("float", why) for label, why in placed.options.keep_float.items()
                 if label not in placed.dynamic}
    automatic.update({label: ("dynamic", "automatic search") for label in placed.searched_dynamic})
    automatic.update({label: ("int16", "accuracy target") for label in placed.options.int16_nodes
                      if label not in placed.choices})
    rounded = repair.adaround if repair is not None else frozenset()
    effective_recipe(request, settings, placed.graph, automatic, recovery, rounded).save(request.save_recipe)


def check_static_request(request: QuantizeRequest) -> None:
    """Refuse option combinations static mode cannot honour, before any stage runs."""
    if request.fallback == NodeStatus.INT8:
        raise UsageError("--fallback int8 (int8 weights) is for --mode weight-only --weight-bits 4")
    if (request.target is not None and request.target_data is None and request.data.eval_data is None
            and request.data.calib is None):
        raise UsageError("an accuracy target needs samples to measure it on: give --eval-data or --calib")
    if (request.metric is None) != (request.target is None or request.target.min_metric is None):
        raise UsageError("--metric SCRIPT and --target-metric VALUE go together")
    if request.metric is not None:
        load_metric(request.metric)  # a broken script fails now, not after calibration
    if recovery_needs_data(request) and request.data.calib is None and not request.data.allow_random:
        raise UsageError("--bias-correction and --adaround need calibration samples: give --calib (also with "
                         "--load-stats)")


# ---------------------------------------------------------------- the speed guard


def speed_guard_stage(request: QuantizeRequest, setup: Setup, prepared: Prepared, samples: Samples, placed: Placed,
                      stats: Statistics, timer: StageTimer, progress: ProgressFactory) -> Guarded:
    """Keep float the layers int8 would not make faster on the target (onnxq.search.speed_guard)."""
    if request.speed_guard == SpeedGuard.OFF:
        return Guarded(placed)
    feed = samples.timing_feed()
    nodes = guarded_nodes(placed.graph, placed.placement, pinned_int8(placed.choices))
    with timer.stage("speed guard"):
        if request.speed_guard == SpeedGuard.TABLE:
            shapes = concrete_shapes(prepared.model, {k: v.shape for k, v in feed.items()} if feed else None)
            guard = table_guard(nodes, shapes, setup.target)
        elif feed is None:
            return Guarded(placed, notes=("speed guard skipped: no sample to time the model with (give --calib or "
                                          "--eval-data)",))
        else:
            settings = setup.settings
            key = json.dumps([prepared.digest, settings.symmetric, settings.per_channel, settings.weight_range,
                              sorted(request.exclude), request.recipe.to_dict()["rules"]])
            model_key = hashlib.sha256(key.encode()).hexdigest()[:16]
            path = request.speed_profile or default_profile_path(machine_key())
            build = trial_builder(prepared, placed, stats, settings, request.fallback)
            guard = run_speed_guard(guard_groups(nodes), build, feed, path, model_key, progress,
                                    pinned=request.speed_profile is not None)
    if guard.keep_float:
        placed = keep_float(placed, guard.keep_float)
    return Guarded(placed, guard, tuple(guard.notes))


# ---------------------------------------------------------------- the automatic search


def search_stage(request: QuantizeRequest, setup: Setup, prepared: Prepared, samples: Samples, placed: Placed,
                 stats: Statistics, timer: StageTimer) -> Searched:
    """The automatic default (onnxq.search.auto): search the candidates; the chosen one's placement and settings."""
    if samples.search is None or not len(samples.search):
        return Searched(placed, setup.settings, notes=("automatic search skipped: no held-back samples to measure "
                                                       "candidates on (give --calib or --eval-data)",))
    with timer.stage("search"):
        reference = CachedReference(prepared.reference, samples.search, request.target_samples, level=emulation.LEVEL)
        space = _search_space(request, setup, prepared, samples, placed, stats, reference)
        outcome = auto.search(space, reference, target=request.auto_target, budget_s=request.budget_s,
                              scorer=scorer_for(request.data.ray, reference))
    chosen = outcome.chosen.candidate
    if chosen.mode != Mode.STATIC:
        return Searched(placed, setup.settings, outcome, reference=reference, notes=tuple(outcome.notes))
    repair = chosen if chosen.bias_correction or chosen.adaround else None
    placed = replace(placed, searched_dynamic=chosen.dynamic)
    moved = {label: f"automatic search: kept float (own error rank {outcome.ranking.index(label) + 1})"
             for label in chosen.keep_float}
    moved.update(dict.fromkeys(chosen.dynamic, "automatic search: int8 with activations quantized at run time"))
    if moved:
        placed = keep_float(placed, moved)
    return Searched(placed, replace(setup.settings, method=chosen.method), outcome, repair, reference,
                    tuple(outcome.notes))


def _search_space(request: QuantizeRequest, setup: Setup, prepared: Prepared, samples: Samples, placed: Placed,
                  stats: Statistics, reference: CachedReference) -> auto.SearchSpace:
    settings, choices = setup.settings, placed.choices
    feed = reference.feeds[0] if reference.feeds else None
    shapes = concrete_shapes(prepared.model, {k: v.shape for k, v in feed.items()} if feed else None)
    table = shipped_table()
    speed_model = auto.SpeedModel.of(placed.graph, shapes, table.row_class_for(setup.target.cpu_class)[0], table)
    base_status = {d.name: ("int8" if d.status == NodeStatus.INT8 else "float") for d in placed.placement.nodes}
    pinned = pinned_int8(choices)
    user_float = {label for label, choice in choices.items() if choice.precision in ("float", "int16")}
    eligible = frozenset(label for sub in all_graphs(placed.graph) for node in sub.nodes
                         if (label := node_label(node)) not in pinned | user_float and _runs_dynamically(node))
    users_recovery = recovery_options(request, choices, None)

    def build(candidate: auto.Candidate) -> onnx.ModelProto:
        return emulation.emulated(written(candidate))

    def written(candidate: auto.Candidate) -> onnx.ModelProto:
        if candidate.mode == Mode.DYNAMIC:
            static_choices = {k: v for k, v in choices.items() if v.precision != NodeStatus.DYNAMIC}
            return rewrite_dynamic(prepared.model, settings.weight_qtype, settings.per_channel,
                                   layer_options(static_choices))[0]
        tried = replace(settings, method=candidate.method)
        moved = dict.fromkeys(candidate.keep_float | candidate.dynamic, "automatic search")
        options = replace(placed.options, keep_float={**placed.options.keep_float, **moved})
        placement = place(placed.graph, options)
        recovery = _with_repair(users_recovery, candidate)
        dynamic = placed.dynamic | candidate.dynamic
        if not recovery.needs_data:
            return write_model(prepared.model, plan_for(placed, stats, tried, prepared.digest, placement), settings,
                               dynamic)
        recovered = _recovered(request, prepared, samples, placed, placement, stats, tried, recovery).model
        graph = import_graph(recovered)
        placement = place(graph, options)
        plan = build_plan(graph, placement, stats, tried, prepared.digest,
                          activation_overrides(graph, placement, choices))
        return write_model(recovered, plan, settings, dynamic)

    def speed(candidate: auto.Candidate) -> float:
        if candidate.mode == Mode.DYNAMIC:
            return speed_model.speedup({label: ("dynamic" if label in eligible else "float")
                                        for label in {*base_status, *eligible}})
        status = {**base_status, **dict.fromkeys(candidate.keep_float, "float"),
                  **dict.fromkeys(candidate.dynamic | placed.dynamic, "dynamic")}
        return speed_model.speedup(status)

    def probe() -> auto.Probe:
        return probe_model(prepared.model, plan_for(placed, stats, settings, prepared.digest),
                           set(placed.int8_layers()))

    def rank_layers() -> list[str]:
        return list(probe_errors(*probe(), reference.feeds))

    def adaround_layers(ranking: list[str]) -> frozenset[str]:
        layers = {layer.label: layer for layer in find_layers(placed.graph, placed.placement)[0]}
        return frozenset(affordable_layers([layers[label] for label in ranking if label in layers],
                                           auto.ADAROUND_LAYERS, auto.ADAROUND_SECONDS))

    methods = search_methods(request, settings.method)
    run_time = eligible if search_may_go_dynamic(request) else frozenset()
    return auto.SearchSpace(build, placed.int8_layers(), run_time, methods, speed, rank_layers, adaround_layers,
                            can_repair=samples.calib is not None and not users_recovery.needs_data, probe=probe)


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
    result.report[TIMINGS] = {**{f"{k} (static)" if k in result.report[TIMINGS] else k: v
                                 for k, v in timer.seconds.items()}, **result.report[TIMINGS]}
    return result


def _measured_speed(setup: Setup, prepared: Prepared, samples: Samples, quantized: onnx.ModelProto
                    ) -> tuple[dict | None, list[str]]:
    """The chosen model against fp32 on this machine, when it is the target, and a note when slower: the
    speed table expected it faster, but small models lose to the float/int8 conversions the table does not
    count. (The model is written all the same: the user asked for int8.)"""
    feed = samples.timing_feed()
    if feed is None or not setup.target.is_host or model_bytes(quantized) > MEASURE_MAX_BYTES:
        return None, []
    try:
        measured = measured_speedup(prepared.reference, quantized, feed)
    except OnnxqError:
        return None, []
    if measured["speedup"] >= 1.0:
        return measured, []
    return measured, [f"the int8 model ran at {measured['speedup']:.2f}x fp32 here (batch 1, one thread, "
                      f"{measured['runs']} interleaved runs): int8 does not pay on this model on this machine; "
                      "keep the fp32 model, or try --speed-guard measure (onnxq bench measures more)"]


# ---------------------------------------------------------------- the accuracy target


def accuracy_target_stage(request: QuantizeRequest, prepared: Prepared, samples: Samples, placed: Placed,
                          stats: Statistics, settings: QuantSettings, timer: StageTimer,
                          progress: ProgressFactory) -> Targeted:
    """Keep the most sensitive int8 layers in float until the target holds (see onnxq.search.sensitivity)."""
    target = request.target
    source = (open_source(request.target_data, model_input_specs(prepared.original), request.data.images)
              if request.target_data is not None else samples.held)
    assert target is not None and source is not None
    with timer.stage("accuracy target"):
        reference = CachedReference(prepared.reference, source, request.target_samples,
                                    load_metric(request.metric) if request.metric is not None else None)
        build = trial_builder(prepared, placed, stats, settings, request.fallback)
        all_int8 = build(frozenset())
        start = reference.fidelity_of(all_int8)
        result = SearchResult([], True, [])
        ranking: list[str] = []
        if not target.met_by(start):
            candidates = placed.int8_layers()
            evaluator = evaluator_for(request.data.ray, build, reference)
            ranking = measure_sensitivity(build, candidates, reference, progress, all_but=False,
                                          evaluator=evaluator).ranked_nodes()
            limit = request.max_fallbacks if request.max_fallbacks is not None else len(ranking)
            result = search_fallbacks(build, ranking, target, reference, limit, progress, evaluator=evaluator)
        if result.float_nodes and request.fallback == NodeStatus.INT16:
            placed = widen(placed, frozenset(result.float_nodes))
        elif result.float_nodes:
            placed = keep_float(placed, {node: f"accuracy target: kept float (sensitivity rank "
                                               f"{ranking.index(node) + 1})" for node in result.float_nodes})
        chosen = (trial_builder(prepared, placed, stats, settings, request.fallback)(frozenset())
                  if result.float_nodes else all_int8)
        final = reference.fidelity_of(chosen)
    feed = samples.timing_feed()
    speed = None
    if result.float_nodes and feed is not None:
        before_ms, after_ms = compare_latency(all_int8, chosen, feed)
        speed = {"before_ms": before_ms, "after_ms": after_ms, "cost": round(after_ms / before_ms, 3)}
    report = {"target": {"min_sqnr_db": target.min_sqnr_db, "min_cosine": target.min_cosine,
                         "data": reference.source, "min_metric": target.min_metric,
                         "metric_script": str(request.metric) if request.metric else None},
              "met": target.met_by(final), "samples": len(reference.feeds),
              "start": {"min_sqnr_db": start.min_sqnr, "min_cosine": start.min_cosine, "metric": start.metric},
              "final": {"min_sqnr_db": final.min_sqnr, "min_cosine": final.min_cosine, "metric": final.metric},
              "fallback": request.fallback, "float_nodes": result.float_nodes, "steps": result.steps, "speed": speed}
    return Targeted(placed, report, reference)


# ---------------------------------------------------------------- recovery


def recovery_options(request: QuantizeRequest, choices: dict[str, NodeChoice],
                     searched: auto.Candidate | None) -> RecoveryOptions:
    """Bias correction and AdaRound as the request, the recipe's adaround rules and the search ask."""
    rounded = adaround_nodes(choices) | (searched.adaround if searched is not None else frozenset())
    seconds = request.adaround_seconds
    if seconds is None and rounded:
        seconds = auto.ADAROUND_SECONDS if searched is not None and searched.adaround else \
            request.adaround_rules_seconds
    return RecoveryOptions(bias_correction=request.bias_correction or bool(searched and searched.bias_correction),
                           adaround_seconds=seconds, adaround_layers=rounded or None)


def recovery_stage(request: QuantizeRequest, prepared: Prepared, samples: Samples, placed: Placed,
                   stats: Statistics, settings: QuantSettings, options: RecoveryOptions, timer: StageTimer,
                   progress: ProgressFactory) -> Recovered:
    """AdaRound / bias correction on the final placement (after the speed guard, search and accuracy target)."""
    if not options.needs_data:
        return Recovered(prepared.model, placed)
    with timer.stage("recovery"):
        result = _recovered(request, prepared, samples, placed, placed.placement, stats, settings, options, progress)
        graph = import_graph(result.model)
        placed = replace(placed, graph=graph, placement=place(graph, placed.options))
    return Recovered(result.model, placed, result.report)


def _recovered(request: QuantizeRequest, prepared: Prepared, samples: Samples, placed: Placed, placement: Placement,
               stats: Statistics, settings: QuantSettings, options: RecoveryOptions,
               progress: ProgressFactory = no_progress) -> RecoveryResult:
    """The prepared model with bias correction / AdaRound for `placement` (layer inputs read from its QDQ model)."""
    plan = plan_for(placed, stats, settings, prepared.digest, placement)
    return recover(prepared.model, write_qdq(prepared.model, plan), placement, plan, samples.calib, options,
                   batch_size=request.data.batch_size, memory_budget=request.data.memory_budget, progress=progress)
