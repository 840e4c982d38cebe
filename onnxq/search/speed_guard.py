"""Speed guard: keep a kind of layer in float where its int8 form does not make the model faster.

int8 is not always faster: depthwise convolutions, tiny convolutions and layers where
quantize/dequantize and layout changes outweigh the arithmetic often run slower in
onnxruntime's int8 kernels than in its float ones, and which ones depends on the CPU.

Two ways to decide (--speed-guard):
- table (default): per layer, from the decision table shipped with onnxq (onnxq.search.speed_table),
  keyed by the target CPU class and the layer's class. Nothing is timed: the same inputs and
  target class give the same model on any machine and under any load.
- measure: time the whole model on this machine, batch 1, one thread: for each kind of layer
  (depthwise 3x3 convs, 1x1 convs, MatMuls, ...) the model with that kind in int8 against the
  model with it in float; a kind goes back to float only when that takes at most
  FLOAT_MIN_GAIN of the int8 time. Timings are kept in a profile per CPU and onnxruntime
  version (cached, or pinned with --speed-profile), so reruns on one machine agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxq.cpu import INT8_FEATURES, TargetCpu, host_cpu
from onnxq.enums import NodeStatus, SpeedGuard
from onnxq.errors import DataError, OutputError
from onnxq.quant.ir import constant_values, is_constant, node_label
from onnxq.quant.ops import HEAVY_OPS
from onnxq.quant.placement import Placement
from onnxq.runtime.latency import interleaved_runs
from onnxq.runtime.session import ProgressFactory, no_progress, session_for
from onnxq.search.speed_table import FLOAT_MIN_GAIN, SpeedTable, layer_class, shipped_table

MODES = SpeedGuard.values()
PROFILE_FORMAT = "onnxq-speed-profile/1"
MIN_ROUNDS = 7
MAX_ROUNDS = 41
ROUND_BUDGET_S = 2.0  # per kind, after MIN_ROUNDS: stable medians, bounded time on big models


@dataclass(frozen=True)
class LayerTiming:
    float_ms: float
    int8_ms: float

    @property
    def float_is_faster(self) -> bool:
        return self.float_ms <= FLOAT_MIN_GAIN * self.int8_ms

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else float("inf")


@dataclass
class SpeedProfile:
    """Measured trials for one machine: trial key (model, settings, kind) -> LayerTiming."""

    machine: str
    timings: dict[str, LayerTiming] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from onnxq.model_io import atomic_write_bytes

        body = {"format": PROFILE_FORMAT, "machine": self.machine,
                "timings": {k: [v.float_ms, v.int8_ms] for k, v in sorted(self.timings.items())}}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path: Path, machine: str) -> SpeedProfile:
        """The profile at `path`, or an empty one for `machine` when there is none yet."""
        if not path.exists():
            return cls(machine)
        try:
            body = json.loads(path.read_text())
            if body.get("format") != PROFILE_FORMAT:
                raise ValueError(f"format {body.get('format')!r}")
            timings = {k: LayerTiming(float(v[0]), float(v[1])) for k, v in body["timings"].items()}
            return cls(str(body["machine"]), timings)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise DataError(f"not an onnxq speed profile: {path} ({exc})") from None


def machine_key() -> str:
    """What the timings depend on: CPU model, its int8-relevant flags, onnxruntime version."""
    host = host_cpu()
    flags = ",".join(sorted(flag for flag in host.features.flags if flag in INT8_FEATURES))
    return f"{host.features.arch} {host.name} [{flags}] onnxruntime {ort.__version__}"


def default_profile_path(machine: str) -> Path:
    """Per-machine cache file: $ONNXQ_CACHE_DIR, else $XDG_CACHE_HOME/onnxq, else ~/.cache/onnxq."""
    root = os.environ.get("ONNXQ_CACHE_DIR")
    if root is None:
        root = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxq")
    digest = hashlib.sha256(machine.encode()).hexdigest()[:16]
    return Path(root) / f"speed-profile-{digest}.json"


def layer_kind(node: gs.Node) -> str:
    """Layers of one kind share int8 kernels, so they are timed and decided together."""
    if node.op != "Conv":
        return node.op
    weight = constant_values(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    kernel = "x".join(str(d) for d in weight.shape[2:])
    if group > 1 and weight.shape[1] == 1:
        return f"Conv depthwise {kernel}"
    return f"Conv grouped {kernel}" if group > 1 else f"Conv {kernel}"


def guarded_nodes(graph: gs.Graph, placement: Placement, pinned: frozenset[str] = frozenset()) -> list[gs.Node]:
    """int8 Conv/MatMul/Gemm nodes with a constant weight that no recipe pins: what the guard may keep float."""
    int8 = {d.name for d in placement.nodes if d.status == NodeStatus.INT8}
    return [node for node in graph.nodes
            if node.op in HEAVY_OPS and node_label(node) in int8 and node_label(node) not in pinned
            and len(node.inputs) > 1 and is_constant(node.inputs[1])]


def guard_groups(nodes: list[gs.Node]) -> dict[str, list[str]]:
    """Guarded nodes by kind: what --speed-guard measure times together."""
    groups: dict[str, list[str]] = {}
    for node in nodes:
        groups.setdefault(layer_kind(node), []).append(node_label(node))
    return dict(sorted(groups.items()))


def table_guard(nodes: list[gs.Node], shapes: dict[str, tuple[int | None, ...]], target: TargetCpu,
                table: SpeedTable | None = None) -> GuardResult:
    """Decide every guarded node from the decision table's row for the target CPU class (no timing)."""
    table = table or shipped_table()
    row_class, note = table.row_class_for(target.cpu_class)
    measured = table.classes.get(row_class, {})
    result = GuardResult(mode="table", source=f"onnxq's speed table, {row_class} rows ({_describe(measured)})")
    if note:
        result.notes.append(f"speed guard: {note}")
    unknown, unmeasured = 0, set()
    for node in nodes:
        layer = layer_class(node, shapes)
        if layer is None:
            continue
        unknown += layer.size == "?"
        decision = table.decide(row_class, layer)
        if decision is None:
            unmeasured.add(layer.kind)
            continue
        result.layers.append({"node": node_label(node), **decision.to_dict()})
        if decision.precision == NodeStatus.FLOAT:
            result.keep_float[node_label(node)] = (
                f"speed guard ({row_class} table, {decision.row_key}): a model took {decision.row.float_ms:.3f} ms "
                f"with such a layer in float, {decision.row.int8_ms:.3f} ms in int8")
    if unmeasured:
        result.notes.append(f"speed guard: the {row_class} table has no rows for {', '.join(sorted(unmeasured))}; "
                             "those layers stay int8")
    if unknown:
        result.notes.append(f"speed guard: {unknown} layers have no known output size (dynamic shapes and no "
                            "sample to fix them); their table rows are the middle size of their kind")
    return result


