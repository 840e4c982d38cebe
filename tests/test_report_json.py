"""quantize, convert and qat-prep write one report shape: the keys every report has (onnxq.commands.report's
report_core) mean the same and have the same shape in each, whatever the command adds of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import conv_relu_model, image_batch, quantize_simple, save, write_npz_folder

from onnxq.commands.convert import ConvertRequest, convert
from onnxq.commands.pipeline import DataOptions, QuantizeRequest
from onnxq.commands.qat_prep import qat_prep
from onnxq.commands.report import format_summary

SHARED = {"onnxq_version", "command", "model", "output", "settings", "data", "nodes", "quantized_nodes",
          "float_nodes", "tensors", "size", "fidelity", "fusion", "notes", "timings_s"}
OLD_KEYS = {"kept_float", "int8_nodes", "weight_range_reason", "calibration", "format", "activations"}
SETTINGS = {"method", "percentile", "symmetric", "per_channel", "weight_range", "weight_range_reason", "format"}


@pytest.fixture
def reports(tmp_path: Path) -> dict[str, dict]:
    """One report per command, on the same small conv model: quantize and qat-prep it, convert the fake-quant
    model qat-prep wrote."""
    source = save(conv_relu_model(), tmp_path / "fp32.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 8)
    prep = qat_prep(QuantizeRequest(model=source, output=tmp_path / "fq.onnx", data=DataOptions(calib=calib)))
    converted = convert(ConvertRequest(model=tmp_path / "fq.onnx", output=tmp_path / "rt.onnx",
                                       data=DataOptions(eval_data=calib)))
    direct = quantize_simple(source, tmp_path / "q.onnx", calib, speed_guard="off")
    return {"quantize": direct.report, "convert": converted.report, "qat-prep": prep.report}


def keys(value: object, depth: int) -> object:
    """The shape of a report section: its keys, `depth` dicts deep (through the first item of lists); below
    that, what a value holds depends on the model and data."""
    if not depth:
        return None
    if isinstance(value, list):
        return [keys(value[0], depth)] if value else []
    return {k: keys(v, depth - 1) for k, v in value.items()} if isinstance(value, dict) else None


def test_every_command_writes_the_shared_keys_in_one_shape(reports: dict[str, dict]) -> None:
    for command, report in reports.items():
        assert report["command"] == command
        assert set(report) >= SHARED, (command, SHARED - set(report))
        assert not OLD_KEYS & set(report), (command, OLD_KEYS & set(report))
        assert set(report["settings"]) >= SETTINGS, command
        assert isinstance(report["settings"]["weight_range_reason"], str) and report["settings"]["weight_range_reason"]
    depths = {"nodes": 1, "size": 1, "fidelity": 2, "fusion": 1, "data": 1, "float_nodes": 1, "quantized_nodes": 1}
    shapes = {command: {key: keys(report[key], depth) for key, depth in depths.items()}
              for command, report in reports.items()}
    assert shapes["convert"] == shapes["quantize"] == shapes["qat-prep"]
    evaluated = {command: keys(report["data"]["evaluation"], 1) for command, report in reports.items()}
    assert evaluated["convert"] == evaluated["quantize"] == evaluated["qat-prep"] is not None
    for report in reports.values():
        nodes = report["nodes"]
        assert set(nodes) == {"total", "quantized", "float", "by_status", "by_op_type"}
        assert nodes["quantized"] + nodes["float"] == nodes["total"] == sum(nodes["by_status"].values())
        assert set(report["data"]) == {"calibration", "statistics_file", "evaluation", "batch_size"}
        assert set(report["size"]) == {"input_bytes", "output_bytes", "ratio"}
        assert all(set(row) == {"name", "op_type", "status"} for row in report["quantized_nodes"])
        assert all({"name", "role", "qtype", "axis"} <= set(row) for row in report["tensors"])
        assert isinstance(report["notes"], list) and report["timings_s"]


def test_float_nodes_have_one_entry_shape(tmp_path: Path) -> None:
    """A node convert keeps float (its input tensor has no learned parameters) is listed as quantize lists one
    --exclude keeps float."""
    source = save(conv_relu_model(), tmp_path / "fp32.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 8)
    excluded = quantize_simple(source, tmp_path / "q.onnx", calib, speed_guard="off", exclude=("conv1",))
    prep = qat_prep(QuantizeRequest(model=source, output=tmp_path / "fq.onnx", data=DataOptions(calib=calib),
                                    exclude=("conv1",)))
    converted = convert(ConvertRequest(model=tmp_path / "fq.onnx", output=tmp_path / "rt.onnx"))
    for report in (excluded.report, prep.report, converted.report):
        rows = {row["name"]: row for row in report["float_nodes"]}
        assert set(rows["conv1"]) == {"name", "op_type", "reason"} and rows["conv1"]["op_type"] == "Conv", report
    assert "1 nodes kept float" in format_summary(converted.report)


def test_one_summary_reads_every_report(reports: dict[str, dict]) -> None:
    for command, report in reports.items():
        summary = format_summary(report)
        assert "  nodes: 3 of 3 quantized" in summary and "  size: " in summary, (command, summary)
        assert "cosine" in summary and "  time: " in summary, (command, summary)


def test_a_per_tensor_collapse_is_noted() -> None:
    """The demo recogniser with --per-tensor answers as fp32 on 0 of 200 lines; the report says why."""
    from onnxq.commands.static_flow import _per_tensor_note
    from onnxq.quant.plan import QuantSettings
    from onnxq.runtime.evaluate import Fidelity

    def fidelity(agreement: float) -> Fidelity:
        task = {"kind": "class", "agreement": agreement, "decided_agreement": agreement}
        return Fidelity(samples=8, source="held", outputs=[{"name": "y", "cosine": 0.4, "sqnr_db": 0.0, "task": task}])

    per_tensor, per_channel = QuantSettings(per_channel=False), QuantSettings(per_channel=True)
    assert "--per-tensor" in _per_tensor_note(per_tensor, fidelity(0.1))[0]
    assert _per_tensor_note(per_tensor, fidelity(0.9)) == []
    assert _per_tensor_note(per_channel, fidelity(0.1)) == []
    assert _per_tensor_note(per_tensor, None) == []
