"""The writers on their own (onnxq.quant.rewrite_qdq, onnxq.quant.rewrite_qop): a tiny graph and a plan written by hand,
no calibration or placement. Checks the nodes written, and that onnxruntime runs the result and gives what
a numpy reference of the same integer arithmetic gives."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, tensor
from onnx import helper, numpy_helper

from onnxq.quant.ops import MS_DOMAIN
from onnxq.quant.placement import NodeDecision
from onnxq.quant.plan import QuantPlan, QuantSettings, TensorPlan
from onnxq.quant.rewrite_qdq import write_qdq
from onnxq.quant.rewrite_qop import write_qoperator

ROWS, K, N = 4, 16, 8
X_SCALE, X_ZERO = 4.0 / 255, 128  # x in [-2, 2) as uint8
Y_SCALE, Y_ZERO = 8.0 / 255, 128


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((K, N)) / 4).astype(np.float32), (rng.standard_normal(N) / 10).astype(np.float32)


def gemm_model() -> onnx.ModelProto:
    w, b = _weights()
    return make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm")], [tensor("x", [ROWS, K])],
                      [tensor("y", [ROWS, N])], {"w": w, "b": b})


def matmul_model() -> onnx.ModelProto:
    w, _ = _weights()
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], [tensor("x", [ROWS, K])],
                      [tensor("y", [ROWS, N])], {"w": w})


def activation(name: str, scale: float, zero: int) -> TensorPlan:
    return TensorPlan(name, "activation", "uint8", [scale], [zero], source=name)


def weight_scales(w: np.ndarray) -> np.ndarray:
    return (np.abs(w).max(axis=0) / 127).astype(np.float32)  # per output column (axis 1 of a [K, N] weight)


def plan_for(model: onnx.ModelProto, op: str, quantize_output: bool) -> QuantPlan:
    """x (and y) as uint8 activations, w per column as int8, b (Gemm) as int32 with scale x_scale * w_scale."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w_scale = weight_scales(inits["w"])
    tensors = {"x": activation("x", X_SCALE, X_ZERO),
               "w": TensorPlan("w", "weight", "int8", w_scale.tolist(), [0] * N, axis=1)}
    if "b" in inits:
        tensors["b"] = TensorPlan("b", "bias", "int32", (np.float32(X_SCALE) * w_scale).tolist(), [0] * N, axis=0)
    if quantize_output:
        tensors["y"] = activation("y", Y_SCALE, Y_ZERO)
    return QuantPlan(QuantSettings(), tensors, [NodeDecision(op.lower(), op, "int8")])


def fake_quant(x: np.ndarray, scale, zero, lo: int, hi: int) -> np.ndarray:
    return ((np.clip(np.rint(x / scale) + zero, lo, hi) - zero) * scale).astype(np.float32)


def reference(model: onnx.ModelProto, x: np.ndarray, quantize_output: bool) -> np.ndarray:
    """What the written model computes, in numpy: dequantized x, w and b through the float op."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits["w"]
    w_scale = weight_scales(w)
    y = fake_quant(x, X_SCALE, X_ZERO, 0, 255).astype(np.float64) @ fake_quant(w, w_scale, 0, -128, 127)
    if "b" in inits:
        b_scale = np.float32(X_SCALE) * w_scale
        y = y + np.rint(inits["b"] / b_scale) * b_scale
    return fake_quant(y, Y_SCALE, Y_ZERO, 0, 255) if quantize_output else y.astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2, 2, (ROWS, K)).astype(np.float32)


CASES = [("Gemm", gemm_model, True), ("Gemm", gemm_model, False), ("MatMul", matmul_model, False),
         ("MatMul", matmul_model, True)]
IDS = ["gemm-int8-output", "gemm-float-output", "matmul-float-output", "matmul-int8-output"]


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize(("op", "build", "quantize_output"), CASES, ids=IDS)
def test_qdq_writes_the_plans_pairs_and_runs_as_numpy_computes(op: str, build, quantize_output: bool) -> None:
    model = build()
    plan = plan_for(model, op, quantize_output)
    written = write_qdq(model, plan)
    ops = [n.op_type for n in written.graph.node]
    pairs = 2 if quantize_output else 1  # x (and y): QuantizeLinear -> DequantizeLinear
    constants = 2 if "b" in plan.tensors else 1  # w (and b): a stored integer tensor behind a DequantizeLinear
    assert ops.count("QuantizeLinear") == pairs and ops.count("DequantizeLinear") == pairs + constants
    assert ops.count(op) == 1 and [o.name for o in written.graph.output] == ["y"]
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    stored = _initializer(written, "w_quantized")
    assert stored.dtype == np.int8
    np.testing.assert_array_equal(stored, np.clip(np.rint(w / weight_scales(w)), -128, 127))
    if "b" in plan.tensors:
        assert _initializer(written, "b_quantized").dtype == np.int32
    x = inputs()
    expected = reference(model, x, quantize_output)
    got = run(written, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # the Q/DQ arithmetic as written
    step = Y_SCALE if quantize_output else 1e-4
    np.testing.assert_allclose(got, expected, rtol=0, atol=step * 1.01)  # float sums may round one step apart
    fused = run(written, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # onnxruntime's int8 kernels
    np.testing.assert_allclose(fused, expected, rtol=0, atol=step * 1.01 if quantize_output else 1e-3)


QOP_FORMS = {("Gemm", True): "QGemm", ("Gemm", False): "QGemm", ("MatMul", False): "MatMulIntegerToFloat",
             ("MatMul", True): "QLinearMatMul"}


@pytest.mark.parametrize(("op", "build", "quantize_output"), CASES, ids=IDS)
def test_qoperator_writes_integer_operators_that_run_as_numpy_computes(op: str, build, quantize_output: bool
                                                                       ) -> None:
    model = build()
    written = write_qoperator(write_qdq(model, plan_for(model, op, quantize_output)))
    ops = [n.op_type for n in written.graph.node]
    form = QOP_FORMS[op, quantize_output]
    assert ops.count(form) == 1 and op not in ops
    assert ops[0] == "QuantizeLinear" and ops.count("QuantizeLinear") == 1  # only x is quantized on the way in
    assert ops.count("DequantizeLinear") == (1 if quantize_output else 0)  # y read back as float
    node = next(n for n in written.graph.node if n.op_type == form)
    assert node.domain == ("" if form == "QLinearMatMul" else MS_DOMAIN)
    assert any(o.domain == MS_DOMAIN for o in written.opset_import) or node.domain == ""
    x = inputs()
    expected = reference(model, x, quantize_output)
    got = run(written, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(got, expected, rtol=0, atol=Y_SCALE * 1.01 if quantize_output else 1e-3)


def test_qdq_leaves_the_input_model_alone() -> None:
    model = gemm_model()
    before = model.SerializeToString()
    write_qdq(model, plan_for(model, "Gemm", True))
    assert model.SerializeToString() == before
