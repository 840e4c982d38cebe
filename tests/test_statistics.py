"""Streaming statistics (onnxq.quant.statistics): batching, growth, merge, save/load, bad input.

The reference histogram used throughout is computed in one shot from all the values:
bin i covers [(i - BINS_PER_SIDE) * w, (i - BINS_PER_SIDE + 1) * w), so a value x lands in
bin floor(x / w) + BINS_PER_SIDE. Division by a power of two is exact in float64 for every
float32 x, so this reference has no rounding of its own.
"""

from __future__ import annotations

import json
import math
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.errors import DataError
from onnxq.quant.statistics import BINS_PER_SIDE, Statistics, TensorStats, required_width_exp

FAST = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- helpers


def reference_histogram(values: np.ndarray, width_exp: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float32).astype(np.float64).ravel()
    index = np.floor(x / 2.0**width_exp).astype(np.int64) + BINS_PER_SIDE
    assert index.min(initial=0) >= 0 and index.max(initial=0) < 2 * BINS_PER_SIDE, "value outside the grid"
    return np.bincount(index, minlength=2 * BINS_PER_SIDE)


def fold(batches: list[np.ndarray]) -> TensorStats:
    stats = TensorStats()
    for batch in batches:
        stats.update(batch)
    return stats


def summation_tolerance(batches: list[np.ndarray]) -> float:
    """Float64 rounding bound for summing the per-batch extremes in any order: n·eps·Σ|terms|."""
    terms = [abs(float(f(b))) for b in batches for f in (np.min, np.max)]
    return len(terms) * 2.0**-52 * math.fsum(terms)


def assert_same_stats(a: TensorStats, b: TensorStats, *, sum_tolerance: float = 0.0) -> None:
    assert a.min == b.min and a.max == b.max
    assert a.batches == b.batches and a.count == b.count and a.zeros == b.zeros
    assert a.width_exp == b.width_exp
    assert a.counts.dtype == b.counts.dtype == np.int64
    np.testing.assert_array_equal(a.counts, b.counts)
    # Documented: the sums of per-batch extremes merge up to float64 rounding (0: exactly).
    assert abs(a.sum_batch_min - b.sum_batch_min) <= sum_tolerance
    assert abs(a.sum_batch_max - b.sum_batch_max) <= sum_tolerance


def assert_matches_data(stats: TensorStats, batches: list[np.ndarray]) -> None:
    """Everything in `stats` equals what the raw batches say (histogram at the stats' own width)."""
    batches = [np.asarray(b, dtype=np.float32).ravel() for b in batches]
    x = np.concatenate(batches)
    assert stats.count == x.size == int(stats.counts.sum())
    assert stats.batches == len(batches)
    tol = summation_tolerance(batches)
    assert abs(stats.sum_batch_min - math.fsum(float(b.min()) for b in batches)) <= tol
    assert abs(stats.sum_batch_max - math.fsum(float(b.max()) for b in batches)) <= tol
    assert stats.zeros == int(np.sum(x == 0))
    assert stats.min == float(x.min()) and stats.max == float(x.max())
    bound = float(np.max(np.abs(x)))
    if bound == 0.0:
        assert stats.width_exp is None
        assert stats.counts[BINS_PER_SIDE] == x.size
    else:
        # Documented: the width is the smallest power of two with BINS_PER_SIDE * w > max|x|.
        assert BINS_PER_SIDE * stats.width > bound >= BINS_PER_SIDE * stats.width / 2
        np.testing.assert_array_equal(stats.counts, reference_histogram(x, stats.width_exp))


# Data of very different scales, so that merging and streaming really re-bin.
SCALES = [0.0, 1e-38, 1e-20, 1e-3, 1.0, 7.0, 1e4, 1e30]


