"""Fusion check (what onnxruntime runs in int8) and `onnxq inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from conftest import IMAGE, make_model, quantize_simple, save, tensor, weight
from onnx import TensorProto, helper

from onnxq.cli import main
from onnxq.runtime.fusion import check_fusion


def badly_placed_qdq_model() -> onnx.ModelProto:
    """Two things onnxruntime cannot fuse: a Conv with int8 weights but no QuantizeLinear after it
    (it runs in float), and a Q/DQ pair between the graph input and a float-only op."""
    rng = np.random.default_rng(0)
    w = weight(rng, (8, 3, 3, 3))
    scale = np.abs(w).reshape(8, -1).max(axis=1) / 127
    wq = np.round(w / scale[:, None, None, None]).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0, name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1], name="conv_in_float"),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq2"], name="q_x2"),
        helper.make_node("DequantizeLinear", ["xq2", "s", "z"], ["xd2"], name="dq_x2"),
        helper.make_node("Sin", ["xd2"], ["y2"], name="sin"),
    ]
    inits = {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8), "wq": wq,
             "ws": scale.astype(np.float32), "wz": np.zeros(8, np.int8)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, 8, 16, 16]), tensor("y2", IMAGE)], inits)


def test_quantized_conv_model_fuses_completely(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    result = quantize_simple(conv_model_path, tmp_path / "q.onnx", conv_calib)
    fusion = result.report["fusion"]
    assert fusion["int8_kernels"] == {"QLinearConv": 2}
    assert fusion["avoidable"] == 0 and fusion["dequantized_weights"] == [] and fusion["unfused_pairs"] == []
    assert "Conv" not in fusion["float_ops"]


def test_unfusable_placements_are_listed() -> None:
    report = check_fusion(badly_placed_qdq_model())
    assert report.int8_kernels == {}
    assert [(d["weight"], d["op"]) for d in report.dequantized_weights] == [("wq", "Conv")]
    # onnxruntime merges the two identical QuantizeLinear nodes: one pair, read by both float ops
    assert report.unfused_pairs == [{"tensor": "x", "producer": "input", "consumers": ["Conv", "Sin"]}]
    assert report.avoidable == 2


def test_inspect_float_model(conv_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(conv_model_path), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["quantized"] is False and info["op_types"] == {"Conv": 2, "Relu": 1}
    assert info["quantizable"]["heavy_ops_int8"] == 2
    assert info["inputs"] == [{"name": "x", "type": "float", "shape": list(IMAGE)}]
    text = CliRunner().invoke(main, ["inspect", str(conv_model_path)]).stdout
    assert "2 Conv/MatMul/Gemm would run in int8" in text


def test_inspect_int8_model_shows_fusion(tmp_path: Path) -> None:
    path = save(badly_placed_qdq_model(), tmp_path / "bad.onnx")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.stderr
    assert "avoidable unfused: 2" in result.stdout
    assert "float Conv conv_in_float reads int8 weight wq" in result.stdout
    info = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).stdout)
    assert info["quantized"] is True and info["fusion"]["avoidable"] == 2


def test_inspect_bad_model_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "onnxq: error:" in result.stderr


def test_inspect_reports_integer_output_dtype(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    quantize_simple(conv_model_path, tmp_path / "q.onnx", conv_calib)
    info = json.loads(CliRunner().invoke(main, ["inspect", str(tmp_path / "q.onnx"), "--json"]).stdout)
    assert info["quantized"] is True
    assert info["op_types"]["QuantizeLinear"] >= 2 and info["fusion"]["int8_kernels"] == {"QLinearConv": 2}
    assert info["outputs"][0]["type"] == onnx.TensorProto.DataType.Name(TensorProto.FLOAT).lower()
