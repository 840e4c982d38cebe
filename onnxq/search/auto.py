"""The automatic default: per model, the fastest way onnxq knows that keeps the task answer.

No single setting is right for every model: a recogniser whose convolutions lose the text under
static activation ranges reads the same text when only its MatMuls are quantized, at run time; a
CNN whose weight rounding shifts channel means needs bias correction; one whose last layers are
fragile keeps them in float. With only --calib, `quantize` measures candidates built from what
onnxq already does on the held-back samples, by their task agreement with fp32 (onnxq.runtime.agreement:
same class, same text, same decisions; samples where fp32 itself is a near tie left out), and keeps
the fastest one reaching the target (TARGET_AGREEMENT), else the most agreeing one.

The candidates, in the order they are measured:

1. static int8 as placed (the speed table's decisions applied) with the calibration method, then
   with `percentile` (same speed, another clip). The first one meeting the target ends the search:
   nothing is expected faster.
2. repairs at the same speed, on the better method, when it is within REPAIR_REACH of the target
   (a repair has not been seen to close a larger gap): bias correction, then AdaRound on the
   ADAROUND_LAYERS layers with the largest own error (onnxq.runtime.layer_errors ranks them in one probe
   pass), with bias correction when it helped. The best repair carries into the later candidates.
3. run-time quantization, which needs no ranking: MatMul/Gemm/LSTM quantized at run time beside
   static convolutions, and the whole model in dynamic mode.
4. float fallbacks, after the probe pass ranks the layers (when the budget leaves room for it):
   the most damaged quarter of the layers, and the ladder of the 1, 2, 4, ... most damaged (at
   most half).
Within steps 3 and 4 the expected-fastest goes first, each must be expected faster than fp32 by
MIN_SPEEDUP, and once a candidate meets the target every slower one is skipped. Only when none
meets it are the candidates expected slower than MIN_SPEEDUP measured (fastest first): the task
answer comes before the speed.

int16 activations are no candidate: onnxruntime's CPU has no int16 Conv/MatMul kernel, so an int16
layer runs in float behind extra Q/DQ pairs, never faster than keeping it float.

Expected speed comes from the speed table (onnxq.search.speed_table) and each layer's multiply-adds,
not from timing, and candidates are measured as the target's integer arithmetic (onnxq.runtime.emulation),
not with this host's kernels: the same inputs give the same choice on any machine; only the budget
(seconds) can end the search earlier on a slower one. The report lists every candidate with its agreement,
expected speed-up and time; --save-recipe writes the choice as a recipe that rebuilds the model
without searching.

With --ray, a Scorer (onnxq.search.distributed.RayScorer) scores each group of candidates that do not
depend on each other at once: the static methods, the run-time group, the fallback ladder, the
ones expected too slow (and the ranking probe beside a group with a slot to spare). The search
reads the results in the serial order and keeps what the serial search measures; the budget is
checked before each group instead of before each candidate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.enums import NodeStatus
from onnxq.quant.ir import all_graphs, constant_values, is_constant, node_label
from onnxq.quant.ops import HEAVY_OPS, MATMUL_OPS
from onnxq.runtime.evaluate import CachedReference, Fidelity
from onnxq.search.speed_table import SpeedTable, layer_class, shipped_table

TARGET_AGREEMENT = 0.99
BUDGET_S = 20.0  # seconds of search; calibration, the final evaluation and writing come on top
SEARCH_HOLDOUT = 0.25  # share of --calib held back to measure candidates on (at most 32 samples)
MIN_SPEEDUP = 1.1  # run-time and fallback candidates expected slower than this against fp32 come last
ADAROUND_LAYERS = 4
ADAROUND_SECONDS = 5.0  # AdaRound's cost-model budget for those layers (onnxq.passes.recovery.adaround_steps)
DYNAMIC_SPEED = 0.8  # a dynamically quantized MatMul's speed-up, relative to a static int8 one (quantizes its input)
LSTM_DYNAMIC_SPEEDUP = 1.5  # DynamicQuantizeLSTM against the float LSTM (no table row)
MAX_FALLBACK_SHARE = 0.5  # at most this share of the int8 layers kept float by the ladder
REPAIR_REACH = 0.15  # repairs are tried when static is this close to the target (they gained 0.05-0.12 measured)


@dataclass(frozen=True)
class Candidate:
    """One way to quantize the model (what it is; the search measures it into a Measured)."""

    name: str
    mode: str = "static"  # "static" or "dynamic" (the whole model)
    method: str = "global"
    keep_float: frozenset[str] = frozenset()
    dynamic: frozenset[str] = frozenset()  # static mode: layers quantized at run time
    bias_correction: bool = False
    adaround: frozenset[str] = frozenset()  # layers whose weights AdaRound re-rounds

    def with_repair(self, repair: Candidate) -> Candidate:
        """This candidate with `repair`'s bias correction and AdaRound (named after both)."""
        if not (repair.bias_correction or repair.adaround):
            return self
        return replace(self, name=f"{self.name} + {_repair_name(repair)}", bias_correction=repair.bias_correction,
                       adaround=repair.adaround)


