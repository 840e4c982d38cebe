"""Streaming activation statistics: fold batches in, save, load and merge.

Each tensor keeps its global min/max, the sum of per-batch extremes, and a
histogram of values on a grid symmetric around zero whose bin width is a power
of two. When a batch exceeds the covered range the width doubles (adjacent bins
are summed), so nothing collected is lost and memory stays constant.

Merge guarantee: because bin edges are multiples of a power-of-two width,
re-binning a finer histogram onto a coarser grid is exact. Merging two
statistics therefore gives bit-for-bit the histogram one pass over the union of
the data would give (same width, same counts); min/max, batch counts and the
sums of per-batch extremes merge exactly (the sums up to float64 rounding).
The width is always the smallest power of two that covers max(|x|), so the
histogram resolves at least BINS_PER_SIDE/2 bins between 0 and max(|x|).
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxq.errors import DataError, read_problem

BINS_PER_SIDE = 4096
STATS_FORMAT = "onnxq-stats/1"
# Bin widths 2^e a float64 holds with every edge finite (ldexp range minus the 2^12 bins per side).
MIN_WIDTH_EXP, MAX_WIDTH_EXP = -1074, 1023 - 12


@dataclass
class TensorStats:
    """Everything the calibration methods need about one tensor."""

    min: float = math.inf
    max: float = -math.inf
    batches: int = 0
    count: int = 0
    zeros: int = 0
    sum_batch_min: float = 0.0
    sum_batch_max: float = 0.0
    # Bin i covers [(i - BINS_PER_SIDE) * width, (i - BINS_PER_SIDE + 1) * width).
    width_exp: int | None = None
    counts: np.ndarray = field(default_factory=lambda: np.zeros(2 * BINS_PER_SIDE, dtype=np.int64))
    # min, max, min, max, ... of every batch in order, when a caller asks for them (not saved):
    # sharded calibration re-adds them in the single-process order, so the sums match it bit
    # for bit. float32 holds them exactly (they are float32 values): 8 bytes a batch.
    batch_extremes: array | None = field(default=None, compare=False, repr=False)
    # False: only the extremes are kept (min, max and their per-batch sums), which is all the
    # `global` and `max` methods read; folding a batch then costs two passes instead of eight.
    histogram: bool = field(default=True, compare=False, repr=False)

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.width_exp) if self.width_exp is not None else 0.0

    @property
    def edges(self) -> np.ndarray:
        """Bin edges (2 * BINS_PER_SIDE + 1 values)."""
        return (np.arange(-BINS_PER_SIDE, BINS_PER_SIDE + 1, dtype=np.float64)) * self.width

    def update(self, values: np.ndarray) -> None:
        """Fold one batch of a tensor's values in."""
        x = np.asarray(values)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        batch_min = float(x.min())
        batch_max = float(x.max())
        if not (math.isfinite(batch_min) and math.isfinite(batch_max)):
            raise DataError("calibration produced NaN or Inf inside the model; check the data and the model")
        self.min = min(self.min, batch_min)
        self.max = max(self.max, batch_max)
        self.batches += 1
        self.count += int(x.size)
        self.sum_batch_min += batch_min
        self.sum_batch_max += batch_max
        if self.batch_extremes is not None:
            self.batch_extremes.extend((batch_min, batch_max))
        self._grow_to(max(abs(batch_min), abs(batch_max)))
        if not self.histogram:
            return
        self.zeros += int(np.count_nonzero(x == 0))  # 5x faster than size - count_nonzero(x) on floats
        if self.width_exp is None:  # all values so far are exactly zero
            self.counts[BINS_PER_SIDE] += x.size
            return
        # the width covers max |x| (see _grow_to): every index is in [0, 2 * BINS_PER_SIDE)
        self.counts += np.bincount(_bin_index(x, -self.width_exp, batch_min < 0), minlength=2 * BINS_PER_SIDE)

    def _grow_to(self, bound: float) -> None:
        """Coarsen the grid until [-bound, bound] is covered."""
        if bound == 0.0:
            return
        needed = required_width_exp(bound)
        if self.width_exp is None:
            self.width_exp = needed
        elif needed > self.width_exp:
            self.counts = rebin(self.counts, needed - self.width_exp)
            self.width_exp = needed

    def merge(self, other: TensorStats) -> TensorStats:
        """Statistics of the union of the data behind self and other."""
        merged = TensorStats(
            min=min(self.min, other.min),
            max=max(self.max, other.max),
            batches=self.batches + other.batches,
            count=self.count + other.count,
            zeros=self.zeros + other.zeros,
            sum_batch_min=self.sum_batch_min + other.sum_batch_min,
            sum_batch_max=self.sum_batch_max + other.sum_batch_max,
            histogram=self.histogram and other.histogram,
        )
        exps = [e for e in (self.width_exp, other.width_exp) if e is not None]
        merged.width_exp = max(exps) if exps else None
        merged.counts = _counts_at(self, merged.width_exp) + _counts_at(other, merged.width_exp)
        return merged

    @property
    def mean_batch_min(self) -> float:
        return self.sum_batch_min / self.batches if self.batches else 0.0

    @property
    def mean_batch_max(self) -> float:
        return self.sum_batch_max / self.batches if self.batches else 0.0


