"""Calibration methods: turn a tensor's statistics into a clip range [lo, hi].

All methods read the same TensorStats, so switching method never needs a new
inference pass. Definitions (also in the README):

- global:     [min, max] over the whole calibration set.
- max:        per-batch min and max, each averaged over batches.
- percentile: symmetric: ±P-th percentile of |x|; asymmetric: the (100-P)-th and
              P-th percentiles of x. Interpolated linearly inside a histogram bin.
- mse:        the range minimising the expected squared error of quantize-dequantize
              over the histogram (rounding error scale²/12 inside, clipping error outside).
- kl:         the threshold minimising KL(P || Q) between the histogram clipped at the
              threshold and its quantized version (TensorRT's entropy calibration); on
              |x| when symmetric, a window [lo, hi] of the signed histogram when asymmetric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxq.quant.statistics import BINS_PER_SIDE, TensorStats

METHODS = ("global", "max", "percentile", "mse", "kl")
EXTREME_METHODS = frozenset({"global", "max"})  # read only min/max and the per-batch extremes, no histogram
# The only method that never collapsed a bench model (README: "Choosing a method").
DEFAULT_METHOD = "global"
DEFAULT_PERCENTILE = 99.99
_CANDIDATES = 256
_KL_CANDIDATES = 128
_KL_WINDOW_CANDIDATES = 64  # per end and round of the asymmetric window search
KL_BINS = 2048
KL_LEVELS = 128


def compute_range(
    stats: TensorStats,
    method: str,
    *,
    symmetric: bool,
    levels: int,
    percentile: float = DEFAULT_PERCENTILE,
) -> tuple[float, float]:
    """Clip range for one tensor. `levels` is the number of quantization steps (255 for 8 bits)."""
    if stats.batches == 0:
        raise ValueError("no statistics collected for this tensor")
    if stats.width_exp is None or (stats.min == 0.0 and stats.max == 0.0):
        return 0.0, 0.0
    if method not in EXTREME_METHODS and not stats.histogram:
        raise ValueError(f"internal error: the {method} method needs histograms; these statistics keep extremes only")
    if method == "global":
        lo, hi = stats.min, stats.max
    elif method == "max":
        lo, hi = stats.mean_batch_min, stats.mean_batch_max
    elif method == "percentile":
        lo, hi = _percentile_range(stats, percentile, symmetric)
    elif method == "mse":
        lo, hi = _mse_range(stats, symmetric, levels)
    elif method == "kl":
        lo, hi = _kl_range(stats, symmetric, levels)
    else:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    # Clip both ends into [min, max]; clipping is monotone, so lo <= hi survives it (clamping
    # each end on one side only let a histogram estimate below min give hi < lo).
    lo, hi = (min(max(float(v), stats.min), stats.max) for v in (lo, hi))
    if symmetric:
        bound = max(abs(lo), abs(hi))
        return -bound, bound
    return lo, hi


# A range's ends are rounded outward to 1/RANGE_GRID of the power of two below its magnitude.
RANGE_GRID = 64


def stable_range(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] rounded outward to a grid of at most 1/64 of its magnitude (never narrower).

    Calibration runs the fp32 model in onnxruntime, whose kernels differ between CPU classes
    (AVX2, AVX-512, AMX sum in other orders): the same data give activations, and so ranges, that
    differ in the last float bits (about 1e-7 relative). On this grid such differences almost never
    change a scale, so the same inputs give the same model bytes on any machine; the range grows
    by under 1.6 %, which costs at most 0.14 dB of SQNR.
    """
    magnitude = max(abs(lo), abs(hi))
    if magnitude == 0.0 or not math.isfinite(magnitude):
        return lo, hi
    exponent = math.frexp(magnitude)[1]
    while True:  # rounding up may reach the next power of two, whose grid is twice as coarse: snap on that one
        step = math.ldexp(1.0, exponent - 1 - int(math.log2(RANGE_GRID)))
        snapped = math.floor(lo / step) * step, math.ceil(hi / step) * step
        snapped_exponent = math.frexp(max(abs(snapped[0]), abs(snapped[1])))[1]
        if snapped_exponent == exponent:
            return snapped
        exponent = snapped_exponent


