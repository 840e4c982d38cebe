"""Float-exact graph simplifications that leave fewer places for quantization error.

Per-channel affine ops right after a Conv (y = conv(x) * s + t, e.g. Paddle's
"learnable affine blocks", or a BatchNorm exported as Mul/Add) are folded into
the Conv's weights and bias. Otherwise each would sit between the int8 Conv and
its consumer as a float op with its own quantize/dequantize round trip.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .ir import NameAllocator, constant_values, export_model, import_graph, is_constant, is_empty


def fold_affine_into_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold constant Mul/Add that follow a Conv into it; returns the model and how many ops went."""
    graph = import_graph(model)
    outputs = {t.name for t in graph.outputs}
    names = NameAllocator(graph)
    folded = 0
    for node in list(graph.nodes):
        if node.op != "Conv" or not _has_constant_params(node):
            continue
        while True:
            consumer = _single_affine_consumer(node.outputs[0], outputs)
            if consumer is None:
                break
            scale_or_shift = _per_channel(consumer, constant_values(node.inputs[1]).shape[0])
            if scale_or_shift is None:
                break
            _absorb(node, consumer, scale_or_shift, names)
            folded += 1
    if not folded:
        return model, 0
    return export_model(graph, model), folded


def _has_constant_params(conv: gs.Node) -> bool:
    if len(conv.inputs) < 2 or not is_constant(conv.inputs[1]):
        return False
    return len(conv.inputs) < 3 or is_empty(conv.inputs[2]) or is_constant(conv.inputs[2])


def _single_affine_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    consumer = tensor.outputs[0]
    if consumer.op not in ("Mul", "Add") or len(consumer.inputs) != 2:
        return None
    constants = [t for t in consumer.inputs if is_constant(t)]
    return consumer if len(constants) == 1 and constants[0].values.dtype == np.float32 else None


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
    weight = constant_values(conv.inputs[1]).astype(np.float32)
    out_channels = weight.shape[0]
    bias = (constant_values(conv.inputs[2]).astype(np.float32) if len(conv.inputs) > 2
            and not is_empty(conv.inputs[2]) else np.zeros(out_channels, dtype=np.float32))
    if op.op == "Mul":
        weight = weight * values.reshape((-1,) + (1,) * (weight.ndim - 1))
        bias = bias * values
    else:
        bias = bias + values
    conv.inputs[1] = gs.Constant(names.new(f"{conv.inputs[1].name}_folded"), weight)
    bias_const = gs.Constant(names.new(f"{conv.inputs[1].name}_bias"), bias.astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias_const
    else:
        conv.inputs.append(bias_const)
    result = op.outputs[0]
    op.outputs.clear()
    op.inputs.clear()
    conv.outputs[0] = result