def _bin_index(x: np.ndarray, factor_exp: int, has_negatives: bool) -> np.ndarray:
    """floor(x * 2**factor_exp) + BINS_PER_SIDE as int64, exactly, for float32 x.

    Multiplying by a power of two is exact in float32 (and ~20x faster than float64
    or ldexp) while the factor is a normal float32. The one inexact case is a tiny
    negative value underflowing to -0.0: it belongs to bin -1, not 0. The floored
    values are integers below 2**24 in magnitude, so adding the offset in float32 is
    exact too; the sum is written straight into the int64 result (one pass fewer).
    """
    if not -126 <= factor_exp <= 127:  # factor not a normal float32: exact in float64
        return np.floor(np.ldexp(x.astype(np.float64), factor_exp)).astype(np.int64) + BINS_PER_SIDE
    scaled = np.multiply(x, np.float32(math.ldexp(1.0, factor_exp)))
    np.floor(scaled, out=scaled)
    if factor_exp < 0 and has_negatives:
        underflowed = (scaled == 0) & (x < 0)
        if underflowed.any():
            scaled[underflowed] = -1
    index = np.empty(x.size, dtype=np.int64)
    np.add(scaled, np.float32(BINS_PER_SIDE), out=index, casting="unsafe")
    return index


def required_width_exp(bound: float) -> int:
    """Smallest e with BINS_PER_SIDE * 2**e > bound, so the largest value still has a bin."""
    # frexp gives 2**(exp - 1) <= bound < 2**exp, hence e = exp - log2(BINS_PER_SIDE) is minimal.
    return math.frexp(bound)[1] - int(math.log2(BINS_PER_SIDE))


def rebin(counts: np.ndarray, doublings: int) -> np.ndarray:
    """Re-bin a centred histogram onto a grid 2**doublings times coarser, exactly."""
    if doublings <= 0:
        return counts
    factor = 2 ** min(doublings, int(math.log2(BINS_PER_SIDE)) + 1)
    neg = counts[:BINS_PER_SIDE][::-1]  # bin k covers [-(k+1)w, -kw)
    pos = counts[BINS_PER_SIDE:]  # bin k covers [kw, (k+1)w)
    out = np.zeros_like(counts)
    if factor > BINS_PER_SIDE:
        out[BINS_PER_SIDE - 1] = neg.sum()
        out[BINS_PER_SIDE] = pos.sum()
        return out
    new_neg = neg.reshape(-1, factor).sum(axis=1)
    new_pos = pos.reshape(-1, factor).sum(axis=1)
    out[BINS_PER_SIDE - len(new_neg) : BINS_PER_SIDE] = new_neg[::-1]
    out[BINS_PER_SIDE : BINS_PER_SIDE + len(new_pos)] = new_pos
    return out


def _counts_at(stats: TensorStats, width_exp: int | None) -> np.ndarray:
    if stats.width_exp is None or width_exp is None:
        # Only exact zeros were seen: they sit in the bin starting at 0 on any grid.
        return stats.counts.copy()
    return rebin(stats.counts, width_exp - stats.width_exp)


