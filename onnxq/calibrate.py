"""Run the fp32 model over calibration data and fold every batch into Statistics.

The tensors to observe are added as extra graph outputs. Memory is bounded: a
probe run on one sample measures each tensor's size, and tensors are split into
groups so that one batch of one group stays under `memory_budget` bytes; each
group is one pass over the data. Nothing is kept between batches but statistics.
"""

from __future__ import annotations

import copy
import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import SampleSource, batches
from .errors import DataError, ModelError, first_line
from .model_io import add_outputs, save_for_onnxruntime
from .statistics import Statistics

DEFAULT_MEMORY_BUDGET = 2 * 1024**3

ProgressFactory = Callable[[int, str], "Progress"]


class Progress:
    """No-op progress; the CLI passes a tqdm-backed one."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _no_progress(total: int, label: str) -> Progress:
    return Progress()


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the named float tensors (session_for(outputs=...) avoids the copy)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    add_outputs(augmented, names)
    return augmented


_saved = itertools.count()  # unique scratch names: a session may still map an earlier model's data file


def session_for(model: onnx.ModelProto | Path, workdir: Path, threads: int = 0,
                outputs: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session (all optimizations) for a model in memory (saved into `workdir`, also returning
    `outputs`) or on disk."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors reach the user as onnxq's one line
    path = model if isinstance(model, Path) else save_for_onnxruntime(model, workdir, f"model_{next(_saved)}.onnx",
                                                                      outputs or ())
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        reason = first_line(exc)
        raise ModelError(f"onnxruntime cannot load the model: {reason}") from None


def run(session: ort.InferenceSession, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:
        reason = first_line(exc)
        raise DataError(f"the model failed on the calibration data: {reason}") from None


def collect_statistics(
    model: onnx.ModelProto,
    tensors: list[str],
    source: SampleSource,
    *,
    batch_size: int = 1,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: ProgressFactory = _no_progress,
    aliases: dict[str, str] | None = None,
) -> Statistics:
    """Statistics of `tensors` (graph inputs or node outputs) over every sample of `source`.

    `aliases` maps tensors holding exactly another tensor's values to that tensor: their
    statistics are copied rather than collected.
    """
    aliases = aliases or {}
    stats = Statistics(samples=len(source), source=source.description)
    input_names = {i.name for i in model.graph.input}
    observed = [t for t in tensors if t not in aliases]
    from_feed = [t for t in observed if t in input_names]
    from_model = [t for t in observed if t not in input_names]
    with tempfile.TemporaryDirectory(prefix="onnxq-calib-") as tmp:
        session = session_for(model, Path(tmp), outputs=from_model)
        groups = _groups_within_budget(session, source, from_model, batch_size, memory_budget)
        bar = progress(len(source) * max(1, len(groups)), "calibrating")
        try:
            for index, group in enumerate(groups or [[]]):
                for feed, count in batches(source, batch_size):
                    if index == 0:
                        for name in from_feed:
                            stats.update(name, feed[name])
                    if group:
                        for name, values in zip(group, run(session, feed, group), strict=True):
                            stats.update(name, values)
                            del values
                    bar.update(count)
        finally:
            bar.close()
    for alias, original in sorted(aliases.items()):
        if alias in tensors and original in stats.tensors:
            stats.tensors[alias] = copy.deepcopy(stats.tensors[original])
    missing = [t for t in tensors if t not in stats.tensors]
    if missing:
        raise DataError(f"no statistics for {len(missing)} tensors (e.g. {missing[0]}); is the data empty?")
    return stats


def _groups_within_budget(
    session: ort.InferenceSession, source: SampleSource, names: list[str], batch_size: int, budget: int
) -> list[list[str]]:
    """Split tensors so one batch of a group fits the memory budget (sizes from a one-sample probe)."""
    if not names:
        return []
    probe = run(session, source.sample(0), names)
    sizes = [a.nbytes * batch_size for a in probe]
    del probe
    if sum(sizes) <= budget:
        return [names]
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes, strict=True):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    print(f"onnxq: activations exceed the memory budget; calibrating in {len(groups)} passes", file=sys.stderr)
    return groups
