"""Latency of models side by side: warm-up, then runs interleaved so machine noise hits all alike.

Used by the speed guard (is this kind of layer faster in int8?) and by `onnxq bench`
(how much faster is the int8 model, at batch 1 and larger, on one thread and on all).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import DataError, UsageError, first_line
from onnxq.model_io import load_model, size_change
from onnxq.runtime.data import InputSpec, SampleSource, example_dims, model_input_specs
from onnxq.runtime.input_shapes import check_input_shapes
from onnxq.runtime.session import session_for


def interleaved_runs(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], *, warmup: int = 2,
                     min_rounds: int = 7, max_rounds: int = 41, budget_s: float = 2.0) -> list[np.ndarray]:
    """Seconds per run of each session: at least min_rounds rounds, then until budget_s or max_rounds."""
    try:
        for sess in sessions:  # first runs allocate and pack weights
            for _ in range(warmup):
                sess.run(None, feed)
        samples: list[list[float]] = [[] for _ in sessions]
        start = time.perf_counter()
        for round_index in range(max_rounds):
            for which, sess in enumerate(sessions):
                t0 = time.perf_counter()
                sess.run(None, feed)
                samples[which].append(time.perf_counter() - t0)
            if round_index + 1 >= min_rounds and time.perf_counter() - start > budget_s:
                break
    except Exception as exc:  # onnxruntime rejects the feed
        reason = first_line(exc)
        raise DataError(f"the model failed on the timing input: {reason}") from None
    return [np.asarray(s) for s in samples]


def measured_speedup(fp32: onnx.ModelProto, int8: onnx.ModelProto, feed: dict[str, np.ndarray],
                     seconds: float = 1.0) -> dict:
    """fp32 median latency / int8 median latency on this machine: batch 1 (the feed), one thread, interleaved."""
    with tempfile.TemporaryDirectory(prefix="onnxq-speed-") as tmp:
        sessions = [session_for(fp32, Path(tmp), 1, spin=True), session_for(int8, Path(tmp), 1, spin=True)]
        fp32_s, int8_s = interleaved_runs(sessions, feed, min_rounds=5, max_rounds=31, budget_s=seconds)
    return {"speedup": round(float(np.median(fp32_s) / np.median(int8_s)), 3), "runs": len(fp32_s), "threads": 1}


@dataclass
class LatencyRow:
    threads: int
    batch: int
    fp32_ms: float
    int8_ms: float
    fp32_p90_ms: float
    int8_p90_ms: float

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms

    def to_dict(self) -> dict:
        return {"threads": self.threads, "batch": self.batch, "fp32_ms": round(self.fp32_ms, 4),
                "int8_ms": round(self.int8_ms, 4), "fp32_p90_ms": round(self.fp32_p90_ms, 4),
                "int8_p90_ms": round(self.int8_p90_ms, 4), "speedup": round(self.speedup, 3),
                "fp32_samples_per_s": round(1e3 * self.batch / self.fp32_ms, 2),
                "int8_samples_per_s": round(1e3 * self.batch / self.int8_ms, 2)}


def batched(feed: dict[str, np.ndarray], specs: list[InputSpec], batch: int) -> dict[str, np.ndarray] | None:
    """The batch-1 feed repeated `batch` times on axis 0, or None where axis 0 is fixed."""
    if batch == 1:
        return feed
    for spec in specs:
        if not spec.shape or spec.shape[0] is not None:
            return None
    return {name: np.concatenate([value] * batch, axis=0) for name, value in feed.items()}


def random_feed(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """A batch-1 feed of random values, for models whose input shapes are static (but batch) or given in
    `shapes` (--input-shapes: the whole shape)."""
    shapes = shapes or {}
    check_input_shapes(shapes, specs)
    rng = np.random.default_rng(0)
    feed = {}
    for spec in specs:
        if spec.dtype is None:
            raise UsageError(f"input {spec.name} has no element type in the model; give --data with a real sample")
        if spec.name not in shapes and (spec.shape is None or any(d is None for d in spec.shape[1:])):
            raise UsageError(f"input {spec.name} has dynamic dimensions; give their sizes with --input-shapes "
                             f"{spec.name}:{example_dims(spec)}, or a real sample with --data (or --calib)")
        shape = shapes.get(spec.name) or ((1, *spec.shape[1:]) if spec.shape else ())
        values = rng.standard_normal(shape)
        feed[spec.name] = values.astype(spec.dtype) if spec.dtype.kind == "f" else np.zeros(shape, spec.dtype)
    return feed


def compare_fp32_int8(fp32: Path, int8: Path, source: SampleSource | None, batches: tuple[int, ...],
                   thread_counts: tuple[int, ...], shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Latency of both models for every (threads, batch), plus their sizes. The input: the first sample of
    `source`, else random values (of `shapes` where the model leaves dimensions open)."""
    specs = model_input_specs(load_model(fp32))
    load_model(int8)
    if source is not None and shapes:
        raise UsageError("--input-shapes shapes the random timing input; a real sample (--data, --calib or "
                         "--data-loader-script) has its own shapes: give one or the other")
    feed = source.sample(0) if source is not None else random_feed(specs, shapes)
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
        for threads in thread_counts:
            sessions = [session_for(fp32, Path(tmp), threads, spin=True),
                        session_for(int8, Path(tmp), threads, spin=True)]
            for batch in batches:
                batch_feed = batched(feed, specs, batch)
                if batch_feed is None:
                    skipped.append(f"batch {batch}: the model's first input dimension is fixed")
                    continue
                fp32_s, int8_s = interleaved_runs(sessions, batch_feed, min_rounds=10, max_rounds=200)
                rows.append(LatencyRow(threads, batch, float(np.median(fp32_s)) * 1e3,
                                       float(np.median(int8_s)) * 1e3, float(np.percentile(fp32_s, 90)) * 1e3,
                                       float(np.percentile(int8_s, 90)) * 1e3))
    return {"fp32": str(fp32), "int8": str(int8), "fp32_bytes": fp32.stat().st_size,
            "int8_bytes": int8.stat().st_size, "size_ratio": round(fp32.stat().st_size / int8.stat().st_size, 3),
            "input": source.description if source is not None else _random_input(shapes),
            "rows": [r.to_dict() for r in rows], "skipped": sorted(set(skipped))}


def _random_input(shapes: dict[str, tuple[int, ...]] | None) -> str:
    given = ", ".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in (shapes or {}).items())
    return f"random values (--input-shapes {given})" if given else "random values (no --data)"


def all_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def format_comparison(result: dict) -> str:
    lines = [f"{result['int8']} vs {result['fp32']} (input: {result['input']})",
             f"  size: {result['fp32_bytes'] / 1e6:.2f} MB -> {result['int8_bytes'] / 1e6:.2f} MB "
             f"({size_change(result['fp32_bytes'], result['int8_bytes'])})",
             "  threads  batch   fp32 ms (p90)      int8 ms (p90)      int8 speedup   int8 samples/s"]
    for row in result["rows"]:
        lines.append(f"  {row['threads']:>7}  {row['batch']:>5}   {row['fp32_ms']:8.2f} ({row['fp32_p90_ms']:7.2f})"
                     f"   {row['int8_ms']:8.2f} ({row['int8_p90_ms']:7.2f})   {row['speedup']:6.2f}x"
                     f"         {row['int8_samples_per_s']:9.1f}")
    lines.extend(f"  skipped {note}" for note in result["skipped"])
    return "\n".join(lines)
