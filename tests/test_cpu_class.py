"""CPU classes, --target-cpu presets and the speed guard's shipped decision table.

Nothing here reads the host's CPU: the class is forced (ONNXQ_HOST_CPU) or named (--target-cpu),
and the table decisions come from a table the test writes, or from the shipped one where the test
only checks what holds for any measured table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import bias, image_batch, make_model, quantize_simple, save, tensor, weight, write_npz_folder
from onnx import helper

from onnxq.cli import main
from onnxq.cpu import CPU_CLASSES, PRESETS, host_cpu, resolve_target
from onnxq.cpu import cpu_class as classify
from onnxq.errors import UsageError
from onnxq.quant.ir import concrete_shapes, import_graph
from onnxq.search import speed_guard
from onnxq.search.speed_table import (
    CONV_KINDS,
    FLOAT_MIN_GAIN,
    LayerClass,
    Row,
    SpeedTable,
    bucket_edges,
    bucket_values,
    layer_class,
    shipped_table,
)

C = 16


def separable_model(seed: int = 5) -> onnx.ModelProto:
    """1x1 conv -> Relu -> depthwise 3x3 -> Relu -> 1x1 conv -> Relu -> 1x1 conv (8x8 pixels, 16 channels)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pw1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], pads=[1, 1, 1, 1], group=C, name="dw"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="pw2"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="pw3")]
    inits = {"w1": weight(rng, (C, 3, 1, 1)), "b1": bias(rng, C), "wd": weight(rng, (C, 1, 3, 3)),
             "bd": bias(rng, C), "w3": weight(rng, (C, C, 1, 1)), "b3": bias(rng, C),
             "w4": weight(rng, (C, C, 1, 1)), "b4": bias(rng, C)}
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, C, 8, 8])], inits)