def _repair_name(candidate: Candidate) -> str:
    parts = [f"AdaRound on {len(candidate.adaround)} layers"] if candidate.adaround else []
    return " + ".join(parts + (["bias correction"] if candidate.bias_correction else []))


@dataclass
class Measured:
    candidate: Candidate
    expected_speedup: float
    agreement: float | None = None  # every held-back sample
    decided_agreement: float | None = None  # samples fp32 decides (what the search steers by)
    near_ties: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def score(self) -> tuple[float, float, float]:
        """Higher is better: decided agreement, then plain agreement, then expected speed."""
        return (_or_minus(self.decided_agreement), _or_minus(self.agreement), self.expected_speedup)

    def meets(self, target: float) -> bool:
        return self.decided_agreement is not None and self.decided_agreement >= target

    def to_dict(self) -> dict:
        c = self.candidate
        return {"name": c.name, "mode": c.mode, "method": c.method, "float_layers": len(c.keep_float),
                "dynamic_layers": len(c.dynamic), "bias_correction": c.bias_correction,
                "adaround_layers": len(c.adaround), "expected_speedup": _round(self.expected_speedup),
                "agreement": _round(self.agreement), "decided_agreement": _round(self.decided_agreement),
                "near_ties": self.near_ties, "seconds": round(self.seconds, 2), "error": self.error}


def _or_minus(value: float | None) -> float:
    return -1.0 if value is None else value


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class SearchOutcome:
    chosen: Measured
    measured: list[Measured]
    target: float
    why: str
    ranking: list[str] = field(default_factory=list)  # layers by their own error, most damaged first
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    scored_on: str = "this process"  # or Ray (onnxq.search.distributed.RayScorer)

    def to_report(self) -> dict:
        return {"target_agreement": self.target, "chosen": self.chosen.candidate.name, "why": self.why,
                "seconds": round(self.seconds, 2), "scored_on": self.scored_on,
                "candidates": [m.to_dict() for m in self.measured],
                "layer_ranking": self.ranking[:20]}


@dataclass
class SearchSpace:
    """What candidates are built from: the caller's builder, the layers, the speed model."""

    build: Callable[[Candidate], onnx.ModelProto]
    int8_layers: dict[str, str]  # label -> op type: the static layers the search may move
    dynamic_layers: frozenset[str]  # MatMul/Gemm/LSTM that can run dynamically (empty: no dynamic candidates)
    methods: tuple[str, ...]  # calibration methods to try (the user's alone, when one was given)
    speed: Callable[[Candidate], float]
    rank_layers: Callable[[], list[str]]  # most damaged first (the probe pass, run when first needed)
    adaround_layers: Callable[[list[str]], frozenset[str]]  # of these (in order), the ones AdaRound can afford
    can_repair: bool = True  # calibration samples are there for bias correction and AdaRound
    probe: Callable[[], Probe] | None = None  # rank_layers' probe model, for a scorer (onnxq.runtime.layer_errors)


Probe = tuple[onnx.ModelProto, dict[str, tuple[str, str]]]  # the probe model; layer -> (fp32 output, copy output)


class Ranking(Protocol):
    def result(self) -> list[str]: ...  # waits for it

    def cancel(self) -> None: ...


class Scorer(Protocol):
    """Scores a group of independent candidates at once (onnxq.search.distributed.RayScorer: as Ray tasks)."""

    where: str  # for the report: where candidates were scored
    width: int  # candidates scored at once

    def rank_later(self, probe: Callable[[], Probe]) -> Ranking:
        """Start the ranking probe (SearchSpace.probe) beside the candidates; the result is rank_layers'."""
        ...

    def score(self, candidates: Sequence[Candidate], build: Callable[[Candidate], onnx.ModelProto],
              enough: Callable[[Scored], bool]) -> dict[int, Scored]:
        """Candidates by index: every one up to the first (in order) that is `enough`; later ones may be missing."""
        ...


@dataclass(frozen=True)
class Scored:
    """What measuring one candidate gives (in this process or in a Ray task)."""

    agreement: float | None = None
    decided_agreement: float | None = None
    near_ties: int = 0
    error: str | None = None
    seconds: float = 0.0


