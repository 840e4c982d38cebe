"""Calibration at the floor: prefetched inference, the faster fold, bounded evaluation.

The oracle is the plain loop calibration was before it overlapped inference with folding:
one session run per batch, then every tensor folded with the straightforward update (min,
max, size - count_nonzero, floor(x / w) in float64, bincount). The statistics files must be
byte-identical to it, whatever the memory budget does to the passes.
"""

from __future__ import annotations

import importlib
import math
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_relu_model, feeds_for, quantize_simple, save, two_input_model, write_npz_folder

from onnxq.commands import stages
from onnxq.commands.pipeline import DataOptions
from onnxq.errors import DataError
from onnxq.passes.prepare import prepare_model
from onnxq.quant.ir import import_graph
from onnxq.quant.placement import tensors_to_observe, value_aliases
from onnxq.quant.plan import QuantSettings
from onnxq.quant.ranges import compute_range
from onnxq.quant.statistics import BINS_PER_SIDE, Statistics, TensorStats, required_width_exp
from onnxq.runtime.calibrate import collect_statistics
from onnxq.runtime.data import SampleSource, model_input_specs, open_source
from onnxq.runtime.evaluate import CachedReference, compare_models
from onnxq.runtime.session import progress_factory, session_for, with_outputs

calibration = importlib.import_module("onnxq.runtime.calibrate")  # the module: onnxq.calibrate is the API function


def oracle_fold(batches: list[np.ndarray]) -> TensorStats:
    """What the straightforward per-batch update gives (the code before the fast fold)."""
    stats = TensorStats()
    extremes = []
    values = []
    for batch in batches:
        x = np.asarray(batch, dtype=np.float32).ravel()
        if x.size == 0:
            continue
        lo, hi = float(x.min()), float(x.max())
        stats.min, stats.max = min(stats.min, lo), max(stats.max, hi)
        stats.batches += 1
        stats.count += x.size
        stats.zeros += int(x.size - np.count_nonzero(x))
        extremes.append((lo, hi))
        values.append(x)
    for lo, hi in extremes:  # left to right, as the streaming update adds them
        stats.sum_batch_min += lo
        stats.sum_batch_max += hi
    bound = max(max(abs(lo), abs(hi)) for lo, hi in extremes)
    if bound == 0.0:
        stats.counts[BINS_PER_SIDE] = stats.count
        return stats
    stats.width_exp = required_width_exp(bound)
    index = np.floor(np.concatenate(values).astype(np.float64) / 2.0**stats.width_exp).astype(np.int64)
    stats.counts = np.bincount(index + BINS_PER_SIDE, minlength=2 * BINS_PER_SIDE)
    return stats


def oracle_statistics(model: onnx.ModelProto, tensors: list[str], source: SampleSource) -> Statistics:
    """One plain session run per sample, every tensor folded by oracle_fold."""
    inputs = {i.name for i in model.graph.input}
    outputs = [t for t in tensors if t not in inputs]
    per_tensor: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    with tempfile.TemporaryDirectory() as tmp:
        session = session_for(with_outputs(model, outputs), Path(tmp))
        for i in range(len(source)):
            feed = source.sample(i)
            for name in tensors:
                if name in inputs:
                    per_tensor[name].append(feed[name])
            for name, values in zip(outputs, session.run(outputs, feed), strict=True):
                per_tensor[name].append(values)
    stats = Statistics(samples=len(source), source=source.description)
    stats.tensors = {name: oracle_fold(batches) for name, batches in per_tensor.items()}
    return stats


def prepared_and_tensors(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    prepared = prepare_model(model).model
    return prepared, tensors_to_observe(import_graph(prepared))


@pytest.mark.parametrize(("budget", "prefetch"), [(2 * 1024**3, True), (1, True), (2 * 1024**3, False)],
                         ids=["one-pass", "a-pass-per-tensor", "one-batch-at-a-time"])
def test_prefetched_calibration_is_byte_identical_to_the_plain_loop(tmp_path: Path, budget: int, prefetch: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if not prefetch:  # activations too large to hold two batches: no background thread
        monkeypatch.setattr(calibration, "PREFETCH_BYTES", 0)
        monkeypatch.setattr(threading, "Thread", None)
    model = conv_relu_model()
    write_npz_folder(tmp_path / "calib", feeds_for(model), 9)
    prepared, tensors = prepared_and_tensors(model)
    source = open_source(tmp_path / "calib", model_input_specs(model))
    collect_statistics(prepared, tensors, source, memory_budget=budget).save(tmp_path / "fast.npz")
    oracle_statistics(prepared, tensors, source).save(tmp_path / "oracle.npz")
    assert (tmp_path / "fast.npz").read_bytes() == (tmp_path / "oracle.npz").read_bytes()


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "not-quiet"])
def test_the_several_passes_note_reaches_stderr_only_without_quiet(tmp_path: Path, quiet: bool,
                                                                    capsys: pytest.CaptureFixture) -> None:
    model = conv_relu_model()
    write_npz_folder(tmp_path / "calib", feeds_for(model), 3)
    prepared, tensors = prepared_and_tensors(model)
    source = open_source(tmp_path / "calib", model_input_specs(model))
    collect_statistics(prepared, tensors, source, memory_budget=1, progress=progress_factory(quiet))
    err = capsys.readouterr().err
    assert err == "" if quiet else "activations exceed the memory budget; calibrating in" in err


