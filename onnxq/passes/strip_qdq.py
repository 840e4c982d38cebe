"""Removing every Q/DQ pair of a QAT export: the float graph the training ran, and what the pairs said.

Weights are replaced by their fake-quantized values, dequantize(quantize(w)), so the writer quantizes
them back to the learned integers; activations lose their pairs and keep their names where they can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import ModelError
from onnxq.passes.prepare import infer_types
from onnxq.quant import qmath
from onnxq.quant.ir import NameAllocator, export_model, import_graph, is_constant, node_label
from onnxq.quant.qdq_params import Learned, constant_value, read_params


@dataclass
class Stripped:
    """The float graph without Q/DQ, and what the pairs said."""

    model: onnx.ModelProto
    learned: dict[str, Learned] = field(default_factory=dict)
    folded_weights: list[str] = field(default_factory=list)  # fake-quant on float weights
    stored_weights: list[str] = field(default_factory=list)  # DequantizeLinear of stored integers
    notes: list[str] = field(default_factory=list)


def strip_qdq(model: onnx.ModelProto) -> Stripped:
    """Remove every Q/DQ pair, keeping the values the model computes (see the module docstring)."""
    graph = import_graph(infer_types(model))
    names = NameAllocator(graph)
    result = Stripped(model)
    outputs = {t.name for t in graph.outputs}
    clipped = _drop_integer_clips(graph, outputs)
    if clipped:
        result.notes.append(f"{len(clipped)} integer Clip(s) between QuantizeLinear and DequantizeLinear dropped "
                            f"(PyTorch's reduced activation range, e.g. {clipped[0]}): the int8 kernels use the "
                            "full range with the learned scale and zero point")
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        users = q.outputs[0].outputs
        if q.outputs[0].name in outputs or any(u.op != "DequantizeLinear" for u in users):
            raise ModelError(f"QuantizeLinear {node_label(q)}: its integer output is used other than by "
                             "DequantizeLinear (integer outputs and integer ops are not supported)")
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        _strip_dequantize(graph, dq, names, outputs, result)
    result.model = export_model(graph, model)
    return result


def _drop_integer_clips(graph: gs.Graph, outputs: set[str]) -> list[str]:
    """Remove Clip nodes on an activation's integers between its QuantizeLinear and DequantizeLinears.

    PyTorch exports fake-quant with quant range (0, 127), its x86 reduced range for activations,
    as QuantizeLinear -> Clip(0, 127) -> DequantizeLinear. The learned scale and zero point stay;
    only values above the 7-bit bound are no longer clipped. Returns "node: [lo, hi]" per Clip.
    """
    dropped = []
    for clip in [n for n in graph.nodes if n.op == "Clip"]:
        integers = clip.inputs[0]
        quantize = integers.inputs[0] if integers.inputs else None
        users = clip.outputs[0].outputs
        if (quantize is None or quantize.op != "QuantizeLinear" or clip.outputs[0].name in outputs
                or not users or any(u.op != "DequantizeLinear" for u in users)):
            continue
        label = node_label(quantize)
        if constant_value(quantize.inputs[0]) is not None:
            raise ModelError(f"QuantizeLinear {label}: a Clip between a weight's QuantizeLinear and "
                             "DequantizeLinear is not supported (only activations may have a reduced range)")
        qtype = qmath.qtype_by_name(read_params(quantize).qtype)
        bounds = []
        for index, default in ((1, qtype.qmin), (2, qtype.qmax)):
            given = clip.inputs[index] if len(clip.inputs) > index and clip.inputs[index].name else None
            value = default if given is None else constant_value(given)
            if value is None:
                raise ModelError(f"Clip {node_label(clip)} after QuantizeLinear {label}: min and max must be "
                                 "constants")
            bounds.append(int(value))
        for user in users:
            user.inputs[0] = integers
        clip.inputs.clear()
        clip.outputs.clear()
        dropped.append(f"{node_label(clip)}: [{bounds[0]}, {bounds[1]}]")
    return dropped


def _strip_dequantize(graph: gs.Graph, dq: gs.Node, names: NameAllocator, outputs: set[str],
                      result: Stripped) -> None:
    quantized, restored = dq.inputs[0], dq.outputs[0]
    if restored.name in outputs and constant_value(quantized) is not None:
        raise ModelError(f"DequantizeLinear {node_label(dq)}: a dequantized constant as a graph output is not "
                         "supported")
    stored = constant_value(quantized)
    if stored is not None:  # DequantizeLinear of stored integers: a weight or bias
        params = read_params(dq, stored.dtype)
        values = _fake_quantized(None, stored, params)
        name = _to_constant(dq, gs.Constant(names.new(f"{quantized.name}_float"), values))
        _remember(result, name, params)
        result.stored_weights.append(name)
        return
    quantize = quantized.inputs[0] if quantized.inputs else None
    if quantize is None or quantize.op != "QuantizeLinear":
        raise ModelError(f"DequantizeLinear {node_label(dq)}: its input is neither stored integers nor a "
                         "QuantizeLinear output (integer model inputs are not supported)")
    q_params, params = read_params(quantize), read_params(dq)
    if not params.same_as(q_params):
        raise ModelError(f"DequantizeLinear {node_label(dq)}: parameters differ from those of its "
                         f"QuantizeLinear {node_label(quantize)} (a requantization, not a fake-quant pair)")
    source = quantize.inputs[0]
    weight = constant_value(source)
    if weight is not None:  # fake-quant on a float weight: keep the values training saw
        values = _fake_quantized(weight, None, params)
        only_here = is_constant(source) and all(c is quantize for c in source.outputs) and all(
            c.op == "DequantizeLinear" for c in quantized.outputs)
        if only_here:  # the weight keeps its name (quantizing fake-quantized values again changes nothing)
            source.values = values
            name = _to_constant(dq, source)
        else:
            name = _to_constant(dq, gs.Constant(names.new(f"{source.name}_fakequant"), values))
        _remember(result, name, q_params)
        result.folded_weights.append(name)
        return
    _remember(result, _drop_activation_pair(graph, dq, quantize, source, restored, outputs), q_params)


def _fake_quantized(weight: np.ndarray | None, stored: np.ndarray | None, params: Learned) -> np.ndarray:
    """dequantize(quantize(weight)) for a fake-quant weight, dequantize(stored) for stored integers."""
    ndim = (weight if weight is not None else stored).ndim
    shape: tuple[int, ...] = ()
    if params.axis is not None:
        if params.axis >= ndim:
            raise ModelError(f"{params.node}: axis {params.axis} is out of range for a weight of rank {ndim}")
        shape = tuple(len(params.scale) if i == params.axis else 1 for i in range(ndim))
    scale = np.asarray(params.scale, np.float32).reshape(shape)
    zero = np.asarray(params.zero_point, np.int64).reshape(shape)
    if stored is None:
        stored = qmath.quantize(weight, scale, zero, qmath.qtype_by_name(params.qtype))
    return qmath.dequantize(stored, scale, zero)


def _to_constant(dq: gs.Node, constant: gs.Constant) -> str:
    """Consumers of `dq` read the float constant instead; returns its name."""
    restored = dq.outputs[0]
    for consumer in list(restored.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is restored:
                consumer.inputs[index] = constant
    dq.inputs.clear()
    dq.outputs.clear()
    return constant.name


def _drop_activation_pair(graph: gs.Graph, dq: gs.Node, quantize: gs.Node, source: gs.Tensor,
                          restored: gs.Tensor, outputs: set[str]) -> str:
    """Drop a Q->DQ pair on an activation; returns the name the float tensor keeps.

    The dequantized name survives where it can (it is what onnxq's own writer restores, and
    graph outputs must keep theirs): the producer then writes it directly.
    """
    dq.inputs.clear()
    dq.outputs.clear()
    if not quantize.outputs[0].outputs:  # the last DequantizeLinear of this QuantizeLinear
        quantize.inputs.clear()
        quantize.outputs.clear()
    if source.inputs and not source.outputs and source.name not in outputs:
        producer = source.inputs[0]
        producer.outputs[producer.outputs.index(source)] = restored
        return restored.name
    if restored.name in outputs:
        graph.nodes.append(gs.Node("Identity", inputs=[source], outputs=[restored]))
        return source.name
    for consumer in list(restored.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is restored:
                consumer.inputs[index] = source
    return source.name


def _remember(result: Stripped, name: str, params: Learned) -> None:
    known = result.learned.get(name)
    if known is not None and not known.same_as(params):
        raise ModelError(f"tensor {name} is quantized twice with different parameters ({known.node} and "
                         f"{params.node})")
    result.learned[name] = params

