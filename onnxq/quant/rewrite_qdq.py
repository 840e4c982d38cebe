"""Write the QDQ model: the plan's parameters as QuantizeLinear/DequantizeLinear pairs.

Activations: the producer's output is renamed and a Q->DQ pair restores the original
name, so consumers, graph outputs and subgraphs that read the tensor need no change.
Weights and biases: stored as int8 / int32 initializers behind a DequantizeLinear.

Layers the plan keeps in float (or computes in float from 16-bit inputs) must stay that way
in the graph onnxruntime builds. Its WeightBiasQuantization transformer (basic level, so on
in every session) quantizes the float weight of a Conv, ConvTranspose or Gemm per tensor
whenever the layer reads a DequantizeLinear with a scalar scale and its output leads to a
QuantizeLinear; its QDQ propagation moves such a DequantizeLinear forward through Reshape,
Transpose, Squeeze, Unsqueeze, Slice and MaxPool first. So (onnxq.quant.float_islands):
- a float layer whose input comes from a float producer (or a graph input) reads that raw
  float value, not its quantized copy (also more accurate);
- one whose input only exists quantized (an int8 producer) reads it through its own
  DequantizeLinear with the same scale repeated along an axis: a per-axis scale, which
  neither transformer touches.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.quant import qmath
from onnxq.quant.float_islands import isolate_float_layers
from onnxq.quant.ir import NameAllocator, constant_values, export_model, import_domain, import_graph
from onnxq.quant.ops import MS_DOMAIN
from onnxq.quant.plan import QuantPlan, TensorPlan

WIDE_QTYPES = ("int16", "uint16")  # standard QuantizeLinear takes them from opset 21 on


def write_qdq(prepared: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    graph = import_graph(prepared)
    names = NameAllocator(graph)
    tensors = graph.tensors()
    wide_domain = "" if _default_opset(prepared) >= 21 else MS_DOMAIN
    for entry in plan.by_role("activation"):
        domain = wide_domain if entry.qtype in WIDE_QTYPES else ""
        _quantize_activation(graph, tensors[entry.name], entry, names, domain)
    for entry in plan.by_role("weight") + plan.by_role("bias"):
        _quantize_constant(graph, tensors[entry.name], entry, names)
    isolate_float_layers(graph, plan.nodes, names)
    model = export_model(graph, prepared)
    model.producer_name = "onnxq"
    import_domain(model, MS_DOMAIN)  # only declared when a 16-bit pair uses it
    return model


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _params(entry: TensorPlan, base: str, names: NameAllocator, with_zero_point: bool = True) -> list[gs.Tensor]:
    params: list[gs.Tensor] = [gs.Constant(names.new(f"{base}_scale"), entry.scale_array())]
    if with_zero_point:
        params.append(gs.Constant(names.new(f"{base}_zero_point"), entry.zero_point_array()))
    return params


def _axis_attrs(entry: TensorPlan) -> dict:
    return {"axis": entry.axis} if entry.axis is not None else {}


def _quantize_activation(graph: gs.Graph, tensor: gs.Variable, entry: TensorPlan, names: NameAllocator,
                         domain: str = "") -> None:
    params = _params(entry, tensor.name, names)
    qtype = qmath.qtype_by_name(entry.qtype)
    quantized = gs.Variable(names.new(f"{tensor.name}_quantized"), dtype=qtype.dtype, shape=tensor.shape)
    if tensor.inputs:  # produced by a node: rename its output, restore the name after Q/DQ
        producer = tensor.inputs[0]
        raw = gs.Variable(names.new(f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = raw
        source, restored = raw, tensor
    else:  # a graph input keeps its name: consumers move to the dequantized copy
        restored = gs.Variable(names.new(f"{tensor.name}_dequantized"), dtype=tensor.dtype, shape=tensor.shape)
        for consumer in list(tensor.outputs):
            _replace_input(consumer, tensor, restored)
        source = tensor
    graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{tensor.name}_QuantizeLinear"),
                               inputs=[source, *params], outputs=[quantized], domain=domain))
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tensor.name}_DequantizeLinear"),
                               inputs=[quantized, *params], outputs=[restored], domain=domain))


def _quantize_constant(graph: gs.Graph, constant: gs.Constant, entry: TensorPlan, names: NameAllocator) -> None:
    values = constant_values(constant).astype(np.float32)
    scale = np.asarray(entry.scale, dtype=np.float32)
    if entry.role == "bias":
        integers = np.clip(np.rint(values.astype(np.float64) / scale.reshape(values.shape).astype(np.float64)),
                           qmath.INT32.qmin, qmath.INT32.qmax).astype(np.int32)
        params = _params(entry, constant.name, names, with_zero_point=False)
    else:
        qtype = qmath.qtype_by_name(entry.qtype)
        integers = qmath.quantize(values, entry.scale_array(), entry.zero_point_array(), qtype, entry.axis)
        params = _params(entry, constant.name, names)
    stored = gs.Constant(names.new(f"{constant.name}_quantized"), integers)
    restored = gs.Variable(names.new(f"{constant.name}_dequantized"), dtype=np.float32, shape=list(values.shape))
    for consumer in list(constant.outputs):
        _replace_input(consumer, constant, restored)
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{constant.name}_DequantizeLinear"),
                               inputs=[stored, *params], outputs=[restored], attrs=_axis_attrs(entry)))


def _replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new