def test_two_inputs_and_aliases_fold_like_the_plain_loop(tmp_path: Path) -> None:
    model = two_input_model()
    write_npz_folder(tmp_path / "calib", feeds_for(model), 5)
    prepared, tensors = prepared_and_tensors(model)
    graph = import_graph(prepared)
    source = open_source(tmp_path / "calib", model_input_specs(model))
    fast = collect_statistics(prepared, tensors, source, aliases=value_aliases(graph, tensors))
    oracle = oracle_statistics(prepared, tensors, source)
    fast.save(tmp_path / "fast.npz")
    oracle.save(tmp_path / "oracle.npz")
    assert (tmp_path / "fast.npz").read_bytes() == (tmp_path / "oracle.npz").read_bytes()


def test_fast_fold_equals_the_oracle_on_hard_values() -> None:
    rng = np.random.default_rng(3)
    batches = [
        np.array([0.0, -0.0, 0.0], np.float32),  # zeros only first (no grid yet)
        np.array([-1e-45, 1e-45, -3e-39, 5e-39], np.float32),  # subnormals
        (rng.standard_normal(1000) * 1e-3).astype(np.float32),
        np.array([-7000.0, 1e-40, -1e-42, 0.0], np.float32),  # tiny negatives next to a huge value
        np.maximum(rng.standard_normal(4096), 0).astype(np.float32),  # half exact zeros
        (rng.standard_normal(333) * 3e30).astype(np.float32),  # factor below a normal float32
    ]
    fast = TensorStats()
    for batch in batches:
        fast.update(batch)
    oracle = oracle_fold(batches)
    assert (fast.min, fast.max, fast.batches, fast.count, fast.zeros, fast.width_exp) == (
        oracle.min, oracle.max, oracle.batches, oracle.count, oracle.zeros, oracle.width_exp)
    assert fast.sum_batch_min == oracle.sum_batch_min and fast.sum_batch_max == oracle.sum_batch_max
    np.testing.assert_array_equal(fast.counts, oracle.counts)


def test_a_bad_sample_mid_way_stops_the_prefetching_thread(tmp_path: Path) -> None:
    model = conv_relu_model()
    write_npz_folder(tmp_path / "calib", feeds_for(model), 6)
    (tmp_path / "calib" / "s004.npz").write_bytes(b"not a zip")
    prepared, tensors = prepared_and_tensors(model)
    before = threading.active_count()
    with pytest.raises(DataError, match=r"s004\.npz"):
        collect_statistics(prepared, tensors, open_source(tmp_path / "calib", model_input_specs(model)))
    assert threading.active_count() == before


def test_an_error_while_folding_stops_the_prefetching_thread(tmp_path: Path) -> None:
    """The error comes from the loop's body (a NaN sample folded), not from the thread: the thread still
    stops before the error leaves (a Ctrl-C there once aborted the process at exit, the thread inside
    onnxruntime)."""
    model = conv_relu_model()
    write_npz_folder(tmp_path / "calib", feeds_for(model), 6)
    nan = {name: np.full_like(value, np.nan) for name, value in np.load(tmp_path / "calib" / "s001.npz").items()}
    np.savez(tmp_path / "calib" / "s001.npz", **nan)
    prepared, tensors = prepared_and_tensors(model)
    before = threading.active_count()
    with pytest.raises(DataError, match="NaN or Inf") as raised:
        collect_statistics(prepared, tensors, open_source(tmp_path / "calib", model_input_specs(model)))
    assert raised.value.__traceback__ is not None  # still held here, with the loop's frame
    assert threading.active_count() == before


