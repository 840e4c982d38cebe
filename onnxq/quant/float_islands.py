"""Keep float layers float in the graph onnxruntime builds (see onnxq.quant.rewrite_qdq's docstring).

onnxruntime rewrites float ops that sit between Q/DQ pairs:
- WeightBiasQuantization (basic level, so in every session) quantizes, per tensor, the float
  weight of a Conv, ConvTranspose or Gemm that reads a DequantizeLinear with a scalar scale and
  whose output leads (through Relu/Clip at most) to a QuantizeLinear;
- its QDQ fusions (extended level) turn DQ -> Add/Mul/Concat/pooling/... -> Q into integer kernels
  whatever onnxq's plan said about that op;
- QDQ propagation first moves a scalar DequantizeLinear forward through the ops in
  DQ_PROPAGATING_OPS, so a float op behind them is reached too.
All of them only look at scalar scales. So a float op reads either the raw float value (where
it exists: its producer is float too) or a DequantizeLinear whose (equal) scales are laid out
along an axis, which none of those transformers touches.

A MatMul or Gemm computing in float on 16-bit inputs (int16) has one more rewrite against it:
DQMatMulToMatMulNBits turns DequantizeLinear(int8 weight) -> MatMul/Gemm into MatMulNBits,
which quantizes the activation to 8 bits at run time. Its weight is stored as the float values
of its int8 rounding instead: the same numbers, computed in float as planned.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.enums import NodeStatus
from onnxq.quant import qmath
from onnxq.quant.ir import NameAllocator, constant_values, is_constant, is_empty, node_label
from onnxq.quant.ops import DQ_PROPAGATING_OPS, MATMUL_OPS, REQUANTIZED_BY_ONNXRUNTIME, WEIGHT_REQUANTIZED_OPS
from onnxq.quant.placement import NodeDecision

# Plan statuses of nodes that compute in float.
FLOAT_COMPUTE = ("float", "int16")


def isolate_float_layers(graph: gs.Graph, decisions: list[NodeDecision], names: NameAllocator) -> None:
    """Rewire the inputs of float nodes in a freshly written QDQ graph (in place)."""
    status = {d.name: d.status for d in decisions}
    for node in list(graph.nodes):
        if status.get(node_label(node)) == NodeStatus.FLOAT:
            _read_raw_floats(node, status)
    for node in list(graph.nodes):
        if node.op in MATMUL_OPS and status.get(node_label(node)) == NodeStatus.INT16:
            _store_rounded_weight(node, names)
    views: dict[tuple[str, int, int], gs.Variable] = {}
    for node in list(graph.nodes):
        if node.op not in REQUANTIZED_BY_ONNXRUNTIME or status.get(node_label(node)) not in FLOAT_COMPUTE:
            continue
        entries = _rewritable_entries(node, status)
        for entry in entries:
            _per_axis_view(graph, *entry, names, views)


def _rewritable_entries(node: gs.Node, status: dict[str, str]) -> list[tuple[gs.Node, int, gs.Node]]:
    """Where scalar DequantizeLinears reach `node`, when they are enough for onnxruntime to rewrite it:
    input 0 of a Conv/ConvTranspose/Gemm (weight quantization), else every data input (QDQ fusions
    need all of them: an Add with a constant operand or a MatMul with a float weight stays float)."""
    if node.op in WEIGHT_REQUANTIZED_OPS:
        entry = _dequantize_entry(node, 0, status)
        return [entry] if entry is not None else []
    data = [index for index, tensor in enumerate(node.inputs) if not is_empty(tensor)]
    if any(is_constant(node.inputs[index]) for index in data):
        return []
    entries = [_dequantize_entry(node, index, status) for index in data]
    return [e for e in entries if e is not None] if all(e is not None for e in entries) else []


def _store_rounded_weight(node: gs.Node, names: NameAllocator) -> None:
    """Replace the node's DequantizeLinear(int8 weight) input by its float values."""
    if len(node.inputs) < 2 or not node.inputs[1].inputs:
        return
    dq = node.inputs[1].inputs[0]
    if dq.op != "DequantizeLinear" or not all(is_constant(t) for t in dq.inputs if not is_empty(t)):
        return
    zero_point = constant_values(dq.inputs[2]) if len(dq.inputs) > 2 and not is_empty(dq.inputs[2]) else 0
    values = qmath.dequantize(constant_values(dq.inputs[0]), constant_values(dq.inputs[1]),
                              np.asarray(zero_point), dq.attrs.get("axis"))
    node.inputs[1] = gs.Constant(names.new(f"{dq.inputs[0].name}_rounded"), values)


