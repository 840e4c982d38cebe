"""Dynamic and weight-only quantization: no calibration data needed.

- dynamic: every MatMul and Gemm with a constant 2-D weight becomes com.microsoft
  DynamicQuantizeMatMul: int8 weights (per column by default), the activation quantized to
  uint8 at run time from its own min/max. LSTMs with constant W and R become com.microsoft
  DynamicQuantizeLSTM (int8 W and R, one scale per gate row by default). Also inside If/Loop/Scan
  bodies. Convolutions stay float: onnxruntime's CPU provider has no dynamic int8 convolution it
  can run for these types (ConvInteger with int8 weights fails with NOT_IMPLEMENTED), so onnxq
  never emits one.
- weight-only: integer weights, float compute. 8 bits: int8 per output channel behind a
  DequantizeLinear (Conv, MatMul, Gemm). 4 bits: MatMul weights as com.microsoft MatMulNBits,
  block-wise along K (symmetric, or with zero points).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import UsageError
from onnxq.quant import qmath, weight_rounding
from onnxq.quant.ir import (
    NameAllocator,
    all_graphs,
    constant_values,
    export_model,
    import_domain,
    import_graph,
    is_constant,
    is_float32,
    node_label,
    replace_nodes,
)
from onnxq.quant.ops import DYNAMIC_OPS, HEAVY_OPS, MATMUL_OPS, MS_DOMAIN, NO_DYNAMIC_KERNEL, gemm_attribute_problem
from onnxq.quant.placement import NodeDecision


@dataclass(frozen=True)
class LayerOptions:
    """Per-node decisions of --mode dynamic and weight-only, by node label, resolved by the caller (a recipe's:
    onnxq.commands.recipe.layer_options), as PlacementOptions carries them for static mode."""

    keep_float: dict[str, str] = field(default_factory=dict)  # -> why
    per_channel: dict[str, bool] = field(default_factory=dict)  # overrides the mode's per_channel
    weight_bits: dict[str, int] = field(default_factory=dict)  # weight-only: 4 or 8

    def per_channel_for(self, label: str, default: bool) -> bool:
        return self.per_channel.get(label, default)


NO_LAYER_OPTIONS = LayerOptions()


@dataclass(frozen=True)
class WeightOnlyOptions:
    bits: int = 8  # 8: int8 per channel (all weights); 4: MatMulNBits for MatMul weights
    block_size: int = 32
    symmetric: bool = True  # 4 bits: False stores a zero point per block
    method: str = "rtn"  # 4 bits: rtn | gptq | awq | hqq (onnxq.quant.weight_rounding)

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"--weight-bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError(f"--block-size must be a power of two of at least 16, got {self.block_size}")
        if self.method not in weight_rounding.METHODS:
            raise UsageError(f"--weight-method must be one of {', '.join(weight_rounding.METHODS)}, got {self.method}")
        if self.method != "rtn" and self.bits != 4:
            raise UsageError(f"--weight-method {self.method} is for --weight-bits 4 (8-bit weights are rounded to "
                             "nearest per channel)")


def finish_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    for sub in all_graphs(graph):
        sub.cleanup(remove_unused_graph_inputs=False)
    model = export_model(graph, like)
    import_domain(model, MS_DOMAIN)
    model.producer_name = "onnxq"
    return model


def matmul_weight(node: gs.Node) -> tuple[np.ndarray, gs.Tensor | None] | str:
    """(weight as [K, N], bias or None) of a MatMul/Gemm that can run as a quantized matmul, else why not."""
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]) or not is_float32(node.inputs[1]):
        return "weight is not a float constant"
    weight = np.asarray(constant_values(node.inputs[1]), dtype=np.float32)  # no copy of a float32 weight
    if weight.ndim != 2:
        return "weight is not 2-D"
    if node.op == "MatMul":
        return weight, None
    problem = gemm_attribute_problem(node.attrs)
    if problem is not None:
        return problem
    if node.attrs.get("transB", 0):
        weight = np.ascontiguousarray(weight.T)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and (not is_constant(bias) or constant_values(bias).shape != (weight.shape[1],)):
        return "Gemm bias is not a constant vector"
    return weight, bias


def _chosen_nodes(graph: gs.Graph, ops: Collection[str], keep_float: dict[str, str],
                  decisions: list[NodeDecision]) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """(graph, node) for every node of `ops`, also in subgraphs; nodes in `keep_float` are recorded in
    `decisions` (with its reason) and not yielded."""
    for sub in all_graphs(graph):
        for node in list(sub.nodes):
            if node.op not in ops:
                continue
            why = keep_float.get(node_label(node))
            if why is not None:
                decisions.append(NodeDecision(node_label(node), node.op, "float", why))
            else:
                yield sub, node


def quantize_columns(weight: np.ndarray, qtype: qmath.QType, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights for a [K, N] matrix: one scale per column (or one in all)."""
    q, scale, _ = qmath.symmetric_weights(weight, qtype, 1 if per_channel else None)
    return q.astype(np.int8), np.asarray(scale, np.float32)