def test_evaluation_measures_the_first_n_samples_and_reuses_cached_fp32_outputs(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    write_npz_folder(tmp_path / "calib", feeds_for(conv_relu_model()), 12)
    write_npz_folder(tmp_path / "eval", feeds_for(conv_relu_model()), 10, seed=5)
    quantize_simple(model_path, tmp_path / "m.int8.onnx", tmp_path / "calib")
    reference, quantized = onnx.load(model_path), onnx.load(tmp_path / "m.int8.onnx")
    held = open_source(tmp_path / "eval", model_input_specs(reference))
    every = compare_models(reference, quantized, held)
    first = compare_models(reference, quantized, held, limit=4)
    alone = compare_models(reference, quantized, held.subset(range(4), held.description))
    assert (every.samples, every.available) == (10, None)
    assert (first.samples, first.available) == (4, 10)
    assert first.outputs == alone.outputs and first.outputs != every.outputs

    cached = CachedReference(reference, held, 6)
    broken = onnx.ModelProto()  # the fp32 model is never run when every needed output is cached
    broken.CopyFrom(reference)
    broken.graph.node[0].op_type = "NoSuchOp"
    reused = compare_models(broken, quantized, held, limit=6, cached=cached)
    assert reused.outputs == compare_models(reference, quantized, held, limit=6).outputs
    partly = compare_models(reference, quantized, held, limit=8, cached=cached)
    assert partly.outputs == compare_models(reference, quantized, held, limit=8).outputs


def test_quantize_report_says_how_many_samples_fidelity_measured(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    write_npz_folder(tmp_path / "calib", feeds_for(conv_relu_model()), 8)
    write_npz_folder(tmp_path / "eval", feeds_for(conv_relu_model()), 7, seed=9)
    data = DataOptions(calib=tmp_path / "calib", eval_data=tmp_path / "eval")
    few = quantize_simple(model_path, tmp_path / "a.onnx", data=data, eval_samples=3)
    every = quantize_simple(model_path, tmp_path / "b.onnx", data=data, eval_samples=None)
    assert (few.report["fidelity"]["samples"], few.report["fidelity"]["available_samples"]) == (3, 7)
    assert (every.report["fidelity"]["samples"], every.report["fidelity"]["available_samples"]) == (7, 7)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert math.isfinite(few.report["fidelity"]["outputs"][0]["cosine"])


def test_extremes_only_statistics_give_the_same_global_and_max_ranges_and_refuse_the_rest(tmp_path: Path) -> None:
    model = conv_relu_model()
    write_npz_folder(tmp_path / "calib", feeds_for(model), 6)
    prepared, tensors = prepared_and_tensors(model)
    source = open_source(tmp_path / "calib", model_input_specs(model))
    full = collect_statistics(prepared, tensors, source)
    lean = collect_statistics(prepared, tensors, source, histograms=False)
    assert lean.tensors.keys() == full.tensors.keys()
    for name, stats in full.tensors.items():
        for method in ("global", "max"):
            for symmetric in (False, True):
                assert compute_range(lean.tensors[name], method, symmetric=symmetric, levels=255) == compute_range(
                    stats, method, symmetric=symmetric, levels=255)
        assert not lean.tensors[name].counts.any()  # no histogram was built
        with pytest.raises(ValueError, match="needs histograms"):
            compute_range(lean.tensors[name], "percentile", symmetric=False, levels=255)
    with pytest.raises(ValueError, match="cannot be saved"):
        lean.save(tmp_path / "lean.npz")
    assert not (tmp_path / "lean.npz").exists()


@pytest.mark.parametrize("method", ["global", "max", "percentile"])
def test_quantize_keeps_histograms_only_when_a_method_reads_them(tmp_path: Path, method: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The single pass with `global` skips the histograms and writes the bytes it wrote with them."""
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    write_npz_folder(tmp_path / "calib", feeds_for(conv_relu_model()), 6)
    seen: list[bool] = []
    real, real_needs = stages._statistics, stages.needs_histograms

    def spy(*args, **kwargs):
        seen.append(kwargs["histograms"])
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "_statistics", spy)
    settings = QuantSettings(method=method)
    quantize_simple(model_path, tmp_path / "lean.onnx", tmp_path / "calib", settings=settings)
    monkeypatch.setattr(stages, "needs_histograms", lambda *_: True)
    quantize_simple(model_path, tmp_path / "full.onnx", tmp_path / "calib", settings=settings)
    assert seen == [method != "global", True]  # max clips: the report counts how much on the histogram
    assert (tmp_path / "lean.onnx").read_bytes() == (tmp_path / "full.onnx").read_bytes()
    monkeypatch.setattr(stages, "needs_histograms", real_needs)
    quantize_simple(model_path, tmp_path / "saved.onnx", tmp_path / "calib", settings=settings,
                    save_stats=tmp_path / "s.npz")
    assert seen[-1] is True and Statistics.load(tmp_path / "s.npz").tensors  # saved statistics are whole
