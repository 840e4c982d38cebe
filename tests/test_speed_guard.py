"""The speed guard: kinds of layer, decisions from timings, the per-machine profile, the report.

Decisions are tested with a fake timer (real timings depend on the machine); one test runs
the real timer and checks only what holds on any machine: every kind was timed and the
written model keeps float exactly what the guard decided.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import IMAGE, bias, image_batch, make_model, quantize_simple, save, tensor, weight, write_npz_folder
from onnx import helper

from onnxq.cli import main
from onnxq.commands import pipeline, static_flow
from onnxq.errors import DataError, ModelError
from onnxq.quant.ir import import_graph
from onnxq.search.speed_guard import FLOAT_MIN_GAIN, LayerTiming, SpeedProfile, layer_kind, run_speed_guard

pytestmark = pytest.mark.speed_guard

C = 8


def separable_model(seed: int = 11) -> onnx.ModelProto:
    """1x1 conv -> Relu -> depthwise 3x3 conv -> Relu -> 1x1 conv -> MatMul: four kinds of layer."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pw1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], pads=[1, 1, 1, 1], group=C, name="dw"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="pw2"),
        helper.make_node("MatMul", ["c3", "m"], ["y"], name="mm"),
    ]
    inits = {"w1": weight(rng, (C, 3, 1, 1)), "b1": bias(rng, C), "wd": weight(rng, (C, 1, 3, 3)),
             "bd": bias(rng, C), "w3": weight(rng, (C, C, 1, 1)), "b3": bias(rng, C),
             "m": weight(rng, (16, 16))}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, C, 16, 16])], inits)


