"""Calibration methods (onnxq.quant.ranges.compute_range) on distributions with known answers.

Every expectation is computed in the test from the raw values (numpy percentiles, batch
extremes, brute-force expected errors), never copied from a run of the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.quant import qmath
from onnxq.quant.ranges import METHODS, RANGE_GRID, compute_range, stable_range
from onnxq.quant.statistics import BINS_PER_SIDE, TensorStats

FIXTURES = Path(__file__).resolve().parent / "fixtures"

LEVELS = 255  # what onnxq.quant.plan passes for 8-bit types: qmax - qmin
N = 200_000
OUTLIER = 16.0


def fold(batches: list[np.ndarray]) -> TensorStats:
    stats = TensorStats()
    for batch in batches:
        stats.update(batch)
    return stats


class Data:
    """Raw values, the batches they were fed in, and the resulting statistics."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = [np.asarray(b, dtype=np.float32) for b in batches]
        self.x = np.concatenate(self.batches).astype(np.float64)
        self.stats = fold(self.batches)


def _gauss(seed: int, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


@pytest.fixture(scope="module")
def outliers() -> Data:
    """N(0,1) plus one value at +16 and one at -16, fed in 8 batches.

    Why two outliers make clipping optimal for MSE (uint8, 255 steps, range [-c, c]):
    every one of the N values inside pays the rounding error scale²/12 = (2c/255)²/12, the
    outliers pay (16 - c)² each when clipped. Keeping them (c = 16) costs N·(32/255)²/12 ≈ 262;
    clipping at c ≈ 10.6 (where d/dc [N·(2c/255)²/12 + 2(16-c)²] = 0) costs ≈ 115 + 58 = 173.
    With ~10 outliers per side clipping would no longer pay; test_mse_* computes this exactly.
    """
    x = _gauss(0)
    x[[1234, 98765]] = [OUTLIER, -OUTLIER]
    return Data(np.array_split(x, 8))


@pytest.fixture(scope="module")
def gauss() -> Data:
    return Data(np.array_split(_gauss(1), 5))


@pytest.fixture(scope="module")
def relu() -> Data:
    return Data(np.array_split(np.maximum(_gauss(2), 0), 5))


@pytest.fixture(scope="module")
def skewed() -> Data:
    """Two-sided but asymmetric: exponential shifted down, long right tail."""
    rng = np.random.default_rng(3)
    return Data(np.array_split((rng.exponential(2.0, N) - 1.0).astype(np.float32), 4))


@pytest.fixture(scope="module")
def uniform() -> Data:
    rng = np.random.default_rng(4)
    return Data(np.array_split(rng.uniform(-0.3, 5.0, N // 2).astype(np.float32), 3))


DATASETS = ["outliers", "gauss", "relu", "skewed", "uniform"]


@pytest.fixture(params=DATASETS)
def data(request: pytest.FixtureRequest) -> Data:
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- reference computations


def expected_squared_error(x: np.ndarray, lo: float, hi: float, levels: int = LEVELS) -> float:
    """The documented MSE objective, on raw values: scale²/12 inside, squared clip distance outside."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels
    clipped = np.clip(x, lo, hi)
    inside = np.count_nonzero(clipped == x)
    return float(inside * scale**2 / 12 + np.sum((x - clipped) ** 2))


def real_squared_error(x: np.ndarray, lo: float, hi: float) -> float:
    """Squared error of an actual uint8 quantize -> dequantize with onnxq.quant.qmath."""
    scale, zp = qmath.asymmetric_params(np.float64(lo), np.float64(hi), qmath.UINT8)
    restored = qmath.dequantize(qmath.quantize(x, scale, zp, qmath.UINT8), scale, zp)
    return float(np.sum((restored.astype(np.float64) - x) ** 2))


def histogram_error(stats: TensorStats, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Brute force over bins (no prefix sums) of the same objective on the histogram: each
    non-empty bin is represented by its centre, clamped to [min, max] as the docstring says."""
    idx = np.nonzero(stats.counts)[0]
    centres = np.clip((idx - BINS_PER_SIDE + 0.5) * stats.width, stats.min, stats.max)[None, :]
    n = stats.counts[idx].astype(np.float64)[None, :]
    lo = np.minimum(np.atleast_1d(lo), 0.0)[:, None]
    hi = np.maximum(np.atleast_1d(hi), 0.0)[:, None]
    scale = (hi - lo) / levels
    err = np.where(centres < lo, n * (lo - centres) ** 2,
                   np.where(centres > hi, n * (centres - hi) ** 2, n * scale**2 / 12))
    return err.sum(axis=1)


def percentile_tolerance(x: np.ndarray, q: float, width: float) -> float:
    """One histogram bin, plus the gap numpy interpolates across.

    The histogram estimate lies in the bin holding the ceil(g·N)-th smallest value (g = q/100);
    numpy interpolates between the order statistics at floor((N-1)·g) and the next one, and
    that pair contains the same value, so the two differ by at most one bin plus that gap.
    """
    xs = np.sort(x)
    i = math.floor((len(xs) - 1) * q / 100.0)
    gap = xs[min(i + 1, len(xs) - 1)] - xs[i]
    return width + gap + 1e-12 * max(1.0, abs(xs[-1]))


# ---------------------------------------------------------------- global and max


def test_global_is_exact_min_max(data: Data) -> None:
    assert compute_range(data.stats, "global", symmetric=False, levels=LEVELS) == (data.x.min(), data.x.max())
    bound = np.abs(data.x).max()
    assert compute_range(data.stats, "global", symmetric=True, levels=LEVELS) == (-bound, bound)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=8),
       scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e30]))