def _activation_pair(tensor: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """(QuantizeLinear, DequantizeLinear) when `tensor` is the output of an activation pair."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or is_constant(dq.inputs[0]):
        return None
    q = dq.inputs[0].inputs[0] if dq.inputs[0].inputs else None
    return (q, dq) if q is not None and q.op == "QuantizeLinear" else None


def _read_raw_floats(node: gs.Node, status: dict[str, str]) -> None:
    """A float node reads the float value itself where it exists, not its quantized copy."""
    for index, tensor in enumerate(node.inputs):
        if is_empty(tensor) or is_constant(tensor):
            continue
        pair = _activation_pair(tensor)
        if pair is None:
            continue
        raw = pair[0].inputs[0]
        producer = raw.inputs[0] if raw.inputs else None
        if producer is None or status.get(node_label(producer)) == NodeStatus.FLOAT:
            node.inputs[index] = raw


def _dequantize_entry(node: gs.Node, index: int, status: dict[str, str]) -> tuple[gs.Node, int, gs.Node] | None:
    """(consumer, input index, DQ) where a scalar activation DequantizeLinear reaches `node`'s input
    `index` in onnxruntime: directly, or moved forward through float pass-through ops."""
    consumer = node
    while True:
        tensor = consumer.inputs[index]
        if is_empty(tensor) or is_constant(tensor):
            return None
        pair = _activation_pair(tensor)
        if pair is not None:
            return consumer, index, pair[1]
        producer = tensor.inputs[0] if tensor.inputs else None
        if (producer is None or producer.op not in DQ_PROPAGATING_OPS
                or status.get(node_label(producer)) != NodeStatus.FLOAT):
            return None
        consumer, index = producer, 0


def _per_axis_view(graph: gs.Graph, consumer: gs.Node, index: int, dq: gs.Node, names: NameAllocator,
                   views: dict[tuple[str, int, int], gs.Variable]) -> None:
    """Let `consumer` read the value through a DequantizeLinear with the scalar scale repeated along an axis."""
    source = dq.outputs[0]
    axis, length = _input_axis(consumer, index)
    scale = constant_values(dq.inputs[1])
    if length is None or length < 2 or scale.size != 1:
        return  # nothing to lay the scale along (the precision check reports what onnxruntime does)
    key = (source.name, axis, length)
    if key not in views:
        zero_point = constant_values(dq.inputs[2]) if len(dq.inputs) > 2 and not is_empty(dq.inputs[2]) else None
        quantized = dq.inputs[0]
        if zero_point is not None and zero_point.dtype == np.int8:
            # onnxruntime turns int8 pairs into uint8 only where the QuantizeLinear feeds one scalar
            # DequantizeLinear (QDQS8ToU8), else the producer's kernel lacks matching types. So the view
            # re-quantizes the dequantized value instead, as uint8 with the zero point moved by 128 (exact).
            zero_point = (zero_point.astype(np.int16) + 128).astype(np.uint8)
            params = _axis_params(source.name, scale, zero_point, length, names)
            quantized = gs.Variable(names.new(f"{source.name}_axis_quantized"), dtype=np.uint8, shape=source.shape)
            graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{source.name}_float_view_QuantizeLinear"),
                                       inputs=[source, *params], outputs=[quantized], attrs={"axis": axis},
                                       domain=dq.domain))
        else:
            params = _axis_params(source.name, scale, zero_point, length, names)
        views[key] = gs.Variable(names.new(f"{source.name}_float_view"), dtype=source.dtype, shape=source.shape)
        graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{source.name}_float_view_DequantizeLinear"),
                                   inputs=[quantized, *params], outputs=[views[key]], attrs={"axis": axis},
                                   domain=dq.domain))
    consumer.inputs[index] = views[key]


def _axis_params(base: str, scale: np.ndarray, zero_point: np.ndarray | None, length: int,
                 names: NameAllocator) -> list[gs.Constant]:
    """The scalar scale (and zero point) repeated `length` times."""
    params = [gs.Constant(names.new(f"{base}_axis_scale"), np.full(length, scale.item(), scale.dtype))]
    if zero_point is not None:
        params.append(gs.Constant(names.new(f"{base}_axis_zero_point"),
                                  np.full(length, zero_point.item(), zero_point.dtype)))
    return params


def _input_axis(consumer: gs.Node, index: int) -> tuple[int, int | None]:
    """An axis of the consumer's input `index` with a known length (channels where the weight tells)."""
    if index == 0 and consumer.op in WEIGHT_REQUANTIZED_OPS:
        shape = _weight_shape(consumer.inputs[1])
        if shape is not None:
            if consumer.op == "Conv":
                return 1, shape[1] * int(consumer.attrs.get("group", 1))
            if consumer.op == "ConvTranspose":
                return 1, shape[0]
            return (0 if consumer.attrs.get("transA", 0) else 1), shape[1 if consumer.attrs.get("transB", 0) else 0]
    dims = consumer.inputs[index].shape or []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int | np.integer) and dim > 1:
            return axis, int(dim)
    return 0, None


def _weight_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """A weight's shape, also behind the DequantizeLinear of a quantized (int16-layer) weight."""
    if is_constant(tensor):
        return tuple(constant_values(tensor).shape)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "DequantizeLinear" and is_constant(producer.inputs[0]):
        return tuple(constant_values(producer.inputs[0]).shape)
    return None