def _sides(stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
    """(negative, positive) counts as float64; bin k covers |x| in [k*w, (k+1)*w) on each side."""
    neg = stats.counts[:BINS_PER_SIDE][::-1].astype(np.float64)
    pos = stats.counts[BINS_PER_SIDE:].astype(np.float64)
    return neg, pos


def _abs_histogram(stats: TensorStats) -> np.ndarray:
    """Counts of |x| (negative side folded onto positive)."""
    neg, pos = _sides(stats)
    return neg + pos


def _quantile_from_counts(counts: np.ndarray, width: float, fraction: float) -> float:
    """Value below which `fraction` of the mass lies, for bins [k*w, (k+1)*w)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    cumulative = np.cumsum(counts)
    target = fraction * total
    k = int(np.searchsorted(cumulative, target, side="left"))
    k = min(k, len(counts) - 1)
    before = cumulative[k - 1] if k > 0 else 0.0
    inside = counts[k]
    offset = (target - before) / inside if inside > 0 else 0.0
    return (k + float(np.clip(offset, 0.0, 1.0))) * width


def _percentile_range(stats: TensorStats, percentile: float, symmetric: bool) -> tuple[float, float]:
    fraction = percentile / 100.0
    w = stats.width
    if symmetric:
        bound = _quantile_from_counts(_abs_histogram(stats), w, fraction)
        return -bound, bound
    neg, pos = _sides(stats)
    total = pos.sum() + neg.sum()
    tail = (1.0 - fraction) * total
    # Upper tail: the value with `tail` of all the mass above it.
    hi = _quantile_from_counts(pos, w, 1.0 - tail / pos.sum()) if pos.sum() > tail else 0.0
    lo = -_quantile_from_counts(neg, w, 1.0 - tail / neg.sum()) if neg.sum() > tail else 0.0
    return lo, hi


def _centres_and_counts(stats: TensorStats) -> tuple[np.ndarray, np.ndarray]:
    nonzero = np.nonzero(stats.counts)[0]
    centres = (nonzero - BINS_PER_SIDE + 0.5) * stats.width
    # Keep the extremes exact: the outermost bins' centres are clamped to the true min/max.
    centres = np.clip(centres, stats.min, stats.max)
    return centres, stats.counts[nonzero].astype(np.float64)


class _ErrorModel:
    """Expected squared quantize-dequantize error of candidate ranges, in O(bins + candidates).

    Inside the range each value's rounding error averages scale²/12; outside, a value
    is clipped and its error is its distance to the range end, squared. Prefix sums of
    n, n·c and n·c² over sorted bin centres c give the clipping terms in closed form.
    """

    def __init__(self, centres: np.ndarray, counts: np.ndarray) -> None:
        order = np.argsort(centres, kind="stable")
        self.centres = centres[order]
        counts = counts[order]
        zero = np.zeros(1)
        self.p0 = np.concatenate([zero, np.cumsum(counts)])
        self.p1 = np.concatenate([zero, np.cumsum(counts * self.centres)])
        self.p2 = np.concatenate([zero, np.cumsum(counts * self.centres**2)])

    def __call__(self, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
        below = np.searchsorted(self.centres, lo, side="left")
        upto = np.searchsorted(self.centres, hi, side="right")
        p0, p1, p2 = self.p0, self.p1, self.p2
        err_below = lo**2 * p0[below] - 2 * lo * p1[below] + p2[below]
        err_above = (p2[-1] - p2[upto]) - 2 * hi * (p1[-1] - p1[upto]) + hi**2 * (p0[-1] - p0[upto])
        inside = p0[upto] - p0[below]
        scale = (hi - lo) / levels
        return np.clip(err_below, 0, None) + np.clip(err_above, 0, None) + inside * scale**2 / 12.0


def _mse_range(stats: TensorStats, symmetric: bool, levels: int) -> tuple[float, float]:
    centres, counts = _centres_and_counts(stats)
    shrink = np.linspace(1.0 / _CANDIDATES, 1.0, _CANDIDATES)
    if symmetric:
        error = _ErrorModel(np.abs(centres), counts)
        candidates = shrink * max(abs(stats.min), abs(stats.max))
        best = float(candidates[int(np.argmin(error(-candidates, candidates, levels)))])
        return -best, best
    error = _ErrorModel(centres, counts)
    lo0, hi0 = min(stats.min, 0.0), max(stats.max, 0.0)
    best = float(shrink[int(np.argmin(error(shrink * lo0, shrink * hi0, levels)))])
    lo, hi = best * lo0, best * hi0
    # One round of coordinate refinement: each end on its own, the other fixed.
    if hi0 > 0:
        his = shrink * hi0
        hi = float(his[int(np.argmin(error(np.full_like(his, lo), his, levels)))])
    if lo0 < 0:
        los = shrink * lo0
        lo = float(los[int(np.argmin(error(los, np.full_like(los, hi), levels)))])
    return lo, hi


def _kl_threshold(hist: np.ndarray, width: float) -> float:
    """TensorRT-style entropy calibration on a one-sided histogram (bins [k*w, (k+1)*w)).

    As in TensorRT, the histogram is first brought to at most KL_BINS bins (here by
    summing neighbours, which is exact on our power-of-two grid) and thresholds are
    searched from KL_LEVELS bins upward: the quantized reference has KL_LEVELS levels.
    """
    last = int(np.max(np.nonzero(hist)[0])) + 1 if hist.any() else 0
    hist = hist[:last]
    factor = 1
    while last > KL_BINS * factor:
        factor *= 2
    if factor > 1:
        padded = np.zeros(-(-last // factor) * factor)
        padded[:last] = hist
        hist = padded.reshape(-1, factor).sum(axis=1)
        width *= factor
    bins = len(hist)
    if bins <= KL_LEVELS:
        return bins * width
    step = max(1, (bins - KL_LEVELS) // _KL_CANDIDATES)
    candidates = list(range(KL_LEVELS, bins + 1, step))
    if candidates[-1] != bins:
        candidates.append(bins)
    divergences = [_kl_divergence_of_window(hist, 0, i, KL_LEVELS) for i in candidates]
    return candidates[_widest_near_minimum(divergences, widest_last=True)] * width


def _kl_divergence_of_window(hist: np.ndarray, a: int, b: int, levels: int) -> float:
    """KL(P || Q) for the clip window of bins [a, b): P folds the mass outside into the end bins,
    Q spreads `levels` groups of the window's own bins evenly over their nonzero bins."""
    inside = hist[a:b]
    reference = inside.copy()
    reference[0] += hist[:a].sum()
    reference[-1] += hist[b:].sum()  # outliers clipped into the end bins
    n = b - a
    group = (np.arange(n) * levels) // n
    nonzero = (inside > 0).astype(np.float64)
    group_mass = np.bincount(group, weights=inside, minlength=levels)
    group_nonzero = np.bincount(group, weights=nonzero, minlength=levels)
    per_bin = np.divide(group_mass, group_nonzero, out=np.zeros(levels), where=group_nonzero > 0)
    expanded = per_bin[group] * nonzero
    p = reference / reference.sum()
    q_total = expanded.sum()
    if q_total == 0:
        return np.inf
    q = expanded / q_total
    mask = p > 0
    # Bins where P has mass but Q has none get a tiny epsilon (TensorRT smooths the same way).
    q_safe = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_safe)))