def test_global_and_max_on_random_batches(seed: int, sizes: list[int], scale: float) -> None:
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal(n) * scale + rng.normal() * scale).astype(np.float32) for n in sizes]
    stats = fold(batches)
    x = np.concatenate(batches)
    assert compute_range(stats, "global", symmetric=False, levels=LEVELS) == (float(x.min()), float(x.max()))
    lo, hi = compute_range(stats, "max", symmetric=False, levels=LEVELS)
    assert lo == pytest.approx(np.mean([float(b.min()) for b in batches]), rel=1e-12)
    assert hi == pytest.approx(np.mean([float(b.max()) for b in batches]), rel=1e-12)


def test_max_is_mean_of_batch_extremes(outliers: Data) -> None:
    mins = [float(b.min()) for b in outliers.batches]
    maxs = [float(b.max()) for b in outliers.batches]
    lo, hi = compute_range(outliers.stats, "max", symmetric=False, levels=LEVELS)
    assert lo == pytest.approx(np.mean(mins), rel=1e-12) and hi == pytest.approx(np.mean(maxs), rel=1e-12)
    # The two batches holding an outlier are averaged with six ordinary ones: inside the global range.
    assert -OUTLIER < lo < -3.0 and 3.0 < hi < OUTLIER
    bound = max(-np.mean(mins), np.mean(maxs))
    s_lo, s_hi = compute_range(outliers.stats, "max", symmetric=True, levels=LEVELS)
    assert s_lo == -s_hi and s_hi == pytest.approx(bound, rel=1e-12)


# ---------------------------------------------------------------- percentile


