"""--mode dynamic and --mode weight-only: output ops and numerics against numpy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxq import qmath
from onnxq.cli import main
from onnxq.dynamic import WeightOnlyOptions, pack_int4, quantize_columns, rewrite_weight_only, unpack_int4
from onnxq.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.plan import QuantSettings
from tests.conftest import cosine, run, save, tensor, write_npz_folder

K, N = 40, 24


def matmul_model(k: int = K, n: int = N, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    w = (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [tensor("x", [2, k])], [tensor("y", [2, n])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), w


def if_matmul_model(seed: int = 1) -> onnx.ModelProto:
    """Both branches of an If hold a MatMul whose weight lives in the outer graph (as exporters write it)."""
    rng = np.random.default_rng(seed)
    w1, w2 = ((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32) for _ in range(2))
    branch = [helper.make_graph([helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"mm_{name}")],
                                f"branch_{name}", [], [tensor(f"y_{name}", [2, N])]) for name in ("w1", "w2")]
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch[0], else_branch=branch[1], name="if")
    graph = helper.make_graph([node], "g", [tensor("cond", [], TensorProto.BOOL), tensor("x", [2, K])],
                              [tensor("y", [2, N])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def dynamic_reference(x: np.ndarray, w: np.ndarray, qtype: qmath.QType) -> np.ndarray:
    """DynamicQuantizeLinear on x (uint8, from its own min/max), int8 weights per column, exact product."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    xq = np.clip(np.round(x / scale) + zero, 0, 255)
    wq, wscale = quantize_columns(w, qtype, per_channel=True)
    return ((xq - zero) @ wq.astype(np.float64)) * scale * wscale.astype(np.float64)


def quantize_mode(tmp_path: Path, model: onnx.ModelProto, mode: str, **kwargs):
    path = save(model, tmp_path / "m.onnx")
    request = QuantizeRequest(model=path, output=tmp_path / "q.onnx", mode=mode, data=DataOptions(), **kwargs)
    return quantize(request), onnx.load(str(tmp_path / "q.onnx"))


def test_dynamic_matmul_matches_numpy(tmp_path: Path) -> None:
    """Exact against numpy with this CPU's weight range (full-range weights saturate on x86 without VNNI:
    there this very test, run with --weight-range full, shows two columns off by up to 47 %)."""
    model, w = matmul_model()
    result, written = quantize_mode(tmp_path, model, "dynamic")
    assert [n.op_type for n in written.graph.node] == ["DynamicQuantizeMatMul"]
    settings = result.report["settings"]
    assert settings["mode"] == "dynamic"
    qtype = QuantSettings(weight_range=settings["weight_range"]).weight_qtype
    x = np.random.default_rng(3).standard_normal((2, K)).astype(np.float32)
    got = run(tmp_path / "q.onnx", {"x": x})[0]
    np.testing.assert_allclose(got, dynamic_reference(x, w, qtype), rtol=1e-4, atol=1e-4)
    assert np.abs(got - x @ w).max() < 0.05 * np.abs(x @ w).max()


def test_dynamic_reaches_into_if_branches(tmp_path: Path) -> None:
    model = if_matmul_model()
    result, written = quantize_mode(tmp_path, model, "dynamic")
    branches = [a.g for a in written.graph.node[0].attribute]
    assert [n.op_type for g in branches for n in g.node] == ["DynamicQuantizeMatMul"] * 2
    assert {o.domain for o in written.opset_import} >= {"", "com.microsoft"}
    x = np.random.default_rng(4).standard_normal((2, K)).astype(np.float32)
    for cond in (True, False):
        feed = {"cond": np.array(cond), "x": x}
        assert cosine(run(tmp_path / "q.onnx", feed)[0], run(tmp_path / "m.onnx", feed)[0]) > 0.999
    assert result.report["nodes"]["by_op_type"] == {"MatMul": {"int8": 2}}


def test_dynamic_leaves_conv_float_and_says_so(tmp_path: Path, conv_model_path: Path) -> None:
    result = CliRunner().invoke(main, ["quantize", str(conv_model_path), "-o", str(tmp_path / "q.onnx"),
                                       "--mode", "dynamic"])
    assert result.exit_code == 3
    assert "nothing to quantize in --mode dynamic" in result.stderr and "no dynamic int8 kernel" in result.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_weight_only_int8_conv(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    result = CliRunner().invoke(main, ["quantize", str(conv_model_path), "-o", str(tmp_path / "q.onnx"), "--mode",
                                       "weight-only", "--eval-data", str(conv_calib), "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["nodes"]["by_op_type"] == {"Conv": {"int8": 2}}
    assert report["settings"]["weight_range"] == "full"  # float compute: nothing saturates
    assert report["fusion"]["avoidable"] == 0 and len(report["fusion"]["expected_dequantized_weights"]) == 2
    assert report["fidelity"]["outputs"][0]["cosine"] > 0.999
    written = onnx.load(str(tmp_path / "q.onnx"))
    assert sorted(t.data_type for t in written.graph.initializer if t.name.endswith("_quantized")) == [
        TensorProto.INT8] * 2
    assert report["size"]["ratio"] > 2.0


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matmulnbits_matches_numpy(tmp_path: Path, block_size: int, symmetric: bool) -> None:
    model, w = matmul_model(k=70)  # K not a multiple of any block size: the last block is padded
    written, decisions = rewrite_weight_only(model, WeightOnlyOptions(bits=4, block_size=block_size,
                                                                      symmetric=symmetric), qmath.INT8)
    assert [d.status for d in decisions] == ["int4"]
    node = written.graph.node[0]
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    assert len(node.input) == (3 if symmetric else 4)
    x = np.random.default_rng(5).standard_normal((2, 70)).astype(np.float32)
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    packed, scales, zeros = pack_int4(w, block_size, symmetric)
    dequantized = unpack_int4(packed, scales, zeros, 70)
    np.testing.assert_allclose(got, x @ dequantized, rtol=1e-4, atol=1e-5)
    # 4-bit rounding: every weight within half a step of its block's scale
    step = np.repeat(scales.reshape(N, -1), block_size, axis=1)[:, :70].T
    assert np.all(np.abs(dequantized - w) <= step / 2 + 1e-6)


def test_int4_cli_reports_size_and_rejects_bad_block(tmp_path: Path) -> None:
    model, _ = matmul_model(k=256, n=128)
    path = save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--mode", "weight-only",
                                       "--weight-bits", "4", "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["nodes"]["by_op_type"] == {"MatMul": {"int4": 1}} and report["size"]["ratio"] > 5
    bad = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "r.onnx"), "--mode", "weight-only",
                                    "--weight-bits", "4", "--block-size", "24"])
    assert bad.exit_code == 2 and "--block-size" in bad.stderr and not (tmp_path / "r.onnx").exists()


def test_calibration_options_rejected_without_calibration(tmp_path: Path) -> None:
    model, _ = matmul_model()
    path = save(model, tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": rng.standard_normal((2, K)).astype(np.float32)}, 2)
    result = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--mode", "dynamic",
                                       "--save-stats", str(tmp_path / "s.npz"), "--calib", str(calib)])
    assert result.exit_code == 2 and "needs no calibration" in result.stderr