def score(reference: CachedReference, model: onnx.ModelProto) -> Scored:
    """A candidate's agreement with fp32 on the reference's samples; an error (onnxruntime cannot build or
    run it) is a result too."""
    began = time.perf_counter()
    try:
        fidelity = reference.fidelity_of(model)
    except Exception as exc:
        return Scored(error=candidate_error(exc), seconds=time.perf_counter() - began)
    return Scored(fidelity.agreement, fidelity.decided_agreement, _near_ties(fidelity),
                  seconds=time.perf_counter() - began)


def candidate_error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"


def search(space: SearchSpace, reference: CachedReference, *, target: float = TARGET_AGREEMENT,
           budget_s: float = BUDGET_S, scorer: Scorer | None = None) -> SearchOutcome:
    """Measure candidates (see the module docstring); the fastest meeting `target`, else the most agreeing.

    With a `scorer`, each group of independent candidates (the static methods, the run-time group, the
    fallback ladder, the slow ones) is scored at once, and the budget is checked before each group rather
    than before each candidate; the outcome is the serial one when the budget does not end the search."""
    run = _Run(space, reference, target, budget_s, scorer)
    try:
        return _search(run)
    finally:
        run.release()


def _search(run: _Run) -> SearchOutcome:
    space, target = run.space, run.target
    statics = run.trial([Candidate(f"static {method}", method=method) for method in space.methods])
    if run.stopped or statics[-1].meets(target):
        return run.finish()  # nothing is expected faster than all-int8 static
    best_static = max(run.measured, key=lambda m: m.score)
    repair = best_static.candidate
    within_reach = (best_static.decided_agreement or 0.0) >= target - REPAIR_REACH
    if space.can_repair and space.int8_layers and within_reach and not run.spent():
        repair = run.best_repair(best_static)
        if any(m.meets(target) for m in run.measured):
            return run.finish()
    best_met: float | None = None
    too_slow: list[Candidate] = []
    for group in (_dynamic_group(space, repair), None):
        if group:
            run.rank_beside(len(group))
        if group is None:  # the fallbacks need the ranking: its probe costs about two candidates
            if not space.int8_layers or run.spent(extra_candidates=2):
                break
            run.rank()
            group = _fallback_group(space, repair, run.ranking)
        ordered = [c for c in sorted(group, key=lambda c: -space.speed(c))
                   if best_met is None or space.speed(c) > best_met]  # slower than one meeting it: skipped
        too_slow += [c for c in ordered if space.speed(c) < MIN_SPEEDUP]
        tried = run.trial([c for c in ordered if space.speed(c) >= MIN_SPEEDUP])
        if run.stopped:
            return run.finish()
        if tried and tried[-1].meets(target):
            best_met = tried[-1].expected_speedup
    if best_met is None:  # the answer comes first: then the candidates expected too slow, fastest first
        run.trial(sorted(too_slow, key=lambda c: -space.speed(c)))
    return run.finish()


