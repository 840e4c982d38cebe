"""Compare the quantized model with the fp32 one on held-back samples.

Metrics are accumulated per output while streaming, so evaluation memory does not
grow with the number of samples:
- cosine: over all samples flattened together, and the worst single sample;
- SQNR (dB): 10·log10(Σ fp32² / Σ (fp32 − int8)²);
- top-1 agreement: share of positions whose argmax over the last axis matches
  for [N, classes] and [N, steps, classes] outputs (the classifier's "same class";
  per time step for sequences); not for images or feature maps;
- task agreement (onnxq.runtime.agreement): the share of samples whose answer is the same as fp32's,
  by the kind of answer the output carries (same class, same sequence, same decisions, ...).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxq.errors import DataError, UsageError, first_line
from onnxq.runtime import agreement as task_agreement
from onnxq.runtime.data import SampleSource, batches
from onnxq.runtime.session import Progress, ProgressFactory, no_progress, run, session_for


@dataclass
class OutputAgreement:
    name: str
    dot: float = 0.0
    ref_energy: float = 0.0
    test_energy: float = 0.0
    noise_energy: float = 0.0
    max_abs_error: float = 0.0
    worst_sample_cosine: float = 1.0
    argmax_total: int = 0
    argmax_same: int = 0
    task: task_agreement.OutputAgreement | None = None  # set once the answer the output carries is known

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        if self.task is not None:
            self.task.add(reference, test)
        ref = reference.astype(np.float64)
        out = test.astype(np.float64)
        self.dot += float(np.vdot(ref, out))
        self.ref_energy += float(np.vdot(ref, ref))
        self.test_energy += float(np.vdot(out, out))
        self.noise_energy += float(np.sum((ref - out) ** 2))
        if ref.size:
            self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(ref - out))))
        for r, t in zip(ref.reshape(ref.shape[0], -1) if ref.ndim else [ref.reshape(-1)],
                        out.reshape(out.shape[0], -1) if out.ndim else [out.reshape(-1)], strict=True):
            self.worst_sample_cosine = min(self.worst_sample_cosine, _cosine(r, t))
        if ref.ndim in (2, 3) and ref.shape[-1] > 1:  # [N, classes] or [N, steps, classes]
            same = np.argmax(ref, axis=-1) == np.argmax(out, axis=-1)
            self.argmax_total += int(same.size)
            self.argmax_same += int(same.sum())

    def summary(self) -> dict:
        return {
            "name": self.name,
            "cosine": _ratio_cosine(self.dot, self.ref_energy, self.test_energy),
            "worst_sample_cosine": self.worst_sample_cosine,
            "sqnr_db": _sqnr(self.ref_energy, self.noise_energy),
            "max_abs_error": self.max_abs_error,
            "top1_agreement": (self.argmax_same / self.argmax_total) if self.argmax_total else None,
            "task": self.task.summary() if self.task is not None else None,
        }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return _ratio_cosine(float(np.vdot(a, b)), float(np.vdot(a, a)), float(np.vdot(b, b)))


def _ratio_cosine(dot: float, aa: float, bb: float) -> float:
    if aa == 0.0 and bb == 0.0:
        return 1.0
    if aa == 0.0 or bb == 0.0:
        return 0.0
    return dot / math.sqrt(aa * bb)


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class Fidelity:
    samples: int
    source: str
    outputs: list[dict] = field(default_factory=list)
    metric: float | None = None  # the user's --metric score, when one was given
    available: int | None = None  # samples the source holds, when fewer were measured

    @property
    def min_cosine(self) -> float:
        return min((o["cosine"] for o in self.outputs), default=1.0)

    @property
    def min_sqnr(self) -> float:
        return min((o["sqnr_db"] for o in self.outputs), default=math.inf)

    @property
    def agreement(self) -> float | None:
        """The model's task agreement with fp32 (onnxq.runtime.agreement.model_agreement)."""
        return task_agreement.model_agreement(self.outputs)

    @property
    def decided_agreement(self) -> float | None:
        """The same on the samples fp32 itself decides (no near tie; see onnxq.runtime.agreement)."""
        return task_agreement.model_agreement(self.outputs, "decided_agreement")


def measures_for(reference: onnx.ModelProto, names: list[str], fp32: list[list[np.ndarray]]
                 ) -> dict[str, task_agreement.OutputMeasure]:
    """The answer each output carries, from the graph and some feeds' fp32 outputs (per feed, by `names`)."""
    samples = [dict(zip(names, values, strict=True)) for values in fp32]
    return {m.name: m for m in task_agreement.infer_measures(reference, samples)}


def _agreements(measures: dict[str, task_agreement.OutputMeasure], names: list[str]) -> dict[str, OutputAgreement]:
    return {name: OutputAgreement(name, task=task_agreement.OutputAgreement(measures[name])) for name in names}


EVAL_CHUNK = 16  # samples run through one model, then the other (fewer switches between the two sessions)


