"""Float-exact graph simplifications that leave fewer places for quantization error.

Per-channel affine ops right after a Conv (y = conv(x) * s + t, e.g. Paddle's
"learnable affine blocks", or a BatchNorm exported as Mul/Add) are folded into
the Conv's weights and bias. Otherwise each would sit between the int8 Conv and
its consumer as a float op with its own quantize/dequantize round trip.

The same ops right before a Conv (PP-LCNetV3's learnable affine block, y = s * act(x) + b, read by the next
convolution) fold into that Conv's input side: s scales its weights' input channels, b adds W·b to its
bias. A shift folds only into an unpadded Conv (padding pads y with zeros, which would then stand for b).

A bias read by several Conv/Gemm nodes gets one copy per node: an int32 bias is
quantized with its node's input scale, which differs between them (a Linear
applied twice, or equal small biases onnxruntime's optimizer merged into one).

A ReduceMean over every spatial axis is a GlobalAveragePool (PyTorch's dynamo
exporter writes adaptive_avg_pool2d(x, 1) and x.mean((2, 3)) that way): as
GlobalAveragePool it runs in int8 instead of forcing a dequantize/quantize.

With --int8-gates (not part of prepare: it is a quantization choice), a product with a Clip gate that is
then scaled by a constant, x * clip(x + 3, 0, 6) / 6 (hard-swish as Paddle and older exporters write it),
is reassociated to x * (clip(x + 3, 0, 6) * (1 / 6)): in int8 the scaling then lands on the gate, whose
[0, 6] grid divides exactly onto [0, 1], instead of re-rounding the product before it is scaled. The
chain then runs in int8 (QLinearAdd with the Clip folded, two QLinearMul) between the convolutions with
one rounding more than float would (the gate's own, to 8 bits).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.quant.ir import NameAllocator, constant_values, export_model, import_graph, is_constant, is_empty, is_float32
from onnxq.quant.ops import BIASED_OPS


def _graph_pass(model: onnx.ModelProto, worth_importing: Callable[[onnx.GraphProto], bool],
                rewrite: Callable[[gs.Graph], int]) -> tuple[onnx.ModelProto, int]:
    """Run `rewrite` (it changes the graph in place and says how many times) on the imported graph; the
    model itself when `worth_importing` finds nothing to do or nothing changed. Returns the model and the count."""
    if not worth_importing(model.graph):
        return model, 0  # importing the graph costs more than the rest of the pass
    graph = import_graph(model)
    changes = rewrite(graph)
    return (export_model(graph, model), changes) if changes else (model, 0)


def _has_op(op_type: str) -> Callable[[onnx.GraphProto], bool]:
    return lambda graph: any(node.op_type == op_type for node in graph.node)


def fold_affine_into_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold constant Mul/Add that follow a Conv into it; returns the model and how many ops went."""
    return _graph_pass(model, _conv_feeds_one_mul_or_add, lambda graph: _fold_into_convs(graph, _affine_after,
                                                                                          _absorb))


def fold_affine_into_next_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold constant Mul/Add whose result only a Conv (group 1) reads into that Conv; returns the model and
    how many ops went."""
    return _graph_pass(model, _mul_or_add_feeds_a_conv, lambda graph: _fold_into_convs(graph, _affine_before,
                                                                                        _absorb_input))


Neighbour = Callable[[gs.Node, set[str]], tuple[gs.Node, np.ndarray] | None]
Absorb = Callable[[gs.Node, gs.Node, np.ndarray, NameAllocator], None]


def _fold_into_convs(graph: gs.Graph, neighbour: Neighbour, absorb: Absorb) -> int:
    """Absorb each Conv's foldable neighbours (found by `neighbour`, one at a time) into it."""
    outputs = {t.name for t in graph.outputs}
    names = NameAllocator(graph)
    folded = 0
    for node in list(graph.nodes):
        if node.op != "Conv" or not _has_constant_params(node):
            continue
        while (found := neighbour(node, outputs)) is not None:
            absorb(node, *found, names)
            folded += 1
    return folded