def _kl_range(stats: TensorStats, symmetric: bool, levels: int) -> tuple[float, float]:
    """Symmetric: TensorRT's threshold on |x|. Asymmetric: a window [lo, hi] of the signed histogram
    with `levels` steps, each end searched with the other fixed (two rounds), as `mse` does.

    Folding the sides onto |x| for an asymmetric range let a dense side set the other's clip:
    a weighted h-swish output with most values at a floor near -0.04 and a sparse informative
    tail up to 0.4 got [-0.055, 0.055], which broke the demo recogniser.
    Exact zeros (ReLU outputs, padding) are left out: zero is exact in every scheme,
    and a spike at 0 would otherwise drag the threshold down."""
    if symmetric:
        neg, pos = _sides(stats)
        pos[0] -= stats.zeros
        bound = _kl_threshold(pos + neg, stats.width)
        return -bound, bound
    signed = _signed_kl_histogram(stats)
    if signed is None or len(signed.counts) <= levels:
        return stats.min, stats.max
    a, b = _kl_window(signed.counts, signed.zero, levels)
    return min(signed.edge(a), 0.0), max(signed.edge(b), 0.0)


@dataclass(frozen=True)
class _SignedHistogram:
    counts: np.ndarray  # exact zeros left out
    low_edge: float  # value at the lower edge of bin 0
    width: float
    zero: int  # the first bin at or above 0

    def edge(self, k: int) -> float:
        return self.low_edge + k * self.width


