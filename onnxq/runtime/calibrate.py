"""Run the fp32 model over calibration data and fold every batch into Statistics.

The tensors to observe are added as extra graph outputs. Memory is bounded: a
probe run on one sample measures each tensor's size, and tensors are split into
groups so that one batch of one group stays under `memory_budget` bytes; each
group is one pass over the data. Nothing is kept between batches but statistics.
"""

from __future__ import annotations

import copy
import queue
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import DataError
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import SampleSource, batches
from onnxq.runtime.session import ProgressFactory, no_progress, run, session_for

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
PREFETCH_BYTES = 256 * 1024**2  # two batches' activations at most, for the next batch to run during the fold

def collect_statistics(
    model: onnx.ModelProto,
    tensors: list[str],
    source: SampleSource,
    *,
    batch_size: int = 1,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: ProgressFactory = no_progress,
    aliases: dict[str, str] | None = None,
    threads: int = 0,
    keep_batch_extremes: bool = False,
    batch_sizes: list[int] | None = None,
    histograms: bool = True,
) -> Statistics:
    """Statistics of `tensors` (graph inputs or node outputs) over every sample of `source`.

    `aliases` maps tensors holding exactly another tensor's values to that tensor: their
    statistics are copied rather than collected. `threads`: onnxruntime's (0: all cores).
    `keep_batch_extremes` and `batch_sizes` (appended to) are for merging shards exactly
    (onnxq.search.distributed). `histograms` False keeps only the extremes (see TensorStats.histogram).
    """
    aliases = aliases or {}
    stats = Statistics(samples=len(source), source=source.description, keep_batch_extremes=keep_batch_extremes,
                       histograms=histograms)
    input_names = {i.name for i in model.graph.input}
    observed = [t for t in tensors if t not in aliases]
    from_feed = [t for t in observed if t in input_names]
    from_model = [t for t in observed if t not in input_names]
    with tempfile.TemporaryDirectory(prefix="onnxq-calib-") as tmp:
        session = session_for(model, Path(tmp), threads, outputs=from_model)
        groups, largest = _groups_and_largest(session, source, from_model, batch_size, memory_budget)
        ahead = 2 * largest <= min(PREFETCH_BYTES, memory_budget)
        bar = progress(len(source) * max(1, len(groups)), "calibrating")
        if len(groups) > 1:
            bar.note(f"activations exceed the memory budget; calibrating in {len(groups)} passes")
        try:
            for index, group in enumerate(groups or [[]]):
                for feed, outputs, count in prefetched(session, source, batch_size, group, ahead=ahead):
                    _fold(stats, [(name, feed[name]) for name in from_feed] if index == 0 else [])
                    _fold(stats, zip(group, outputs, strict=True))
                    del feed, outputs  # before the next batch's activations arrive
                    bar.update(count)
                    if index == 0 and batch_sizes is not None:
                        batch_sizes.append(count)
        finally:
            bar.close()
    for alias, original in sorted(aliases.items()):
        if alias in tensors and original in stats.tensors:
            stats.tensors[alias] = copy.deepcopy(stats.tensors[original])
    missing = [t for t in tensors if t not in stats.tensors]
    if missing:
        raise DataError(f"no statistics for {len(missing)} tensors (e.g. {missing[0]}); is the data empty?")
    return stats


def _fold(stats: Statistics, named_values) -> None:
    for name, values in named_values:
        stats.update(name, values)


def prefetched(session: ort.InferenceSession, source: SampleSource, batch_size: int, names: list[str], *,
               ahead: bool = True) -> Iterator[tuple[dict[str, np.ndarray], list[np.ndarray], int]]:
    """(feed, outputs `names`, samples) per batch, in order. `ahead`: the next batch is read and run in a
    background thread while the caller folds this one. Errors surface here, in order."""
    if not ahead:
        for feed, count in batches(source, batch_size):
            yield feed, run(session, feed, names) if names else [], count
            del feed
        return
    slots = threading.Semaphore(2)  # batches computed and not yet folded
    results: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for feed, count in batches(source, batch_size):
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                results.put((feed, run(session, feed, names) if names else [], count))
                del feed
            results.put(done)
        except BaseException as exc:  # re-raised in the caller's thread
            results.put(exc)

    worker = threading.Thread(target=produce, name="onnxq-calibrate", daemon=True)
    try:
        worker.start()
        while (item := results.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()
    finally:
        stop.set()
        _join(worker)


def _join(worker: threading.Thread) -> None:
    """Wait for `worker` even if Ctrl-C or SIGTERM arrives meanwhile (then raised once it has stopped): a
    thread left inside onnxruntime's run while Python exits aborts the process ("terminate called without
    an active exception") instead of exiting 130/143."""
    interrupted: BaseException | None = None
    while worker.ident is not None and worker.is_alive():
        try:
            worker.join()
        except BaseException as exc:  # onnxq.interrupts raises once, then ignores further signals
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def groups_within_budget(
    session: ort.InferenceSession, source: SampleSource, names: list[str], batch_size: int, budget: int
) -> list[list[str]]:
    """Split tensors so one batch of a group fits the memory budget (sizes from a one-sample probe)."""
    return _groups_and_largest(session, source, names, batch_size, budget)[0]


def pack_under_budget(names: list[str], sizes: list[int], budget: int) -> list[list[str]]:
    """`names` in order, split into consecutive groups whose sizes add up to at most `budget` (a name
    larger than the budget gets a group of its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes, strict=True):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _groups_and_largest(
    session: ort.InferenceSession, source: SampleSource, names: list[str], batch_size: int, budget: int
) -> tuple[list[list[str]], int]:
    """groups_within_budget's groups, and the bytes of one batch of the largest."""
    if not names:
        return [], 0
    probe = run(session, source.sample(0), names)
    sizes = [a.nbytes * batch_size for a in probe]
    del probe
    if sum(sizes) <= budget:
        return [names], sum(sizes)
    groups = pack_under_budget(names, sizes, budget)
    size_of = dict(zip(names, sizes, strict=True))
    return groups, max(sum(size_of[name] for name in group) for group in groups)