def _describe(measured: dict) -> str:
    parts = [measured.get("measured_on"), measured.get("kernels"), measured.get("onnxruntime") and
             f"onnxruntime {measured['onnxruntime']}"]
    return ", ".join(p for p in parts if p) or "source not recorded"


def compare_latency(current: onnx.ModelProto, trial: onnx.ModelProto, feed: dict[str, np.ndarray],
                    threads: int = 1) -> tuple[float, float]:
    """Median batch-1 latency (ms) of both models, runs interleaved so machine noise hits both alike."""
    with tempfile.TemporaryDirectory(prefix="onnxq-guard-") as tmp:
        sessions = [session_for(m, Path(tmp), threads, spin=True) for m in (current, trial)]
        samples = interleaved_runs(sessions, feed, min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS,
                                   budget_s=ROUND_BUDGET_S)
    current_ms, trial_ms = (round(float(np.median(s)) * 1e3, 4) for s in samples)
    return current_ms, trial_ms


@dataclass
class GuardResult:
    mode: str = "measure"  # "table" or "measure"
    source: str = ""  # where the decisions came from: the table's rows, or the timing profile
    keep_float: dict[str, str] = field(default_factory=dict)  # node name -> why
    layers: list[dict] = field(default_factory=list)  # table: one row per guarded layer
    trials: list[dict] = field(default_factory=list)  # measure: one row per kind of layer
    timed_now: int = 0  # measure: trials timed in this run (the rest came from the profile)
    notes: list[str] = field(default_factory=list)

    def to_report(self) -> dict:
        report = {"enabled": True, "mode": self.mode, "source": self.source,
                  "kept_float": dict(sorted(self.keep_float.items()))}
        if self.mode == SpeedGuard.TABLE:
            report["layers"] = self.layers
        else:
            report.update(trials=self.trials, trials_timed_now=self.timed_now)
        return report


def run_speed_guard(
    groups: dict[str, list[str]],
    build: Callable[[frozenset[str]], onnx.ModelProto],
    feed: dict[str, np.ndarray],
    profile_path: Path,
    model_key: str,
    progress: ProgressFactory = no_progress,
    *,
    pinned: bool = False,
    compare: Callable[[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]], tuple[float, float]] = compare_latency,
) -> GuardResult:
    """Keep each kind of layer in float where the whole model runs faster that way.

    `build(float_nodes)` writes the int8 model with those nodes kept float. Kinds are tried
    in turn against the best model so far; a kind goes float only when the model with it in
    float takes at most FLOAT_MIN_GAIN of the time with it in int8. `model_key` names the
    model and settings in the profile; `pinned`: the user named the profile file, so
    failing to write it is an error rather than a cache miss. `compare(current, trial, feed)`
    returns both latencies in ms (tests pass a fake).
    """
    profile = SpeedProfile.load(profile_path, machine_key())
    result = GuardResult(mode="measure", source=f"{'pinned' if pinned else 'cached'} timing profile {profile_path} "
                                                f"({profile.machine})")
    kept_float: set[str] = set()
    current: onnx.ModelProto | None = None
    bar = progress(len(groups), "speed guard")
    try:
        for kind, nodes in groups.items():
            key = json.dumps([model_key, kind, sorted(kept_float)])
            if key not in profile.timings:
                current = current if current is not None else build(frozenset(kept_float))
                trial = build(frozenset(kept_float | set(nodes)))
                int8_ms, float_ms = compare(current, trial, feed)
                profile.timings[key] = LayerTiming(float_ms=float_ms, int8_ms=int8_ms)
                result.timed_now += 1
            timing = profile.timings[key]
            decision = "float" if timing.float_is_faster else "int8"
            why = (f"model {timing.int8_ms:.2f} ms with these {len(nodes)} layers in int8, "
                   f"{timing.float_ms:.2f} ms in float")
            result.trials.append({"kind": kind, "layers": len(nodes), "decision": decision,
                                  "int8_ms": timing.int8_ms, "float_ms": timing.float_ms})
            if decision == NodeStatus.FLOAT:
                kept_float.update(nodes)
                current = None
                result.keep_float.update({n: f"speed guard ({kind}): float is faster on this CPU; {why}"
                                          for n in nodes})
            bar.update(1)
    finally:
        bar.close()
    if result.timed_now:
        if pinned:
            profile.save(profile_path)
        else:
            _save_quietly(profile, profile_path)
    return result


def _save_quietly(profile: SpeedProfile, path: Path) -> None:
    """A cache that cannot be written only costs time next run; never fail the quantization for it."""
    with contextlib.suppress(OutputError, OSError):
        profile.save(path)