@pytest.mark.parametrize("q", [60.0, 90.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_numpy(data: Data, q: float) -> None:
    x, w = data.x, data.stats.width
    _, a = compute_range(data.stats, "percentile", symmetric=True, levels=LEVELS, percentile=q)
    expected = np.percentile(np.abs(x), q)
    assert abs(a - expected) <= percentile_tolerance(np.abs(x), q, w)

    lo, hi = compute_range(data.stats, "percentile", symmetric=False, levels=LEVELS, percentile=q)
    exp_lo, exp_hi = np.percentile(x, 100.0 - q), np.percentile(x, q)
    assert abs(hi - exp_hi) <= percentile_tolerance(x, q, w)
    if (x < 0).mean() > (1.0 - q / 100.0):
        # The lower tail lies on the negative side: lo is the (100-P)-th percentile.
        assert abs(lo - exp_lo) <= percentile_tolerance(x, 100.0 - q, w)
    else:
        # Fewer negatives than the tail holds: the percentile is >= 0 and, since every
        # range is widened to include 0 anyway, lo is reported as max(min, 0).
        assert exp_lo >= 0 and lo == max(data.x.min(), 0.0)


def test_percentile_interpolates_inside_a_bin() -> None:
    # Evenly spaced values fill every bin uniformly, so linear interpolation inside the bin
    # is exact up to the value spacing; a bin-level answer would be off by up to half a bin.
    n = 2**18
    x = ((np.arange(n) + 0.5) * (8.0 / n)).astype(np.float32)  # exact in float32; max < 8
    stats = fold(np.array_split(x, 3))
    w, spacing = stats.width, 8.0 / n
    assert w >= 32 * spacing  # 64 values per bin
    for q in (51.3, 75.0, 90.01, 97.77, 99.5, 99.9):
        _, hi = compute_range(stats, "percentile", symmetric=False, levels=LEVELS, percentile=q)
        _, a = compute_range(stats, "percentile", symmetric=True, levels=LEVELS, percentile=q)
        expected = np.percentile(x.astype(np.float64), q)
        assert abs(hi - expected) <= 2 * spacing and abs(a - expected) <= 2 * spacing


# ---------------------------------------------------------------- mse


def test_mse_symmetric_is_brute_force_argmin(data: Data) -> None:
    stats = data.stats
    _, a = compute_range(stats, "mse", symmetric=True, levels=LEVELS)
    candidates = np.linspace(1 / 256, 1, 256) * max(abs(stats.min), abs(stats.max))
    errors = histogram_error(stats, -candidates, candidates, LEVELS)
    assert np.min(np.abs(candidates - a)) <= 1e-12 * candidates[-1]  # one of the documented candidates
    assert histogram_error(stats, -a, a, LEVELS)[0] <= errors.min() * (1 + 1e-9)


def test_mse_asymmetric_is_brute_force_optimal(data: Data) -> None:
    stats = data.stats
    lo, hi = compute_range(stats, "mse", symmetric=False, levels=LEVELS)
    assert stats.min <= lo <= hi <= stats.max
    shrink = np.linspace(1 / 256, 1, 256)
    lo0, hi0 = min(stats.min, 0.0), max(stats.max, 0.0)
    mine = histogram_error(stats, lo, hi, LEVELS)[0]
    # Joint shrink of both ends, then each end refined with the other fixed: the result is at
    # least as good as every joint candidate and the best lo for the chosen hi.
    assert mine <= histogram_error(stats, shrink * lo0, shrink * hi0, LEVELS).min() * (1 + 1e-9)
    assert mine <= histogram_error(stats, shrink * lo0, np.full(256, hi), LEVELS).min() * (1 + 1e-9)
    if hi0 > 0:
        assert np.min(np.abs(shrink * hi0 - hi)) <= 1e-12 * hi0
    if lo0 < 0:
        assert np.min(np.abs(shrink * lo0 - lo)) <= 1e-12 * -lo0


def test_mse_clips_outliers_because_it_is_cheaper(outliers: Data) -> None:
    x = outliers.x
    for symmetric in (True, False):
        lo, hi = compute_range(outliers.stats, "mse", symmetric=symmetric, levels=LEVELS)
        assert lo > -OUTLIER and hi < OUTLIER  # both outliers clipped
        assert hi > np.percentile(x, 99.9) and lo < np.percentile(x, 0.1)  # the Gaussian body is kept
        # The expected error (the objective, on raw values) and the error of a real uint8
        # quantize-dequantize are both lower than keeping the outliers.
        keep = expected_squared_error(x, -OUTLIER, OUTLIER)
        clip = expected_squared_error(x, lo, hi)
        assert clip < 0.8 * keep
        assert real_squared_error(x, lo, hi) < 0.8 * real_squared_error(x, -OUTLIER, OUTLIER)
        # And it is close to the best symmetric clip found by brute force on the raw values.
        grid = np.linspace(3.0, OUTLIER, 131)
        best = min(expected_squared_error(x, -c, c) for c in grid)
        assert clip <= 1.02 * best


def test_mse_keeps_outliers_when_there_are_many() -> None:
    # The counter-case: 2% of the values at ±16 cost far more clipped than rounded.
    x = _gauss(5, 50_000)
    x[:500], x[500:1000] = OUTLIER, -OUTLIER
    stats = fold([x])
    _, hi = compute_range(stats, "mse", symmetric=True, levels=LEVELS)
    assert expected_squared_error(x.astype(np.float64), -OUTLIER, OUTLIER) < expected_squared_error(
        x.astype(np.float64), 0.9 * -OUTLIER, 0.9 * OUTLIER)
    assert hi > 0.9 * OUTLIER


# ---------------------------------------------------------------- kl


def test_kl_on_standard_normal_is_sane(gauss: Data) -> None:
    lo, hi = compute_range(gauss.stats, "kl", symmetric=True, levels=LEVELS)
    assert lo == -hi and 2.5 <= hi <= 5.0
    assert hi < np.abs(gauss.x).max()  # clips the extreme tail ...
    assert hi > np.percentile(np.abs(gauss.x), 99)  # ... but not the body
    # Two-sided data, asymmetric: a window over the signed histogram, nearly symmetric for a Gaussian.
    a_lo, a_hi = compute_range(gauss.stats, "kl", symmetric=False, levels=LEVELS)
    assert 2.5 <= a_hi <= 5.0 and -5.0 <= a_lo <= -2.5
    assert a_hi == pytest.approx(-a_lo, rel=0.25)
    assert a_lo > gauss.x.min() or a_hi < gauss.x.max()  # still clips a tail


def test_kl_ignores_the_relu_zero_spike(relu: Data) -> None:
    positives = relu.x[relu.x > 0].astype(np.float32)
    assert relu.stats.zeros == relu.x.size - positives.size > 0.4 * relu.x.size
    only_positive = fold([positives])
    for symmetric in (False, True):
        lo, hi = compute_range(relu.stats, "kl", symmetric=symmetric, levels=LEVELS)
        _, hi_positive = compute_range(only_positive, "kl", symmetric=symmetric, levels=LEVELS)
        assert hi == hi_positive  # the half of the data sitting at exactly 0 changed nothing
        assert 2.5 <= hi <= 5.0 and lo == (-hi if symmetric else 0.0)


def test_kl_mirrored_relu(relu: Data) -> None:
    negative = fold([-b for b in relu.batches])
    lo, hi = compute_range(negative, "kl", symmetric=False, levels=LEVELS)
    _, positive_hi = compute_range(relu.stats, "kl", symmetric=False, levels=LEVELS)
    assert hi == 0.0 and -5.0 <= lo <= -2.5
    assert lo == pytest.approx(-positive_hi, rel=0.15)  # the same search from the other end (other grid)


def test_kl_asymmetric_keeps_the_recogniser_tail_beside_its_dense_floor() -> None:
    """The demo recogniser's weighted h-swish output (p2o.Add.103): about half the values sit at a
    floor near -0.044, the informative ones in a sparse tail up to 0.42 (2 % above 0.055)."""
    with np.load(FIXTURES / "recogniser_hswish_stats.npz") as saved:
        stats = TensorStats(**{k: (saved[k] if k == "counts" else saved[k].item()) for k in saved.files})
    lo, hi = compute_range(stats, "kl", symmetric=False, levels=LEVELS)
    assert lo == pytest.approx(stats.min, abs=2e-3)
    assert hi > 0.3  # folding both sides onto |x| put the bound at 0.055 and broke the model
    _, folded_bound = compute_range(stats, "kl", symmetric=True, levels=LEVELS)
    assert folded_bound < 0.1  # the symmetric search on |x| is dominated by the floor


# ---------------------------------------------------------------- all methods


@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
def test_clipping_methods_clip_outliers_global_keeps_them(outliers: Data, method: str) -> None:
    assert compute_range(outliers.stats, "global", symmetric=False, levels=LEVELS) == (-OUTLIER, OUTLIER)
    for symmetric in (True, False):
        lo, hi = compute_range(outliers.stats, method, symmetric=symmetric, levels=LEVELS)
        assert -OUTLIER < lo < -3.0 and 3.0 < hi < OUTLIER


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_is_minus_a_a(data: Data, method: str) -> None:
    lo, hi = compute_range(data.stats, method, symmetric=True, levels=LEVELS)
    a_lo, a_hi = compute_range(data.stats, method, symmetric=False, levels=LEVELS)
    assert lo == -hi and 0 < hi <= max(-data.x.min(), data.x.max())
    if method in ("global", "max"):  # a = max(|lo|, |hi|) of the asymmetric range
        assert hi == max(-a_lo, a_hi)


CONSTANTS = [3.0, -2.0, 1e-30, -7e30, 0.1, 3.3007805347442627]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [*CONSTANTS, 0.0])
def test_constant_tensors_give_a_usable_range(method: str, symmetric: bool, value: float) -> None:
    c = np.float32(value)
    stats = fold([np.full(100, c), np.full((3, 7), c)])
    lo, hi = compute_range(stats, method, symmetric=symmetric, levels=LEVELS, percentile=99.9)
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    if symmetric:
        assert lo == -hi and hi == abs(float(c))
        qtype = qmath.INT8
        scale, zp = qmath.symmetric_params(np.float64(lo), np.float64(hi), qtype)
    else:
        assert lo == hi == float(c)
        qtype = qmath.UINT8
        scale, zp = qmath.asymmetric_params(np.float64(lo), np.float64(hi), qtype)
    assert np.isfinite(scale) and scale > 0
    restored = qmath.dequantize(qmath.quantize(np.array([c, 0.0]), scale, zp, qtype), scale, zp)
    assert restored[1] == 0.0
    assert abs(float(restored[0]) - float(c)) <= float(scale) * (0.5 + 2**-20)


def test_no_statistics_and_unknown_method_raise(gauss: Data) -> None:
    with pytest.raises(ValueError):
        compute_range(TensorStats(), "global", symmetric=False, levels=LEVELS)
    with pytest.raises(ValueError):
        compute_range(gauss.stats, "median", symmetric=False, levels=LEVELS)


@st.composite
def tensor_batches(draw: st.DrawFn) -> list[np.ndarray]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "positive", "negative", "narrow", "relu", "spiky"]))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 50.0, 1e25]))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 400))
        x = rng.standard_normal(n)
        if kind == "positive":
            x = np.abs(x) + 0.5
        elif kind == "negative":
            x = -np.abs(x) - 0.1
        elif kind == "narrow":  # all values within a few ulps of one number: a single histogram bin
            x = draw(st.sampled_from([1.0, -1.0])) * (1.0 + 1e-6 * rng.random()) + 1e-7 * rng.random(n)
            x = x * draw(st.floats(0.1, 10.0))
        elif kind == "relu":
            x = np.maximum(x, 0)
        elif kind == "spiky":
            x[rng.random(n) < 0.01] *= 100
        out.append((x * scale).astype(np.float32))
    return out


