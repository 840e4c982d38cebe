"""Calibration and candidate evaluation on a Ray cluster (`--ray [ADDRESS] --workers N`).

Ray is optional (`pip install 'onnxq[ray]'`); nothing here imports it until asked.

Sharded calibration: the driver cuts the calibration samples into contiguous shards and
puts the prepared model and the sample source into Ray's object store once; each task
opens its shard (the same files: a path every worker can read) and folds it with
onnxq.runtime.calibrate.collect_statistics, exactly as one process would, one batch at a time.
At most --workers tasks run at once; the driver folds each result in as it arrives.
Histograms, counts and extremes merge exactly, in any order (onnxq.quant.statistics); the sums
of per-batch extremes are float sums whose rounding depends on grouping, so each task
also returns its per-batch extremes and the driver re-adds them left to right, in data
order, as the single process does. The merged statistics,
and so the written model, are byte-identical to a single-process run on the same kind
of CPU, whatever the number of workers and the order shards finish in.

Batches never cross a shard boundary: shards start at multiples of --batch-size, and a
shard whose samples change shape mid-batch (where one process would start its batches
elsewhere) is refused with --batch-size > 1.

Candidate evaluation (RayEvaluator): the fp32 reference outputs go to the object store
once; each candidate model is built on the driver and scored by a task.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import onnx

from onnxq.errors import OnnxqError, UsageError, first_line
from onnxq.model_io import needs_external_data
from onnxq.quant.statistics import Statistics, TensorStats
from onnxq.runtime.calibrate import DEFAULT_MEMORY_BUDGET, collect_statistics
from onnxq.runtime.data import SampleSource
from onnxq.runtime.evaluate import CachedReference, Fidelity
from onnxq.runtime.layer_errors import probe_errors
from onnxq.runtime.session import ProgressFactory, no_progress
from onnxq.search import auto

TASK_RETRIES = 3  # a worker that dies mid-task (killed, out of memory, node lost) is retried this often
MAX_SHARD_BATCHES = 4096  # per task: keeps a task's per-batch extremes small, and a retry cheap


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the run
    workers: int | None = None  # tasks at once; None: one per CPU of the cluster
    cpus_per_task: int = 1  # also the onnxruntime threads of each task


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'onnxq[ray]'") from None
    return ray


def connect(options: RayOptions):
    """The ray module, connected: to the running Ray of this process, to `options.address` or RAY_ADDRESS,
    or to a local Ray started for this run (stopped when the process exits)."""
    ray = _ray()
    if not ray.is_initialized():
        _check_reachable(options.address or os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(address=options.address or None, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = options.address or "RAY_ADDRESS / a local Ray"
            raise UsageError(f"cannot connect to Ray at {where}: {first_line(exc)}") from None
    return ray


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nobody answers at (ray.init would retry for minutes, logging each try)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray ADDRESS must look like HOST:PORT (or ray://HOST:PORT), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"cannot reach Ray at {address}: {exc.strerror or type(exc).__name__}") from None


def worker_count(ray, options: RayOptions) -> int:
    if options.workers is not None:
        if options.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {options.workers}")
        return options.workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // options.cpus_per_task)


# ---------------------------------------------------------------- sharded calibration


@dataclass
class Shard:
    index: int
    start: int
    stop: int

    def describe(self, total: int) -> str:
        return f"shard {self.index + 1} of {total} (samples {self.start}-{self.stop - 1})"


def shards(samples: int, count: int, batch_size: int = 1, max_batches: int | None = None) -> list[Shard]:
    """At least `count` contiguous shards of nearly equal size, none over `max_batches` batches (default
    MAX_SHARD_BATCHES), whose starts are multiples of `batch_size`."""
    max_batches = max_batches or MAX_SHARD_BATCHES
    batches = math.ceil(samples / batch_size)
    count = max(1, min(batches, max(count, math.ceil(batches / max_batches))))
    edges = [min(samples, round(i * batches / count) * batch_size) for i in range(count + 1)]
    return [Shard(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(edges))]  # none empty: count <= batches


@dataclass
class ShardResult:
    index: int
    stats: Statistics  # with every tensor's batch_extremes
    batch_sizes: list[int]  # samples in each batch, in order


def fold_shard(model_bytes: bytes, source: SampleSource, shard: Shard, tensors: list[str], batch_size: int,
               memory_budget: int, aliases: dict[str, str], threads: int) -> ShardResult:
    """One task: the statistics of samples [start, stop), folded as one process folds them."""
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    part = source.subset(range(shard.start, shard.stop), source.description)
    sizes: list[int] = []
    stats = collect_statistics(model, tensors, part, batch_size=batch_size, memory_budget=memory_budget,
                               aliases=aliases, threads=threads, keep_batch_extremes=True, batch_sizes=sizes)
    return ShardResult(shard.index, stats, sizes)


class ShardMerger:
    """Folds shard results in as they finish, in any order, into what one process gets.

    Histograms, counts and extremes merge at once (exactly, in any order). The sums of
    per-batch extremes are re-added left to right as soon as every earlier shard is in, so
    only shards that finished ahead of an earlier one wait (their extremes: 8 bytes a batch
    and tensor); memory does not grow with the number of shards.
    """

    def __init__(self, shard_count: int, batch_size: int) -> None:
        self.shard_count = shard_count
        self.batch_size = batch_size
        self.tensors: dict[str, TensorStats] = {}
        self.sums: dict[str, list[float]] = {}
        self.waiting: dict[int, ShardResult] = {}
        self.next = 0

    def add(self, result: ShardResult) -> None:
        for name, part in result.stats.tensors.items():
            mine = self.tensors.get(name)
            self.tensors[name] = part.merge(mine) if mine is not None else _without_extremes(part)
        self.waiting[result.index] = result
        while self.next in self.waiting:
            self._add_sums(self.waiting.pop(self.next))
            self.next += 1

    def _add_sums(self, result: ShardResult) -> None:
        last = result.index == self.shard_count - 1
        sizes = result.batch_sizes if last else [*result.batch_sizes, 0]  # a shard ends on a full batch
        if self.batch_size > 1 and any(size != self.batch_size for size in sizes[:-1]):
            raise UsageError(f"--ray with --batch-size {self.batch_size} needs samples of one shape (their shape "
                             "changes mid-batch, so shards would batch them differently): use --batch-size 1")
        for name, part in result.stats.tensors.items():
            sums = self.sums.setdefault(name, [0.0, 0.0])
            extremes = part.batch_extremes or ()
            for low in extremes[0::2]:  # left to right, as one process adds them
                sums[0] += low
            for high in extremes[1::2]:
                sums[1] += high

    def result(self, samples: int, source: str) -> Statistics:
        assert self.next == self.shard_count and not self.waiting, "a shard is missing"
        merged = Statistics(samples=samples, source=source)
        for name in sorted(self.tensors):
            merged.tensors[name] = self.tensors[name]
            merged.tensors[name].sum_batch_min, merged.tensors[name].sum_batch_max = self.sums[name]
        return merged


def _without_extremes(stats: TensorStats) -> TensorStats:
    return replace(stats, batch_extremes=None)


def merge_shards(results: Sequence[ShardResult], samples: int, source: str, batch_size: int) -> Statistics:
    """The statistics one process gets over all shards, from their results in any order."""
    merger = ShardMerger(len(results), batch_size)
    for result in results:
        merger.add(result)
    return merger.result(samples, source)


def _one_protobuf(model: onnx.ModelProto) -> onnx.ModelProto:
    if needs_external_data(model):
        raise UsageError("--ray ships the model as one protobuf, which cannot exceed 2 GB; this model does: "
                         "quantize it without --ray")
    return model


def collect_statistics_on_ray(model: onnx.ModelProto, tensors: list[str], source: SampleSource,
                              options: RayOptions, *, batch_size: int = 1,
                              memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: ProgressFactory = no_progress,
                              aliases: dict[str, str] | None = None) -> Statistics:
    """collect_statistics over shards of `source` as Ray tasks; byte-identical to collect_statistics."""
    if needs_external_data(model):
        raise UsageError("--ray ships the model as one protobuf, which cannot exceed 2 GB; this model does: "
                         "calibrate it without --ray")
    ray = connect(options)
    parts = shards(len(source), worker_count(ray, options), batch_size)
    model_ref = ray.put(model.SerializeToString())  # once, not once per task
    source_ref = ray.put(source)
    task = _remote(ray, fold_shard, options)
    jobs = ((shard, lambda shard=shard: task.remote(model_ref, source_ref, shard, tensors, batch_size, memory_budget,
                                                    aliases or {}, options.cpus_per_task)) for shard in parts)
    merger = ShardMerger(len(parts), batch_size)
    _gather(ray, jobs, worker_count(ray, options), len(parts), progress(len(source), "calibrating on Ray"),
            lambda shard: shard.stop - shard.start, lambda _, result: merger.add(result))
    return merger.result(len(source), source.description)


_REMOTE: dict[tuple, object] = {}


def _remote(ray, function: Callable, options: RayOptions):
    key = (function, options.cpus_per_task)
    if key not in _REMOTE:
        _REMOTE[key] = ray.remote(function).options(num_cpus=options.cpus_per_task, max_retries=TASK_RETRIES,
                                                    retry_exceptions=False)
    return _REMOTE[key]


def _gather(ray, jobs: Iterable[tuple[object, Callable]], limit: int, total: int, bar, weight: Callable,
            take: Callable, drop: Callable[[object], bool] | None = None) -> None:
    """Submit jobs ((item, submit) pairs) with at most `limit` running, and take(item, result) each as it
    finishes; after each, running tasks whose item `drop` names are cancelled and forgotten. A failed task
    fails the run with one line naming it; Ctrl-C (or any error) cancels what is still running."""
    jobs = iter(jobs)
    pending: dict = {}

    def refill() -> None:
        while len(pending) < limit and (job := next(jobs, None)) is not None:
            item, submit = job
            pending[submit()] = item

    try:
        refill()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)  # Ctrl-C gets through in between
            if not ready:
                continue
            item = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                raise _task_error(item, total, exc.cause) from None
            except ray.exceptions.RayError as exc:  # retries used up: the worker kept dying
                raise OnnxqError(f"{_where(item, total)}: the Ray task failed {TASK_RETRIES + 1} times "
                                 f"({type(exc).__name__}: {first_line(exc)})") from None
            take(item, result)
            bar.update(weight(item))
            for ref in [ref for ref, other in pending.items() if drop is not None and drop(other)]:
                ray.cancel(ref)  # not forced: the worker stays up for the next task
                del pending[ref]
            refill()
    except BaseException:
        cancel_all(ray, list(pending))
        raise
    finally:
        bar.close()


def cancel_all(ray, refs: list) -> None:
    """Force-cancel every task in `refs`, even if Ctrl-C is pressed again meanwhile (a second press that
    broke this loop would leave the remaining tasks running on the cluster)."""
    while refs:
        try:
            ray.cancel(refs[-1], force=True)
        except KeyboardInterrupt:
            continue  # the press that started the unwinding is already on its way up
        refs.pop()


def _where(item, total: int) -> str:
    return item.describe(total) if isinstance(item, Shard | _Trial) else f"candidate {item + 1} of {total}"


def _task_error(item, total: int, cause: BaseException) -> OnnxqError:
    if isinstance(cause, OnnxqError):
        return type(cause)(f"{_where(item, total)}: {cause.message}")
    return OnnxqError(f"{_where(item, total)}: {type(cause).__name__}: {first_line(cause)}")


# ---------------------------------------------------------------- candidate evaluation


class RayEvaluator:
    """Scores candidate models as Ray tasks (onnxq.search.sensitivity.Evaluator); same scores as SerialEvaluator."""

    def __init__(self, build: Callable[[frozenset[str]], onnx.ModelProto], reference: CachedReference,
                 options: RayOptions) -> None:
        self.ray = connect(options)
        self.build = build
        self.options = options
        self.width = worker_count(self.ray, options)
        self.reference_ref = self.ray.put(reference)

    def fidelities(self, candidates: Sequence[frozenset[str]], done: Callable[[int], None] | None = None
                   ) -> list[Fidelity]:
        task = _remote(self.ray, score_candidate, self.options)
        scored: dict[int, Fidelity] = {}
        jobs = ((i, lambda c=c: task.remote(self.reference_ref, self.build(c).SerializeToString()))
                for i, c in enumerate(candidates))  # a model is built when a worker is free for it
        _gather(self.ray, jobs, self.width, len(candidates), _Callback(done), lambda _: 1, scored.__setitem__)
        return [scored[i] for i in range(len(candidates))]


def score_candidate(reference: CachedReference, model_bytes: bytes) -> Fidelity:
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return reference.fidelity_of(model)


class _Callback:
    def __init__(self, done: Callable[[int], None] | None) -> None:
        self.done = done

    def update(self, n: int) -> None:
        if self.done is not None:
            self.done(n)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- the automatic search's candidates


@dataclass(frozen=True)
class _Trial:
    index: int  # -1: not a candidate (the ranking probe)
    name: str
    built_s: float = 0.0  # building the candidate, on the driver

    def describe(self, total: int) -> str:
        return f"candidate {self.index + 1} of {total} ({self.name})" if self.index >= 0 else self.name


class RayScorer:
    """Scores the automatic search's candidate groups as Ray tasks (onnxq.search.auto.Scorer).

    The reference (fp32 outputs and held-back samples) goes to the object store once per search;
    each candidate is built on the driver when a worker is free for it, put once, and scored by a
    task with onnxq.search.auto.score, the function the serial search uses (an error building or running
    the candidate is its row, as there). Once a candidate meets the target, later candidates of its
    group (slower ones) are not started, and running ones are cancelled. The layer-ranking probe
    is a task too (onnxq.runtime.layer_errors.probe_errors), taking one of the `width` slots while it runs.
    """

    def __init__(self, reference: CachedReference, options: RayOptions) -> None:
        self.ray = connect(options)
        self.options = options
        self.width = worker_count(self.ray, options)
        self.reference_ref = self.ray.put(reference)
        self.where = f"Ray, at most {self.width} task{'s' if self.width > 1 else ''} at once"
        self.probing: _RayRanking | None = None  # the probe task, while it holds a slot

    def rank_later(self, probe: Callable[[], auto.Probe]) -> _RayRanking:
        model, pairs = probe()
        task = _remote(self.ray, rank_layers_task, self.options)
        ref = task.remote(self.reference_ref, _one_protobuf(model).SerializeToString(), pairs,
                          self.options.cpus_per_task)
        self.probing = _RayRanking(self, ref)
        return self.probing

    def score(self, candidates: Sequence[auto.Candidate], build: Callable[[auto.Candidate], onnx.ModelProto],
              enough: Callable[[auto.Scored], bool]) -> dict[int, auto.Scored]:
        task = _remote(self.ray, score_trial, self.options)
        scored: dict[int, auto.Scored] = {}
        first_enough = len(candidates)

        def jobs() -> Iterable[tuple[_Trial, Callable]]:
            for i, candidate in enumerate(candidates):
                if i > first_enough:
                    return
                began = time.perf_counter()
                try:
                    model = build(candidate)
                except Exception as exc:  # a row, as in the serial search
                    scored[i] = auto.Scored(error=auto.candidate_error(exc), seconds=time.perf_counter() - began)
                    continue
                data = _one_protobuf(model).SerializeToString()
                trial = _Trial(i, candidate.name, time.perf_counter() - began)
                yield trial, lambda data=data: task.remote(self.reference_ref, data, self.options.cpus_per_task)

        def take(trial: _Trial, result: auto.Scored) -> None:
            nonlocal first_enough
            scored[trial.index] = replace(result, seconds=result.seconds + trial.built_s)
            if enough(result):
                first_enough = min(first_enough, trial.index)

        slots = max(1, self.width - (self.probing is not None))
        _gather(self.ray, jobs(), slots, len(candidates), _Callback(None), lambda _: 1, take,
                drop=lambda trial: trial.index > first_enough)
        return scored


class _RayRanking:
    """The ranking probe's task (onnxq.search.auto.Ranking)."""

    def __init__(self, scorer: RayScorer, ref) -> None:
        self.scorer, self.ref = scorer, ref

    def result(self) -> list[str]:
        ranking: list[list[str]] = []
        try:
            _gather(self.scorer.ray, [(_Trial(-1, "the layer-ranking probe"), lambda: self.ref)], 1, 1, _Callback(None),
                    lambda _: 1, lambda _, result: ranking.append(result))
        finally:
            self.scorer.probing = None
        return ranking[0]

    def cancel(self) -> None:
        cancel_all(self.scorer.ray, [self.ref])
        self.scorer.probing = None


