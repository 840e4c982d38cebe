"""Per-layer sensitivity and the accuracy-target search (mixed precision: int8 where it holds, float where not).

Sensitivity is measured, not guessed: on held-back samples, the output SQNR against fp32
of the model with *only* that layer in int8, and of the model with *all but* that layer
in int8. Layers are ranked by the first, lowest first: the damage a layer does on its own.
The second misses what only shows when neighbours fall back together (a layer's quantized
output stays quantized while the next layer is int8): on the bundled recogniser the
"only this" order reached a 15 dB target with 20 layers in float, the "all but" order
needed 50.

The target search starts from the all-int8 model and keeps the highest-ranked layers in
float, one at a time, re-measuring the whole model each time, until the target (minimum
SQNR or cosine over the outputs) holds; it stops early once the target is met, so the
fallbacks are as few as this greedy order allows. It always returns the best model seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import onnx

from onnxq.runtime.evaluate import CachedReference, Fidelity
from onnxq.runtime.session import ProgressFactory, no_progress

Build = Callable[[frozenset[str]], onnx.ModelProto]  # float nodes -> quantized model


class Evaluator(Protocol):
    """Scores candidates (sets of layers in the fallback precision) against the fp32 reference.

    Every candidate is independent of the others, so an evaluator may score them in any
    order or at once (onnxq.search.distributed.RayEvaluator); the searches only ask for lists.
    `width` is how many it scores at once: a search that can stop early asks for that many.
    """

    width: int

    def fidelities(self, candidates: Sequence[frozenset[str]],
                   done: Callable[[int], None] | None = None) -> list[Fidelity]: ...


class SerialEvaluator:
    """One candidate after the other, in this process."""

    width = 1

    def __init__(self, build: Build, reference: CachedReference) -> None:
        self.build = build
        self.reference = reference

    def fidelities(self, candidates: Sequence[frozenset[str]],
                   done: Callable[[int], None] | None = None) -> list[Fidelity]:
        scores = []
        for candidate in candidates:
            scores.append(self.reference.fidelity_of(self.build(candidate)))
            if done is not None:
                done(1)
        return scores


@dataclass
class LayerSensitivity:
    node: str
    op: str
    only_this_sqnr_db: float  # this layer int8, every other candidate float
    all_but_this_sqnr_db: float  # every candidate int8 but this one

    def to_dict(self) -> dict:
        return {"node": self.node, "op": self.op, "only_this_sqnr_db": _finite(self.only_this_sqnr_db),
                "all_but_this_sqnr_db": _finite(self.all_but_this_sqnr_db)}


@dataclass
class SensitivityResult:
    all_int8_sqnr_db: float
    samples: int
    layers: list[LayerSensitivity] = field(default_factory=list)  # most sensitive first
    notes: list[str] = field(default_factory=list)

    def ranked_nodes(self) -> list[str]:
        return [layer.node for layer in self.layers]

    def to_dict(self) -> dict:
        return {"all_int8_sqnr_db": _finite(self.all_int8_sqnr_db), "samples": self.samples,
                "layers": [layer.to_dict() for layer in self.layers], "notes": list(self.notes)}

    def save_json(self, path: Path) -> None:
        from onnxq.model_io import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def save_png(self, path: Path, top: int = 40) -> None:
        """Bar charts, most sensitive first: SQNR with only the layer int8; SQNR recovered with it float."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from onnxq.model_io import atomic_write_bytes

        shown = self.layers[:top]
        labels = [f"{layer.node} ({layer.op})" for layer in shown][::-1]
        fig, (only_ax, gain_ax) = plt.subplots(1, 2, sharey=True, figsize=(12, 0.28 * len(shown) + 1.5))
        only_ax.barh(labels, [layer.only_this_sqnr_db for layer in shown][::-1], color="#c0504d")
        only_ax.set_xlabel("output SQNR, only this layer int8 (dB; lower = more sensitive)")
        gains = [layer.all_but_this_sqnr_db - self.all_int8_sqnr_db for layer in shown][::-1]
        gain_ax.barh(labels, [g if math.isfinite(g) else 0.0 for g in gains], color="#4472c4")
        gain_ax.set_xlabel("SQNR recovered keeping only this layer float (dB)")
        fig.suptitle(f"onnxq sensitivity: all-int8 SQNR {self.all_int8_sqnr_db:.1f} dB, {self.samples} samples")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        atomic_write_bytes(path, buffer.getvalue())

    def table(self, top: int = 20) -> str:
        lines = [f"all layers int8: SQNR {self.all_int8_sqnr_db:.2f} dB on {self.samples} samples",
                 f"{'rank':>4}  {'only-this dB':>12}  {'recovered dB':>12}  node"]
        for rank, layer in enumerate(self.layers[:top], 1):
            lines.append(f"{rank:>4}  {layer.only_this_sqnr_db:>12.2f}  "
                         f"{layer.all_but_this_sqnr_db - self.all_int8_sqnr_db:>12.2f}  {layer.node} ({layer.op})")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _finite(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def measure_sensitivity(build: Build, candidates: dict[str, str], reference: CachedReference,
                        progress: ProgressFactory = no_progress, *, all_but: bool = True,
                        evaluator: Evaluator | None = None) -> SensitivityResult:
    """`candidates`: node -> op type of every int8 layer to rank. `all_but=False` skips the
    all-but-this-layer models (the ranking needs only the others): half the work."""
    evaluator = evaluator or SerialEvaluator(build, reference)
    names = sorted(candidates)
    trials = [frozenset()] + [frozenset(n for n in names if n != name) for name in names]
    if all_but:
        trials += [frozenset([name]) for name in names]
    bar = progress(len(trials), "sensitivity")
    try:
        scores = [f.min_sqnr for f in evaluator.fidelities(trials, bar.update)]
    finally:
        bar.close()
    rest = scores[1 + len(names):] if all_but else [math.nan] * len(names)
    layers = [LayerSensitivity(name, candidates[name], only, other)
              for name, only, other in zip(names, scores[1:1 + len(names)], rest, strict=True)]
    layers.sort(key=lambda layer: (layer.only_this_sqnr_db, layer.node))
    return SensitivityResult(scores[0], len(reference.feeds), layers)


@dataclass
class Target:
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    min_metric: float | None = None  # the user's --metric score (higher is better)

    def met_by(self, fidelity: Fidelity) -> bool:
        return ((self.min_sqnr_db is None or fidelity.min_sqnr >= self.min_sqnr_db)
                and (self.min_cosine is None or fidelity.min_cosine >= self.min_cosine)
                and (self.min_metric is None or (fidelity.metric is not None and fidelity.metric >= self.min_metric)))

    def score(self, fidelity: Fidelity) -> float:
        """Higher is better: the worst margin to the target (dB and cosine put on one scale)."""
        margins = []
        if self.min_sqnr_db is not None:
            margins.append(fidelity.min_sqnr - self.min_sqnr_db)
        if self.min_cosine is not None:  # 1 - cosine ~ noise/signal/2: compare in dB
            margins.append(_cosine_db(fidelity.min_cosine) - _cosine_db(self.min_cosine))
        if self.min_metric is not None and fidelity.metric is not None:  # the user's scale: 1 unit = 10 dB
            margins.append(10.0 * (fidelity.metric - self.min_metric))
        return min(margins) if margins else 0.0


def _cosine_db(cosine: float) -> float:
    return -10.0 * math.log10(max(1.0 - cosine, 1e-12))


@dataclass
class SearchResult:
    float_nodes: list[str]  # in the order they fell back
    met: bool
    steps: list[dict] = field(default_factory=list)  # one per model measured


def search_fallbacks(build: Build, ranked: list[str], target: Target, reference: CachedReference,
                     max_fallbacks: int, progress: ProgressFactory = no_progress, *,
                     evaluator: Evaluator | None = None) -> SearchResult:
    """Keep ranked layers in float one by one until `target` holds; the best model's float nodes.

    Step k keeps the first k ranked layers in float. The evaluator scores `width` steps at once;
    steps after the first that meets the target are dropped, so the result (and the steps
    listed) is the serial search's for any width.
    """
    evaluator = evaluator or SerialEvaluator(build, reference)
    last = min(len(ranked), max_fallbacks)
    best: tuple[float, list[str]] | None = None
    steps = []
    bar = progress(last + 1, "target search")
    try:
        for first in range(0, last + 1, evaluator.width):
            wave = range(first, min(last, first + evaluator.width - 1) + 1)
            for step, fidelity in zip(wave, evaluator.fidelities([frozenset(ranked[:k]) for k in wave]), strict=True):
                bar.update(1)
                chosen = ranked[:step]
                steps.append({"float_nodes": step, "added": chosen[-1] if chosen else None,
                              "min_sqnr_db": _finite(fidelity.min_sqnr), "min_cosine": fidelity.min_cosine,
                              "metric": fidelity.metric})
                if best is None or target.score(fidelity) > best[0]:
                    best = (target.score(fidelity), list(chosen))
                if target.met_by(fidelity):
                    return SearchResult(list(chosen), True, steps)
    finally:
        bar.close()
    assert best is not None
    return SearchResult(best[1], False, steps)
