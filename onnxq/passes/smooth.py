"""SmoothQuant: move activation outliers into the weights that follow (float-exact).

A few channels of a transformer's activations are much larger than the rest, so one per-tensor
int8 scale wastes most of its levels on them. For a MatMul/Gemm X @ W with a constant W [K, N],
X @ W = (X / s) @ (diag(s) W) for any positive s [K]. With a_k the calibration abs-max of
channel k of X (its last axis) and w_k = max_n |W_kn|,

    s_k = a_k^alpha / w_k^(1 - alpha)

evens out the channels of X / s (alpha = 1 moves all of the range into the weights, 0 none);
the weights are quantized per output column, so their rows absorb s cheaply. All MatMul/Gemm
reading the same X (Q, K and V after one LayerNorm) share one s, from the max over their weights.

X / s must come from somewhere. Free: folded into the producer of X when it is a
LayerNormalization (scale and bias / s), a Mul or Div by a constant (the 0.5 ending an exported
GELU), a constant Mul then constant Add (a LayerNorm exported as separate ops ends with x * a + b),
or a MatMul/Gemm (+ bias Add) with constant weights (output columns / s). When the
producer's output also feeds other nodes (the residual Add after a post-norm transformer's
LayerNorm), a LayerNormalization is copied for the smoothed consumers (one more op). Anything
else gets a Mul by 1/s, only when asked (`insert_mul`), since it costs an op.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import UsageError
from onnxq.quant.ir import (
    NameAllocator,
    constant_values,
    export_model,
    import_graph,
    is_constant,
    is_float32,
    node_label,
)
from onnxq.quant.ops import MATMUL_OPS
from onnxq.runtime.data import SampleSource, batches
from onnxq.runtime.session import ProgressFactory, no_progress, run, session_for

S_MIN, S_MAX = 1e-4, 1e4  # s stays finite and invertible in float32 whatever the statistics say


@dataclass
class SmoothedLayer:
    """One activation shared by `consumers`, divided by s through `how`."""

    activation: str
    consumers: list[str]
    how: str  # layernorm | layernorm-copy | mul-constant | affine-constant | matmul | inserted-mul
    range_before: float  # per-tensor abs-max of the activation over calibration data
    range_after: float  # the same of X / s (what the int8 scale now has to cover)

    def to_report(self) -> dict:
        return {"activation": self.activation, "consumers": self.consumers, "how": self.how,
                "range_before": round(self.range_before, 6), "range_after": round(self.range_after, 6),
                "range_shrink": round(self.range_before / self.range_after, 3) if self.range_after else None,
                "extra_op": self.how in ("layernorm-copy", "inserted-mul")}


@dataclass
class SmoothResult:
    model: onnx.ModelProto
    alpha: float
    layers: list[SmoothedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # activation -> why it was left alone

    def to_report(self) -> dict:
        return {"alpha": self.alpha, "layers_smoothed": len(self.layers),
                "extra_ops": sum(1 for layer in self.layers if layer.to_report()["extra_op"]),
                "max_range_before": max((layer.range_before for layer in self.layers), default=None),
                "max_range_after": max((layer.range_after for layer in self.layers), default=None),
                "layers": [layer.to_report() for layer in self.layers], "skipped": self.skipped}


def validate_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"--smooth-alpha must be between 0 and 1 (typical 0.5), got {alpha}")


@dataclass
class SmoothGroup:
    activation: gs.Variable
    consumers: list[gs.Node]
    how: str


def smooth_model(model: onnx.ModelProto, alpha: float, source: SampleSource, *, batch_size: int = 1,
                 insert_mul: bool = False, progress: ProgressFactory = no_progress) -> SmoothResult:
    """The model with every smoothable MatMul/Gemm input smoothed (outputs unchanged up to rounding)."""
    validate_alpha(alpha)
    graph = import_graph(model)
    groups, skipped = find_groups(graph, insert_mul)
    if not groups:
        return SmoothResult(model, alpha, skipped=skipped)
    absmax = channel_absmax(model, [g.activation.name for g in groups], source, batch_size, progress)
    names = NameAllocator(graph)
    layers = []
    for group in groups:
        a = absmax[group.activation.name]
        w = np.max([np.abs(_weight_kn(node)).max(axis=1) for node in group.consumers], axis=0)
        s = smoothing_factors(a, w, alpha)
        for node in group.consumers:
            scale_weight_rows(node, s, names)
        divide_activation(graph, group, s, names)
        layers.append(SmoothedLayer(group.activation.name, [node_label(n) for n in group.consumers], group.how,
                                    float(a.max()), float((a / s).max())))
    return SmoothResult(export_model(graph, model), alpha, layers, skipped)


def smoothing_factors(a: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """s = a^alpha / w^(1-alpha), 1 where a channel is all zero (nothing to balance), clamped."""
    a, w = np.asarray(a, np.float64), np.asarray(w, np.float64)
    live = (a > 0) & (w > 0)
    s = np.where(live, np.power(np.where(live, a, 1.0), alpha) / np.power(np.where(live, w, 1.0), 1.0 - alpha), 1.0)
    return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def channel_absmax(model: onnx.ModelProto, tensors: list[str], source: SampleSource, batch_size: int = 1,
                   progress: ProgressFactory = no_progress) -> dict[str, np.ndarray]:
    """Per-channel (last axis) abs-max of `tensors` over `source`; only a running max is kept.

    Graph inputs among `tensors` are read from the feeds (onnxruntime has no output by their name).
    """
    found: dict[str, np.ndarray] = {}
    inputs = {i.name for i in model.graph.input}
    computed = [t for t in tensors if t not in inputs]
    with tempfile.TemporaryDirectory(prefix="onnxq-smooth-") as tmp:
        session = session_for(model, Path(tmp), outputs=computed) if computed else None
        bar = progress(len(source), "smoothing statistics")
        try:
            for feed, count in batches(source, batch_size):
                values_of = dict(zip(computed, run(session, feed, computed), strict=True)) if session else {}
                values_of.update({name: feed[name] for name in tensors if name in inputs})
                for name in tensors:
                    values = values_of[name]
                    channel = np.abs(values.reshape(-1, values.shape[-1])).max(axis=0)
                    found[name] = channel if name not in found else np.maximum(found[name], channel)
                bar.update(count)
        finally:
            bar.close()
    return found


def _weight_kn(node: gs.Node) -> np.ndarray:
    weight = constant_values(node.inputs[1]).astype(np.float32)
    return weight.T if node.op == "Gemm" and node.attrs.get("transB", 0) else weight


def _smoothable(node: gs.Node) -> bool:
    """A MatMul/Gemm whose second input is a constant float 2-D weight (X @ W, X's last axis = K)."""
    if node.op not in MATMUL_OPS or len(node.inputs) < 2 or is_constant(node.inputs[0]):
        return False
    weight = node.inputs[1]
    if not is_constant(weight) or not is_float32(weight) or constant_values(weight).ndim != 2:
        return False
    return node.op == "MatMul" or not node.attrs.get("transA", 0)


def find_groups(graph: gs.Graph, insert_mul: bool) -> tuple[list[SmoothGroup], dict[str, str]]:
    by_activation: dict[str, list[gs.Node]] = {}
    tensors = graph.tensors()
    for node in graph.nodes:  # the main graph only: subgraph bodies are not calibrated per channel here
        if _smoothable(node):
            by_activation.setdefault(node.inputs[0].name, []).append(node)
    groups, skipped = [], {}
    outputs = {t.name for t in graph.outputs}
    for name, consumers in by_activation.items():
        activation = tensors[name]
        others = [n for n in activation.outputs if n not in consumers and n.op != "Shape"]
        exclusive = not others and name not in outputs
        how = _how(activation, exclusive, insert_mul)
        if how.startswith("no:"):
            skipped[name] = how[3:].strip()
        else:
            groups.append(SmoothGroup(activation, consumers, how))
    return groups, skipped


def _how(activation: gs.Variable, exclusive: bool, insert_mul: bool) -> str:
    """Where 1/s can go for this activation, or 'no: why'."""
    producer = activation.inputs[0] if activation.inputs else None
    if producer is not None and _layernorm_foldable(producer):
        return "layernorm" if exclusive else "layernorm-copy"
    if producer is not None and exclusive and _constant_operand(producer) is not None:
        return "mul-constant"
    if producer is not None and exclusive and _constant_affine(producer) is not None:
        return "affine-constant"
    if producer is not None and exclusive and _producing_matmul(producer) is not None:
        return "matmul"
    if insert_mul:
        return "inserted-mul"
    what = f"produced by {producer.op}" if producer is not None else "a graph input"
    return f"no: {what}, nothing to fold 1/s into (--smooth-mul inserts a Mul, one more op)"


def _layernorm_foldable(node: gs.Node) -> bool:
    if node.op != "LayerNormalization" or node.attrs.get("axis", -1) not in (-1,):
        return False
    return all(is_constant(t) and constant_values(t).ndim == 1 for t in node.inputs[1:3] if t.name)


def _constant_operand(node: gs.Node) -> int | None:
    """Index of the constant of a Mul (either side) or Div (divisor) holding a scalar or last-axis vector."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    for index in ((0, 1) if node.op == "Mul" else (1,)):
        tensor, other = node.inputs[index], node.inputs[1 - index]
        if is_constant(tensor) and not is_constant(other) and is_float32(tensor):
            shape = constant_values(tensor).shape
            if all(d == 1 for d in shape[:-1]) and len(shape) <= len(other.shape or [None]):
                return index
    return None


def _constant_affine(node: gs.Node) -> tuple[int, gs.Node, int] | None:
    """(index of the constant in this Add, the Mul before it, index of the Mul's constant) for y = x * a + b
    with constant a and b: how exporters write a LayerNormalization's scale and shift as separate ops."""
    if node.op != "Add" or len(node.inputs) != 2:
        return None
    for index in (0, 1):
        shift, other = node.inputs[index], node.inputs[1 - index]
        if not is_constant(shift) or not is_float32(shift) or not other.inputs or len(other.outputs) != 1:
            continue
        if any(d != 1 for d in constant_values(shift).shape[:-1]):
            continue
        mul = other.inputs[0]
        mul_index = _constant_operand(mul) if mul.op == "Mul" else None
        if mul_index is not None:
            return index, mul, mul_index
    return None


def _producing_matmul(node: gs.Node) -> tuple[gs.Node, gs.Node | None] | None:
    """(MatMul/Gemm with a constant weight, its bias Add or None) producing this node's output; a Gemm's
    bias input C must then be a constant vector (it is divided by s too)."""
    add = None
    if node.op == "Add" and len(node.inputs) == 2:
        for index in (0, 1):
            bias, other = node.inputs[index], node.inputs[1 - index]
            if is_constant(bias) and constant_values(bias).ndim == 1 and other.inputs and len(other.outputs) == 1:
                add, node = node, other.inputs[0]
                break
        else:
            return None
    if not _smoothable(node):
        return None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = node.inputs[2]
        if add is not None or not is_constant(bias) or constant_values(bias).ndim > 1:
            return None
    return node, add


def _new_constant(names: NameAllocator, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(names.new(f"{base}_smoothed"), np.ascontiguousarray(values.astype(np.float32)))


def scale_weight_rows(node: gs.Node, s: np.ndarray, names: NameAllocator) -> None:
    """W' = diag(s) W (a fresh constant: the original may be shared with other nodes)."""
    weight = constant_values(node.inputs[1]).astype(np.float32)
    scaled = weight * s[None, :] if node.op == "Gemm" and node.attrs.get("transB", 0) else weight * s[:, None]
    node.inputs[1] = _new_constant(names, node.inputs[1].name, scaled)


def divide_activation(graph: gs.Graph, group: SmoothGroup, s: np.ndarray, names: NameAllocator) -> None:
    activation, how = group.activation, group.how
    producer = activation.inputs[0] if activation.inputs else None
    if how in ("layernorm", "layernorm-copy"):
        assert producer is not None
        params = [_new_constant(names, t.name, constant_values(t) / s) if t.name else t for t in producer.inputs[1:3]]
        if how == "layernorm":
            for index, param in enumerate(params, start=1):
                producer.inputs[index] = param
            return
        copy = gs.Variable(names.new(f"{activation.name}_smoothed"), activation.dtype, activation.shape)
        graph.nodes.append(gs.Node("LayerNormalization", names.new(f"{producer.name or 'LayerNorm'}_smoothed"),
                                   dict(producer.attrs), [producer.inputs[0], *params], [copy]))
        _rewire(group, copy)
    elif how == "mul-constant":
        assert producer is not None
        index = _constant_operand(producer)
        assert index is not None
        constant = producer.inputs[index]
        values = constant_values(constant)
        vector = (values / s if producer.op == "Mul" else values * s).reshape((1,) * max(values.ndim - 1, 0) + (-1,))
        producer.inputs[index] = _new_constant(names, constant.name, vector)
    elif how == "affine-constant":  # (x * a + b) / s = x * (a / s) + b / s
        assert producer is not None
        found_affine = _constant_affine(producer)
        assert found_affine is not None
        add_index, mul, mul_index = found_affine
        for node, index in ((producer, add_index), (mul, mul_index)):
            values = constant_values(node.inputs[index])
            vector = np.broadcast_to(values, (*values.shape[:-1], s.size)) / s
            node.inputs[index] = _new_constant(names, node.inputs[index].name, vector)
    elif how == "matmul":
        assert producer is not None
        found = _producing_matmul(producer)
        assert found is not None
        matmul, add = found
        weight = constant_values(matmul.inputs[1]).astype(np.float32)
        transposed = matmul.op == "Gemm" and matmul.attrs.get("transB", 0)
        matmul.inputs[1] = _new_constant(names, matmul.inputs[1].name,
                                         weight / s[:, None] if transposed else weight / s[None, :])
        if add is not None:
            index = 0 if is_constant(add.inputs[0]) else 1
            add.inputs[index] = _new_constant(names, add.inputs[index].name, constant_values(add.inputs[index]) / s)
        elif matmul.op == "Gemm" and len(matmul.inputs) > 2 and matmul.inputs[2].name:  # Gemm's own bias C
            matmul.inputs[2] = _new_constant(names, matmul.inputs[2].name, constant_values(matmul.inputs[2]) / s)
    else:  # inserted-mul
        divided = gs.Variable(names.new(f"{activation.name}_smoothed"), activation.dtype, activation.shape)
        graph.nodes.append(gs.Node("Mul", names.new(f"{activation.name}_smooth_Mul"), {},
                                   [activation, _new_constant(names, f"{activation.name}_inverse_s", 1.0 / s)],
                                   [divided]))
        _rewire(group, divided)


def _rewire(group: SmoothGroup, tensor: gs.Variable) -> None:
    for node in group.consumers:
        node.inputs[0] = tensor