def _affine_after(conv: gs.Node, outputs: set[str]) -> tuple[gs.Node, np.ndarray] | None:
    """The Conv's only reader when it is a constant Mul/Add, with its constant per output channel."""
    consumer = _single_affine_consumer(conv.outputs[0], outputs)
    values = None if consumer is None else _per_channel(consumer, constant_values(conv.inputs[1]).shape[0])
    return None if values is None else (consumer, values)


def _affine_before(conv: gs.Node, outputs: set[str]) -> tuple[gs.Node, np.ndarray] | None:
    """The constant Mul/Add whose result only this (group 1) Conv reads, with its constant per input channel;
    an Add only before an unpadded Conv."""
    if conv.attrs.get("group", 1) != 1:
        return None
    producer = _single_producer(conv.inputs[0], outputs)
    if producer is None or not _affine(producer) or (producer.op == "Add" and not _unpadded(conv)):
        return None
    values = _per_channel(producer, constant_values(conv.inputs[1]).shape[1])
    return None if values is None else (producer, values)


def _mul_or_add_feeds_a_conv(graph: onnx.GraphProto) -> bool:
    """Some Conv input is a Mul's or an Add's output read by it alone (what fold_affine_into_next_conv looks for)."""
    uses = _uses(graph)
    makers = {name: node.op_type for node in graph.node for name in node.output}
    return any(node.op_type == "Conv" and node.input and uses[node.input[0]] == 1
               and makers.get(node.input[0]) in ("Mul", "Add") for node in graph.node)


def _unpadded(conv: gs.Node) -> bool:
    return conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(conv.attrs.get("pads", []))


def _absorb_input(conv: gs.Node, op: gs.Node, values: np.ndarray, names: NameAllocator) -> None:
    """conv(W, x * s) = conv(W * s, x) (s along W's input channels); conv(W, x + b) = conv(W, x) + sum W b
    (unpadded only)."""
    weight, bias = _weight_and_bias(conv)
    along_inputs = values.reshape((1, -1) + (1,) * (weight.ndim - 2))
    if op.op == "Mul":
        weight = weight * along_inputs
    else:
        bias = bias + (weight.astype(np.float64) * along_inputs).reshape(weight.shape[0], -1).sum(axis=1)
    _set_weight_and_bias(conv, weight, bias, names)
    source = next(t for t in op.inputs if not is_constant(t))
    op.inputs.clear()
    op.outputs.clear()
    conv.inputs[0] = source


def _has_constant_params(conv: gs.Node) -> bool:
    if len(conv.inputs) < 2 or not is_constant(conv.inputs[1]):
        return False
    return len(conv.inputs) < 3 or is_empty(conv.inputs[2]) or is_constant(conv.inputs[2])


def _single_affine_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    consumer = tensor.outputs[0]
    return consumer if _affine(consumer) else None


def _affine(node: gs.Node) -> bool:
    """A Mul or Add of an activation and one float32 constant."""
    if node.op not in ("Mul", "Add") or len(node.inputs) != 2:
        return False
    constants = [t for t in node.inputs if is_constant(t)]
    return len(constants) == 1 and constants[0].dtype == np.float32


def _per_channel(node: gs.Node, channels: int) -> np.ndarray | None:
    """The constant operand as one value per output channel, or None if it varies otherwise."""
    value = next(constant_values(t) for t in node.inputs if is_constant(t)).astype(np.float32)
    if value.size == 1:
        return np.full(channels, value.reshape(()), dtype=np.float32)
    squeezed = value.reshape(-1)
    if squeezed.size != channels:
        return None
    # Must broadcast along the channel axis of an NC... tensor: shapes [C,1,...] or [1,C,1,...].
    dims = list(value.shape)
    while dims and dims[0] == 1 and len(dims) > 1 and dims[0] != channels:
        dims.pop(0)
    if dims and dims[0] == channels and all(d == 1 for d in dims[1:]) and len(dims) >= 2:
        return squeezed
    return None