@settings(max_examples=60, deadline=None)
@given(batches=tensor_batches(), method=st.sampled_from(METHODS), symmetric=st.booleans(),
       percentile=st.floats(50.0, 100.0, exclude_min=True))
def test_ranges_never_leave_min_max(batches: list[np.ndarray], method: str, symmetric: bool,
                                    percentile: float) -> None:
    stats = fold(batches)
    lo, hi = compute_range(stats, method, symmetric=symmetric, levels=LEVELS, percentile=percentile)
    assert math.isfinite(lo) and math.isfinite(hi)
    if symmetric:
        assert lo == -hi and 0 <= hi <= max(-stats.min, stats.max)
    else:
        assert stats.min <= lo <= hi <= stats.max


def test_narrow_tensor_percentile_regression() -> None:
    # All values in the last 0.1 % of one histogram bin: the P=99.9 estimate inside the bin
    # lies below every value. Clamping only hi <= max and lo >= min then gave lo > hi.
    width = 2.0**-10  # the bin width for values in [2, 4)
    value = np.float32((3379 + 4094 / 4096) * width)
    stats = fold([np.full(10, value)])
    lo, hi = compute_range(stats, "percentile", symmetric=False, levels=LEVELS, percentile=99.9)
    assert lo <= hi and stats.min <= lo and hi <= stats.max


