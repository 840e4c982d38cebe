"""--mode dynamic and --mode weight-only: output ops and numerics against numpy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import cosine, run, save, tensor, write_npz_folder
from onnx import TensorProto, helper, numpy_helper

from onnxq.cli import main
from onnxq.commands.dynamic import (
    WeightOnlyOptions,
    pack_int4,
    quantize_columns,
    rewrite_dynamic,
    rewrite_weight_only,
    unpack_int4,
)
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.quant import qmath
from onnxq.quant.plan import QuantSettings

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
def test_int4_matmulnbits_matches_numpy(block_size: int, symmetric: bool) -> None:
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
    # 4-bit rounding: every weight within half a step of its block's scale; symmetric blocks put their
    # largest magnitude at -8 steps, so values of the other sign beyond +7.5 steps clip, by at most one step
    step = np.abs(np.repeat(scales.reshape(N, -1), block_size, axis=1)[:, :70].T)
    limit = np.where(symmetric & (np.abs(w) > 7.5 * step), step, step / 2)
    assert np.all(np.abs(dequantized - w) <= limit + 1e-6)


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
    assert result.exit_code == 2 and "--save-stats" in result.stderr and "no calibration" in result.stderr


SEQ, BATCH, INPUT, HIDDEN = 5, 2, 8, 16


def lstm_model(seed: int = 5, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One forward LSTM (opset 13) with bias and initial states, its weights as initializers."""
    rng = np.random.default_rng(seed)
    params = {"W": rng.standard_normal((1, 4 * HIDDEN, INPUT)) / np.sqrt(INPUT),
              "R": rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) / np.sqrt(HIDDEN),
              "B": 0.1 * rng.standard_normal((1, 8 * HIDDEN))}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    node = helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "c0"], ["y", "y_h", "y_c"], name="lstm",
                            hidden_size=HIDDEN, **attrs)
    state = [1, BATCH, HIDDEN]
    graph = helper.make_graph([node], "g", [tensor("x", [SEQ, BATCH, INPUT]), tensor("h0", state),
                                            tensor("c0", state)],
                              [tensor("y", [SEQ, 1, BATCH, HIDDEN]), tensor("y_h", state), tensor("y_c", state)],
                              [numpy_helper.from_array(v, k) for k, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), params


def fake_dynamic_uint8(a: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeLinear (uint8 from the tensor's own min/max) keeps of `a`."""
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = (hi - lo) / 255.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(a / scale) + zero, 0, 255) - zero) * scale


def numpy_lstm(x: np.ndarray, w: np.ndarray, r: np.ndarray, b: np.ndarray, h: np.ndarray, c: np.ndarray,
               quantize_activations: bool = False) -> np.ndarray:
    """ONNX LSTM, one forward direction, default activations; gates in i, o, f, c order. Returns Y.

    quantize_activations: as onnxruntime's DynamicQuantizeLSTM (one thread) computes it: the whole
    input sequence quantized to uint8 at once (one GEMM for all steps), the hidden state at each step.
    """
    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v))

    x = x.astype(np.float64)
    if quantize_activations:
        x = fake_dynamic_uint8(x)
    bias = b[:4 * HIDDEN] + b[4 * HIDDEN:]
    outputs = []
    for xt in x:
        gates = xt @ w.T + (fake_dynamic_uint8(h) if quantize_activations else h) @ r.T + bias
        i, o, f, g = np.split(gates, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs)[:, None]


def test_dynamic_lstm_matches_numpy(tmp_path: Path) -> None:
    model, params = lstm_model()
    result, written = quantize_mode(tmp_path, model, "dynamic")
    node = written.graph.node[0]
    assert [n.op_type for n in written.graph.node] == ["DynamicQuantizeLSTM"] and node.domain == "com.microsoft"
    assert result.report["nodes"]["by_op_type"] == {"LSTM": {"int8": 1}}
    stored = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    w_q, r_q, w_scale, r_scale = (stored[node.input[i]] for i in (1, 2, 8, 10))
    assert w_q.dtype == np.int8 and w_q.shape == (1, INPUT, 4 * HIDDEN)  # transposed against ONNX LSTM
    assert r_q.shape == (1, HIDDEN, 4 * HIDDEN) and w_scale.shape == r_scale.shape == (1, 4 * HIDDEN)
    w_deq, r_deq = (w_q[0] * w_scale[0]).T, (r_q[0] * r_scale[0]).T  # back in ONNX LSTM layout
    assert np.all(np.abs(w_deq - params["W"][0]) <= w_scale[0][:, None] / 2 + 1e-7)
    rng = np.random.default_rng(6)
    feed = {"x": rng.standard_normal((SEQ, BATCH, INPUT)).astype(np.float32),
            "h0": 0.5 * rng.standard_normal((1, BATCH, HIDDEN)).astype(np.float32),
            "c0": 0.5 * rng.standard_normal((1, BATCH, HIDDEN)).astype(np.float32)}
    got, fp32 = run(tmp_path / "q.onnx", feed), run(tmp_path / "m.onnx", feed)
    state = (params["B"][0], feed["h0"][0], feed["c0"][0])
    np.testing.assert_allclose(fp32[0], numpy_lstm(feed["x"], params["W"][0], params["R"][0], *state), atol=1e-5)
    assert all(cosine(q, f) > 0.999 for q, f in zip(got, fp32, strict=True))
    assert np.abs(got[0] - numpy_lstm(feed["x"], w_deq, r_deq, *state)).max() < 0.02
    np.testing.assert_allclose(got[0], numpy_lstm(feed["x"], w_deq, r_deq, *state, quantize_activations=True),
                               atol=1e-5)


@pytest.mark.parametrize(("attrs", "why"), [({"layout": 1}, "layout=1"), ({"input_forget": 1}, "input_forget"),
                                            ({"activations": ["Sigmoid", "Relu", "Tanh"]}, "activations")])
def test_dynamic_lstm_left_float_with_reason(attrs: dict, why: str) -> None:
    model, _ = lstm_model(**attrs)
    written, decisions = rewrite_dynamic(model, qmath.INT8, per_channel=True)
    assert [n.op_type for n in written.graph.node] == ["LSTM"]
    assert decisions[0].status == "float" and why in decisions[0].reason