@dataclass
class _Run:
    """One search's state: what was measured, the ranking, the clock."""

    space: SearchSpace
    reference: CachedReference
    target: float
    budget_s: float
    scorer: Scorer | None = None
    measured: list[Measured] = field(default_factory=list)
    ranking: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stopped: bool = False  # the budget ended the search
    start: float = field(default_factory=time.perf_counter)
    ranking_ahead: Ranking | None = None  # the probe, started on the scorer before the search asked for it

    def trial(self, candidates: list[Candidate], *, budget: bool = True) -> list[Measured]:
        """Measure `candidates` in order up to the first meeting the target. Here: the budget is checked before
        each one (`budget`). On the scorer: once before the group, which is then scored at once (candidates
        after the first meeting the target are not kept, nor started once it is known)."""
        if not candidates:
            return []
        if self.scorer is None:
            tried: list[Measured] = []
            for candidate in candidates:
                if budget and self.spent():
                    self.stopped = True
                    break
                tried.append(self.measure(candidate))
                if tried[-1].meets(self.target):
                    break
            return tried
        if budget and self.spent():
            self.stopped = True
            return []
        scored = self.scorer.score(candidates, self.space.build,
                                   lambda s: s.decided_agreement is not None and s.decided_agreement >= self.target)
        tried = []
        for i, candidate in enumerate(candidates):
            tried.append(self._record(candidate, scored[i]))
            if tried[-1].meets(self.target):
                break
        return tried

    def measure(self, candidate: Candidate) -> Measured:
        """One candidate, built and scored in this process."""
        began = time.perf_counter()
        try:
            model = self.space.build(candidate)
        except Exception as exc:  # a candidate that cannot be built is a row that says so
            return self._record(candidate, Scored(error=candidate_error(exc), seconds=time.perf_counter() - began))
        scored = score(self.reference, model)
        return self._record(candidate, replace(scored, seconds=time.perf_counter() - began))

    def _record(self, candidate: Candidate, scored: Scored) -> Measured:
        result = Measured(candidate, self.space.speed(candidate), scored.agreement, scored.decided_agreement,
                          scored.near_ties, scored.seconds, scored.error)
        self.measured.append(result)
        return result

    def rank(self) -> None:
        """Rank the layers by their own error (the probe pass), once."""
        if self.ranking:
            return
        if self.scorer is None or self.space.probe is None:
            self.ranking = self.space.rank_layers()
            return
        if self.ranking_ahead is None:
            self.ranking_ahead = self.scorer.rank_later(self.space.probe)
        self.ranking, self.ranking_ahead = self.ranking_ahead.result(), None

    def rank_beside(self, group: int) -> None:
        """On a scorer with a slot to spare beside a group of `group` candidates: start the probe now, in case
        the search needs it later (its ranking is kept only when the serial search would rank)."""
        if (self.scorer is not None and self.space.probe is not None and self.space.int8_layers
                and not self.ranking and self.ranking_ahead is None and group < self.scorer.width):
            self.ranking_ahead = self.scorer.rank_later(self.space.probe)

    def release(self) -> None:
        """Cancel a probe started ahead and not needed."""
        if self.ranking_ahead is not None:
            self.ranking_ahead.cancel()
            self.ranking_ahead = None

    def spent(self, extra_candidates: int = 1) -> bool:
        """True when the next `extra_candidates` candidates, each expected to take as long as the slowest so far,
        would end past the budget (never before the first candidate)."""
        if not self.measured:
            return False
        next_cost = extra_candidates * max(m.seconds for m in self.measured)
        if time.perf_counter() - self.start + next_cost <= self.budget_s:
            return False
        note = (f"search budget of {self.budget_s:g} s spent after {len(self.measured)} candidates: on a slower "
                f"machine it may choose otherwise (--save-recipe pins this choice; --budget gives more time)")
        if note not in self.notes:
            self.notes.append(note)
        return True

    def best_repair(self, baseline: Measured) -> Candidate:
        """Bias correction, then AdaRound on the most damaged layers: `baseline` repaired if that helped
        (repairs cost a calibration pass, not speed)."""
        static = baseline.candidate
        self.rank_beside(1)
        corrected = self.trial([replace(static, name=f"{static.name} + bias correction", bias_correction=True)],
                               budget=False)[0]
        helped = corrected.score[:2] > baseline.score[:2]
        best = corrected if helped else baseline
        if corrected.meets(self.target) or self.spent(extra_candidates=3):  # the probe, then AdaRound
            return best.candidate
        self.rank()
        layers = self.space.adaround_layers(self.ranking)
        if not layers:
            return best.candidate
        rounded = replace(static, adaround=layers, bias_correction=helped)
        measured = self.trial([replace(rounded, name=f"{static.name} + {_repair_name(rounded)}")], budget=False)[0]
        return (measured if measured.score[:2] > best.score[:2] else best).candidate

    def finish(self) -> SearchOutcome:
        outcome = _outcome(self.measured, self.target, self.notes, self.ranking)
        outcome.seconds = time.perf_counter() - self.start
        outcome.scored_on = self.scorer.where if self.scorer is not None else "this process"
        return outcome


def _dynamic_group(space: SearchSpace, repair: Candidate) -> list[Candidate]:
    """MatMul/Gemm/LSTM at run time beside static layers, and the whole model dynamic (no ranking needed)."""
    if not space.dynamic_layers:
        return []
    method = repair.method
    return [Candidate(f"static {method}, MatMul/Gemm/LSTM dynamic", method=method,
                      dynamic=space.dynamic_layers & frozenset(space.int8_layers)).with_repair(repair),
            Candidate("dynamic", mode="dynamic", method=method)]


