"""Accuracy recovery for static quantization: cross-layer equalization, bias correction, AdaRound.

- `equalize_model` (Nagel et al. 2019, "Data-Free Quantization"): for Conv -> [Relu | LeakyRelu |
  PRelu | nothing] -> Conv pairs, scale conv1's output channel i by 1/s_i and conv2's input channel i
  by s_i, s_i = sqrt(r1_i / r2_i) (r = per-channel max |w|), so both channels end with the range
  sqrt(r1_i * r2_i). Exact for positive-homogeneous activations only: Clip(0, 6) (Relu6) and
  HardSwish are not (f(x / s) != f(x) / s), so pairs through them are skipped.
- `bias_shift` (empirical bias correction): weight rounding shifts each output channel's mean by
  E[(W - W_q) x]; adding that to the float bias removes it. x is the layer's input as the
  quantized model sees it (the QDQ model of the current plan, run on the calibration samples).
- `adaround` (Nagel et al. 2020, "Up or Down?"): choose floor or ceil for every weight to minimise
  ||(W - W_q) x||^2 on the layer's calibration inputs, through the rectified-sigmoid relaxation with
  an annealed regulariser, optimised with Adam in numpy. The error is a quadratic form in the
  Gram matrix of x's columns (im2col for Conv), collected once on a fixed-seed subsample of them.
  The chosen integers reach the writer as float weights s * q: with the plan's per-channel scale
  s, round-to-nearest gives back exactly q (and the largest |q| stays qmax, so s is unchanged).

Statistics per layer are running sums (column sums and a Gram matrix), never activations.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

from onnxq.enums import NodeStatus
from onnxq.errors import UsageError
from onnxq.quant import qmath
from onnxq.quant.ir import NameAllocator, constant_values, export_model, import_graph, is_constant, is_empty, node_label
from onnxq.quant.ops import BIASED_OPS, HEAVY_OPS
from onnxq.quant.placement import Placement
from onnxq.quant.plan import QuantPlan
from onnxq.runtime.calibrate import groups_within_budget
from onnxq.runtime.data import SampleSource, batches
from onnxq.runtime.session import ProgressFactory, no_progress, run, session_for

HOMOGENEOUS_ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu"}  # f(x / s) = f(x) / s for every s > 0
EQUALIZE_ITERATIONS = 20
GRAM_COLUMNS_PER_BATCH = 512  # im2col columns sampled per batch for AdaRound's Gram matrix
MAX_ADAROUND_FAN_IN = 4096
ADAROUND_SEED = 0
ADAROUND_MAX_STEPS = 2000
ADAROUND_MIN_STEPS = 100
ASSUMED_FLOPS = 2e9  # turns --adaround-seconds into step counts without reading the clock (byte-identical output)
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound paper)


# ------------------------------------------------------------------ cross-layer equalization


def equalization_scales(w1: np.ndarray, w2: np.ndarray, groups2: int) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i) for conv1's output channel i = conv2's input channel i (1 where either is 0)."""
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1).astype(np.float64)
    r2 = _input_channel_ranges(w2, groups2)
    s = np.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return s