def rewrite_dynamic(model: onnx.ModelProto, qtype: qmath.QType, per_channel: bool,
                    layers: LayerOptions = NO_LAYER_OPTIONS, only: frozenset[str] | None = None
                    ) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """`layers`: nodes kept float, per-channel overrides.
    `only`: rewrite just these nodes (static mode's dynamic layers); the rest are left as they are."""
    graph = import_graph(model)
    names = NameAllocator(graph)
    decisions: list[NodeDecision] = []
    keep_float = dict(layers.keep_float)
    if only is not None:
        keep_float.update({node_label(node): "not a dynamic layer" for sub in all_graphs(graph) for node in sub.nodes
                           if node.op in DYNAMIC_OPS and node_label(node) not in only})
    for sub, node in _chosen_nodes(graph, MATMUL_OPS, keep_float, decisions):
        found = matmul_weight(node)
        if isinstance(found, str):
            decisions.append(NodeDecision(node_label(node), node.op, "float", found))
            continue
        weight, bias = found
        base = node_label(node)
        q, scale = quantize_columns(weight, qtype, layers.per_channel_for(base, per_channel))
        params = [gs.Constant(names.new(f"{base}_weight_quantized"), q),
                  gs.Constant(names.new(f"{base}_weight_scale"), scale),
                  gs.Constant(names.new(f"{base}_weight_zero_point"), np.zeros(scale.shape, np.int8))]
        inputs = [node.inputs[0], *params] + ([bias] if bias is not None else [])
        new = gs.Node("DynamicQuantizeMatMul", node.name, {}, inputs, list(node.outputs), domain=MS_DOMAIN)
        replace_nodes(sub, [node], new)
        decisions.append(NodeDecision(base, node.op, "int8", "DynamicQuantizeMatMul"))
    for sub, node in _chosen_nodes(graph, ("LSTM",), keep_float, decisions):
        per_row = layers.per_channel_for(node_label(node), per_channel)
        decisions.append(_dynamic_lstm(sub, node, names, qtype, per_row))
    for sub in all_graphs(graph):
        for node in sub.nodes:
            if node.op in NO_DYNAMIC_KERNEL:
                decisions.append(NodeDecision(node_label(node), node.op, "float",
                                              "no dynamic int8 kernel onnxruntime's CPU provider runs for it"))
    return finish_model(graph, model), decisions


DEFAULT_LSTM_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]


def _lstm_unsupported(node: gs.Node) -> str | None:
    """Why this LSTM cannot become a DynamicQuantizeLSTM, or None when it can."""
    if len(node.inputs) < 3 or not all(is_constant(t) and is_float32(t) for t in node.inputs[1:3]):
        return "W or R is not a float constant"
    if any(constant_values(t).ndim != 3 for t in node.inputs[1:3]):
        return "W or R is not 3-D"
    if node.attrs.get("layout", 0) != 0:
        return "layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    if node.attrs.get("input_forget", 0):
        return "input_forget=1"
    directions = 2 if node.attrs.get("direction", "forward") == "bidirectional" else 1
    activations = node.attrs.get("activations")
    if activations is not None and [a.lower() for a in activations] != [a.lower() for a in
                                                                         DEFAULT_LSTM_ACTIVATIONS * directions]:
        return f"non-default activations {list(activations)}"
    if node.attrs.get("activation_alpha") or node.attrs.get("activation_beta"):
        return "activation_alpha/activation_beta set"
    return None


def quantize_lstm_weight(weight: np.ndarray, qtype: qmath.QType, per_channel: bool
                         ) -> tuple[np.ndarray, np.ndarray]:
    """An ONNX LSTM weight [dirs, 4H, K] as DynamicQuantizeLSTM wants it: int8 [dirs, K, 4H] (transposed),
    symmetric, with scales [dirs, 4H] (one per gate row) or [dirs] (one per direction)."""
    quantized, scales = [], []
    for direction in weight:  # [4H, K]: quantize as the [K, 4H] matrix the kernel multiplies by
        q, scale = quantize_columns(np.ascontiguousarray(direction.T), qtype, per_channel)
        quantized.append(q)
        scales.append(scale.reshape(-1))
    scale = np.stack(scales).astype(np.float32)
    return np.stack(quantized), scale if per_channel else scale.reshape(-1)


def _dynamic_lstm(graph: gs.Graph, node: gs.Node, names: NameAllocator, qtype: qmath.QType,
                  per_channel: bool) -> NodeDecision:
    label = node_label(node)
    why_not = _lstm_unsupported(node)
    if why_not is not None:
        return NodeDecision(label, node.op, "float", why_not)
    inputs = list(node.inputs) + [gs.Variable.empty()] * (8 - len(node.inputs))
    quantized, params = [], []
    for tensor in node.inputs[1:3]:
        q, scale = quantize_lstm_weight(constant_values(tensor).astype(np.float32), qtype, per_channel)
        quantized.append(gs.Constant(names.new(f"{tensor.name}_quantized"), q))
        params += [gs.Constant(names.new(f"{tensor.name}_scale"), scale),
                   gs.Constant(names.new(f"{tensor.name}_zero_point"), np.zeros(scale.shape, np.int8))]
    # X, W, R, B, sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale, R_zero_point
    new_inputs = [inputs[0], *quantized, *inputs[3:8], *params]
    attrs = {k: v for k, v in node.attrs.items() if k not in ("layout", "input_forget")}
    new = gs.Node("DynamicQuantizeLSTM", node.name, attrs, new_inputs, list(node.outputs), domain=MS_DOMAIN)
    replace_nodes(graph, [node], new)
    return NodeDecision(label, node.op, "int8", "DynamicQuantizeLSTM")


