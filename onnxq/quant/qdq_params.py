"""Reading a QuantizeLinear/DequantizeLinear's scale, zero point and axis, checked (for `onnxq convert`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.errors import ModelError
from onnxq.quant import qmath
from onnxq.quant.ir import constant_values, is_constant, node_label


@dataclass(frozen=True)
class Learned:
    """Parameters read from one Q/DQ pair (or a DequantizeLinear of stored integers)."""

    qtype: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None  # None: per tensor
    node: str  # where they were read, for messages

    def same_as(self, other: Learned) -> bool:
        return (self.qtype, self.scale, self.zero_point, self.axis) == (other.qtype, other.scale,
                                                                        other.zero_point, other.axis)

    def as_type(self, qtype: str) -> Learned:
        """The same quantization grid in another 8-bit type: uint8 zero point z is int8 z - 128."""
        if qtype == self.qtype:
            return self
        shift = {("uint8", "int8"): -128, ("int8", "uint8"): 128}[(self.qtype, qtype)]
        return Learned(qtype, self.scale, tuple(z + shift for z in self.zero_point), self.axis, self.node)



def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """A tensor's value if it is constant: an initializer, a Constant node, or an Identity of either."""
    if is_constant(tensor):
        return constant_values(tensor)
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Identity":
            return constant_value(producer.inputs[0])
        if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
            return np.asarray(producer.attrs["value"].values)
    return None


def read_params(node: gs.Node, data_dtype: np.dtype | None = None) -> Learned:
    """The scale, zero point and axis of a QuantizeLinear/DequantizeLinear, checked (ModelError naming the node).

    `data_dtype` is the stored integers' type (a DequantizeLinear of stored integers, whose zero point may be
    omitted).
    """
    label = f"{node.op} {node_label(node)}"
    if node.attrs.get("block_size", 0):
        raise ModelError(f"{label}: block-wise quantization (block_size) is not supported")
    scale = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        raise ModelError(f"{label}: the scale is not a constant")
    zero = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if len(node.inputs) > 2 and node.inputs[2].name and zero is None:
        raise ModelError(f"{label}: the zero point is not a constant")
    if zero is None:  # omitted: zero of the quantized type (uint8 for QuantizeLinear)
        output_dtype = node.attrs.get("output_dtype", 0)  # opset 21: the type without a zero point
        if data_dtype is None and output_dtype:
            data_dtype = onnx.helper.tensor_dtype_to_np_dtype(output_dtype)
        zero = np.zeros(scale.shape, dtype=data_dtype if data_dtype is not None else np.uint8)
    qtype = _qtype_of(zero.dtype, label)
    if qtype.name == "int32" and data_dtype is None:
        raise ModelError(f"{label}: unsupported quantized type int32 (only stored biases may be int32)")
    if scale.dtype.kind != "f":
        raise ModelError(f"{label}: the scale has type {scale.dtype}, expected a float type")
    scale = scale.astype(np.float32)
    if scale.ndim > 1 or zero.ndim > 1 or scale.size != zero.size or scale.size == 0:
        raise ModelError(f"{label}: scale {list(scale.shape)} and zero point {list(zero.shape)} shapes do not "
                         "match (expected both scalars or both 1-D of the same length)")
    bad = ~np.isfinite(scale) | (scale <= 0)
    if bad.any():
        raise ModelError(f"{label}: scale {float(scale.reshape(-1)[int(np.argmax(bad))])} is not a positive finite "
                         "number")
    zeros = zero.astype(np.int64).reshape(-1)
    if zeros.min() < qtype.qmin or zeros.max() > qtype.qmax:
        raise ModelError(f"{label}: zero point outside the {qtype.name} range [{qtype.qmin}, {qtype.qmax}]")
    if qtype.name == "int32" and zeros.any():
        raise ModelError(f"{label}: an int32 (bias) zero point must be 0")
    axis = _axis(node, scale, label)
    return Learned(qtype.name, tuple(float(s) for s in scale.reshape(-1)), tuple(int(z) for z in zeros), axis,
                   label)


def _qtype_of(dtype: np.dtype, label: str) -> qmath.QType:
    for qtype in (qmath.UINT8, qmath.INT8, qmath.INT32):
        if np.dtype(dtype) == qtype.dtype:
            return qtype
    raise ModelError(f"{label}: unsupported quantized type {np.dtype(dtype)} (onnxq converts uint8/int8 tensors "
                     "and int32 biases)")


def _axis(node: gs.Node, scale: np.ndarray, label: str) -> int | None:
    """Per-channel axis (normalised, checked against the tensor's shape when known), or None for per-tensor."""
    if scale.size == 1:
        return None  # a 1-element scale, scalar or [1], quantizes the whole tensor
    shape = _shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 1))
    if shape is None:
        if axis < 0:
            raise ModelError(f"{label}: negative axis {axis} on a tensor of unknown rank")
        return axis
    if not -len(shape) <= axis < len(shape):
        raise ModelError(f"{label}: axis {axis} is out of range for a tensor of rank {len(shape)}")
    axis %= len(shape)
    if isinstance(shape[axis], int) and shape[axis] != scale.size:
        raise ModelError(f"{label}: {scale.size} per-channel scales for axis {axis} of size {shape[axis]}")
    return axis


def _shape(tensor: gs.Tensor) -> list | None:
    values = constant_value(tensor)
    if values is not None:
        return list(values.shape)
    return list(tensor.shape) if tensor.shape is not None else None