@settings(max_examples=40, deadline=None)
@given(value=st.floats(1e-30, 1e30), sign=st.sampled_from([1.0, -1.0]), spread=st.sampled_from([0.0, 1e-7]),
       percentile=st.floats(50.0, 100.0, exclude_min=True), seed=st.integers(0, 2**32 - 1))
def test_percentile_on_single_bin_data_stays_ordered(value: float, sign: float, spread: float, percentile: float,
                                                     seed: int) -> None:
    # Data inside one histogram bin, anywhere in that bin: the interpolated estimate can land
    # below (or, for negatives, above) every value, and must still be clipped into [min, max].
    rng = np.random.default_rng(seed)
    x = (sign * value * (1.0 + spread * rng.random(50))).astype(np.float32)
    stats = fold([x])
    lo, hi = compute_range(stats, "percentile", symmetric=False, levels=LEVELS, percentile=percentile)
    assert stats.min <= lo <= hi <= stats.max


# ---------------------------------------------------------------- ranges that do not depend on the CPU


@given(lo=st.floats(-1e6, 0.0, allow_subnormal=False), hi=st.floats(0.0, 1e6, allow_subnormal=False))
def test_stable_range_only_widens_and_by_a_little(lo: float, hi: float) -> None:
    s_lo, s_hi = stable_range(lo, hi)
    assert s_lo <= lo and s_hi >= hi
    magnitude = max(abs(lo), abs(hi))
    assert (s_hi - s_lo) - (hi - lo) <= 2 * magnitude / RANGE_GRID + 1e-300
    assert stable_range(s_lo, s_hi) == (s_lo, s_hi)