def rewrite_weight_only(model: onnx.ModelProto, options: WeightOnlyOptions, qtype: qmath.QType,
                        layers: LayerOptions = NO_LAYER_OPTIONS) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """`layers`: nodes kept float, weight bits by node (else `options.bits`)."""
    graph = import_graph(model)
    names = NameAllocator(graph)
    decisions: list[NodeDecision] = []
    for sub, node in _chosen_nodes(graph, HEAVY_OPS, layers.keep_float, decisions):
        if layers.weight_bits.get(node_label(node), options.bits) == 4:
            decisions.append(_int4_matmul(sub, node, names, options))
        else:
            decisions.append(_int8_weight(sub, node, names, qtype))
    return finish_model(graph, model), decisions


def _int8_weight(graph: gs.Graph, node: gs.Node, names: NameAllocator, qtype: qmath.QType) -> NodeDecision:
    label = node_label(node)
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]) or not is_float32(node.inputs[1]):
        return NodeDecision(label, node.op, "float", "weight is not a float constant")
    values = constant_values(node.inputs[1]).astype(np.float32)
    axis = 0 if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transB", 0)) else 1
    if values.ndim < 2:
        return NodeDecision(label, node.op, "float", "weight has fewer than 2 dimensions")
    q, scale, _ = qmath.symmetric_weights(values, qtype, axis)
    q = q.astype(np.int8)
    base = node.inputs[1].name
    restored = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{base}_DequantizeLinear"), {"axis": axis},
                               [gs.Constant(names.new(f"{base}_quantized"), q),
                                gs.Constant(names.new(f"{base}_scale"), np.asarray(scale, np.float32)),
                                gs.Constant(names.new(f"{base}_zero_point"), np.zeros(np.shape(scale), np.int8))],
                               [restored]))
    node.inputs[1] = restored
    return NodeDecision(label, node.op, "int8", "int8 weights, float compute")


def pack_int4(weight: np.ndarray, block_size: int, symmetric: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits layout of a [K, N] weight rounded to nearest: (packed [N, blocks, block_size/2] uint8,
    scales [N*blocks], packed zero points or None).

    Each column is cut into blocks of `block_size` along K (the last block zero-padded);
    values are unsigned 4-bit q = round(w / scale) + zero_point, two per byte, low nibble first.
    Symmetric: zero point 8, the value m of largest magnitude at code 0 (scale = -m / 8); else
    scale = (max - min) / 15 with a zero point.
    """
    fmt = weight_rounding.BlockFormat(4, block_size, symmetric)
    return weight_rounding.pack(weight_rounding.rtn(weight, fmt))


def unpack_int4(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, k: int) -> np.ndarray:
    """The [K, N] float weight MatMulNBits computes with (the reference for tests and reports)."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks, half * 2), np.float64)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    if zeros is None:
        zero = np.full((n, blocks), 8.0)
    else:
        z = zeros.reshape(n, -1)
        unpacked = np.empty((n, z.shape[1] * 2))
        unpacked[:, 0::2] = z & 0x0F
        unpacked[:, 1::2] = z >> 4
        zero = unpacked[:, :blocks]
    values = (q - zero[..., None]) * scales.reshape(n, blocks)[..., None]
    return values.reshape(n, -1)[:, :k].T.astype(np.float32)


def _int4_matmul(graph: gs.Graph, node: gs.Node, names: NameAllocator, options: WeightOnlyOptions) -> NodeDecision:
    label = node_label(node)
    if node.op != "MatMul":
        return NodeDecision(label, node.op, "float", "4-bit weights are for MatMul (MatMulNBits)")
    found = matmul_weight(node)
    if isinstance(found, str):
        return NodeDecision(label, node.op, "float", found)
    weight, _ = found
    k, n = weight.shape
    packed, scales, zeros = pack_int4(weight, options.block_size, options.symmetric)
    base = node.inputs[1].name
    inputs = [node.inputs[0], gs.Constant(names.new(f"{base}_int4"), packed),
              gs.Constant(names.new(f"{base}_scales"), scales)]
    if zeros is not None:
        inputs.append(gs.Constant(names.new(f"{base}_zero_points"), zeros))
    attrs = {"K": k, "N": n, "bits": 4, "block_size": options.block_size}
    replace_nodes(graph, [node], gs.Node("MatMulNBits", node.name, attrs, inputs, list(node.outputs), domain=MS_DOMAIN))
    return NodeDecision(label, node.op, "int4", f"4-bit weights, blocks of {options.block_size} (MatMulNBits)")
