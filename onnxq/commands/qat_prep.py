"""`qat-prep`: the fp32 model with fake-quant pairs initialised from calibration, to start QAT from.

The same stages as `quantize` (prepare, place, calibrate, plan) give the parameters; the
difference is the form: weights stay float and pass through QuantizeLinear -> DequantizeLinear,
so a training framework that imports the ONNX model (or reads the parameters JSON) trains the
float weights with the rounding in the loop. Activations get the same Q -> DQ pairs `quantize`
writes; biases stay float (their int32 scale follows the trained scales, `onnxq convert` sets it).
`onnxq convert` turns the trained model into the int8 one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq import __version__
from onnxq.commands.report import (
    FP32_REFERENCE,
    fidelity_section,
    json_safe,
    quantize_data,
    report_core,
    settings_section,
)
from onnxq.commands.request import QuantizeRequest, StageTimer
from onnxq.commands.stages import calibrated
from onnxq.commands.written import check_written_model
from onnxq.enums import Format
from onnxq.model_io import model_bytes, save_model
from onnxq.outputs import transaction
from onnxq.paths import OUTPUT, PathArg, check_paths, quantize_paths
from onnxq.quant import qmath
from onnxq.quant.ir import NameAllocator, export_model, import_graph
from onnxq.quant.plan import QuantPlan, TensorPlan, build_plan
from onnxq.quant.rewrite_qdq import write_qdq
from onnxq.runtime.evaluate import compare_models
from onnxq.runtime.session import ProgressFactory, no_progress


@dataclass
class PrepResult:
    report: dict
    plan: QuantPlan  # the parameters in the model: activations and weights (no biases)


def params_path_for(output: Path) -> Path:
    """Default parameters file: next to the model, MODEL.fakequant.onnx -> MODEL.fakequant.params.json."""
    return output.with_suffix(".params.json")


def qat_prep(request: QuantizeRequest, params_path: Path | None = None,
             progress: ProgressFactory = no_progress) -> PrepResult:
    params_path = params_path or params_path_for(request.output)
    check_paths([*quantize_paths(request), PathArg("--params", params_path, OUTPUT)])
    with transaction():  # the model and its parameters file are written together, or neither
        return _qat_prep(request, params_path, progress)


def _qat_prep(request: QuantizeRequest, params_path: Path, progress: ProgressFactory) -> PrepResult:
    timer = StageTimer()
    c = calibrated(replace(request, speed_guard="off"), progress, timer=timer)
    prepared, held, calib = c.prepared, c.samples.held, c.samples.calib
    with timer.stage("plan"):
        full = build_plan(c.placed.graph, c.placed.placement, c.stats, c.setup.settings, prepared.digest)
        plan = QuantPlan(settings=full.settings, nodes=full.nodes, model_digest=prepared.digest,
                         tensors={n: t for n, t in full.tensors.items() if t.role != "bias"})
    with timer.stage("rewrite"):
        activations = QuantPlan(settings=plan.settings, tensors={t.name: t for t in plan.by_role("activation")})
        model = add_weight_fake_quant(write_qdq(prepared.model, activations), plan.by_role("weight"))
    with timer.stage("check"):
        fusion = check_written_model(model)
    fidelity = None
    if held is not None:
        with timer.stage("evaluate"):
            fidelity = compare_models(prepared.reference, model, held, batch_size=request.data.batch_size,
                                      progress=progress)
    with timer.stage("write"):
        save_model(model, request.output)
        plan.save(params_path)
    report = {
        **report_core(command="qat-prep", model=request.model, output=request.output, version=__version__,
                      plan=plan, settings=settings_section(plan.settings, c.setup.weight_range_reason, Format.QDQ,
                                                           exclude=list(request.exclude)),
                      data=quantize_data(request, c.stats, calib, held),
                      sizes=(model_bytes(prepared.original), model_bytes(model)),
                      fidelity=fidelity_section(fidelity, FP32_REFERENCE), fusion=fusion.to_dict(), notes=c.notes,
                      timings=timer.seconds),
        "params": str(params_path),
        "fake_quant": {"activations": len(plan.by_role("activation")), "weights": len(plan.by_role("weight"))},
    }
    return PrepResult(json_safe(report), plan)


def add_weight_fake_quant(model: onnx.ModelProto, weights: list[TensorPlan]) -> onnx.ModelProto:
    """Put QuantizeLinear -> DequantizeLinear between each float weight and its consumers."""
    graph = import_graph(model)
    names = NameAllocator(graph)
    tensors = graph.tensors()
    for entry in weights:
        constant = tensors[entry.name]
        shape = list(constant.shape)
        params = [gs.Constant(names.new(f"{entry.name}_scale"), entry.scale_array()),
                  gs.Constant(names.new(f"{entry.name}_zero_point"), entry.zero_point_array())]
        qtype = qmath.qtype_by_name(entry.qtype)
        quantized = gs.Variable(names.new(f"{entry.name}_quantized"), dtype=qtype.dtype, shape=shape)
        restored = gs.Variable(names.new(f"{entry.name}_fakequant"), dtype=np.float32, shape=shape)
        for consumer in list(constant.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is constant:
                    consumer.inputs[index] = restored
        attrs = {"axis": entry.axis} if entry.axis is not None else {}
        graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{entry.name}_QuantizeLinear"),
                                   inputs=[constant, *params], outputs=[quantized], attrs=attrs))
        graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{entry.name}_DequantizeLinear"),
                                   inputs=[quantized, *params], outputs=[restored], attrs=dict(attrs)))
    result = export_model(graph, model)
    result.producer_name = "onnxq"
    return result