def _absorb(conv: gs.Node, op: gs.Node, values: np.ndarray, names: NameAllocator) -> None:
    weight, bias = _weight_and_bias(conv)
    if op.op == "Mul":
        weight = weight * values.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias = bias * values
    else:
        bias = bias + values
    _set_weight_and_bias(conv, weight, bias, names)
    result = op.outputs[0]
    op.outputs.clear()
    op.inputs.clear()
    conv.outputs[0] = result


def _weight_and_bias(conv: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """The Conv's weight and bias as float32 (zeros when it has none)."""
    weight = constant_values(conv.inputs[1]).astype(np.float32)
    has_bias = len(conv.inputs) > 2 and not is_empty(conv.inputs[2])
    bias = constant_values(conv.inputs[2]).astype(np.float32) if has_bias else np.zeros(weight.shape[0], np.float32)
    return weight, bias


def _set_weight_and_bias(conv: gs.Node, weight: np.ndarray, bias: np.ndarray, names: NameAllocator) -> None:
    """New constants (others may read the old ones) named after the weight."""
    conv.inputs[1] = gs.Constant(names.new(f"{conv.inputs[1].name}_folded"), weight.astype(np.float32))
    bias_const = gs.Constant(names.new(f"{conv.inputs[1].name}_bias"), bias.astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias_const
    else:
        conv.inputs.append(bias_const)


def scale_gates_first(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(x * gate) / c and (x * gate) * c, with gate a Clip with constant bounds that only this product
    reads and c one finite non-zero float32 constant -> x * (gate * k), k = 1 / c or c; returns the model
    and how many were rewritten. Exact up to one float32 rounding."""
    return _graph_pass(model, _has_op("Clip"), _scale_gates)


def _scale_gates(graph: gs.Graph) -> int:
    outputs = {t.name for t in graph.outputs}
    names = NameAllocator(graph)
    moved = 0
    for node in list(graph.nodes):
        factor = _constant_factor(node)
        product = _single_producer(node.inputs[0], outputs) if factor is not None else None
        if product is None or product.op != "Mul" or len(product.inputs) != 2:
            continue
        gates = [i for i, t in enumerate(product.inputs) if _is_clip_gate(t, outputs)]
        if len(gates) != 1:
            continue
        gate = product.inputs[gates[0]]
        scaled = gs.Variable(names.new(f"{gate.name}_scaled"), dtype=gate.dtype, shape=gate.shape)
        result = node.outputs[0]
        node.op = "Mul"  # this node, now scaling the gate, keeps its name
        node.inputs = [gate, gs.Constant(names.new(f"{node.name}_factor"), factor)]
        node.outputs = [scaled]
        product.inputs[gates[0]] = scaled
        product.outputs = [result]
        moved += 1
    return moved


def _constant_factor(node: gs.Node) -> np.ndarray | None:
    """What a Div(x, c) or Mul(x, c) multiplies x by, for c a single finite non-zero float32 constant."""
    if node.op not in ("Div", "Mul") or len(node.inputs) != 2 or is_constant(node.inputs[0]):
        return None
    constant = node.inputs[1]
    if not is_constant(constant) or not is_float32(constant):
        return None
    value = constant_values(constant).astype(np.float32)
    if value.size != 1 or not np.isfinite(value).all() or (value == 0).any():
        return None
    return np.asarray(np.float32(1.0) / value if node.op == "Div" else value, dtype=np.float32).reshape(value.shape)


def _single_producer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    """The node that makes `tensor`, when `tensor` is read by one node only and is not a graph output."""
    if tensor.name in graph_outputs or len(tensor.outputs) != 1 or len(tensor.inputs) != 1:
        return None
    return tensor.inputs[0]


def _is_clip_gate(tensor: gs.Tensor, graph_outputs: set[str]) -> bool:
    clip = _single_producer(tensor, graph_outputs)
    bounds = [t for t in clip.inputs[1:] if not is_empty(t)] if clip is not None and clip.op == "Clip" else None
    return bool(bounds) and all(is_constant(t) for t in bounds)


def means_to_global_pool(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """ReduceMean over all spatial axes of a float N x C x ... tensor -> GlobalAveragePool (+ Flatten
    when keepdims=0); returns the model and how many were replaced. Needs inferred ranks."""
    return _graph_pass(model, _has_op("ReduceMean"), _pool_means)


def _pool_means(graph: gs.Graph) -> int:
    names = NameAllocator(graph)
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "ReduceMean" or not _spatial_mean(node) or _normalization_statistic(node):
            continue
        result = node.outputs[0]
        node.outputs.clear()
        keepdims = node.attrs.get("keepdims", 1)
        pooled = result if keepdims else gs.Variable(names.new(f"{result.name}_pooled"), dtype=result.dtype)
        graph.nodes.append(gs.Node("GlobalAveragePool", name=names.new(f"{node.name or 'mean'}_global_pool"),
                                   inputs=[node.inputs[0]], outputs=[pooled]))
        if not keepdims:  # N x C x 1 x 1 -> N x C
            graph.nodes.append(gs.Node("Flatten", name=names.new(f"{node.name or 'mean'}_flatten"),
                                       attrs={"axis": 1}, inputs=[pooled], outputs=[result]))
        node.inputs.clear()
        replaced += 1
    return replaced


def _normalization_statistic(node: gs.Node) -> bool:
    """The mean or variance of a decomposed LayerNorm/InstanceNorm (x - mean(x), mean(d * d)): no pooling,
    and its statistics stay float (a [batch, tokens, features] mean over features looks spatial by rank)."""
    data, mean = node.inputs[0], node.outputs[0]
    if any(user.op == "Sub" and user.inputs[0] is data and user.inputs[1] is mean for user in mean.outputs):
        return True
    producer = data.inputs[0] if data.inputs else None
    return producer is not None and (producer.op == "Pow" or (producer.op == "Mul"
                                                              and producer.inputs[0] is producer.inputs[1]))


def _spatial_mean(node: gs.Node) -> bool:
    """Reduces exactly axes 2 .. rank-1 of a float32 tensor of known rank >= 3."""
    data = node.inputs[0]
    rank = len(data.shape) if data.shape is not None else 0
    if rank < 3 or not is_float32(data):
        return False
    if len(node.inputs) > 1 and not is_empty(node.inputs[1]):  # opset 18: axes are an input
        if not is_constant(node.inputs[1]):
            return False
        axes = constant_values(node.inputs[1]).reshape(-1).tolist()
    else:
        axes = list(node.attrs.get("axes", []))
    return sorted(a % rank for a in axes) == list(range(2, rank))


def unshare_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Give every Conv/Gemm its own constant bias tensor; returns the model and how many copies were made."""
    return _graph_pass(model, _shares_a_bias, _copy_shared_biases)


def _shares_a_bias(graph: onnx.GraphProto) -> bool:
    uses = _uses(graph)
    return any(node.op_type in BIASED_OPS and len(node.input) > 2 and uses[node.input[2]] > 1 for node in graph.node)


def _copy_shared_biases(graph: gs.Graph) -> int:
    names = NameAllocator(graph)
    copies = 0
    for node in graph.nodes:
        if node.op not in BIASED_OPS or len(node.inputs) < 3 or not is_constant(node.inputs[2]):
            continue
        shared = node.inputs[2]
        if len(shared.outputs) > 1 and shared.outputs[0] is not node:
            node.inputs[2] = gs.Constant(names.new(f"{shared.name}_{node.name or 'copy'}"),
                                         constant_values(shared).copy())
            copies += 1
    return copies


def _uses(graph: onnx.GraphProto) -> Counter[str]:
    """How many node inputs of the top-level graph read each tensor name."""
    return Counter(name for node in graph.node for name in node.input if name)


def _conv_feeds_one_mul_or_add(graph: onnx.GraphProto) -> bool:
    """Some Conv output is read by exactly one node, a Mul or an Add (what fold_affine_into_conv looks for)."""
    uses = _uses(graph)
    readers = {name: node.op_type for node in graph.node for name in node.input if name}
    return any(node.op_type == "Conv" and node.output and uses[node.output[0]] == 1
               and readers.get(node.output[0]) in ("Mul", "Add") for node in graph.node)