@pytest.fixture
def separable(tmp_path: Path) -> tuple[Path, Path]:
    model = save(separable_model(), tmp_path / "sep.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng, (1, 3, 8, 8))}, 8)
    return model, calib


def table_with(rows: dict[str, dict[str, Row]]) -> SpeedTable:
    return SpeedTable({cls: {"measured_on": "a test", "kernels": "made up"} for cls in rows}, rows)


FAST_INT8 = Row(int8_ms=1.0, float_ms=2.0, fp32_ms=2.0)
FAST_FLOAT = Row(int8_ms=1.0, float_ms=0.8, fp32_ms=0.7)


# ---------------------------------------------------------------- classes and presets


@pytest.mark.parametrize("name", CPU_CLASSES)
def test_each_preset_is_its_own_class(name: str) -> None:
    assert classify(PRESETS[name]) == (name, "")
    target = resolve_target(name)
    assert target.cpu_class == name and target.source == f"--target-cpu {name}"


def test_the_host_class_is_forced_by_the_environment(monkeypatch: pytest.MonkeyPatch, cpu_class: str) -> None:
    host = host_cpu()
    assert host.cpu_class == cpu_class and "forced by ONNXQ_HOST_CPU" in host.source
    assert resolve_target(None) == host == resolve_target("host")
    monkeypatch.setenv("ONNXQ_HOST_CPU", "pentium")
    with pytest.raises(UsageError, match="ONNXQ_HOST_CPU"):
        host_cpu()


@pytest.mark.parametrize(("preset", "weight_range"), [("avx2", "reduced"), ("avx512-vnni", "full"), ("amx", "full"),
                                                      ("arm64", "full")])
@pytest.mark.usefixtures("cpu_class")
def test_target_cpu_preset_sets_weight_range_and_is_reported(tmp_path: Path, separable, preset: str,
                                                              weight_range: str) -> None:
    model, calib = separable
    result = quantize_simple(model, tmp_path / "q.onnx", calib, target_cpu=preset)
    assert result.report["settings"]["weight_range"] == weight_range
    target = result.report["target_cpu"]
    assert target["class"] == preset and target["source"] == f"--target-cpu {preset}"
    assert preset in result.report["settings"]["weight_range_reason"]


def test_default_target_is_the_host_class(tmp_path: Path, separable, cpu_class: str) -> None:
    model, calib = separable
    result = quantize_simple(model, tmp_path / "q.onnx", calib)
    assert result.report["target_cpu"]["class"] == cpu_class
    assert result.report["settings"]["weight_range"] == ("reduced" if cpu_class == "avx2" else "full")


@pytest.mark.parametrize("args", [
    ["--target-cpu", "pentium"],
    ["--speed-profile", "p.json"],
    ["--speed-guard", "measure", "--target-cpu", "amx"],
    ["--no-speed-guard", "--speed-guard", "table"],
])
def test_contradicting_cpu_options_exit_2(tmp_path: Path, separable, args: list[str]) -> None:
    model, calib = separable
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                       *args])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("onnxq: error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- layer classes and table lookups


def test_layer_classes_use_the_sample_shapes() -> None:
    model = separable_model()
    shapes = concrete_shapes(model, {"x": (1, 3, 8, 8)})
    classes = {n.name: layer_class(n, shapes) for n in import_graph(model).nodes if n.op == "Conv"}
    assert classes["dw"] == LayerClass("conv-dw3", "<=24", "<=64")
    assert classes["pw2"] == LayerClass("conv-1x1", "<=24", "<=64")
    unknown = layer_class(next(n for n in import_graph(model).nodes if n.name == "dw"), {})
    assert unknown == LayerClass("conv-dw3", "<=24", "?")


@pytest.mark.parametrize(("float_ms", "decision"), [(10.0 * FLOAT_MIN_GAIN, "float"),
                                                    (10.0 * FLOAT_MIN_GAIN + 0.01, "int8")])
def test_a_tie_stays_int8(float_ms: float, decision: str) -> None:
    table = table_with({"avx2": {"conv-dw3 c<=24 n<=64": Row(10.0, float_ms, 9.0)}})
    assert table.decide("avx2", LayerClass("conv-dw3", "<=24", "<=64")).precision == decision


def test_missing_rows_fall_back_to_the_nearest_bucket_and_class() -> None:
    table = table_with({"avx2": {"conv-dw3 c<=96 n<=1024": FAST_FLOAT, "conv-dw3 c>384 n<=64": FAST_INT8}})
    decision = table.decide("avx2", LayerClass("conv-dw3", "<=96", "<=64"))
    assert decision.row_key == "conv-dw3 c<=96 n<=1024" and decision.precision == "float"
    assert table.decide("avx2", LayerClass("conv-dw3", "<=24", "?")).row_key == "conv-dw3 c<=96 n<=1024"
    assert table.row_class_for("avx2") == ("avx2", "")
    row_class, note = table.row_class_for("amx")
    assert row_class == "avx2" and "no measured rows for amx" in note


@pytest.mark.speed_guard
def test_table_guard_keeps_float_what_its_row_says(tmp_path: Path, separable, monkeypatch: pytest.MonkeyPatch,
                                                   cpu_class: str) -> None:
    model, calib = separable
    rows = {"conv-dw3 c<=24 n<=64": FAST_FLOAT, "conv-1x1 c<=24 n<=64": FAST_INT8}
    monkeypatch.setattr(speed_guard, "shipped_table", lambda: table_with({cpu_class: rows}))
    result = quantize_simple(model, tmp_path / "q.onnx", calib)
    statuses = {n.name: (n.status, n.reason) for n in result.plan.nodes}
    assert statuses["dw"][0] == "float" and statuses["dw"][1].startswith(f"speed guard ({cpu_class} table, conv-dw3")
    assert {statuses[n][0] for n in ("pw1", "pw2", "pw3")} == {"int8"}
    guard = result.report["speed_guard"]
    assert guard["mode"] == "table" and set(guard["kept_float"]) == {"dw"}
    assert {layer["node"]: layer["decision"] for layer in guard["layers"]} == {
        "pw1": "int8", "dw": "float", "pw2": "int8", "pw3": "int8"}
    assert result.report["target_cpu"]["speed_decisions"].startswith(f"table: onnxq's speed table, {cpu_class} rows")
    dw = next(row for row in result.report["fusion"]["precision"] if row["node"] == "dw")
    assert set(dw["executed"].values()) == {"float"}  # kept float really runs in float


@pytest.mark.speed_guard
def test_class_without_rows_decides_from_the_nearest_and_says_so(tmp_path: Path, separable,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = separable
    monkeypatch.setattr(speed_guard, "shipped_table",
                        lambda: table_with({"avx2": {"conv-dw3 c<=24 n<=64": FAST_FLOAT}}))
    result = quantize_simple(model, tmp_path / "q.onnx", calib, target_cpu="arm64")
    assert any("no measured rows for arm64" in note for note in result.report["notes"])
    assert set(result.report["speed_guard"]["kept_float"]) == {"dw"}


# ---------------------------------------------------------------- the shipped table


def test_shipped_table_is_complete_and_says_where_it_comes_from() -> None:
    table = shipped_table()
    assert table.rows, "the package ships no measured rows"
    for measured, rows in table.rows.items():
        info = table.classes[measured]
        assert info["measured_on"] and info["kernels"] and info["onnxruntime"] and info["command"]
        for kind in (*CONV_KINDS, "matmul", "gemm"):
            assert any(key.startswith(f"{kind} ") for key in rows), f"{measured} has no {kind} row"
            channel_buckets, size_buckets = bucket_edges(kind)
            for channels, _ in bucket_values(channel_buckets):
                for size, _ in [*bucket_values(size_buckets), ("?", 0)]:
                    decision = table.decide(measured, LayerClass(kind, channels, size))
                    assert decision.precision in ("int8", "float") and decision.row.int8_ms > 0
    for cls in CPU_CLASSES:
        assert table.row_class_for(cls)[0] in table.rows


@pytest.mark.speed_guard
def test_same_target_class_gives_the_same_bytes_on_any_host(tmp_path: Path, separable,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The default guard decides from the shipped table: the host's class and timing do not matter."""
    model, calib = separable
    outputs = []
    for host in ("avx2", "amx"):
        monkeypatch.setenv("ONNXQ_HOST_CPU", host)
        outputs.append(tmp_path / f"{host}.onnx")
        result = quantize_simple(model, outputs[-1], calib, target_cpu="avx512-vnni")
        assert result.report["speed_guard"]["mode"] == "table"
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_doctor_names_the_class_and_the_table_rows(cpu_class: str) -> None:
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["cpu_class"] == cpu_class and "ONNXQ_HOST_CPU" in info["source"]
    assert info["speed_table_rows"] in shipped_table().rows
