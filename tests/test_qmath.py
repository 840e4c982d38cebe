"""Properties of onnxq.quant.qmath: scale/zero point, quantize/dequantize, bias, per channel, ORT parity.

Float32 slack used below. quantize computes r = fl32(x / s) and dequantize fl32(n · s) with
n = q - z an exact small integer; u = 2**-24 is float32's unit roundoff. Then
    |fl32(n·s) - x| <= s·|n - x/s| + |n·s|·u <= s·(|n - r| + |r - x/s|) + (|x| + s)·u
                    <= s/2 + |x|·u + (|x| + s)·u   (+ s·2**-150 if x/s is subnormal),
so |dequantize(quantize(x)) - x| <= s/2 + 2**-22·(|x| + s) for x in the representable range.
For x in the requested [lo, hi] (not the representable range) the float32 rounding of the
scale adds up to 255·s·u at the far end of the range: a further 2**-15·s covers it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from onnxq.quant import qmath
from onnxq.quant.plan import QuantSettings, weight_plan

FAST = settings(max_examples=60, deadline=None)
# Saturation probes divide values near FLT_MAX by scales < 1: the float32 quotient overflows to
# inf on purpose (and saturates, as ONNX specifies), which numpy reports as a RuntimeWarning.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
REDUCED = QuantSettings(weight_range="reduced").weight_qtype

# Largest magnitude we draw. Up to FLT_MAX itself, dequantize(qmax) = 255 · fl32(FLT_MAX/255)
# can round past FLT_MAX to inf (as ONNX DequantizeLinear would): ranges that end within a
# few ulps of FLT_MAX are out of scope, 1e38 leaves a 3x margin.
HUGE = float(np.float32(1e38))
TINY = float(np.float32(1e-36))
LARGE = float(np.float32(1e30))

f32 = st.floats(-HUGE, HUGE, width=32, allow_nan=False, allow_infinity=False)
tiny = st.floats(-TINY, TINY, width=32, allow_nan=False, allow_infinity=False)  # incl. subnormals


@st.composite
def ranges(draw: st.DrawFn) -> tuple[float, float]:
    """lo <= hi, finite float32: general, equal, all-zero, tiny and huge magnitudes, one-sided."""
    kind = draw(st.sampled_from(["any", "equal", "zero", "tiny", "one_sided", "huge"]))
    if kind == "equal":
        v = draw(st.one_of(f32, tiny))
        return v, v
    if kind == "zero":
        return 0.0, 0.0
    if kind == "tiny":
        a, b = draw(tiny), draw(tiny)
    elif kind == "huge":
        a, b = draw(st.floats(-HUGE, -LARGE, width=32)), draw(st.floats(LARGE, HUGE, width=32))
    elif kind == "one_sided":
        a, b = sorted([abs(draw(f32)), abs(draw(f32))])
        if draw(st.booleans()):
            a, b = -b, -a
    else:
        a, b = draw(f32), draw(f32)
    return min(a, b), max(a, b)


SCHEMES = {
    "asym_uint8": (qmath.asymmetric_params, qmath.UINT8),
    "asym_int8": (qmath.asymmetric_params, qmath.INT8),
    "sym_int8": (qmath.symmetric_params, qmath.INT8),
    "sym_uint8": (qmath.symmetric_params, qmath.UINT8),
    "sym_reduced": (qmath.symmetric_params, REDUCED),
}


def params_for(scheme: str, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, qmath.QType]:
    fn, qtype = SCHEMES[scheme]
    scale, zp = fn(np.float64(lo), np.float64(hi), qtype)
    return scale, zp, qtype


def roundtrip(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qtype: qmath.QType,
              axis: int | None = None) -> np.ndarray:
    return qmath.dequantize(qmath.quantize(x, scale, zp, qtype, axis), scale, zp, axis)


def slack(x: np.ndarray, scale: float) -> np.ndarray:
    return 2.0**-22 * (np.abs(np.asarray(x, np.float64)) + scale)


# ---------------------------------------------------------------- per-tensor properties


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@FAST
@given(rng_range=ranges(), seed=st.integers(0, 2**32 - 1))
def test_params_and_roundtrip(scheme: str, rng_range: tuple[float, float], seed: int) -> None:
    lo, hi = rng_range
    scale, zp, qtype = params_for(scheme, lo, hi)
    s = float(scale)

    # Scale: float32, finite, > 0; zero point: the type's dtype, inside [qmin, qmax].
    assert scale.dtype == np.float32 and np.isfinite(scale) and s > 0
    assert zp.dtype == qtype.dtype and qtype.qmin <= int(zp) <= qtype.qmax
    if SCHEMES[scheme][0] is qmath.symmetric_params:
        assert int(zp) == (0 if qtype.qmin < 0 else 128)

    # Zero is exact, +0 and -0 alike.
    zeros = np.array([0.0, -0.0], np.float32)
    assert np.all(qmath.quantize(zeros, scale, zp, qtype) == zp)
    assert np.all(roundtrip(zeros, scale, zp, qtype) == 0.0)

    # Inside the representable range: error <= scale/2 (+ float32 slack, see module docstring).
    rep_lo, rep_hi = (float(v) for v in qmath.representable_range(scale, zp, qtype))
    assert rep_lo <= 0.0 <= rep_hi
    rng = np.random.default_rng(seed)
    inside = np.concatenate([rng.uniform(rep_lo, rep_hi, 200), [rep_lo, rep_hi]]).astype(np.float32)
    wide = inside.astype(np.float64)
    inside = inside[(wide >= rep_lo) & (wide <= rep_hi)]  # float32 rounding can step just outside
    err = np.abs(roundtrip(inside, scale, zp, qtype).astype(np.float64) - inside)
    assert np.all(err <= s / 2 + slack(inside, s))

    # The requested range itself (widened to 0 for asymmetric, to ±max|.| for symmetric) is covered.
    if SCHEMES[scheme][0] is qmath.asymmetric_params:
        want = np.array([min(lo, 0.0), lo, hi, max(hi, 0.0)], np.float32)
    else:
        a = max(abs(lo), abs(hi))
        want = np.array([-a, lo, hi, a], np.float32)
    err = np.abs(roundtrip(want, scale, zp, qtype).astype(np.float64) - want)
    assert np.all(err <= s / 2 + slack(want, s) + 2.0**-15 * s)

    # Outside: saturation to qmin / qmax, including the very next float32 beyond the range.
    big = np.float32(np.finfo(np.float32).max)
    above = np.array([np.nextafter(np.float32(rep_hi), big), abs(rep_hi) * 2 + s, big, np.inf], np.float32)
    below = np.array([np.nextafter(np.float32(rep_lo), -big), -abs(rep_lo) * 2 - s, -big, -np.inf], np.float32)
    above, below = above[above.astype(np.float64) > rep_hi], below[below.astype(np.float64) < rep_lo]
    assert np.all(qmath.quantize(above, scale, zp, qtype) == qtype.qmax)
    assert np.all(qmath.quantize(below, scale, zp, qtype) == qtype.qmin)


@pytest.mark.parametrize("scheme", ["asym_uint8", "asym_int8"])
@FAST
@given(rng_range=ranges())
def test_asymmetric_scale_is_span_over_levels(scheme: str, rng_range: tuple[float, float]) -> None:
    # Not wasteful either: the scale is the (0-widened) span / 255 in float32, or the floor value.
    lo, hi = rng_range
    scale, _, qtype = params_for(scheme, lo, hi)
    span = max(hi, 0.0) - min(lo, 0.0)
    expected = np.float32(span / (qtype.qmax - qtype.qmin))
    if span == 0.0:
        assert float(scale) == 1.0
    elif expected < qmath.MIN_SCALE:
        assert float(scale) == qmath.MIN_SCALE
    else:
        assert scale == expected


@pytest.mark.parametrize("scheme", ["sym_int8", "sym_reduced", "sym_uint8"])
@FAST
@given(rng_range=ranges())
def test_symmetric_uses_max_abs_and_both_ends_are_exact(scheme: str, rng_range: tuple[float, float]) -> None:
    lo, hi = rng_range
    scale, zp, qtype = params_for(scheme, lo, hi)
    a = max(abs(lo), abs(hi))
    levels = qtype.qmax if qtype.qmin < 0 else (qtype.qmax - qtype.qmin) // 2
    expected = np.float32(a / levels)
    if a == 0.0:
        assert float(scale) == 1.0
    elif expected < qmath.MIN_SCALE:
        assert float(scale) == qmath.MIN_SCALE
    else:
        assert scale == expected
        # +a and -a map to the two ends of the restricted range, symmetric around the zero point.
        q = qmath.quantize(np.array([a, -a], np.float32), scale, zp, qtype).astype(np.int64) - int(zp)
        assert q[0] == levels and q[1] == -levels


@FAST
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=f32), scheme=st.sampled_from(sorted(SCHEMES)))
def test_quantize_is_monotone_and_dequantize_inverts_integers(x: np.ndarray, scheme: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    scale, zp, qtype = params_for(scheme, lo, hi)
    order = np.argsort(x, kind="stable")
    q = qmath.quantize(x[order], scale, zp, qtype).astype(np.int64)
    assert np.all(np.diff(q) >= 0)
    # Every integer of the type dequantizes to (q - zp) * scale and re-quantizes to itself.
    ints = np.arange(qtype.qmin, qtype.qmax + 1).astype(qtype.dtype)
    values = qmath.dequantize(ints, scale, zp)
    np.testing.assert_array_equal(values, (ints.astype(np.int64) - int(zp)).astype(np.float32) * scale)
    np.testing.assert_array_equal(qmath.quantize(values, scale, zp, qtype), ints)


# ---------------------------------------------------------------- per channel


@st.composite
def weights_and_axis(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    scale = draw(st.sampled_from([1e-38, 1e-6, 1.0, 1e3, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal(shape) * scale * rng.uniform(0, 3, (shape[axis],)).reshape(
        [-1 if i == axis % ndim else 1 for i in range(ndim)])
    if draw(st.booleans()):  # one channel entirely zero
        np.moveaxis(w, axis, 0)[0] = 0.0
    return w.astype(np.float32), axis


@pytest.mark.parametrize("scheme", ["sym_int8", "sym_reduced", "asym_uint8", "asym_int8"])
@FAST
@given(case=weights_and_axis())
def test_per_channel_equals_per_tensor_on_each_channel(scheme: str, case: tuple[np.ndarray, int]) -> None:
    w, axis = case
    fn, qtype = SCHEMES[scheme]
    lo, hi = qmath.channel_minmax(w, axis)
    moved = np.moveaxis(w, axis, 0)
    np.testing.assert_array_equal(lo, moved.reshape(moved.shape[0], -1).min(axis=1))
    np.testing.assert_array_equal(hi, moved.reshape(moved.shape[0], -1).max(axis=1))
    scale, zp = fn(lo, hi, qtype)
    assert scale.shape == zp.shape == (w.shape[axis],)
    q = qmath.quantize(w, scale, zp, qtype, axis)
    restored = qmath.dequantize(q, scale, zp, axis)
    assert q.dtype == qtype.dtype and q.shape == w.shape and restored.shape == w.shape
    q_moved, r_moved = np.moveaxis(q, axis, 0), np.moveaxis(restored, axis, 0)
    for c in range(w.shape[axis]):
        s_c, z_c = params_for(scheme, float(lo[c]), float(hi[c]))[:2]
        assert scale[c] == s_c and zp[c] == z_c
        np.testing.assert_array_equal(q_moved[c], qmath.quantize(moved[c], s_c, z_c, qtype))
        np.testing.assert_array_equal(r_moved[c], qmath.dequantize(q_moved[c], s_c, z_c))
        err = np.abs(r_moved[c].astype(np.float64) - moved[c])
        assert np.all(err <= float(s_c) / 2 + slack(moved[c], float(s_c)) + 2.0**-15 * float(s_c))
        assert qmath.dequantize(qmath.quantize(np.zeros(1), s_c, z_c, qtype), s_c, z_c)[0] == 0.0


def test_channel_minmax_of_empty_channels() -> None:
    lo, hi = qmath.channel_minmax(np.zeros((3, 0), np.float32), 0)
    assert lo.shape == hi.shape == (3,) and not lo.any() and not hi.any()
    scale, _ = qmath.symmetric_params(lo, hi, qmath.INT8)
    assert np.all(np.isfinite(scale) & (scale > 0))


# ---------------------------------------------------------------- reduced range weights


@pytest.mark.parametrize("qtype", [REDUCED, qmath.INT8], ids=["reduced", "full"])
@FAST
@given(case=weights_and_axis(), per_channel=st.booleans(),
       raw=hnp.arrays(np.float32, st.integers(1, 30), elements=f32))
def test_symmetric_weights_never_exceed_qmax(qtype: qmath.QType, case: tuple[np.ndarray, int],
                                             per_channel: bool, raw: np.ndarray) -> None:
    assert qtype.qmax == -qtype.qmin - 1
    for w, axis in (case, (raw, 0)):
        if per_channel:
            lo, hi = qmath.channel_minmax(w, axis)
        else:
            lo, hi, axis = np.float64(w.min(initial=0.0)), np.float64(w.max(initial=0.0)), None
        scale, zp = qmath.symmetric_params(lo, hi, qtype)
        q = qmath.quantize(w, scale, zp, qtype, axis).astype(np.int64)
        assert np.abs(q).max() <= qtype.qmax  # never qmin: -64 (-128) is not used by weights


@FAST
@given(case=weights_and_axis(), per_channel=st.booleans())
def test_reduced_weights_through_the_plan_stay_seven_bit(case: tuple[np.ndarray, int], per_channel: bool) -> None:
    # The path the writer takes: the plan records qtype "int8" and the rewriter quantizes with
    # the full int8 type and the plan's (reduced) scale; the values must still fit in 7 bits.
    w, axis = case
    settings_ = QuantSettings(weight_range="reduced", per_channel=per_channel)
    entry = weight_plan("w", w, axis % w.ndim if per_channel else None, settings_.weight_qtype)
    q = qmath.quantize(w, entry.scale_array(), entry.zero_point_array(), qmath.qtype_by_name(entry.qtype),
                       entry.axis).astype(np.int64)
    assert np.abs(q).max() <= REDUCED.qmax


def test_reduced_weight_type_is_seven_bit() -> None:
    assert (REDUCED.qmin, REDUCED.qmax, REDUCED.dtype) == (-64, 63, np.dtype(np.int8))
    assert QuantSettings().weight_qtype == qmath.INT8


# ---------------------------------------------------------------- bias


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 16), per_channel=st.booleans(),
       input_scale=st.floats(float(np.float32(1e-6)), 10.0, width=32), magnitude=st.sampled_from([1e-3, 1.0, 1e3, 1e9]))
def test_quantize_bias(seed: int, n: int, per_channel: bool, input_scale: float, magnitude: float) -> None:
    rng = np.random.default_rng(seed)
    bias = (rng.standard_normal(n) * magnitude).astype(np.float32)
    weight_scale = np.asarray(10.0 ** rng.uniform(-6, 0, n if per_channel else None)).astype(np.float32)
    q, scale = qmath.quantize_bias(bias, input_scale, weight_scale)
    expected_scale = np.float32(input_scale) * np.asarray(weight_scale, np.float32)
    assert q.dtype == np.int32 and q.shape == bias.shape
    assert scale.dtype == np.float32
    np.testing.assert_array_equal(np.broadcast_to(scale, bias.shape), np.broadcast_to(expected_scale, bias.shape))
    if per_channel:
        assert scale.shape == bias.shape
    s = np.broadcast_to(scale, bias.shape).astype(np.float64)
    exact = bias.astype(np.float64) / s
    info = np.iinfo(np.int32)
    fits = (exact > info.min) & (exact < info.max)
    err = np.abs(q.astype(np.float64) * s - bias)
    # float64 division and product add at most a few ulps of |bias| (q has <= 31 bits).
    assert np.all(err[fits] <= s[fits] / 2 + 2.0**-50 * np.abs(bias[fits]))
    assert np.all(q[~fits] == np.where(exact[~fits] > 0, info.max, info.min))


def test_quantize_bias_zero_product_scale_is_usable() -> None:
    q, scale = qmath.quantize_bias(np.array([0.0, 1e-40], np.float32), 1e-30, np.array([1e-30, 1e-30], np.float32))
    assert np.all(np.isfinite(scale) & (scale > 0)) and q.dtype == np.int32


# ---------------------------------------------------------------- onnxruntime parity


def _qdq_session(scale: np.ndarray, zp: np.ndarray, axis: int | None, opset: int) -> ort.InferenceSession:
    elem = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}[zp.dtype]
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **attrs)]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("q", elem, None), helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _probe_values(rng: np.random.Generator, scale: float, zp: int, qtype: qmath.QType) -> np.ndarray:
    """Random values across and beyond the range, exact ties k + 1/2, near-ties and extremes."""
    rep_lo, rep_hi = (qtype.qmin - zp) * scale, (qtype.qmax - zp) * scale
    k = np.arange(qtype.qmin - zp - 3, qtype.qmax - zp + 3, dtype=np.float64)
    ties = ((k + 0.5) * scale).astype(np.float32)
    big = np.finfo(np.float32).max
    return np.concatenate([
        rng.uniform(rep_lo * 1.2, rep_hi * 1.2 + scale, 200),
        ties, np.nextafter(ties, np.float32(big)), np.nextafter(ties, np.float32(-big)),
        [0.0, -0.0, rep_lo, rep_hi, 1e30, -1e30, big, -big],
    ]).astype(np.float32)


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("scheme", ["asym_uint8", "asym_int8", "sym_int8", "sym_reduced"])
def test_quantize_matches_onnxruntime(scheme: str, opset: int) -> None:
    rng = np.random.default_rng(opset)
    cases = [(-1.0, 3.0), (0.0, 2.0**-3 * 255), (-0.37, 0.0), (-5e-3, 7e2), (0.0, 0.0), (-1e-8, 1e-8), (-3e20, 1e21)]
    for lo, hi in cases:
        scale, zp, qtype = params_for(scheme, lo, hi)
        x = _probe_values(rng, float(scale), int(zp), qtype)
        q_ort, d_ort = _qdq_session(scale, zp, None, opset).run(None, {"x": x})
        q = qmath.quantize(x, scale, zp, qtype)
        # ORT saturates to the storage dtype; the 7-bit weight type saturates at -64/63 (onnxq
        # stores weights already quantized, so ORT never quantizes with the reduced type).
        np.testing.assert_array_equal(q, np.clip(q_ort, qtype.qmin, qtype.qmax))
        same = q == q_ort
        assert same.mean() > 0.5
        np.testing.assert_array_equal(qmath.dequantize(q, scale, zp)[same], d_ort[same])
        assert q.min() == qtype.qmin and q.max() == qtype.qmax  # saturation was exercised


@pytest.mark.parametrize("scheme", ["asym_uint8", "sym_int8"])
def test_ties_round_half_to_even_like_onnxruntime(scheme: str) -> None:
    # A power-of-two scale makes x / scale exactly k + 1/2: a true tie.
    fn, qtype = SCHEMES[scheme]
    _, zp = fn(np.float64(-0.25 * 100), np.float64(0.25 * 155), qtype)  # zero point 100 (uint8) or 0 (int8)
    scale = np.float32(0.25)
    k = np.arange(-140, 140)
    x = ((k + 0.5) * 0.25).astype(np.float32)
    assert np.all(x.astype(np.float64) / 0.25 == k + 0.5)
    q = qmath.quantize(x, scale, zp, qtype).astype(np.int64)
    n = q - int(zp)
    inside = (q > qtype.qmin) & (q < qtype.qmax)
    assert inside.sum() > 200
    assert np.all(n[inside] % 2 == 0) and np.all(np.abs(n[inside] - (k[inside] + 0.5)) == 0.5)
    q_ort, _ = _qdq_session(scale, zp, None, 13).run(None, {"x": x})
    np.testing.assert_array_equal(q, q_ort)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scheme", ["sym_int8", "sym_reduced", "asym_uint8"])
def test_per_axis_quantize_matches_onnxruntime(scheme: str, axis: int) -> None:
    rng = np.random.default_rng(7 + axis)
    shape = (6, 40) if axis == 0 else (40, 6)
    w = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, 6).reshape([-1 if i == axis else 1 for i in (0, 1)]))
    w = w.astype(np.float32)
    fn, qtype = SCHEMES[scheme]
    lo, hi = qmath.channel_minmax(w, axis)
    scale, zp = fn(0.7 * lo, 0.7 * hi, qtype)  # a narrower range so some values saturate
    x = np.concatenate([w, np.moveaxis(np.broadcast_to(((np.arange(-3, 4) + 0.5)[:, None] * scale), (7, 6)), 1, axis)
                        .astype(np.float32)], axis=1 - axis)
    q_ort, d_ort = _qdq_session(scale, zp, axis, 13).run(None, {"x": x})
    q = qmath.quantize(x, scale, zp, qtype, axis)
    np.testing.assert_array_equal(q, np.clip(q_ort, qtype.qmin, qtype.qmax))  # see test above on reduced range
    same = q == q_ort
    assert same.mean() > 0.5
    np.testing.assert_array_equal(qmath.dequantize(q, scale, zp, axis)[same], d_ort[same])
    assert (q == qtype.qmax).any()


def test_unknown_qtype_name() -> None:
    assert qmath.qtype_by_name("uint8") is qmath.UINT8
    with pytest.raises(ValueError):
        qmath.qtype_by_name("int4")


@given(lo=f32, hi=f32)
@settings(max_examples=30, deadline=None)
def test_representable_range_matches_formula(lo: float, hi: float) -> None:
    assume(lo <= hi)
    scale, zp = qmath.asymmetric_params(np.float64(lo), np.float64(hi), qmath.UINT8)
    rep_lo, rep_hi = qmath.representable_range(scale, zp, qmath.UINT8)
    # Both ends dequantize (in float32) to what representable_range reports (in float64).
    ends = qmath.dequantize(np.array([0, 255], np.uint8), scale, zp).astype(np.float64)
    assert ends[0] == pytest.approx(float(rep_lo), rel=2**-23, abs=0)
    assert ends[1] == pytest.approx(float(rep_hi), rel=2**-23, abs=0)