def _fallback_group(space: SearchSpace, repair: Candidate, ranking: list[str]) -> list[Candidate]:
    """The most damaged quarter of the layers in float, and the ladder: 1, 2, 4, ... of them (at most half)."""
    method = repair.method
    limit = min(len(ranking), max(1, int(MAX_FALLBACK_SHARE * len(space.int8_layers))))
    quarter = max(1, len(space.int8_layers) // 4)
    counts = sorted({quarter} | {2**i for i in range(limit.bit_length()) if 2**i <= limit}) if ranking else []
    return [_fallback(method, ranking, count).with_repair(repair) for count in counts if count <= limit]


def _fallback(method: str, ranking: list[str], count: int) -> Candidate:
    return Candidate(f"static {method}, {count} most damaged layer{'s' if count > 1 else ''} float", method=method,
                     keep_float=frozenset(ranking[:count]))


def _near_ties(fidelity: Fidelity) -> int:
    return max((o["task"].get("near_ties", 0) for o in fidelity.outputs if o.get("task")), default=0)


def _outcome(measured: list[Measured], target: float, notes: list[str], ranking: list[str]) -> SearchOutcome:
    meeting = [m for m in measured if m.meets(target)]
    if meeting:
        chosen = max(meeting, key=lambda m: (m.expected_speedup, m.score))
        why = (f"the fastest expected (layers {chosen.expected_speedup:.2f}x) of {len(meeting)} candidate(s) reaching "
               f"agreement {target:g} on the samples fp32 decides")
        return SearchOutcome(chosen, measured, target, why, ranking, notes)
    scored = [m for m in measured if m.decided_agreement is not None]
    if not scored:
        return SearchOutcome(measured[0], measured, target, "no candidate could be measured", ranking, notes)
    chosen = max(scored, key=lambda m: m.score)
    why = f"no candidate reached agreement {target:g}: the most agreeing one"
    notes.append(f"the automatic search did not reach agreement {target:g} on the held-back samples fp32 decides; "
                 f"kept the most agreeing candidate, {chosen.candidate.name} ({chosen.decided_agreement:.4f})")
    return SearchOutcome(chosen, measured, target, why, ranking, notes)


# ---------------------------------------------------------------- expected speed


def layer_macs(node: gs.Node, shapes: dict[str, tuple[int | None, ...]]) -> float | None:
    """Multiply-adds of a Conv/MatMul/Gemm with a constant weight (None when shapes are unknown)."""
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return None
    weight = constant_values(node.inputs[1]).shape
    output = shapes.get(node.outputs[0].name)
    if output is None or any(not isinstance(d, int) or d <= 0 for d in output):
        return None
    if node.op == "Conv":
        return float(np.prod(output) * np.prod(weight[1:]))
    if node.op in MATMUL_OPS and len(weight) == 2:
        return float(np.prod(output) * (weight[1] if node.op == "Gemm" and node.attrs.get("transB", 0) else weight[0]))
    return None


@dataclass
class SpeedModel:
    """Expected speed-up over fp32: each layer costs its multiply-adds divided by its class's int8 speed-up
    (from the table's rows: the fp32 model time over the all-int8 one), dynamically quantized ones by
    DYNAMIC_SPEED of that, float ones their multiply-adds. Layers without known shapes count as one
    average layer; everything else in the model is left out (it runs the same in every candidate)."""

    table: SpeedTable
    row_class: str
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (macs, int8 speed-up)
    lstms: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, graph: gs.Graph, shapes: dict, row_class: str, table: SpeedTable | None = None) -> SpeedModel:
        model = cls(table or shipped_table(), row_class)
        macs_known = []
        for node in graph.nodes:
            if node.op not in HEAVY_OPS:
                continue
            layer = layer_class(node, shapes)
            decision = model.table.decide(row_class, layer) if layer is not None else None
            if decision is None:
                continue
            speedup = decision.row.fp32_ms / decision.row.int8_ms if decision.row.int8_ms > 0 else 1.0
            macs = layer_macs(node, shapes)
            model.layers[node_label(node)] = (macs if macs is not None else math.nan, speedup)
            if macs is not None:
                macs_known.append(macs)
        average = float(np.mean(macs_known)) if macs_known else 1.0
        model.layers = {k: (average if math.isnan(m) else m, s) for k, (m, s) in model.layers.items()}
        model.lstms = {node_label(n) for sub in all_graphs(graph) for n in sub.nodes if n.op == "LSTM"}
        return model

    def speedup(self, statuses: dict[str, str]) -> float:
        """statuses: label -> int8 / dynamic / float (layers not named: int8)."""
        fp32 = cost = 0.0
        for label, (macs, int8) in self.layers.items():
            status = statuses.get(label, "int8")
            fp32 += macs
            cost += (macs / int8 if status == NodeStatus.INT8
                     else macs / (int8 * DYNAMIC_SPEED) if status == NodeStatus.DYNAMIC else macs)
        lstm = [label for label in self.lstms if statuses.get(label) == NodeStatus.DYNAMIC]
        if lstm and fp32 == 0.0:
            return LSTM_DYNAMIC_SPEEDUP
        return fp32 / cost if cost > 0 else 1.0
