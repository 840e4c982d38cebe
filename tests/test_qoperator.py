"""--format qoperator, op by op: the integer operator appears, and its output matches the QDQ form.

Both forms come from the same plan, so they must agree to within one step of the output's
quantization (onnxruntime's fused QDQ kernels and its QLinear kernels round alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    CHANNELS,
    IMAGE,
    bias,
    conv_relu_model,
    feeds_for,
    gemm_model,
    image_batch,
    make_model,
    matmul_add_model,
    pass_through_model,
    quantize_simple,
    run,
    save,
    tensor,
    weight,
    write_npz_folder,
)
from onnx import helper

C = CHANNELS
FEATURE = [1, C, 16, 16]


def conv_then(ops: list[onnx.NodeProto], out_shape: list[int], extra: dict | None = None,
              two_branches: bool = False) -> onnx.ModelProto:
    """x -> Conv -> a (and -> Conv -> b when two_branches) -> ops -> y."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], name="conv_a")]
    inits = {"w1": weight(rng, (C, 3, 3, 3)), "b1": bias(rng, C), **(extra or {})}
    if two_branches:
        nodes.append(helper.make_node("Conv", ["x", "w2", "b2"], ["b"], pads=[1, 1, 1, 1], name="conv_b"))
        inits.update({"w2": weight(rng, (C, 3, 3, 3)), "b2": bias(rng, C)})
    return make_model(nodes + ops, [tensor("x", IMAGE)], [tensor("y", out_shape)], inits)


def then_conv(op: onnx.NodeProto, shape: list[int]) -> tuple[list[onnx.NodeProto], dict]:
    """op (reading a, writing m) followed by a Conv, so the op's output is quantized too."""
    rng = np.random.default_rng(6)
    return [op, helper.make_node("Conv", ["m", "w9"], ["y"], pads=[1, 1, 1, 1], name="conv_out")], \
        {"w9": weight(rng, (C, shape[1], 3, 3))}


def case(name: str) -> onnx.ModelProto:
    if name == "conv_relu":
        return conv_relu_model()
    if name == "matmul_float_output":
        return matmul_add_model()
    if name == "gemm":
        return gemm_model()
    if name == "pass_through":
        return pass_through_model()
    if name in ("add", "mul"):
        ops, extra = then_conv(helper.make_node(name.capitalize(), ["a", "b"], ["m"], name=name), FEATURE)
        return conv_then(ops, FEATURE, extra, two_branches=True)
    if name == "concat":
        ops, extra = then_conv(helper.make_node("Concat", ["a", "b"], ["m"], axis=1, name="concat"), [1, 2 * C])
        return conv_then(ops, FEATURE, extra, two_branches=True)
    if name in ("sigmoid", "leaky_relu"):
        op = "Sigmoid" if name == "sigmoid" else "LeakyRelu"
        attrs = {"alpha": 0.1} if op == "LeakyRelu" else {}
        ops, extra = then_conv(helper.make_node(op, ["a"], ["m"], name=name, **attrs), FEATURE)
        return conv_then(ops, FEATURE, extra)
    if name == "average_pool":
        ops, extra = then_conv(helper.make_node("AveragePool", ["a"], ["m"], kernel_shape=[2, 2], strides=[2, 2],
                                                name="avgpool"), FEATURE)
        return conv_then(ops, [1, C, 8, 8], extra)
    if name == "global_average_pool":
        ops, extra = then_conv(helper.make_node("GlobalAveragePool", ["a"], ["m"], name="gap"), FEATURE)
        return conv_then(ops, [1, C, 1, 1], extra)
    if name == "matmul_quantized_output":
        rng = np.random.default_rng(7)
        ops, extra = then_conv(helper.make_node("MatMul", ["a", "wm"], ["m"], name="matmul"), FEATURE)
        return conv_then(ops, FEATURE, {**extra, "wm": weight(rng, (16, 16))})
    raise ValueError(name)


EXPECTED = {
    "conv_relu": {"QLinearConv": 2},
    "matmul_float_output": {"QGemm": 1},  # onnxruntime's preparation fuses MatMul + bias Add into Gemm
    "gemm": {"QGemm": 2},
    "pass_through": {"QLinearConv": 3, "QLinearConcat": 1, "MatMulIntegerToFloat": 1},
    "add": {"QLinearConv": 3, "QLinearAdd": 1},
    "mul": {"QLinearConv": 3, "QLinearMul": 1},
    "concat": {"QLinearConv": 3, "QLinearConcat": 1},
    "sigmoid": {"QLinearConv": 2, "QLinearSigmoid": 1},
    "leaky_relu": {"QLinearConv": 2, "QLinearLeakyRelu": 1},
    "average_pool": {"QLinearConv": 2, "QLinearAveragePool": 1},
    "global_average_pool": {"QLinearConv": 2, "QLinearGlobalAveragePool": 1},
    "matmul_quantized_output": {"QLinearConv": 2, "QLinearMatMul": 1},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_qoperator_matches_qdq(tmp_path: Path, name: str) -> None:
    model = case(name)
    path = save(model, tmp_path / f"{name}.onnx")
    feeds = feeds_for(model)
    calib = write_npz_folder(tmp_path / "calib", feeds, 12)
    qdq = quantize_simple(path, tmp_path / "qdq.onnx", calib)
    qop = quantize_simple(path, tmp_path / "qop.onnx", calib, output_format="qoperator")
    assert qop.plan.to_json() == qdq.plan.to_json()  # same parameters by construction

    written = onnx.load(str(tmp_path / "qop.onnx"))
    ops = [n.op_type for n in written.graph.node]
    integer_ops = {op: ops.count(op) for op in set(ops) if op.startswith(("QLinear", "QGemm", "MatMulInteger"))}
    assert integer_ops == EXPECTED[name]
    assert not {"Conv", "Gemm", "MatMul"} & set(ops)
    if name == "conv_relu":
        assert "Relu" not in ops  # folded into QLinearConv's uint8 output (zero point 0)
    assert qop.report["fusion"]["avoidable"] == 0
    assert qop.report["settings"]["format"] == "qoperator"

    rng = np.random.default_rng(99)
    for _ in range(3):
        feed = feeds(rng)
        expected = run(tmp_path / "qdq.onnx", feed)
        got = run(tmp_path / "qop.onnx", feed)
        for e, g in zip(expected, got, strict=True):
            step = max(float(np.abs(e).max()) / 100, 1e-6)
            assert np.max(np.abs(e - g)) <= step, name


def test_qoperator_keeps_float_regions_float(tmp_path: Path) -> None:
    """A float op between int8 ones gets DequantizeLinear before and QuantizeLinear after it."""
    ops, extra = then_conv(helper.make_node("Sin", ["a"], ["m"], name="sin"), FEATURE)
    model = conv_then(ops, FEATURE, extra)
    path = save(model, tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 8)
    quantize_simple(path, tmp_path / "qop.onnx", calib, output_format="qoperator")
    graph = onnx.load(str(tmp_path / "qop.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    sin = next(n for n in graph.node if n.op_type == "Sin")
    assert producer[sin.input[0]].op_type == "DequantizeLinear"
    consumers = [n for n in graph.node if sin.output[0] in n.input]
    assert [n.op_type for n in consumers] == ["QuantizeLinear"]
    assert sorted(n.op_type for n in graph.node if n.op_type == "QLinearConv") == ["QLinearConv"] * 2
