"""Cheap sensitivity: every int8 layer's own error, in one pass over the samples.

Measuring a layer's effect on the model output costs a whole evaluation per layer (what
`onnxq sensitivity` does). The automatic default only needs an order to try fallbacks in, so
it uses each layer's local error instead: a probe model computes, beside every int8
Conv/MatMul/Gemm, a copy of it that reads the same fp32 inputs quantized as the plan says
(activations through Q/DQ, weights and bias rounded) and returns both outputs. One run over
the samples gives every layer's SQNR against its fp32 output. The cost is about two fp32
passes, whatever the number of layers (the probe grows by one copy per layer), and linear in
samples; it misses how much later layers amplify an error, which the fallback trials then
measure on the whole model.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.quant import qmath
from onnxq.quant.ir import NameAllocator, constant_values, export_model, import_graph, is_constant, node_label
from onnxq.quant.ops import HEAVY_OPS
from onnxq.quant.plan import QuantPlan, TensorPlan
from onnxq.runtime.emulation import LEVEL
from onnxq.runtime.session import run, session_for


def probe_model(prepared: onnx.ModelProto, plan: QuantPlan, layers: set[str]) -> tuple[onnx.ModelProto,
                                                                                       dict[str, tuple[str, str]]]:
    """The fp32 model plus a quantized copy of each layer in `layers`; label -> (fp32 output, copy output)."""
    graph = import_graph(prepared)
    names = NameAllocator(graph)
    pairs: dict[str, tuple[str, str]] = {}
    outputs = list(graph.outputs)
    for node in list(graph.nodes):
        label = node_label(node)
        if node.op not in HEAVY_OPS or label not in layers or not node.outputs:
            continue
        inputs = [_quantized_input(graph, tensor, plan.tensors.get(tensor.name), names) for tensor in node.inputs]
        copy_out = gs.Variable(names.new(f"{node.outputs[0].name}_probe"), dtype=np.float32)
        graph.nodes.append(gs.Node(node.op, names.new(f"{label}_probe"), dict(node.attrs), inputs, [copy_out]))
        original = node.outputs[0]
        original.dtype = original.dtype or np.float32
        outputs += [original, copy_out]
        pairs[label] = (original.name, copy_out.name)
    unique = {id(t): t for t in outputs}  # graphsurgeon tensors are not hashable: one entry each by identity
    graph.outputs = list(unique.values())
    return export_model(graph, prepared), pairs


def _quantized_input(graph: gs.Graph, tensor: gs.Tensor, entry: TensorPlan | None, names: NameAllocator
                     ) -> gs.Tensor:
    """The tensor as the int8 layer sees it: activations through a Q/DQ pair, constants rounded."""
    if entry is None:
        return tensor
    if entry.role in ("weight", "bias") and is_constant(tensor):
        values = constant_values(tensor).astype(np.float32)
        if entry.role == "weight":
            qtype = qmath.qtype_by_name(entry.qtype)
            rounded = qmath.dequantize(qmath.quantize(values, entry.scale_array(), entry.zero_point_array(), qtype,
                                                      entry.axis), entry.scale_array(), entry.zero_point_array(),
                                       entry.axis)
        else:
            scale = np.asarray(entry.scale, np.float32).reshape(values.shape)
            rounded = (np.rint(values.astype(np.float64) / scale) * scale).astype(np.float32)
        return gs.Constant(names.new(f"{tensor.name}_rounded"), rounded)
    if entry.role != "activation":
        return tensor
    scale = gs.Constant(names.new(f"{tensor.name}_probe_scale"), entry.scale_array())
    zero_point = gs.Constant(names.new(f"{tensor.name}_probe_zero_point"), entry.zero_point_array())
    qtype = qmath.qtype_by_name(entry.qtype)
    quantized = gs.Variable(names.new(f"{tensor.name}_probe_q"), dtype=qtype.dtype)
    restored = gs.Variable(names.new(f"{tensor.name}_probe_dq"), dtype=np.float32)
    graph.nodes.append(gs.Node("QuantizeLinear", names.new(f"{tensor.name}_probe_Q"),
                               inputs=[tensor, scale, zero_point], outputs=[quantized]))
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{tensor.name}_probe_DQ"),
                               inputs=[quantized, scale, zero_point], outputs=[restored]))
    return restored


def layer_errors(prepared: onnx.ModelProto, plan: QuantPlan, layers: set[str],
                 feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Each layer's SQNR (dB) against its fp32 output on `feeds`, lowest = most damaged first."""
    return probe_errors(*probe_model(prepared, plan, layers), feeds)


def probe_errors(model: onnx.ModelProto, pairs: dict[str, tuple[str, str]], feeds: list[dict[str, np.ndarray]],
                 threads: int = 0) -> dict[str, float]:
    """The probe pass of layer_errors over `feeds` (a Ray task runs it in onnxq.search.distributed)."""
    names = [name for pair in pairs.values() for name in pair]
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    with tempfile.TemporaryDirectory(prefix="onnxq-probe-") as tmp:
        # the copies' Q/DQ as written (onnxq.runtime.emulation)
        session = session_for(model, Path(tmp), threads, level=LEVEL)
        for feed in feeds:
            values = dict(zip(names, run(session, feed, names), strict=True))
            for label, (reference, copy) in pairs.items():
                ref = values[reference].astype(np.float64)
                signal[label] += float(np.sum(ref**2))
                noise[label] += float(np.sum((ref - values[copy].astype(np.float64)) ** 2))
    errors = {label: _db(signal[label], noise[label]) for label in pairs}
    return dict(sorted(errors.items(), key=lambda item: (item[1], item[0])))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