def _signed_kl_histogram(stats: TensorStats) -> _SignedHistogram | None:
    """The occupied part of the histogram, brought to at most KL_BINS bins (None: nothing but zeros)."""
    counts = stats.counts.astype(np.float64)
    counts[BINS_PER_SIDE] -= stats.zeros
    nonzero = np.nonzero(counts)[0]
    if len(nonzero) == 0:
        return None
    first, last = int(nonzero[0]), int(nonzero[-1]) + 1
    factor = 1
    while last - first > KL_BINS * factor:
        factor *= 2
    start, end = first // factor * factor, -(-last // factor) * factor  # multiples of factor: 0 stays an edge
    hist = counts[start:end].reshape(-1, factor).sum(axis=1)
    zero = min(max((BINS_PER_SIDE - start) // factor, 0), len(hist))
    return _SignedHistogram(hist, (start - BINS_PER_SIDE) * stats.width, factor * stats.width, zero)


def _kl_window(hist: np.ndarray, zero: int, levels: int) -> tuple[int, int]:
    """Bins [a, b) minimising the KL divergence: each end searched with the other fixed, twice.
    The window holds 0 (a <= zero <= b) and at least `levels` bins."""
    a, b = 0, len(hist)
    for _ in range(2):
        his = _window_ends(min(max(zero, a + levels), len(hist)), len(hist))
        b = his[_widest_near_minimum([_kl_divergence_of_window(hist, a, i, levels) for i in his], widest_last=True)]
        los = _window_ends(0, max(min(zero, b - levels), 0))
        a = los[_widest_near_minimum([_kl_divergence_of_window(hist, i, b, levels) for i in los], widest_last=False)]
    return a, b


KL_TIE = 1e-3  # divergences within this relative distance of the minimum count as a tie


def _widest_near_minimum(divergences: list[float], *, widest_last: bool) -> int:
    """The index of the widest candidate whose divergence ties the minimum (within KL_TIE).

    The KL objective is often flat near its minimum; a plain argmin then flips between neighbours
    when the histogram differs by a few counts (the same data calibrated on another CPU, whose fp32
    kernels round differently). Among near ties the widest window clips least."""
    values = np.asarray(divergences, dtype=np.float64)
    best = float(np.min(values))
    ties = np.nonzero(values <= best + KL_TIE * max(abs(best), 1e-12))[0]
    return int(ties[-1] if widest_last else ties[0])


def _window_ends(first: int, last: int) -> list[int]:
    """About _KL_WINDOW_CANDIDATES bin indices from `first` to `last` (inclusive, both always in)."""
    step = max(1, (last - first) // _KL_WINDOW_CANDIDATES)
    return sorted(set(range(first, last + 1, step)) | {first, last})
