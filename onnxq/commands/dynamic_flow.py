"""--mode dynamic and --mode weight-only: weights quantized ahead, activations (if at all) at run time, so
no calibration, placement or plan stages: load -> prepare (-> smooth) -> rewrite -> check -> evaluate ->
write -> report."""

from __future__ import annotations

import gc
from collections import Counter

from onnxq import __version__
from onnxq.commands.dynamic import rewrite_dynamic
from onnxq.commands.recipe import layer_options
from onnxq.commands.report import build_report, json_safe
from onnxq.commands.request import QuantizeRequest, QuantizeResult, StageTimer, recovery_needs_data, resolve_settings
from onnxq.commands.request_recipe import effective_recipe, recipe_choices
from onnxq.commands.stages import already_quantized, load_checked, smoothed_model
from onnxq.commands.weight_only import int8_embedding_tables, run_weight_only, target_gates
from onnxq.commands.written import check_written_model
from onnxq.cpu import resolve_target
from onnxq.enums import Format, Mode, NodeStatus
from onnxq.errors import ModelError, UsageError
from onnxq.model_io import externalize, model_bytes, save_model
from onnxq.passes.smooth import validate_alpha
from onnxq.paths import check_paths, quantize_paths
from onnxq.quant.ir import import_graph
from onnxq.quant.plan import QuantPlan, QuantSettings
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import model_input_specs, open_source
from onnxq.runtime.evaluate import compare_models
from onnxq.runtime.session import ProgressFactory, no_progress


def quantize_without_calibration(request: QuantizeRequest, progress: ProgressFactory = no_progress
                                 ) -> QuantizeResult:
    """--mode dynamic or weight-only: weights are quantized ahead, activations (if at all) at run time.

    The command line refuses these modes' inert flags from the option table (exit 2); the checks here
    cover the same settings when a recipe or the Python API sets them."""
    if request.mode not in (Mode.DYNAMIC, Mode.WEIGHT_ONLY):
        raise UsageError(f"unknown mode {request.mode!r}; choose static, dynamic or weight-only")
    if request.output_format != Format.QDQ or request.load_stats or request.save_stats or request.save_plan:
        raise UsageError(f"--mode {request.mode} takes no --format qoperator, --load-stats, --save-stats or "
                         "--save-plan (it needs no calibration)")
    if request.smooth_alpha is not None:
        validate_alpha(request.smooth_alpha)
    if request.equalize or recovery_needs_data(request):
        raise UsageError("--equalize, --bias-correction and --adaround (also as recipe rules) apply to --mode static "
                         "only")
    if request.target is not None and request.mode == Mode.DYNAMIC:
        raise UsageError("an accuracy target (--target-sqnr/--target-cosine/--target-metric) applies to --mode static "
                         "and weight-only")
    timer = StageTimer()
    check_paths(quantize_paths(request))
    target = resolve_target(request.target_cpu)
    settings, weight_range_reason = resolve_settings(request, target)
    if request.mode == Mode.WEIGHT_ONLY:  # float compute: no int8 products, nothing can saturate
        settings = QuantSettings(**{**settings.__dict__, "weight_range": "full"})
        weight_range_reason = "weight-only: float compute, full 8-bit weights"
    request.weight_only.validate()
    original, prepared = load_checked(request, timer)
    held_path = request.data.eval_data or request.data.calib
    held = open_source(held_path, model_input_specs(original), request.data.images) if held_path else None
    held_notes = [held.note("--eval-data" if request.data.eval_data else "--calib")] if held is not None else []
    smoothing = None
    if request.smooth_alpha is not None:  # fewer activation outliers help run-time quantization too
        calib = open_source(request.data.calib, model_input_specs(original),
                            request.data.images) if request.data.calib else None
        with timer.stage("smooth"):
            prepared.model, smoothing = smoothed_model(request, prepared.model, calib, progress)
    graph = import_graph(externalize(prepared.model, None, "weights"))  # names and op types: no weights held
    choices, recipe_notes = recipe_choices(request, graph, with_exclude=True)
    weight_only = None
    with timer.stage("rewrite"):
        if request.mode == Mode.DYNAMIC:
            quantized, decisions = rewrite_dynamic(prepared.model, settings.weight_qtype, settings.per_channel,
                                                   layer_options(choices))
            quantized, decisions = int8_embedding_tables(quantized, choices, decisions)
        else:  # onnxq.commands.weight_only: int8 per channel, or int4 by --weight-method (+ embeddings, target search)
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
                         f"{already_quantized(n.op for n in graph.nodes)} ({detail})")
    with timer.stage("check"):  # only float nodes have a precision to keep here: int ones are rewritten ops
        fusion = check_written_model(quantized, {d.name: d.status for d in decisions if d.status == NodeStatus.FLOAT})
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
    if request.mode == Mode.WEIGHT_ONLY:  # int8 weights feeding float ops are this mode's intended form
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