@st.composite
def gaussian_batches(draw: st.DrawFn) -> list[np.ndarray]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_batches = draw(st.integers(1, 5))
    out = []
    for _ in range(n_batches):
        scale = draw(st.sampled_from(SCALES))
        size = draw(st.integers(1, 300))
        batch = (rng.standard_normal(size) * scale).astype(np.float32)
        if draw(st.booleans()):
            batch[rng.integers(0, size, size // 3 + 1)] = 0.0  # exact zeros (ReLU-like)
        if draw(st.booleans()):
            batch = np.abs(batch)  # one-sided data
        out.append(batch)
    return out


# Any finite float32: subnormals, -0.0, values near the float32 maximum.
raw_batches = st.lists(
    hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=4,
)
any_batches = st.one_of(gaussian_batches(), raw_batches)


# ---------------------------------------------------------------- streaming


@FAST
@given(batches=any_batches)
def test_many_batches_equal_one_batch(batches: list[np.ndarray]) -> None:
    streamed = fold(batches)
    union = np.concatenate(batches)
    whole = fold([union])
    assert streamed.min == whole.min and streamed.max == whole.max
    assert streamed.count == whole.count and streamed.zeros == whole.zeros
    assert streamed.width_exp == whole.width_exp
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    assert_matches_data(streamed, batches)
    assert_matches_data(whole, [union])


@FAST
@given(batches=any_batches)
def test_batch_order_does_not_change_the_histogram(batches: list[np.ndarray]) -> None:
    forward, backward = fold(batches), fold(batches[::-1])
    assert forward.width_exp == backward.width_exp
    np.testing.assert_array_equal(forward.counts, backward.counts)


def test_range_growth_keeps_every_count_and_bins_values_correctly() -> None:
    rng = np.random.default_rng(0)
    small = rng.uniform(-1.0, 1.0, 10_000).astype(np.float32)
    stats = fold([small])
    fine_exp = stats.width_exp
    assert fine_exp == required_width_exp(float(np.max(np.abs(small))))
    probe = np.float32(0.7)  # a value we can follow through the growth
    stats.update(np.array([probe]))
    big = np.array([-1000.5, 3.0, 999.0], dtype=np.float32)
    stats.update(big)

    assert stats.width_exp == required_width_exp(1000.5) > fine_exp  # the grid really coarsened (2**8 times)
    assert int(stats.counts.sum()) == stats.count == small.size + 1 + big.size
    edges = stats.edges
    assert edges.shape == (2 * BINS_PER_SIDE + 1,)
    for value in (probe, *big):
        i = int(np.searchsorted(edges, float(value), side="right")) - 1  # edges[i] <= value < edges[i+1]
        assert edges[i] <= value < edges[i + 1]
        assert stats.counts[i] >= 1
    # The whole histogram equals a direct one-shot histogram of all values at the final width.
    np.testing.assert_array_equal(stats.counts, reference_histogram(np.concatenate([small, [probe], big]),
                                                                     stats.width_exp))


def test_zeros_first_then_values() -> None:
    stats = fold([np.zeros(50, np.float32), np.array([-0.0, 0.0], np.float32)])
    assert stats.width_exp is None and stats.counts[BINS_PER_SIDE] == 52 and stats.zeros == 52
    stats.update(np.array([-3.0, 2.0], np.float32))
    assert_matches_data(stats, [np.zeros(50), np.zeros(2), np.array([-3.0, 2.0])])


def test_tiny_and_subnormal_values_are_binned() -> None:
    # max |x| below 2**-116: the bin width is below 2**-128, whose inverse overflows float32.
    values = np.array([1e-38, -1e-38, 3e-45, -1.4e-45, 0.0], dtype=np.float32)
    stats = fold([values])
    assert_matches_data(stats, [values])
    assert stats.counts[:BINS_PER_SIDE].sum() == 2  # the two negatives stay negative


def test_tiny_negative_next_to_a_huge_value_stays_negative() -> None:
    values = np.array([-1e-40, 3e38], dtype=np.float32)
    stats = fold([values])
    # -1e-40 / 2**116 is far below float32's smallest subnormal: computed in float32 it
    # flushes to -0.0 and the value would land in the first non-negative bin.
    assert stats.counts[BINS_PER_SIDE - 1] == 1 and stats.counts[BINS_PER_SIDE] == 0
    assert_matches_data(stats, [values])


def test_memory_does_not_grow_with_batches() -> None:
    rng = np.random.default_rng(1)
    stats = TensorStats()
    shape, nbytes = stats.counts.shape, stats.counts.nbytes
    batches = [(rng.standard_normal(256) * 2.0 ** (i % 40 - 20)).astype(np.float32) for i in range(400)]
    tracemalloc.start()
    try:
        for batch in batches[:40]:  # every scale once: the grid has reached its final width
            stats.update(batch)
        before, _ = tracemalloc.get_traced_memory()
        for batch in batches[40:]:
            stats.update(batch)
            assert stats.counts.shape == shape and stats.counts.nbytes == nbytes
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 360 batches of 1 KiB each were folded in; keeping any of them would show here.
    assert after - before < 16 * 1024
    assert stats.batches == 400 and stats.count == 400 * 256
    assert [k for k, v in vars(stats).items() if isinstance(v, np.ndarray)] == ["counts"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_raises_data_error_and_keeps_state(bad: float) -> None:
    stats = fold([np.array([1.0, -2.0], np.float32)])
    before = (stats.min, stats.max, stats.batches, stats.count, stats.width_exp, stats.counts.copy())
    with pytest.raises(DataError):
        stats.update(np.array([0.5, bad, 3.0], np.float32))
    assert (stats.min, stats.max, stats.batches, stats.count, stats.width_exp) == before[:5]
    np.testing.assert_array_equal(stats.counts, before[5])
    collection = Statistics()
    with pytest.raises(DataError):
        collection.update("t", np.array([[bad]], np.float64))


def test_empty_batch_is_ignored() -> None:
    stats = fold([np.array([1.0], np.float32), np.zeros((0, 3), np.float32)])
    assert stats.batches == 1 and stats.count == 1


# ---------------------------------------------------------------- merge


@FAST
@given(first=any_batches, second=any_batches)
def test_merge_equals_one_pass_over_the_union(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    merged = fold(first).merge(fold(second))
    one_pass = fold(first + second)
    # Histogram bit-for-bit, counts and extremes exactly, sums up to float64 rounding.
    tol = summation_tolerance(first + second)
    assert_same_stats(merged, one_pass, sum_tolerance=tol)
    # And both equal the ground truth from the raw values (which also implies the weaker
    # documented "within one bin": every value sits in exactly its own bin).
    assert_matches_data(merged, first + second)
    # Merge is symmetric.
    assert_same_stats(fold(second).merge(fold(first)), merged, sum_tolerance=tol)


@FAST
@given(first=any_batches, second=any_batches)
def test_merge_sums_exact_for_single_batches(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    # With one batch on each side the one-pass sum is 0 + a + b, the merged one 0 + a + (0 + b): identical.
    a, b = np.concatenate(first), np.concatenate(second)
    assert_same_stats(fold([a]).merge(fold([b])), fold([a, b]))


def test_merge_with_all_zero_and_empty_stats() -> None:
    zeros = fold([np.zeros(10, np.float32)])
    values = fold([np.array([-5.0, 0.25], np.float32)])
    assert_same_stats(zeros.merge(values), fold([np.zeros(10, np.float32), np.array([-5.0, 0.25], np.float32)]))
    assert_same_stats(values.merge(zeros), fold([np.array([-5.0, 0.25], np.float32), np.zeros(10, np.float32)]))
    assert_same_stats(zeros.merge(zeros), fold([np.zeros(10, np.float32)] * 2))
    assert_same_stats(values.merge(TensorStats()), values)


def test_statistics_merge_checks_model_digest_and_tensors() -> None:
    a = Statistics(model_digest="sha256:aaa", samples=2, source="a")
    b = Statistics(model_digest="sha256:bbb", samples=3, source="b")
    for s in (a, b):
        s.update("x", np.array([1.0, -1.0], np.float32))
    with pytest.raises(DataError):
        a.merge(b)
    with pytest.raises(DataError):
        b.merge(a)
    same = Statistics(model_digest="sha256:aaa", samples=3, source="c")
    same.update("x", np.array([4.0], np.float32))
    merged = a.merge(same)
    assert merged.samples == 5 and merged.model_digest == "sha256:aaa" and merged.tensors["x"].max == 4.0
    only_a = Statistics(model_digest="sha256:aaa")
    only_a.update("y", np.array([1.0], np.float32))
    with pytest.raises(DataError):
        a.merge(only_a)


# ---------------------------------------------------------------- save / load


def sample_statistics() -> Statistics:
    rng = np.random.default_rng(2)
    stats = Statistics(samples=7, model_digest="sha256:0123", source="calib/ (7 samples)")
    for batch in np.array_split(rng.standard_normal(5000).astype(np.float32), 5):
        stats.update("gauss", batch)
    stats.update("relu", np.maximum(rng.standard_normal(1000), 0).astype(np.float32))
    stats.update("zeros", np.zeros(16, np.float32))
    stats.update("tiny", np.array([1e-39, -3e-42], np.float32))
    stats.update("huge", np.array([-3e38, 1e-3, 2.5e38], np.float32))
    stats.update("negative", -np.abs(rng.standard_normal(100)).astype(np.float32) - 1)
    stats.update("sums", np.array([0.1], np.float32))
    stats.update("sums", np.array([0.2], np.float32))  # 0.1 + 0.2: a sum that must survive JSON exactly
    stats.tensors["never_seen"] = TensorStats()
    return stats


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    original = sample_statistics()
    path = tmp_path / "stats.npz"
    original.save(path)
    loaded = Statistics.load(path)
    assert (loaded.samples, loaded.model_digest, loaded.source) == (
        original.samples, original.model_digest, original.source)
    assert sorted(loaded.tensors) == sorted(original.tensors)
    for name, tensor in original.tensors.items():
        assert_same_stats(loaded.tensors[name], tensor)
    # A loaded file merges and saves again without drift.
    again = tmp_path / "again.npz"
    loaded.save(again)
    for name, tensor in Statistics.load(again).tensors.items():
        assert_same_stats(tensor, original.tensors[name])


def test_empty_statistics_round_trip(tmp_path: Path) -> None:
    Statistics(model_digest="d").save(tmp_path / "empty.npz")
    loaded = Statistics.load(tmp_path / "empty.npz")
    assert loaded.tensors == {} and loaded.model_digest == "d"


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    """Copy a valid stats file, replacing arrays; dict values for 'header' are JSON-encoded."""
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key, None)
        elif isinstance(value, (dict, list, str)):
            text = value if isinstance(value, str) else json.dumps(value)
            arrays[key] = np.frombuffer(text.encode(), dtype=np.uint8)
        else:
            arrays[key] = np.asarray(value)
    np.savez(dst, **arrays)
    return dst


def _header(path: Path) -> dict:
    with np.load(path) as data:
        return json.loads(bytes(data["header"]).decode())


CORRUPTIONS = [
    "random_bytes", "empty_file", "truncated", "npy_file", "plain_text", "zip_without_arrays", "no_header",
    "header_not_json", "header_is_list", "wrong_format", "wrong_bins", "missing_tensors_key", "missing_samples",
    "tensor_entry_missing_key", "fewer_rows_than_tensors", "counts_1d", "missing_file", "directory",
]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_or_foreign_file_raises_data_error(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.npz"
    sample_statistics().save(good)
    header = _header(good)
    bad = tmp_path / "bad.npz"
    if kind == "random_bytes":
        bad.write_bytes(np.random.default_rng(3).bytes(4096))
    elif kind == "empty_file":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "npy_file":
        bad = tmp_path / "bad.npy"
        np.save(bad, np.arange(10))
    elif kind == "plain_text":
        bad.write_text("min,max\n0,1\n")
    elif kind == "zip_without_arrays":
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("readme.txt", "hello")
    elif kind == "no_header":
        _rewrite(good, bad, header=None)
    elif kind == "header_not_json":
        _rewrite(good, bad, header="{not json")
    elif kind == "header_is_list":
        _rewrite(good, bad, header=[1, 2, 3])
    elif kind == "wrong_format":
        _rewrite(good, bad, header={**header, "format": "someone-else/1"})
    elif kind == "wrong_bins":
        _rewrite(good, bad, header={**header, "bins_per_side": 2048})
    elif kind == "missing_tensors_key":
        _rewrite(good, bad, header={k: v for k, v in header.items() if k != "tensors"})
    elif kind == "missing_samples":
        _rewrite(good, bad, header={k: v for k, v in header.items() if k != "samples"})
    elif kind == "tensor_entry_missing_key":
        tensors = [dict(header["tensors"][0]), *header["tensors"][1:]]
        del tensors[0]["width_exp"]
        _rewrite(good, bad, header={**header, "tensors": tensors})
    elif kind == "fewer_rows_than_tensors":
        with np.load(good) as data:
            _rewrite(good, bad, counts=data["counts"][:-1])
    elif kind == "counts_1d":
        _rewrite(good, bad, counts=np.zeros(2 * BINS_PER_SIDE, np.int64))
    elif kind == "missing_file":
        bad = tmp_path / "nope.npz"
    elif kind == "directory":
        bad = tmp_path / "folder.npz"
        bad.mkdir()
    with pytest.raises(DataError):
        Statistics.load(bad)


def test_rewrite_helper_keeps_a_valid_file_valid(tmp_path: Path) -> None:
    # Guards the corruption tests above: an unchanged rewrite must still load.
    good = tmp_path / "good.npz"
    sample_statistics().save(good)
    copy = _rewrite(good, tmp_path / "copy.npz", header=_header(good))
    assert sorted(Statistics.load(copy).tensors) == sorted(sample_statistics().tensors)


def test_width_exp_is_minimal() -> None:
    for bound in (1e-45, 1e-38, 2.0**-20, 0.3, 1.0, 4095.0, 4096.0, 4097.0, 3.4e38):
        e = required_width_exp(bound)
        assert BINS_PER_SIDE * math.ldexp(1.0, e) > bound >= BINS_PER_SIDE * math.ldexp(1.0, e - 1)