def rank_layers_task(reference: CachedReference, model_bytes: bytes, pairs: dict[str, tuple[str, str]],
                     threads: int) -> list[str]:
    """One task: the layers by their own error, most damaged first (onnxq.runtime.layer_errors.probe_errors)."""
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return list(probe_errors(model, pairs, reference.feeds, threads))


def score_trial(reference: CachedReference, model_bytes: bytes, threads: int) -> auto.Scored:
    """One task: a candidate model's agreement with fp32 (onnxq.search.auto.score), on the task's CPUs."""
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    reference.threads = threads  # this task's copy (onnxruntime's results do not depend on its thread count)
    return auto.score(reference, model)


# ---------------------------------------------------------------- entry points for onnxq.commands.pipeline


def collect(model: onnx.ModelProto, tensors: list[str], source: SampleSource, options: RayOptions | None,
            **kwargs) -> Statistics:
    """collect_statistics here (options None) or sharded on Ray: the same statistics either way (Ray
    shards always keep histograms; `histograms=False` only makes the local pass cheaper)."""
    histograms = kwargs.pop("histograms", True)
    if options is None:
        return collect_statistics(model, tensors, source, histograms=histograms, **kwargs)
    return collect_statistics_on_ray(model, tensors, source, options, **kwargs)


def evaluator_for(options: RayOptions | None, build: Callable[[frozenset[str]], onnx.ModelProto],
                  reference: CachedReference) -> RayEvaluator | None:
    """A Ray evaluator for the accuracy search, or None (the search then scores candidates itself)."""
    return RayEvaluator(build, reference, options) if options is not None else None


def scorer_for(options: RayOptions | None, reference: CachedReference) -> RayScorer | None:
    """A Ray scorer for the automatic search, or None (it then measures candidates itself)."""
    return RayScorer(reference, options) if options is not None else None