@dataclass
class Statistics:
    """Per-tensor statistics for one model and one calibration set."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)
    samples: int = 0
    model_digest: str = ""
    source: str = ""
    keep_batch_extremes: bool = field(default=False, compare=False, repr=False)  # see TensorStats.batch_extremes
    histograms: bool = field(default=True, compare=False, repr=False)  # see TensorStats.histogram

    def update(self, name: str, values: np.ndarray) -> None:
        if name not in self.tensors:
            self.tensors[name] = TensorStats(batch_extremes=array("f") if self.keep_batch_extremes else None,
                                             histogram=self.histograms)
        self.tensors[name].update(values)

    def merge(self, other: Statistics) -> Statistics:
        if self.model_digest and other.model_digest and self.model_digest != other.model_digest:
            raise DataError("statistics come from different models; merge needs the same model")
        merged = Statistics(
            samples=self.samples + other.samples,
            model_digest=self.model_digest or other.model_digest,
            source=" + ".join(s for s in (self.source, other.source) if s),
        )
        for name in sorted(set(self.tensors) | set(other.tensors)):
            mine, theirs = self.tensors.get(name), other.tensors.get(name)
            if mine is None or theirs is None:
                raise DataError(f"tensor {name!r} is in only one of the statistics files; cannot merge")
            merged.tensors[name] = mine.merge(theirs)
        return merged

    def save(self, path: str | Path) -> None:
        """Write a single .npz: a JSON header plus one histogram array per tensor."""
        from onnxq.model_io import atomic_write_bytes

        if not all(t.histogram for t in self.tensors.values()):
            raise ValueError("internal error: statistics collected without histograms cannot be saved")

        names = sorted(self.tensors)
        header = {
            "format": STATS_FORMAT,
            "bins_per_side": BINS_PER_SIDE,
            "samples": self.samples,
            "model_digest": self.model_digest,
            "source": self.source,
            "tensors": [
                {
                    "name": n,
                    "min": _finite_or_none(self.tensors[n].min),
                    "max": _finite_or_none(self.tensors[n].max),
                    "batches": self.tensors[n].batches,
                    "count": self.tensors[n].count,
                    "zeros": self.tensors[n].zeros,
                    "sum_batch_min": self.tensors[n].sum_batch_min,
                    "sum_batch_max": self.tensors[n].sum_batch_max,
                    "width_exp": self.tensors[n].width_exp,
                }
                for n in names
            ],
        }
        arrays = {"header": np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)}
        arrays["counts"] = (
            np.stack([self.tensors[n].counts for n in names])
            if names
            else np.zeros((0, 2 * BINS_PER_SIDE), np.int64)
        )
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                counts = np.array(data["counts"])
        except FileNotFoundError:
            raise DataError(f"statistics file not found: {path}") from None
        except Exception as exc:  # corrupt zip, missing keys, bad JSON
            raise DataError(f"not an onnxq statistics file: {path} ({read_problem(exc)})") from None
        if not isinstance(header, dict):
            raise DataError(f"not an onnxq statistics file: {path} (header is not a JSON object)")
        if header.get("format") != STATS_FORMAT or header.get("bins_per_side") != BINS_PER_SIDE:
            raise DataError(f"{path}: unsupported statistics format {header.get('format')!r}")
        try:
            if counts.shape != (len(header["tensors"]), 2 * BINS_PER_SIDE) or counts.dtype.kind not in "iu":
                raise ValueError(f"the histogram array is {counts.dtype} {list(counts.shape)}, not integer counts "
                                 f"[{len(header['tensors'])}, {2 * BINS_PER_SIDE}]")
            if not _is_count(header["samples"]):
                raise ValueError(f"samples is {header['samples']!r}, not a count")
            stats = cls(samples=header["samples"], model_digest=header["model_digest"], source=header["source"])
            for row, entry in zip(counts, header["tensors"], strict=True):
                problem = _entry_problem(entry, row)
                if problem:
                    raise ValueError(f"tensor {entry.get('name')!r}: {problem}")
                stats.tensors[entry["name"]] = TensorStats(
                    min=entry["min"] if entry["min"] is not None else math.inf,
                    max=entry["max"] if entry["max"] is not None else -math.inf,
                    batches=entry["batches"],
                    count=entry["count"],
                    zeros=entry["zeros"],
                    sum_batch_min=entry["sum_batch_min"],
                    sum_batch_max=entry["sum_batch_max"],
                    width_exp=entry["width_exp"],
                    counts=row.astype(np.int64),
                )
        except KeyError as exc:
            raise DataError(f"{path}: corrupt statistics file (no field {exc})") from None
        except (TypeError, ValueError, AttributeError) as exc:  # a header or array that does not fit the format
            raise DataError(f"{path}: corrupt or hand-edited statistics file: {exc}") from None
        return stats


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _entry_problem(entry: dict, counts: np.ndarray) -> str:
    """What makes one tensor's saved statistics impossible ('' when they are consistent)."""
    for key in ("batches", "count", "zeros"):
        if not _is_count(entry[key]):
            return f"{key} is {entry[key]!r}, not a count"
    for key in ("min", "max"):
        if entry[key] is not None and not _is_number(entry[key]):
            return f"{key} is {entry[key]!r}, not a finite number"
    for key in ("sum_batch_min", "sum_batch_max"):
        if not _is_number(entry[key]):
            return f"{key} is {entry[key]!r}, not a finite number"
    if entry["count"] and (entry["min"] is None or entry["max"] is None or entry["min"] > entry["max"]):
        return f"min {entry['min']} is not <= max {entry['max']}"
    if entry["zeros"] > entry["count"]:
        return f"{entry['zeros']} zeros among {entry['count']} values"
    width = entry["width_exp"]
    if width is not None and (not isinstance(width, int) or isinstance(width, bool)):
        return f"width_exp is {width!r}, not an integer"
    if width is not None and not MIN_WIDTH_EXP <= width <= MAX_WIDTH_EXP:
        return f"width_exp {width} is outside [{MIN_WIDTH_EXP}, {MAX_WIDTH_EXP}]"
    if counts.min(initial=0) < 0 or int(counts.sum()) != entry["count"]:
        return f"the histogram holds {int(counts.sum())} values (some negative?) for a count of {entry['count']}"
    if width is not None and entry["count"] and max(abs(entry["min"]), abs(entry["max"])) >= math.ldexp(
            BINS_PER_SIDE, width):
        return f"the histogram (bin width 2^{width}) does not reach min/max"
    return ""


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