def _input_channel_ranges(w2: np.ndarray, groups: int) -> np.ndarray:
    """max |w2| over everything that multiplies input channel i (conv2 with `groups` groups)."""
    out, per_group = w2.shape[0], w2.shape[1]
    view = np.abs(w2).reshape(groups, out // groups, per_group, -1)
    return view.max(axis=(1, 3)).reshape(groups * per_group).astype(np.float64)


def apply_equalization(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, groups2: int, s: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """conv1's output channel i divided by s_i, conv2's input channel i multiplied by s_i."""
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    new_w1 = (w1 / s.reshape(shape1)).astype(np.float32)
    new_b1 = None if b1 is None else (b1 / s).astype(np.float32)
    out, per_group = w2.shape[0], w2.shape[1]
    view = w2.reshape(groups2, out // groups2, per_group, -1)
    new_w2 = (view * s.reshape(groups2, 1, per_group, 1)).reshape(w2.shape).astype(np.float32)
    return new_w1, new_b1, new_w2


@dataclass
class EqualizationPair:
    conv1: gs.Node
    activation: str  # op type, or "none"
    conv2: gs.Node


def equalization_pairs(graph: gs.Graph) -> tuple[list[EqualizationPair], dict[str, int]]:
    """Conv -> [homogeneous activation] -> Conv pairs whose tensors have no other reader; and skips by reason."""
    pairs, skipped = [], {}
    outputs = {t.name for t in graph.outputs}
    for conv1 in graph.nodes:
        if conv1.op != "Conv" or not _own_constants(conv1):
            continue
        chain, activation = conv1.outputs[0], "none"
        if chain.name in outputs or len(chain.outputs) != 1:
            continue
        nxt = chain.outputs[0]
        if nxt.op != "Conv":
            if nxt.op not in HOMOGENEOUS_ACTIVATIONS:
                if nxt.op in ("Clip", "HardSwish"):
                    skipped[f"{nxt.op} between convs is not positive-homogeneous"] = skipped.get(
                        f"{nxt.op} between convs is not positive-homogeneous", 0) + 1
                continue
            if nxt.op == "PRelu" and not is_constant(nxt.inputs[1]):
                continue
            activation, chain = nxt.op, nxt.outputs[0]
            if chain.name in outputs or len(chain.outputs) != 1 or chain.outputs[0].op != "Conv":
                continue
            nxt = chain.outputs[0]
        if nxt.inputs[0] is not chain or not _own_constants(nxt):
            continue
        channels = constant_values(conv1.inputs[1]).shape[0]
        w2 = constant_values(nxt.inputs[1])
        groups2 = int(nxt.attrs.get("group", 1))
        if w2.shape[1] * groups2 != channels:
            continue
        pairs.append(EqualizationPair(conv1, activation, nxt))
    return pairs, skipped


def _own_constants(conv: gs.Node) -> bool:
    """Constant weight (and bias) read by this node only: rescaling them changes nothing else."""
    tensors = [conv.inputs[1]] + [t for t in conv.inputs[2:3] if not is_empty(t)]
    return all(is_constant(t) and len(t.outputs) == 1 for t in tensors) and constant_values(conv.inputs[1]).ndim >= 3


def equalize_model(model: onnx.ModelProto, iterations: int = EQUALIZE_ITERATIONS) -> tuple[onnx.ModelProto, dict]:
    """Cross-layer equalization of every eligible Conv pair; the float model computes the same function."""
    graph = import_graph(model)
    pairs, skipped = equalization_pairs(graph)
    report: dict = {"pairs": len(pairs), "skipped": skipped, "iterations": 0, "layers": []}
    if not pairs:
        return model, report
    before = [_range_spread(p) for p in pairs]
    for iteration in range(iterations):
        largest = 0.0
        for pair in pairs:
            w1, w2 = constant_values(pair.conv1.inputs[1]), constant_values(pair.conv2.inputs[1])
            groups2 = int(pair.conv2.attrs.get("group", 1))
            has_bias = len(pair.conv1.inputs) > 2 and not is_empty(pair.conv1.inputs[2])
            b1 = constant_values(pair.conv1.inputs[2]) if has_bias else None
            s = equalization_scales(w1, w2, groups2)
            new_w1, new_b1, new_w2 = apply_equalization(w1, b1, w2, groups2, s)
            pair.conv1.inputs[1].values = new_w1
            pair.conv2.inputs[1].values = new_w2
            if new_b1 is not None:
                pair.conv1.inputs[2].values = new_b1
            largest = max(largest, float(np.max(np.abs(np.log(s)))))
        report["iterations"] = iteration + 1
        if largest < 1e-3:
            break
    for pair, spread in zip(pairs, before, strict=True):
        report["layers"].append({"conv1": node_label(pair.conv1), "activation": pair.activation,
                                 "conv2": node_label(pair.conv2), "range_spread_before": spread,
                                 "range_spread_after": _range_spread(pair)})
    return export_model(graph, model), report


def _range_spread(pair: EqualizationPair) -> list[float]:
    """Per-tensor max |w| over the smallest channel's max |w| (conv1 outputs, conv2 inputs): 1 is ideal."""
    w1 = np.abs(constant_values(pair.conv1.inputs[1]))
    r1 = w1.reshape(w1.shape[0], -1).max(axis=1)
    r2 = _input_channel_ranges(constant_values(pair.conv2.inputs[1]), int(pair.conv2.attrs.get("group", 1)))
    return [round(float(r.max() / max(r.min(), 1e-30)), 3) for r in (r1, r2)]


# ------------------------------------------------------------------ layers as matrices


@dataclass
class Layer:
    """A quantized Conv/Gemm/MatMul seen as W [groups, out per group, fan-in] applied to input columns."""

    node: gs.Node
    weight: gs.Constant
    groups: int
    layout: str  # "conv", "rows" (Gemm transB: W[out, in]) or "cols" (MatMul / Gemm: W[in, out])
    input_name: str  # the input in the model the columns are read from

    @property
    def label(self) -> str:
        return node_label(self.node)

    def matrix(self, values: np.ndarray | None = None) -> np.ndarray:
        w = constant_values(self.weight) if values is None else values
        w2 = w.T if self.layout == "cols" else w.reshape(w.shape[0], -1)
        return w2.reshape(self.groups, w2.shape[0] // self.groups, w2.shape[1]).astype(np.float64)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        w = constant_values(self.weight)
        flat = m.reshape(-1, m.shape[-1])
        return (flat.T if self.layout == "cols" else flat.reshape(w.shape)).astype(np.float32)

    def padded_input(self, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], list[int], list[int]]:
        """A Conv's input with its pads applied, and its kernel shape, strides and dilations."""
        kernel = constant_values(self.weight).shape[2:]
        attrs = self.node.attrs
        pads = attrs.get("pads", [0, 0] * len(kernel))
        strides = attrs.get("strides", [1] * len(kernel))
        dilations = attrs.get("dilations", [1] * len(kernel))
        padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + len(kernel)]) for i in range(len(kernel))])
        return padded, kernel, strides, dilations

    def columns(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """A view of the input's columns: [N, H', W', groups, fan-in] for Conv, [rows, 1, fan-in] otherwise."""
        if self.layout != "conv":
            return x.reshape(-1, 1, x.shape[-1]), 0
        padded, kernel, strides, dilations = self.padded_input(x)
        spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
        win = sliding_window_view(padded, spans, axis=(2, 3))
        win = win[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]  # [N, C, Ho, Wo, kh, kw]
        win = win.transpose(0, 2, 3, 1, 4, 5)  # [N, Ho, Wo, C, kh, kw]
        n, ho, wo = win.shape[:3]
        return win, n * ho * wo


def find_layers(graph: gs.Graph, placement: Placement) -> tuple[list[Layer], dict[str, str]]:
    """The int8 heavy layers recovery can work on, and why the others are skipped (label -> reason)."""
    int8 = {d.name for d in placement.nodes if d.status == NodeStatus.INT8 and d.op_type in HEAVY_OPS}
    layers, skipped = [], {}
    for node in graph.nodes:
        label = node_label(node)
        if node.op not in HEAVY_OPS or label not in int8:
            continue
        reason, layer = _as_layer(node, placement)
        if layer is None:
            skipped[label] = reason
        else:
            layers.append(layer)
    return layers, skipped


def _as_layer(node: gs.Node, placement: Placement) -> tuple[str, Layer | None]:
    if node.op == "Conv":
        w = node.inputs[1]
        if constant_values(w).ndim != 4:
            return "only 2-D convolutions", None
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "auto_pad padding", None
        return "", Layer(node, w, int(node.attrs.get("group", 1)), "conv", node.inputs[0].name)
    if node.op == "Gemm":
        w = node.inputs[1]
        if not is_constant(w):
            return "no constant weight", None
        return "", Layer(node, w, 1, "rows" if node.attrs.get("transB", 0) else "cols", node.inputs[0].name)
    if is_constant(node.inputs[1]) and not is_constant(node.inputs[0]) and node.inputs[1].name in placement.weights:
        return "", Layer(node, node.inputs[1], 1, "cols", node.inputs[0].name)
    return "constant operand is the first input", None


# ------------------------------------------------------------------ statistics of layer inputs


@dataclass
class InputMoments:
    """Running sums over a layer's input columns: count and sum (all), Gram matrix (a sample)."""

    count: int = 0
    total: np.ndarray | None = None  # [groups, fan-in]
    gram: np.ndarray | None = None  # [groups, fan-in, fan-in]
    gram_count: int = 0

    @property
    def mean(self) -> np.ndarray:
        assert self.total is not None and self.count
        return self.total / self.count


def accumulate(layer: Layer, x: np.ndarray, moments: InputMoments, rng: np.random.Generator | None) -> None:
    """Fold one batch of the layer's input into `moments` (the Gram matrix only when `rng` is given)."""
    x = np.asarray(x, dtype=np.float32)
    cols, positions = layer.columns(x)
    groups = layer.groups
    if layer.layout == "conv":
        total = _window_sums(layer, x, cols.shape[1:3]).reshape(groups, -1)
        count = positions
    else:
        total = cols.reshape(-1, cols.shape[-1]).sum(axis=0, dtype=np.float64).reshape(1, -1)
        count = cols.shape[0]
    moments.total = total if moments.total is None else moments.total + total
    moments.count += count
    if rng is None:
        return
    if layer.layout == "conv":
        n, ho, wo = cols.shape[:3]
        pick = np.sort(rng.choice(count, size=min(count, GRAM_COLUMNS_PER_BATCH), replace=False))
        i, h, w = np.unravel_index(pick, (n, ho, wo))
        sample = cols[i, h, w].reshape(len(pick), groups, -1).astype(np.float64)
    else:
        pick = np.sort(rng.choice(count, size=min(count, GRAM_COLUMNS_PER_BATCH), replace=False))
        sample = cols.reshape(count, 1, -1)[pick].astype(np.float64)
    per_group = sample.transpose(1, 0, 2)  # [groups, k, fan-in]
    gram = per_group.transpose(0, 2, 1) @ per_group
    moments.gram = gram if moments.gram is None else moments.gram + gram
    moments.gram_count += len(pick)


def _window_sums(layer: Layer, x: np.ndarray, out_hw: tuple[int, ...]) -> np.ndarray:
    """Sum of a Conv's input columns, [C, kh, kw]: one strided slice of the padded input per kernel
    offset (summing the im2col view directly walks memory across the window and is ~10x slower)."""
    padded, kernel, strides, dilations = layer.padded_input(x)
    ho, wo = out_hw
    sums = np.empty((x.shape[1], *kernel), dtype=np.float64)
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            top, left = a * dilations[0], b * dilations[1]
            window = padded[:, :, top:top + (ho - 1) * strides[0] + 1:strides[0],
                            left:left + (wo - 1) * strides[1] + 1:strides[1]]
            sums[:, a, b] = window.sum(axis=(0, 2, 3), dtype=np.float64)
    return sums


def collect_moments(model: onnx.ModelProto, layers: list[Layer], source: SampleSource, *, batch_size: int,
                    memory_budget: int, gram: set[str], progress: ProgressFactory = no_progress
                    ) -> dict[str, InputMoments]:
    """Input moments of every layer (`gram`: labels that also need the Gram matrix) over `source`."""
    inputs = {i.name for i in model.graph.input}
    names = sorted({layer.input_name for layer in layers} - inputs)
    moments = {layer.label: InputMoments() for layer in layers}
    rngs = {layer.label: np.random.default_rng([ADAROUND_SEED, i]) for i, layer in enumerate(layers)
            if layer.label in gram}
    with tempfile.TemporaryDirectory(prefix="onnxq-recovery-") as tmp:
        session = session_for(model, Path(tmp), outputs=names)
        groups = groups_within_budget(session, source, names, batch_size, memory_budget) or [[]]
        bar = progress(len(source) * len(groups), "reading layer inputs")
        try:
            for index, group in enumerate(groups):
                wanted = set(group) | (inputs if index == 0 else set())
                for feed, count in batches(source, batch_size):
                    values = dict(zip(group, run(session, feed, group), strict=True)) if group else {}
                    values.update({k: v for k, v in feed.items() if k in inputs})
                    for layer in layers:
                        if layer.input_name in wanted and layer.input_name in values:
                            accumulate(layer, values[layer.input_name], moments[layer.label], rngs.get(layer.label))
                    del values
                    bar.update(count)
        finally:
            bar.close()
    return moments


# ------------------------------------------------------------------ bias correction


def bias_shift(w: np.ndarray, w_q: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """E[W x] - E[W_q x] per output channel: w, w_q [groups, out, fan-in], mean [groups, fan-in] -> [out]."""
    return np.einsum("gof,gf->go", w.astype(np.float64) - w_q.astype(np.float64), mean).reshape(-1)


def _bias_target(graph: gs.Graph, layer: Layer, names: NameAllocator) -> gs.Constant | None:
    """The float bias to adjust: Conv/Gemm's own (added when missing) or the constant Add after a MatMul."""
    out = int(np.prod(layer.matrix().shape[:2]))
    node = layer.node
    if node.op in BIASED_OPS:
        if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
            bias = node.inputs[2]
            if len(bias.outputs) > 1:  # shared: give this layer its own copy
                bias = gs.Constant(names.new(f"{bias.name}_corrected"), constant_values(bias).copy())
                node.inputs[2] = bias
            return bias if constant_values(bias).shape == (out,) else None
        bias = gs.Constant(names.new(f"{layer.label}_bias"), np.zeros(out, np.float32))
        if len(node.inputs) > 2:
            node.inputs[2] = bias
        else:
            node.inputs.append(bias)
        return bias
    result = node.outputs[0]
    if len(result.outputs) != 1 or result.outputs[0].op != "Add" or result.name in {t.name for t in graph.outputs}:
        return None
    add = result.outputs[0]
    other = [t for t in add.inputs if t is not result]
    if len(other) != 1 or not is_constant(other[0]) or np.asarray(constant_values(other[0])).size != out:
        return None
    if np.asarray(constant_values(other[0])).shape[-1:] != (out,):
        return None
    bias = other[0]
    if len(bias.outputs) > 1:
        copy = gs.Constant(names.new(f"{bias.name}_corrected"), constant_values(bias).copy())
        add.inputs[add.inputs.index(bias)] = copy
        bias = copy
    return bias


# ------------------------------------------------------------------ AdaRound


@dataclass
class RoundingResult:
    q: np.ndarray  # chosen integers [groups, out, fan-in]
    loss_nearest: float  # ||(W - W_q) x||^2 per output element, round-to-nearest
    loss_chosen: float
    steps: int


def rounding_loss(w: np.ndarray, w_q: np.ndarray, gram: np.ndarray, columns: int) -> float:
    """Mean squared output error per output element: sum_o (w_o - w_q_o)^T G (w_o - w_q_o) / (columns * out)."""
    delta = w - w_q
    return float(np.sum((delta @ gram) * delta) / max(columns * delta.shape[0] * delta.shape[1], 1))


def _rectified_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) and dh/dV."""
    sig = 1.0 / (1.0 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = np.clip(raw, 0.0, 1.0)
    grad = np.where((raw > 0) & (raw < 1), sig * (1 - sig) * (ZETA - GAMMA), 0.0)
    return h, grad


def adaround(w: np.ndarray, scale: np.ndarray, gram: np.ndarray, columns: int, qmin: int, qmax: int,
             steps: int, *, reg_weight: float = 1.0, lr: float = 0.01, warmup: float = 0.2) -> RoundingResult:
    """Learned rounding of w [groups, out, fan-in] with per-output-channel scale [groups, out] (see module doc).

    The reconstruction loss is normalised by the loss of a unit rounding error per weight, so the
    regulariser weight means the same on every layer. Deterministic: no randomness, fixed step count.
    """
    s = scale[..., None].astype(np.float64)
    ratio = w / s
    floor = np.floor(ratio)
    nearest = np.clip(np.rint(ratio), qmin, qmax)
    loss_nearest = rounding_loss(w, nearest * s, gram, columns)
    rest = np.clip(ratio - floor, 1e-4, 1 - 1e-4)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    unit = np.einsum("gff->g", gram)[:, None, None] / gram.shape[-1] * s ** 2  # loss of a unit error, per row
    unit = np.maximum(unit, 1e-30)
    m, u = np.zeros_like(v), np.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    start = int(warmup * steps)
    for step in range(steps):
        h, dh = _rectified_sigmoid(v)
        q = np.clip(floor + h, qmin, qmax)
        inside = (floor + h >= qmin) & (floor + h <= qmax)
        delta = (q * s - w)  # W_soft - W
        grad_w = 2.0 * (delta @ gram) / unit  # d(normalised loss)/dW_soft
        grad = grad_w * s * inside * dh
        if step >= start:
            progress = (step - start) / max(steps - start, 1)
            beta = 2.0 + (20.0 - 2.0) * (1.0 - progress)
            centred = 2.0 * h - 1.0
            a = np.abs(centred)
            # d/dh of (1 - |2h - 1|^beta) = -beta |2h - 1|^(beta - 1) * 2 sign(2h - 1)
            grad = grad + reg_weight * (-beta * np.power(a, beta - 1.0) * 2.0 * np.sign(centred)) * dh
        m = beta1 * m + (1 - beta1) * grad
        u = beta2 * u + (1 - beta2) * grad * grad
        m_hat = m / (1 - beta1 ** (step + 1))
        u_hat = u / (1 - beta2 ** (step + 1))
        v = v - lr * m_hat / (np.sqrt(u_hat) + eps)
    h, _ = _rectified_sigmoid(v)
    chosen = np.clip(floor + (h >= 0.5), qmin, qmax)
    # the largest magnitude of each channel must keep +-qmax, or the plan's scale would change
    chosen = np.where(np.abs(nearest) == qmax, nearest, chosen)
    loss_chosen = rounding_loss(w, chosen * s, gram, columns)
    if loss_chosen >= loss_nearest:
        chosen, loss_chosen = nearest, loss_nearest
    return RoundingResult(chosen, loss_nearest, loss_chosen, steps)


def adaround_steps(layers: list[tuple[str, int]], seconds: float) -> dict[str, int]:
    """Steps per layer from (label, flops per step): ADAROUND_MAX_STEPS each unless the budget is smaller.

    Timing comes from a fixed cost model, not the clock, so the same input gives the same output.
    """
    total = sum(cost for _, cost in layers) * ADAROUND_MAX_STEPS / ASSUMED_FLOPS
    factor = min(1.0, seconds / total) if total > 0 else 1.0
    return {label: max(ADAROUND_MIN_STEPS, int(ADAROUND_MAX_STEPS * factor)) for label, _ in layers}


# ------------------------------------------------------------------ the pipeline step


@dataclass
class RecoveryOptions:
    bias_correction: bool = False
    adaround_seconds: float | None = None
    adaround_layers: frozenset[str] | None = None  # AdaRound only these layers (None: every one it can)

    @property
    def needs_data(self) -> bool:
        return self.bias_correction or self.adaround_seconds is not None


@dataclass
class RecoveryResult:
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)


def recover(prepared: onnx.ModelProto, quantized_view: onnx.ModelProto, placement: Placement, plan: QuantPlan,
            source: SampleSource | None, options: RecoveryOptions, *, batch_size: int = 1,
            memory_budget: int = 2 * 1024**3, progress: ProgressFactory = no_progress) -> RecoveryResult:
    """AdaRound and/or bias correction of the int8 layers of `prepared`, with the plan's weight scales.

    `quantized_view` is the QDQ model of `plan`: the layer inputs are read from it, as the
    quantized model sees them. Returns the float model to plan and write again.
    """
    if source is None or not len(source):
        raise UsageError("--bias-correction and --adaround need calibration samples: give --calib")
    start = time.perf_counter()
    graph = import_graph(prepared)
    layers, skipped = find_layers(graph, placement)
    _read_inputs_from(layers, quantized_view)
    report: dict = {"samples": len(source), "input": "as seen by the quantized model", "skipped": skipped}
    gram_wanted: set[str] = set()
    if options.adaround_seconds is not None:
        for layer in layers:
            if options.adaround_layers is not None and layer.label not in options.adaround_layers:
                continue
            shared = len(layer.weight.outputs) > 1
            fan_in = layer.matrix().shape[-1]
            if shared or fan_in > MAX_ADAROUND_FAN_IN:
                skipped[layer.label] = "weight shared by several layers" if shared else f"fan-in {fan_in} too large"
            else:
                gram_wanted.add(layer.label)
    moments = collect_moments(quantized_view, layers, source, batch_size=batch_size, memory_budget=memory_budget,
                              gram=gram_wanted, progress=progress)
    qtype = plan.settings.weight_qtype
    originals = {layer.label: layer.matrix() for layer in layers}  # bias correction compares with these
    if gram_wanted:
        report["adaround"] = _adaround_layers([la for la in layers if la.label in gram_wanted], moments, plan, qtype,
                                              options.adaround_seconds or 0.0, progress)
    if options.bias_correction:
        report["bias_correction"] = _correct_biases(graph, layers, moments, originals, plan, qtype)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return RecoveryResult(export_model(graph, prepared), report)


def _read_inputs_from(layers: list[Layer], quantized: onnx.ModelProto) -> None:
    """Point each layer at its input tensor in the QDQ model (the same node name reads the dequantized copy)."""
    by_name = {n.name: n for n in quantized.graph.node if n.name}
    for layer in layers:
        node = by_name.get(layer.node.name) if layer.node.name else None
        if node is not None and node.op_type == layer.node.op:
            layer.input_name = node.input[0]


def _weight_scales(layer: Layer, plan: QuantPlan) -> np.ndarray:
    entry = plan.tensors[layer.weight.name]
    groups, out = layer.matrix().shape[:2]
    scale = np.asarray(entry.scale, dtype=np.float32).astype(np.float64)
    return np.broadcast_to(scale, (groups * out,)).reshape(groups, out) if scale.size == 1 else scale.reshape(
        groups, out)


def _quantized_matrix(layer: Layer, plan: QuantPlan, qtype: qmath.QType) -> np.ndarray:
    entry = plan.tensors[layer.weight.name]
    w = constant_values(layer.weight).astype(np.float32)
    q = qmath.quantize(w, entry.scale_array(), entry.zero_point_array(), qtype, entry.axis)
    return layer.matrix(qmath.dequantize(q, entry.scale_array(), entry.zero_point_array(), entry.axis))


def step_flops(layer: Layer) -> int:
    """AdaRound's cost model: flops of one optimisation step on `layer`."""
    g, o, f = layer.matrix().shape
    return 2 * g * o * f * f + 20 * g * o * f


def affordable_layers(layers: list[Layer], count: int, seconds: float) -> list[str]:
    """The first `count` of `layers` (in the given order) whose ADAROUND_MIN_STEPS steps fit `seconds` together
    under the cost model: a layer too large to round within the budget is left to round-to-nearest."""
    chosen: list[str] = []
    spent = 0.0
    for layer in layers:
        if len(chosen) == count:
            break
        cost = ADAROUND_MIN_STEPS * step_flops(layer) / ASSUMED_FLOPS
        shared = len(layer.weight.outputs) > 1
        if not shared and layer.matrix().shape[-1] <= MAX_ADAROUND_FAN_IN and spent + cost <= seconds:
            chosen.append(layer.label)
            spent += cost
    return chosen


def _adaround_layers(layers: list[Layer], moments: dict[str, InputMoments], plan: QuantPlan, qtype: qmath.QType,
                     seconds: float, progress: ProgressFactory = no_progress) -> dict:
    steps = adaround_steps([(layer.label, step_flops(layer)) for layer in layers], seconds)
    rows = []
    start = time.perf_counter()
    bar = progress(len(layers), "adaround")
    try:
        for layer in sorted(layers, key=lambda la: la.label):
            rows.extend(_adaround_layer(layer, moments[layer.label], plan, qtype, steps[layer.label]))
            bar.update(1)
    finally:
        bar.close()
    improved = [r for r in rows if r["loss_adaround"] < r["loss_nearest"]]
    return {"layers_improved": len(improved), "layers": rows, "seconds": round(time.perf_counter() - start, 2),
            "mean_loss_ratio": _mean_ratio(rows)}


def _adaround_layer(layer: Layer, m: InputMoments, plan: QuantPlan, qtype: qmath.QType, steps: int) -> list[dict]:
    """Re-round one layer's weights in place; its report row (none without a Gram matrix)."""
    if m.gram is None:
        return []
    w = layer.matrix()
    scale = _weight_scales(layer, plan)
    result = adaround(w, scale, m.gram, m.gram_count, qtype.qmin, qtype.qmax, steps)
    layer.weight.values = layer.from_matrix(result.q * scale[..., None])
    nearest = np.clip(np.rint(w / scale[..., None]), qtype.qmin, qtype.qmax)
    return [{"layer": layer.label, "steps": result.steps, "loss_nearest": result.loss_nearest,
             "loss_adaround": result.loss_chosen, "changed_weights": int(np.count_nonzero(result.q != nearest))}]


def _mean_ratio(rows: list[dict]) -> float | None:
    ratios = [r["loss_adaround"] / r["loss_nearest"] for r in rows if r["loss_nearest"] > 0]
    return round(float(np.mean(ratios)), 4) if ratios else None


def _correct_biases(graph: gs.Graph, layers: list[Layer], moments: dict[str, InputMoments],
                    originals: dict[str, np.ndarray], plan: QuantPlan, qtype: qmath.QType) -> dict:
    names = NameAllocator(graph)
    rows, no_bias = [], []
    for layer in sorted(layers, key=lambda la: la.label):
        m = moments[layer.label]
        if not m.count:
            continue
        shift = bias_shift(originals[layer.label], _quantized_matrix(layer, plan, qtype), m.mean)
        target = _bias_target(graph, layer, names)
        if target is None:
            no_bias.append(layer.label)
            continue
        values = constant_values(target).astype(np.float64)
        target.values = (values + shift.reshape(values.shape)).astype(np.float32)
        scale = float(np.mean(np.abs(values))) if values.size else 0.0
        rows.append({"layer": layer.label, "mean_abs_shift": float(np.mean(np.abs(shift))),
                     "max_abs_shift": float(np.max(np.abs(shift))), "mean_abs_bias": scale})
    return {"layers_corrected": len(rows), "layers": rows, "no_bias_to_adjust": no_bias}

