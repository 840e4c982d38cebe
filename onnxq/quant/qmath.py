"""Linear quantization arithmetic: ranges to scale/zero-point, quantize, dequantize.

Everything here is plain numpy so the rest of onnxq (and the tests) share one
definition of the numbers ONNX QuantizeLinear/DequantizeLinear compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Smallest scale we ever emit: keeps 1/scale finite in float32.
MIN_SCALE = float(np.finfo(np.float32).tiny) * 2**20


@dataclass(frozen=True)
class QType:
    """An integer type used for quantized values."""

    name: str
    dtype: np.dtype
    qmin: int
    qmax: int
    onnx_type: int  # onnx.TensorProto element type


def _qtype(name: str, dtype: type, onnx_type: int) -> QType:
    info = np.iinfo(dtype)
    return QType(name, np.dtype(dtype), int(info.min), int(info.max), onnx_type)


# onnx.TensorProto enum values, written out so this module needs no onnx import.
UINT8 = _qtype("uint8", np.uint8, 2)
INT8 = _qtype("int8", np.int8, 3)
UINT16 = _qtype("uint16", np.uint16, 4)
INT16 = _qtype("int16", np.int16, 5)
INT32 = _qtype("int32", np.int32, 6)
QTYPES = {t.name: t for t in (UINT8, INT8, UINT16, INT16, INT32)}


def qtype_by_name(name: str) -> QType:
    try:
        return QTYPES[name]
    except KeyError:
        raise ValueError(f"unknown quantized type {name!r}; expected one of {sorted(QTYPES)}") from None


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    """Replace zero, subnormal or non-finite scales (constant tensors) by a usable one."""
    scale = np.asarray(scale, dtype=np.float64)
    bad = ~np.isfinite(scale) | (scale < MIN_SCALE)
    return np.where(bad, np.where(np.isfinite(scale) & (scale > 0), MIN_SCALE, 1.0), scale)


def asymmetric_params(lo: np.ndarray, hi: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point covering [lo, hi]; the range is widened to include 0 so 0 is exact."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    span = hi - lo
    scale = np.where(span > 0, span / (qtype.qmax - qtype.qmin), 1.0)
    scale = _safe_scale(scale).astype(np.float32)
    zero_point = np.rint(qtype.qmin - lo / scale.astype(np.float64))
    zero_point = np.clip(zero_point, qtype.qmin, qtype.qmax).astype(qtype.dtype)
    return scale, zero_point


def symmetric_params(lo: np.ndarray, hi: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Scale with the zero point at the type's centre (0 for signed types).

    Signed types use the restricted range [-qmax, qmax] so +a and -a are both exact.
    """
    bound = np.maximum(np.abs(np.asarray(lo, dtype=np.float64)), np.abs(np.asarray(hi, dtype=np.float64)))
    if qtype.qmin < 0:
        levels = qtype.qmax
        center = 0
    else:
        levels = (qtype.qmax - qtype.qmin) // 2
        center = (qtype.qmax + qtype.qmin + 1) // 2
    scale = np.where(bound > 0, bound / levels, 1.0)
    scale = _safe_scale(scale).astype(np.float32)
    zero_point = np.full(scale.shape, center).astype(qtype.dtype)
    return scale, zero_point


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qtype: QType, axis: int | None = None
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    if max(-qtype.qmin, qtype.qmax) < 2**24:  # integers below 2^24 are exact in float32: one buffer, in place
        q = np.asarray(np.divide(x, s, dtype=np.float32))  # 0-d input: a scalar, made an array
        np.rint(q, out=q)
        q += _broadcast(np.asarray(zero_point).astype(np.float32), x.ndim, axis)
        return np.clip(q, qtype.qmin, qtype.qmax, out=q).astype(qtype.dtype)
    z = _broadcast(np.asarray(zero_point).astype(np.float64), x.ndim, axis)
    q = np.rint(x / s).astype(np.float64) + z
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.dtype)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point).astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def representable_range(scale: np.ndarray, zero_point: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """The float interval a (scale, zero point) pair can represent without saturating."""
    scale = np.asarray(scale, dtype=np.float64)
    zp = np.asarray(zero_point).astype(np.float64)
    return (qtype.qmin - zp) * scale, (qtype.qmax - zp) * scale


def channel_minmax(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min and max of a weight along `axis`."""
    w = np.asarray(w, dtype=np.float32)
    if w.size == 0:
        zeros = np.zeros(w.shape[axis], dtype=np.float32)
        return zeros, zeros
    others = tuple(i for i in range(w.ndim) if i != axis % w.ndim)  # no transposed copy of a large weight
    return w.min(axis=others), w.max(axis=others)


def symmetric_weights(w: np.ndarray, qtype: QType, axis: int | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric (zero point 0) quantization of a weight, per channel along `axis` or per tensor (None)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is not None:
        lo, hi = channel_minmax(w, axis)
    else:
        lo, hi = np.float64(w.min(initial=0.0)), np.float64(w.max(initial=0.0))
    scale, zero_point = symmetric_params(lo, hi, qtype)
    return quantize(w, scale, zero_point, qtype, axis), scale, zero_point


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bias as int32 with scale input_scale * weight_scale (what int8 Conv/Gemm kernels expect)."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = _safe_scale(scale).astype(np.float32)
    scale = np.broadcast_to(scale, np.shape(bias)).astype(np.float32) if scale.ndim else scale
    q = np.rint(np.asarray(bias, dtype=np.float64) / scale.astype(np.float64))
    q = np.clip(q, INT32.qmin, INT32.qmax).astype(np.int32)
    return q, scale