@pytest.fixture
def separable(tmp_path: Path) -> tuple[Path, Path]:
    model = save(separable_model(), tmp_path / "sep.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 8)
    return model, calib


class FakeTimer:
    """Stands in for compare_latency: (int8 ms, float ms) per kind, by the nodes the trial keeps float."""

    def __init__(self, timings: dict[str, tuple[float, float]]) -> None:
        self.timings = timings
        self.calls: list[str] = []

    def __call__(self, current: onnx.ModelProto, trial: onnx.ModelProto, _feed: dict) -> tuple[float, float]:
        kind = self._kind_made_float(current, trial)
        self.calls.append(kind)
        return self.timings[kind]

    @staticmethod
    def _kind_made_float(current: onnx.ModelProto, trial: onnx.ModelProto) -> str:
        def quantized_weight_users(model: onnx.ModelProto) -> set[str]:
            graph = import_graph(model)
            return {n.name for n in graph.nodes if n.op in ("Conv", "MatMul")
                    and n.inputs[1].inputs and n.inputs[1].inputs[0].op == "DequantizeLinear"}

        made_float = quantized_weight_users(current) - quantized_weight_users(trial)
        graph = import_graph(trial)  # there the nodes made float hold their float weights again
        kinds = {layer_kind(n) for n in graph.nodes if n.name in made_float}
        assert len(kinds) == 1, kinds
        return kinds.pop()


def use_timer(monkeypatch: pytest.MonkeyPatch, timer: FakeTimer) -> None:
    monkeypatch.setattr(static_flow, "run_speed_guard", functools.partial(run_speed_guard, compare=timer))


def measured(model: Path, output: Path, calib: Path, **kwargs) -> pipeline.QuantizeResult:
    """quantize with --speed-guard measure (the timing path these tests fake)."""
    return quantize_simple(model, output, calib, speed_guard="measure", **kwargs)


def statuses(result: pipeline.QuantizeResult) -> dict[str, tuple[str, str]]:
    return {n.name: (n.status, n.reason) for n in result.plan.nodes}


def test_layer_kinds() -> None:
    graph = import_graph(separable_model())
    assert {n.name: layer_kind(n) for n in graph.nodes if n.op in ("Conv", "MatMul")} == {
        "pw1": "Conv 1x1", "dw": "Conv depthwise 3x3", "pw2": "Conv 1x1", "mm": "MatMul"}


def test_kind_where_float_is_faster_goes_float(tmp_path: Path, separable, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = separable
    timer = FakeTimer({"Conv 1x1": (10.0, 14.0), "Conv depthwise 3x3": (10.0, 9.0), "MatMul": (10.0, 10.0)})
    use_timer(monkeypatch, timer)
    result = measured(model, tmp_path / "q.onnx", calib)
    nodes = statuses(result)
    assert nodes["dw"][0] == "float" and nodes["dw"][1].startswith("speed guard (Conv depthwise 3x3)")
    assert nodes["pw1"][0] == nodes["pw2"][0] == "int8"
    assert nodes["mm"][0] == "int8"  # a tie stays int8
    guard = result.report["speed_guard"]
    assert [(t["kind"], t["decision"]) for t in guard["trials"]] == [
        ("Conv 1x1", "int8"), ("Conv depthwise 3x3", "float"), ("MatMul", "int8")]
    assert set(guard["kept_float"]) == {"dw"}
    written = onnx.load(str(tmp_path / "q.onnx"))
    dw = next(n for n in written.graph.node if n.name == "dw")
    assert not any(i.endswith("_dequantized") for i in dw.input[1:])  # float weights
    assert "kept 1 Conv depthwise 3x3 float" in pipeline_summary(result)


def pipeline_summary(result: pipeline.QuantizeResult) -> str:
    from onnxq.commands.report import format_summary

    return format_summary(result.report)


@pytest.mark.parametrize(("float_ms", "decision"), [(10.0 * FLOAT_MIN_GAIN, "float"), (10.0 * FLOAT_MIN_GAIN + 0.01,
                                                                                       "int8")])
def test_threshold(float_ms: float, decision: str) -> None:
    timing = LayerTiming(float_ms=float_ms, int8_ms=10.0)
    assert ("float" if timing.float_is_faster else "int8") == decision


def test_profile_is_reused_and_output_is_identical(tmp_path: Path, separable,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = separable
    timer = FakeTimer({"Conv 1x1": (10.0, 14.0), "Conv depthwise 3x3": (10.0, 8.0), "MatMul": (10.0, 12.0)})
    use_timer(monkeypatch, timer)
    first = measured(model, tmp_path / "a.onnx", calib, weight_range="reduced")
    assert len(timer.calls) == 3 and first.report["speed_guard"]["trials_timed_now"] == 3
    second = measured(model, tmp_path / "b.onnx", calib, weight_range="reduced")
    assert len(timer.calls) == 3 and second.report["speed_guard"]["trials_timed_now"] == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # Another setting is another key: it is timed anew.
    measured(model, tmp_path / "c.onnx", calib, weight_range="full")
    assert len(timer.calls) == 6


def test_pinned_profile_is_written_and_read(tmp_path: Path, separable, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = separable
    profile = tmp_path / "ci" / "speed.json"
    timer = FakeTimer({"Conv 1x1": (10.0, 14.0), "Conv depthwise 3x3": (10.0, 8.0), "MatMul": (10.0, 12.0)})
    use_timer(monkeypatch, timer)
    measured(model, tmp_path / "a.onnx", calib, speed_profile=profile)
    body = json.loads(profile.read_text())
    assert body["format"] == "onnxq-speed-profile/1" and len(body["timings"]) == 3
    loaded = SpeedProfile.load(profile, "any")
    assert sorted((t.int8_ms, t.float_ms) for t in loaded.timings.values()) == [(10.0, 8.0), (10.0, 12.0),
                                                                               (10.0, 14.0)]
    # A pinned profile decides without timing, even with another cache folder.
    monkeypatch.setenv("ONNXQ_CACHE_DIR", str(tmp_path / "elsewhere"))
    result = measured(model, tmp_path / "b.onnx", calib, speed_profile=profile)
    assert len(timer.calls) == 3 and set(result.report["speed_guard"]["kept_float"]) == {"dw"}


def test_bad_profile_is_a_data_error(tmp_path: Path, separable) -> None:
    model, calib = separable
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not an onnxq speed profile"):
        measured(model, tmp_path / "q.onnx", calib, speed_profile=bad)
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                       "--speed-guard", "measure", "--speed-profile", str(bad)])
    assert result.exit_code == 4 and "not an onnxq speed profile" in result.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_everything_float_says_how_to_force_int8(tmp_path: Path, separable, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = separable
    use_timer(monkeypatch, FakeTimer({"Conv 1x1": (10.0, 5.0), "Conv depthwise 3x3": (10.0, 5.0),
                                      "MatMul": (10.0, 5.0)}))
    with pytest.raises(ModelError, match=r"nothing to quantize.*--speed-guard off"):
        measured(model, tmp_path / "q.onnx", calib)
    assert not (tmp_path / "q.onnx").exists()


def test_no_speed_guard_times_nothing(tmp_path: Path, separable, monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = separable
    timer = FakeTimer({})
    use_timer(monkeypatch, timer)
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                       "--no-speed-guard", "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["speed_guard"] == {"enabled": False}
    assert timer.calls == []


def test_real_timing_keeps_float_exactly_what_it_decided(tmp_path: Path, separable) -> None:
    model, calib = separable
    try:
        result = measured(model, tmp_path / "q.onnx", calib)
    except ModelError as exc:  # this tiny model may well be faster in float everywhere: then say so, write nothing
        assert "speed guard" in exc.message and "--speed-guard off" in exc.message
        assert not (tmp_path / "q.onnx").exists()
        return
    guard = result.report["speed_guard"]
    assert [t["kind"] for t in guard["trials"]] == ["Conv 1x1", "Conv depthwise 3x3", "MatMul"]
    for trial in guard["trials"]:
        assert trial["int8_ms"] > 0 and trial["float_ms"] > 0
        assert (trial["decision"] == "float") == (trial["float_ms"] <= FLOAT_MIN_GAIN * trial["int8_ms"])
    float_by_guard = {n for n, (status, reason) in statuses(result).items()
                      if status == "float" and reason.startswith("speed guard")}
    assert float_by_guard == set(guard["kept_float"])
    assert guard["mode"] == "measure" and "timing profile" in guard["source"]