def compare_models(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    source: SampleSource,
    *,
    batch_size: int = 1,
    progress: ProgressFactory = no_progress,
    limit: int | None = None,
    cached: CachedReference | None = None,
) -> Fidelity:
    """Run both models on the first `limit` samples of `source` (all: None) and accumulate agreement
    per float output. fp32 outputs `cached` for the same source (batch 1) are used, not recomputed."""
    names = [o.name for o in reference.graph.output
             if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                 onnx.TensorProto.DOUBLE)]
    total = len(source) if limit is None else min(limit, len(source))
    known = cached.outputs if cached is not None and batch_size == 1 and cached.source == source.description else []
    agreement: dict[str, OutputAgreement] = {}
    bar: Progress = progress(total, "evaluating")
    with tempfile.TemporaryDirectory(prefix="onnxq-eval-") as tmp:
        test_session = session_for(quantized, Path(tmp))
        ref_session = session_for(reference, Path(tmp)) if total > len(known) else None
        try:
            done = 0
            for chunk in _chunks(batches(source, batch_size, limit=total), EVAL_CHUNK):
                expected = []
                for feed, count in chunk:
                    if done + count <= len(known):
                        expected.append([known[done][name] for name in names])
                    else:
                        expected.append(run(ref_session, feed, names))
                    done += count
                agreement = agreement or _agreements(measures_for(reference, names, expected), names)
                for (feed, count), ref_values in zip(chunk, expected, strict=True):
                    for name, ref, test in zip(names, ref_values, run(test_session, feed, names), strict=True):
                        agreement[name].add(ref, test)
                    bar.update(count)
        finally:
            bar.close()
    agreement = agreement or {name: OutputAgreement(name) for name in names}
    return Fidelity(total, source.description, [agreement[n].summary() for n in names],
                    available=len(source) if total < len(source) else None)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class CachedReference:
    """fp32 outputs on a few samples, kept in memory, to score many candidate models quickly.

    Used by the sensitivity analysis and the accuracy-target search, which score dozens of
    variants of one model on the same samples.
    """

    def __init__(self, reference: onnx.ModelProto, source: SampleSource, limit: int,
                 metric: UserMetric | None = None, level: str = "all") -> None:
        self.names = [o.name for o in reference.graph.output
                      if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                          onnx.TensorProto.DOUBLE)]
        # a user metric sees every output; SQNR and cosine only the float ones
        self.wanted = [o.name for o in reference.graph.output] if metric is not None else self.names
        self.feeds = [source.sample(i) for i in range(min(limit, len(source)))]
        self.labels = [source.label(i) for i in range(len(self.feeds))]  # a data loader's (feeds, label) pairs
        self.source = source.description
        self.metric = metric
        self.level = level  # onnxruntime optimization level candidates run at (onnxq.runtime.emulation: "disabled")
        self.threads = 0  # onnxruntime threads a candidate runs on (0: its default; a Ray task sets its CPUs)
        with tempfile.TemporaryDirectory(prefix="onnxq-ref-") as tmp:
            session = session_for(reference, Path(tmp))
            self.outputs = [self._run(session, feed) for feed in self.feeds]
        self.measures = measures_for(reference, self.names, [[out[n] for n in self.names] for out in self.outputs])

    def _run(self, session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.wanted, run(session, feed, self.wanted), strict=True))

    def fidelity_of(self, model: onnx.ModelProto) -> Fidelity:
        agreement = (_agreements(self.measures, self.names) if self.measures
                     else {name: OutputAgreement(name) for name in self.names})
        candidates = []
        with tempfile.TemporaryDirectory(prefix="onnxq-eval-") as tmp:
            session = session_for(model, Path(tmp), self.threads, level=self.level)
            for feed, expected in zip(self.feeds, self.outputs, strict=True):
                got = self._run(session, feed)
                for name in self.names:
                    agreement[name].add(expected[name], got[name])
                if self.metric is not None:  # kept only when a metric needs all samples at once
                    candidates.append(got)
        score = (self.metric(self.outputs, candidates, self.feeds, self.labels, self.source)
                 if self.metric is not None else None)
        return Fidelity(len(self.feeds), self.source, [agreement[n].summary() for n in self.names], score)


# (fp32 outputs per sample, candidate outputs per sample, feeds, labels per sample, where the samples come
# from) -> score, higher is better
UserMetric = Callable[[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[dict[str, np.ndarray]],
                       list[object], str], float]


def load_metric(path: Path) -> UserMetric:
    """The `score` function of a user's Python file (--metric), checked to return a finite number.

    A score with a fourth parameter (`score(references, candidates, feeds, labels)`) also gets the label
    of every sample: a data loader's (feeds, label) pairs (onnxq.runtime.loaders)."""
    if not Path(path).is_file():
        raise UsageError(f"metric script not found: {path}")
    spec = importlib.util.spec_from_file_location(f"onnxq_user_metric_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"metric script {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"metric script {path} failed to load: {type(exc).__name__}: {first_line(exc)}") from None
    score = getattr(module, "score", None)
    if not callable(score):
        raise UsageError(f"metric script {path} has no function score(references, candidates, feeds)")
    wants_labels, needs_labels = _takes_labels(score)

    def checked(references, candidates, feeds, labels, source: str) -> float:
        unlabelled = [i for i, label in enumerate(labels) if label is None]
        if needs_labels and unlabelled:
            raise DataError(f"metric script {path} scores with labels, but sample {unlabelled[0]} of {source} has "
                            "none: yield (feeds, label) pairs from a data loader script")
        try:
            value = float(score(references, candidates, feeds, labels) if wants_labels else
                          score(references, candidates, feeds))
        except Exception as exc:
            raise DataError(f"metric script {path} failed: {type(exc).__name__}: {first_line(exc)}") from None
        if not math.isfinite(value):
            raise DataError(f"metric script {path} returned {value}, not a finite number")
        return value

    return checked


def _takes_labels(score: Callable) -> tuple[bool, bool]:
    """Whether score() has a fourth parameter (labels), and whether it has no default (labels required)."""
    try:
        parameters = inspect.signature(score).parameters.values()
    except (TypeError, ValueError):
        return False, False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 4:
        return False, False
    return True, positional[3].default is inspect.Parameter.empty
