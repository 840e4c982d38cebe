"""`convert`: a model that already has QuantizeLinear/DequantizeLinear (a QAT export) to onnxq's int8 form.

Quantization-aware training exports (PyTorch, TensorFlow) carry learned scales and zero points
in Q/DQ pairs, but not where onnxruntime fuses them: fake-quant Q->DQ on float weights, pairs
after Relu, on graph outputs, behind shared Identity zero points. The command

1. reads every pair's parameters, validating them (onnxq.quant.qdq_params), and strips the pairs
   (onnxq.passes.strip_qdq), which gives back the float graph the training ran (weights replaced by their
   fake-quantized values) plus a table of learned parameters by tensor name;
2. places pairs on that float graph with onnxq's own placement (onnxq.quant.placement), taking each
   placed tensor's parameters from the table: its own, its shared-scale group's, or those of the
   input of a Relu it follows (onnxq.commands.convert_plan). A tensor with none was left float by the input
   model (onnxruntime's quantize_static leaves e.g. a ReduceMean float): by default every node that
   would read or write it quantized stays float too, as in the input; `calibrate_missing` calibrates
   such tensors instead;
3. writes the QuantPlan with onnxq's writers (QDQ, or QOperator on top of it).

Weights keep their learned integers exactly: the stripped graph holds dequantize(quantize(w)),
which the writer quantizes back with the same parameters.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from onnxq import __version__
from onnxq.commands.convert_plan import (
    build_convert_plan,
    calibrate_missing,
    fit_pooling_scales,
    respect_float_tensors,
    roots_without_params,
)
from onnxq.commands.pipeline import DataOptions, check_written_model
from onnxq.commands.report import (
    data_section,
    describe_source,
    fidelity_section,
    json_safe,
    report_core,
    settings_section,
)
from onnxq.cpu import default_weight_range, host_cpu
from onnxq.enums import Format, NodeStatus, WeightRange
from onnxq.errors import ModelError, UsageError
from onnxq.model_io import load_model, model_bytes, save_model
from onnxq.passes.prepare import prepare_model
from onnxq.passes.strip_qdq import strip_qdq
from onnxq.paths import DATA, MODEL, MODEL_OUTPUT, PathArg, check_paths
from onnxq.quant import qmath
from onnxq.quant.ir import import_graph
from onnxq.quant.ops import QDQ_OPS
from onnxq.quant.placement import PlacementOptions, place
from onnxq.quant.plan import QuantPlan, QuantSettings
from onnxq.quant.ranges import DEFAULT_METHOD, DEFAULT_PERCENTILE
from onnxq.quant.rewrite_qdq import write_qdq
from onnxq.quant.rewrite_qop import write_qoperator
from onnxq.runtime.data import model_input_specs, open_source
from onnxq.runtime.evaluate import compare_models
from onnxq.runtime.session import ProgressFactory, no_progress

ACTIVATION_TYPES = ("keep", "uint8", "int8")
EVAL_LIMIT = 256  # samples the fidelity comparison runs on at most


@dataclass
class ConvertRequest:
    model: Path
    output: Path
    output_format: str = "qdq"  # or "qoperator"
    # uint8: every activation as uint8 (a learned int8 one with its zero point moved by 128: the same values, in
    # the type onnxruntime's x86 kernels fuse); int8: the other way; keep: each learned type as it is
    activations: str = "uint8"
    data: DataOptions = field(default_factory=DataOptions)
    method: str = DEFAULT_METHOD  # for tensors that have to be calibrated
    percentile: float = DEFAULT_PERCENTILE
    calibrate_missing: bool = False  # calibrate tensors the input left float (default: their nodes stay float)


@dataclass
class ConvertResult:
    report: dict
    plan: QuantPlan


def convert(request: ConvertRequest, progress: ProgressFactory = no_progress) -> ConvertResult:
    """Convert a Q/DQ (QAT) model to onnxq's int8 form; see the module docstring."""
    start = time.perf_counter()
    if request.output_format not in Format.values():
        raise UsageError(f"unknown format {request.output_format!r}; choose {' or '.join(Format.values())}")
    if request.activations not in ACTIVATION_TYPES:
        raise UsageError(f"--activations must be one of {', '.join(ACTIVATION_TYPES)}, got {request.activations!r}")
    check_paths(convert_paths(request))
    original = load_model(request.model)
    if not any(n.op_type in QDQ_OPS for n in original.graph.node):
        raise ModelError(f"{request.model} has no QuantizeLinear/DequantizeLinear nodes; use `onnxq quantize` "
                         "for a float model")
    stripped = strip_qdq(original)
    prepared = prepare_model(stripped.model)
    graph = import_graph(prepared.model)
    activation_types = Counter(p.qtype for n, p in stripped.learned.items() if n not in stripped.folded_weights
                               and n not in stripped.stored_weights)
    target = request.activations
    calib_type = target if target != "keep" else (activation_types.most_common(1)[0][0] if activation_types
                                                  else "uint8")
    weight_settings = QuantSettings(method=request.method, percentile=request.percentile,
                                    symmetric=calib_type == "int8",
                                    weight_range=default_weight_range(host_cpu().features))
    options = PlacementOptions(per_channel=True, fold_activations=True)
    placement, kept_float = place(graph, options), {}
    if not request.calibrate_missing:
        placement, kept_float = respect_float_tensors(graph, options, stripped.learned)
    if not any(d.status == NodeStatus.INT8 for d in placement.nodes):
        hint = (" once the tensors the input model leaves float stay float (--calibrate-missing --calib DATA "
                "quantizes them)") if kept_float else ""
        raise ModelError(f"nothing to convert: no Conv, MatMul or Gemm can run in int8{hint}")
    missing = roots_without_params(graph, placement, stripped.learned)
    calibrated, calib_source = calibrate_missing(prepared.model, missing, request.data, request.method,
                                                 request.percentile, qmath.qtype_by_name(calib_type), progress)
    plan, origins = build_convert_plan(graph, placement, stripped.learned, target, calibrated, weight_settings)
    fit_pooling_scales(graph, plan, set(origins.calibrated))
    quantized = write_qdq(prepared.model, plan)
    if request.output_format == Format.QOPERATOR:
        quantized = write_qoperator(quantized)
    fusion = check_written_model(quantized, {d.name: d.status for d in plan.nodes})
    fidelity, held = None, None
    held_path = request.data.eval_data or request.data.calib
    if held_path is not None:
        held = open_source(held_path, model_input_specs(original), request.data.images).first(EVAL_LIMIT)
        fidelity = compare_models(original, quantized, held, batch_size=request.data.batch_size, progress=progress)
    save_model(quantized, request.output)
    report = {
        **report_core(command="convert", model=request.model, output=request.output, version=__version__, plan=plan,
                      settings=settings_section(weight_settings, _weight_range_reason(weight_settings),
                                                request.output_format, activations=request.activations,
                                                calibrate_missing=request.calibrate_missing),
                      data=data_section(calibration=describe_source(calib_source), evaluation=held,
                                        batch_size=request.data.batch_size),
                      sizes=(model_bytes(original), model_bytes(quantized)),
                      fidelity=fidelity_section(fidelity, "the input (fake-quant) model"), fusion=fusion.to_dict(),
                      notes=stripped.notes + prepared.notes,
                      timings={"convert": round(time.perf_counter() - start, 3)}),
        "weights": {"folded_fake_quant": len(stripped.folded_weights), "stored_integers": len(stripped.stored_weights)},
        "tensor_origins": {"learned": origins.learned, "shared_learned": origins.shared,
                           "calibrated": origins.calibrated, "computed": origins.computed},
        "converted_types": origins.converted, "dropped": origins.dropped,
    }
    return ConvertResult(json_safe(report), plan)


def convert_paths(request: ConvertRequest) -> list[PathArg]:
    return [PathArg("MODEL", request.model, MODEL), PathArg("--calib", request.data.calib, DATA),
            PathArg("--eval-data", request.data.eval_data, DATA), PathArg("-o", request.output, MODEL_OUTPUT)]


def _weight_range_reason(settings: QuantSettings) -> str:
    """Why the range of the weights onnxq quantizes itself (the learned ones keep their integers)."""
    why = ("x86 without VNNI, uint8 x int8 products can saturate, weights limited to 7 bits"
           if settings.weight_range == WeightRange.REDUCED else "accumulates int8 products without saturation")
    return f"this machine: {why} (weights without learned parameters only; learned weights keep their integers)"