def test_last_bit_differences_in_activations_give_the_same_plan() -> None:
    """Another CPU's fp32 kernels round differently (~1e-7 relative): the plan must not change."""
    from conftest import conv_relu_model

    from onnxq.passes.prepare import prepare_model
    from onnxq.quant.ir import import_graph
    from onnxq.quant.placement import PlacementOptions, place
    from onnxq.quant.plan import QuantSettings, build_plan
    from onnxq.quant.statistics import Statistics

    graph = import_graph(prepare_model(conv_relu_model()).model)
    placement = place(graph, PlacementOptions())
    assert placement.statistics_tensors
    rng = np.random.default_rng(5)
    batches = {name: [rng.normal(0.3, 1.7, 4096).astype(np.float32) for _ in range(6)]
               for name in placement.statistics_tensors}
    plans = []
    for perturbation in (0.0, 1e-6):
        stats = Statistics()
        noise = np.random.default_rng(9)
        for name, values in batches.items():
            for batch in values:
                stats.update(name, batch * (1 + perturbation * noise.standard_normal(batch.shape)).astype(np.float32))
        plans.append({n: (t.scale, t.zero_point) for n, t in
                      build_plan(graph, placement, stats, QuantSettings(method="global")).tensors.items()})
    assert plans[0] == plans[1]
