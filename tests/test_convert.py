"""`onnxq convert` (QAT Q/DQ models -> onnxq's int8 form) and `onnxq qat-prep` (fp32 -> fake-quant).

Unit cases build small Q/DQ graphs here and check the written parameters against the ones
put in; the end-to-end case converts a real PyTorch QAT export (tests/fixtures/qat_digits,
made by tests/fixtures/make_qat_digits.py) and checks its int8 accuracy in onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import (
    CHANNELS,
    IMAGE,
    conv_relu_model,
    cosine,
    fused_op_types,
    image_batch,
    int8_initializers,
    make_model,
    quantize_simple,
    run,
    save,
    tensor,
    weight,
    write_npz_folder,
)
from onnx import TensorProto, helper, numpy_helper

from onnxq.cli import main
from onnxq.commands.convert import ConvertRequest, convert
from onnxq.commands.pipeline import DataOptions, QuantizeRequest
from onnxq.commands.qat_prep import qat_prep
from onnxq.commands.report import format_summary
from onnxq.errors import EXIT_BAD_MODEL, EXIT_USAGE, UsageError
from onnxq.quant import qmath
from onnxq.quant.plan import QuantPlan, QuantSettings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "qat_digits"
NP_TYPES = {"uint8": np.uint8, "int8": np.int8}
# Where a dropped pair's DequantizeLinear output name survives (the producer writes it; see onnxq.passes.strip_qdq).
KEPT_NAME = {"x": "x", "r1": "r1_dq"}


# ---------------------------------------------------------------- building QAT-style graphs


def qdq_model(*, act_type: str = "uint8", per_channel: bool = False, stored_weights: bool = False,
              shared_scale: bool = False, input_pair: bool = True, overrides: dict | None = None,
              seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """x -> [Q/DQ] -> Conv(w1, b1) -> Relu -> Q/DQ -> Conv(w2) -> Q/DQ -> y, weights fake-quant (or stored int8).

    Returns the model and the parameters put in (name -> (scale, zero point)). `overrides`
    replaces initializers by name (for the bad-parameter cases).
    """
    rng = np.random.default_rng(seed)
    w1, w2 = weight(rng, (CHANNELS, 3, 3, 3)), weight(rng, (CHANNELS, CHANNELS, 3, 3))
    zp_in = {"uint8": 128, "int8": 0}[act_type]
    zp_relu = {"uint8": 0, "int8": -128}[act_type]
    dtype = NP_TYPES[act_type]
    inits: dict[str, np.ndarray] = {
        "s_x": np.array(0.03, np.float32), "z_x": np.array(zp_in, dtype),
        "s_r": np.array(0.03 if shared_scale else 0.02, np.float32), "z_r": np.array(zp_relu, dtype),
        "b1": (0.1 * rng.standard_normal(CHANNELS)).astype(np.float32),
    }
    inits["s_y"] = np.array(0.05, np.float32)
    if shared_scale:
        del inits["s_r"]
    nodes = []
    conv_input = "x"
    if input_pair:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["x_q"], name="x_quant"),
                  helper.make_node("DequantizeLinear", ["x_q", "s_x", "z_x"], ["x_dq"], name="x_dequant")]
        conv_input = "x_dq"
    for name, w in (("w1", w1), ("w2", w2)):
        axis = 0 if per_channel else None
        q, scale, zero = qmath.symmetric_weights(w, qmath.INT8, axis)
        inits[f"s_{name}"], inits[f"z_{name}"] = scale, zero
        attrs = {"axis": 0} if per_channel else {}
        if stored_weights:
            inits[f"{name}_int8"] = q
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"s_{name}", f"z_{name}"],
                                          [f"{name}_dq"], name=f"{name}_dequant", **attrs))
        else:
            inits[name] = w
            nodes += [helper.make_node("QuantizeLinear", [name, f"s_{name}", f"z_{name}"], [f"{name}_q"],
                                       name=f"{name}_quant", **attrs),
                      helper.make_node("DequantizeLinear", [f"{name}_q", f"s_{name}", f"z_{name}"], [f"{name}_dq"],
                                       name=f"{name}_dequant", **attrs)]
    relu_scale = "s_x" if shared_scale else "s_r"
    nodes += [
        helper.make_node("Conv", [conv_input, "w1_dq", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("QuantizeLinear", ["r1", relu_scale, "z_r"], ["r1_q"], name="relu_quant"),
        helper.make_node("DequantizeLinear", ["r1_q", relu_scale, "z_r"], ["r1_dq"], name="relu_dequant"),
        helper.make_node("Conv", ["r1_dq", "w2_dq"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("QuantizeLinear", ["c2", "s_y", "z_x"], ["y_q"], name="y_quant"),
        helper.make_node("DequantizeLinear", ["y_q", "s_y", "z_x"], ["y"], name="y_dequant"),
    ]
    model = make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits)
    for name, value in (overrides or {}).items():  # after make_model's checks: these may be invalid
        index = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))
        inits[name] = value
    params = {"x": (inits["s_x"], inits["z_x"]), "r1": (inits[relu_scale], inits["z_r"]),
              "w1": (inits["s_w1"], inits["z_w1"]), "w2": (inits["s_w2"], inits["z_w2"])}
    return model, params


def dequantize_params(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """For each DequantizeLinear in a written model: its integer input -> (scale, zero point, axis)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            axis = next((a.i for a in node.attribute if a.name == "axis"), None)
            zero = inits[node.input[2]] if len(node.input) > 2 else None
            found[node.input[0]] = (inits[node.input[1]], zero, axis)
    return found


def convert_model(model: onnx.ModelProto, tmp_path: Path, **kwargs):
    source = save(model, tmp_path / "qat.onnx")
    output = tmp_path / f"converted_{len(list(tmp_path.iterdir()))}.onnx"
    return convert(ConvertRequest(model=source, output=output, **kwargs)), source, output


def feed() -> dict[str, np.ndarray]:
    return {"x": image_batch(np.random.default_rng(7))}


# ---------------------------------------------------------------- learned parameters kept


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("stored_weights", [False, True])
def test_weights_keep_learned_integers_and_scales(tmp_path: Path, per_channel: bool, stored_weights: bool) -> None:
    model, params = qdq_model(per_channel=per_channel, stored_weights=stored_weights)
    result, source, output = convert_model(model, tmp_path)
    written = onnx.load(str(output))
    weights = {name: dequantize_params(written)[f"{name}_quantized"] for name in ("w1", "w2")} if not stored_weights \
        else {name: dequantize_params(written)[f"{name}_int8_float_quantized"] for name in ("w1", "w2")}
    inits = int8_initializers(written)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, (scale, zero, axis) in weights.items():
        np.testing.assert_array_equal(scale, params[name][0])
        np.testing.assert_array_equal(zero, params[name][1])
        assert axis == (0 if per_channel else None)
        stored = inits[f"{name}_quantized"] if not stored_weights else inits[f"{name}_int8_float_quantized"]
        expected = originals[f"{name}_int8"] if stored_weights else qmath.quantize(
            originals[name], params[name][0], params[name][1], qmath.INT8, 0 if per_channel else None)
        np.testing.assert_array_equal(stored, expected)
    assert result.report["tensor_origins"]["calibrated"] == []
    assert fused_op_types(output).count("QLinearConv") == 2
    reference, converted = run(source, feed())[0], run(output, feed())[0]
    assert cosine(reference, converted) > 0.999


@pytest.mark.parametrize("act_type", ["uint8", "int8"])
def test_activations_keep_learned_type_scale_and_zero_point(tmp_path: Path, act_type: str) -> None:
    model, params = qdq_model(act_type=act_type)
    _, _, output = convert_model(model, tmp_path, activations="keep")
    written = dequantize_params(onnx.load(str(output)))
    for name in ("x", "r1"):
        scale, zero, _ = written[f"{KEPT_NAME[name]}_quantized"]
        np.testing.assert_array_equal(scale, params[name][0])
        assert zero.dtype == NP_TYPES[act_type] and zero == params[name][1]


def test_activations_int8_conversion_same_dequantized_values(tmp_path: Path) -> None:
    model, params = qdq_model(act_type="uint8")
    _, _, kept_path = convert_model(model, tmp_path)
    signed, _, signed_path = convert_model(model, tmp_path, activations="int8")
    written = dequantize_params(onnx.load(str(signed_path)))
    for name in ("x", "r1"):
        scale, zero, _ = written[f"{KEPT_NAME[name]}_quantized"]
        assert zero.dtype == np.int8 and int(zero) == int(params[name][1]) - 128
        np.testing.assert_array_equal(scale, params[name][0])
        values = np.linspace(-5, 5, 101, dtype=np.float32)  # the same grid: identical dequantized values
        np.testing.assert_array_equal(
            qmath.dequantize(qmath.quantize(values, scale, zero, qmath.INT8), scale, zero),
            qmath.dequantize(qmath.quantize(values, *params[name], qmath.UINT8), *params[name]))
    assert {c["tensor"] for c in signed.report["converted_types"]} == {"x", "r1_dq", "y"}
    np.testing.assert_allclose(run(signed_path, feed())[0], run(kept_path, feed())[0], rtol=0, atol=1e-5)
    back, _, _ = convert_model(model, tmp_path, activations="uint8")
    assert back.report["converted_types"] == []


def test_shared_scale_tensor_is_read_once_per_pair(tmp_path: Path) -> None:
    model, params = qdq_model(shared_scale=True)
    result, _, output = convert_model(model, tmp_path)
    written = dequantize_params(onnx.load(str(output)))
    assert float(written["x_quantized"][0]) == float(written["r1_dq_quantized"][0]) == float(params["x"][0])
    assert {"x", "r1_dq"} <= set(result.report["tensor_origins"]["learned"])


def test_bias_gets_int32_with_input_times_weight_scale(tmp_path: Path) -> None:
    model, params = qdq_model(per_channel=True)
    _, _, output = convert_model(model, tmp_path)
    written = onnx.load(str(output))
    scale, _, _ = dequantize_params(written)["b1_quantized"]
    np.testing.assert_allclose(scale, np.float32(params["x"][0]) * params["w1"][0], rtol=1e-6)
    stored = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}["b1_quantized"]
    assert stored.dtype == np.int32


def test_tensor_the_input_leaves_float_stays_float_unless_calibrated(tmp_path: Path) -> None:
    model, _ = qdq_model(input_pair=False)
    result, _, output = convert_model(model, tmp_path)  # default: respect the input model's decision
    reasons = {k["name"]: k["reason"] for k in result.report["float_nodes"]}
    assert set(reasons) == {"conv1", "relu1"}  # relu1: its producer stays float
    assert "leaves x float" in reasons["conv1"] and "x" not in dequantize_params(onnx.load(str(output)))
    assert result.report["tensor_origins"]["calibrated"] == []
    assert {"name": "conv2", "op_type": "Conv", "status": "int8"} in result.report["quantized_nodes"]
    assert "1 nodes kept float" in format_summary(result.report)
    with pytest.raises(UsageError, match=r"need calibration data \(--calib\): x"):
        convert_model(model, tmp_path, calibrate_missing=True)
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 6)
    result, _, output = convert_model(model, tmp_path, data=DataOptions(calib=calib), calibrate_missing=True)
    assert result.report["float_nodes"] == []
    assert result.report["tensor_origins"]["calibrated"] == ["x"]
    scale, zero, _ = dequantize_params(onnx.load(str(output)))["x_quantized"]
    lo = min(float(np.load(p)["x"].min()) for p in sorted(calib.iterdir()))
    hi = max(float(np.load(p)["x"].max()) for p in sorted(calib.iterdir()))
    expected_scale, expected_zero = qmath.asymmetric_params(np.float64(lo), np.float64(hi), qmath.UINT8)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)  # minmax over the calibration data
    assert zero == expected_zero
    assert result.report["fidelity"]["outputs"][0]["cosine"] > 0.99


def test_qoperator_format_reuses_the_qdq_parameters(tmp_path: Path) -> None:
    model, _ = qdq_model(per_channel=True)
    _, _, qdq_path = convert_model(model, tmp_path)
    _, _, qop_path = convert_model(model, tmp_path, output_format="qoperator")
    ops = {n.op_type for n in onnx.load(str(qop_path)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops
    np.testing.assert_allclose(run(qop_path, feed())[0], run(qdq_path, feed())[0], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- inconsistent parameters


def _bad(name: str, value: np.ndarray) -> dict:
    return {name: value}


BAD_CASES = {
    "zero scale": (_bad("s_r", np.array(0.0, np.float32)), ["relu_quant", "scale 0.0"]),
    "negative scale": (_bad("s_x", np.array(-0.1, np.float32)), ["x_quant", "scale -0.1"]),
    "nan scale": (_bad("s_w1", np.full(1, np.nan, np.float32)), ["w1_quant", "scale nan"]),
    "infinite scale": (_bad("s_r", np.array(np.inf, np.float32)), ["relu_quant", "scale inf"]),
    "per-channel length": (_bad("s_w1", np.full(5, 0.01, np.float32)) | _bad("z_w1", np.zeros(5, np.int8)),
                           ["w1_quant", "5 per-channel scales for axis 1 of size 3"]),
    "per-channel axis": (_bad("s_w1", np.full(3, 0.01, np.float32)) | _bad("z_w1", np.zeros(3, np.int8)),
                         ["QuantizeLinear w1_quant", "axis 1", "output-channel axis 0"]),
    "scale/zero point shapes": (_bad("z_w2", np.zeros(2, np.int8)), ["w2_quant", "shapes do not match"]),
    "unsupported type": (_bad("z_r", np.array(0, np.uint16)), ["relu_quant", "unsupported", "uint16"]),
    "int32 activation": (_bad("z_x", np.array(0, np.int32)), ["x_quant", "int32"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_parameters_one_line_error_naming_the_node(tmp_path: Path, case: str) -> None:
    overrides, words = BAD_CASES[case]
    model, _ = qdq_model(overrides=overrides)
    source = save(model, tmp_path / "bad.onnx")
    output = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(output)])
    assert result.exit_code == EXIT_BAD_MODEL, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:"), result.stderr
    for word in words:
        assert word in lines[0]
    assert not output.exists()


def test_pair_with_different_parameters_is_rejected(tmp_path: Path) -> None:
    model, _ = qdq_model()
    dq = next(n for n in model.graph.node if n.name == "relu_dequant")
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "s_other"))
    dq.input[1] = "s_other"
    with pytest.raises(Exception, match="relu_dequant: parameters differ from those of its QuantizeLinear relu_quant"):
        convert_model(model, tmp_path)


def _with_integer_clip(model: onnx.ModelProto, quantize_node: str, low: int | None, high: int) -> onnx.ModelProto:
    """Insert Clip(low, high) on the integers between `quantize_node` and its DequantizeLinear (PyTorch's
    export of a (0, 127) fake-quant range; it leaves `min` out, as low=None does)."""
    clipped = onnx.ModelProto()
    clipped.CopyFrom(model)
    q = next(n for n in clipped.graph.node if n.name == quantize_node)
    dtype = numpy_helper.to_array(next(t for t in clipped.graph.initializer if t.name == q.input[2])).dtype
    clipped.graph.initializer.extend([numpy_helper.from_array(np.array(high, dtype), f"{quantize_node}_hi")])
    if low is not None:
        clipped.graph.initializer.extend([numpy_helper.from_array(np.array(low, dtype), f"{quantize_node}_lo")])
    for node in clipped.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == q.output[0]:
            node.input[0] = f"{q.output[0]}_clipped"
    index = list(clipped.graph.node).index(q) + 1
    bounds = [q.output[0], f"{quantize_node}_lo" if low is not None else "", f"{quantize_node}_hi"]
    clipped.graph.node.insert(index, helper.make_node("Clip", bounds, [f"{q.output[0]}_clipped"],
                                                      name=f"{quantize_node}_clip"))
    onnx.checker.check_model(clipped, full_check=True)
    return clipped


@pytest.mark.parametrize("low", [0, None])
def test_reduced_range_activation_clip_is_dropped_keeping_learned_parameters(tmp_path: Path, low: int | None
                                                                             ) -> None:
    model, params = qdq_model(act_type="uint8")
    clipped = _with_integer_clip(model, "relu_quant", low, 127)
    result, _, output = convert_model(clipped, tmp_path)
    assert any("relu_quant_clip: [0, 127]" in note for note in result.report["notes"])
    written = dequantize_params(onnx.load(str(output)))
    scale, zero, _ = written[f"{KEPT_NAME['r1']}_quantized"]
    np.testing.assert_array_equal(scale, params["r1"][0])
    assert zero == params["r1"][1]
    # the same int8 model as converting the export without the Clip
    _, _, unclipped = convert_model(model, tmp_path)
    np.testing.assert_array_equal(run(output, feed())[0], run(unclipped, feed())[0])


def test_clip_inside_a_weight_pair_is_refused(tmp_path: Path) -> None:
    clipped = _with_integer_clip(qdq_model()[0], "w1_quant", -100, 100)
    with pytest.raises(Exception, match="w1_quant: a Clip between a weight's QuantizeLinear"):
        convert_model(clipped, tmp_path)


def test_bias_zero_point_must_be_zero(tmp_path: Path) -> None:
    model, _ = qdq_model()
    conv = next(n for n in model.graph.node if n.name == "conv1")
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros(CHANNELS, np.int32), "b1_int32"),
                                    numpy_helper.from_array(np.full(CHANNELS, 1e-4, np.float32), "b1_scale"),
                                    numpy_helper.from_array(np.full(CHANNELS, 3, np.int32), "b1_zero")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["b1_int32", "b1_scale", "b1_zero"], ["b1_dq"],
                                                name="b1_dequant", axis=0))
    conv.input[2] = "b1_dq"
    with pytest.raises(Exception, match="b1_dequant: an int32 \\(bias\\) zero point must be 0"):
        convert_model(model, tmp_path)


def test_float_model_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(save(conv_relu_model(), tmp_path / "f.onnx")),
                                       "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == EXIT_BAD_MODEL and "onnxq quantize" in result.stderr


def test_missing_calibration_is_a_usage_error_on_the_cli(tmp_path: Path) -> None:
    model, _ = qdq_model(input_pair=False)
    source = save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "o.onnx"), "--calibrate-missing"])
    assert result.exit_code == EXIT_USAGE and "--calib" in result.stderr and ": x" in result.stderr
    assert not (tmp_path / "o.onnx").exists()
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 0 and "1 nodes kept float" in result.stdout


# ---------------------------------------------------------------- qat-prep and the round trip


@pytest.fixture
def prepped(tmp_path: Path):
    source = save(conv_relu_model(), tmp_path / "fp32.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 12)
    request = QuantizeRequest(model=source, output=tmp_path / "fp32.fakequant.onnx", data=DataOptions(calib=calib))
    return source, calib, request, qat_prep(request)


def test_qat_prep_runs_close_to_fp32_with_the_json_parameters(prepped) -> None:
    source, calib, request, _ = prepped
    model = onnx.load(str(request.output))
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert {"w1", "w2", "b1", "b2"} <= floats  # weights and biases stay float (trainable)
    x = {"x": np.load(sorted(calib.iterdir())[-1])["x"]}
    assert cosine(run(source, x)[0], run(request.output, x)[0]) > 0.99
    plan = QuantPlan.load(request.output.with_suffix(".params.json"))
    assert json.loads(request.output.with_suffix(".params.json").read_text())["format"] == "onnxq-plan/1"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    # r1: Relu folded into conv1's output range; y: conv2's output (the int8 kernel's output scale)
    assert set(quantizers) == {"w1", "w2", "x", "r1_float", "y_float"}
    for tensor_name, node in quantizers.items():
        entry = plan.tensors[tensor_name.removesuffix("_float")]
        np.testing.assert_array_equal(inits[node.input[1]].reshape(-1), np.float32(entry.scale))
        np.testing.assert_array_equal(inits[node.input[2]].reshape(-1), entry.zero_point)
    assert {t.role for t in plan.tensors.values()} == {"activation", "weight"}


def test_qat_prep_then_convert_equals_quantize(prepped, tmp_path: Path) -> None:
    source, calib, request, _ = prepped
    converted = convert(ConvertRequest(model=request.output, output=tmp_path / "rt.int8.onnx"))
    direct = quantize_simple(source, tmp_path / "direct.int8.onnx", calib, speed_guard="off",
                             settings=QuantSettings())
    assert converted.report["tensor_origins"]["calibrated"] == []
    assert set(converted.plan.tensors) == set(direct.plan.tensors)
    for name, entry in direct.plan.tensors.items():
        got = converted.plan.tensors[name]
        assert (got.role, got.qtype, got.axis, got.zero_point) == (entry.role, entry.qtype, entry.axis,
                                                                    entry.zero_point), name
        np.testing.assert_allclose(got.scale, entry.scale, rtol=1e-7, err_msg=name)
    np.testing.assert_array_equal(int8_initializers(onnx.load(str(tmp_path / "rt.int8.onnx")))["w1_quantized"],
                                  int8_initializers(onnx.load(str(tmp_path / "direct.int8.onnx")))["w1_quantized"])


def test_quantize_convert_and_qat_prep_reports_share_their_keys_and_summary(prepped, tmp_path: Path) -> None:
    source, calib, request, prep = prepped
    converted = convert(ConvertRequest(model=request.output, output=tmp_path / "rt.int8.onnx",
                                       data=DataOptions(calib=calib)))
    direct = quantize_simple(source, tmp_path / "direct.int8.onnx", calib, speed_guard="off")
    reports = {"qat-prep": prep.report, "convert": converted.report, "quantize": direct.report}
    references = {"qat-prep": "the fp32 model", "convert": "the input (fake-quant) model", "quantize": "the fp32 model"}
    for command, report in reports.items():
        assert report["command"] == command and report["onnxq_version"] and report["output"]
        assert set(report["fidelity"]) == {"reference", "samples", "source", "available_samples", "outputs"}
        assert report["fidelity"]["reference"] == references[command]
        assert report["timings_s"] and all(v >= 0 for v in report["timings_s"].values()), command
        summary = format_summary(report)
        assert "cosine" in summary and "  time: " in summary, summary
    assert " vs the input (fake-quant) model on " in format_summary(converted.report)


def test_qat_prep_cli_writes_model_params_and_report(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    out, params, report = tmp_path / "fq.onnx", tmp_path / "p.json", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["qat-prep", str(conv_model_path), "-o", str(out), "--calib", str(conv_calib),
                                       "--params", str(params), "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    assert out.exists() and QuantPlan.load(params).tensors
    assert json.loads(report.read_text())["fake_quant"]["weights"] == 2


# ---------------------------------------------------------------- a real PyTorch QAT export


def digits_accuracy(path: Path) -> float:
    images = np.load(FIXTURE / "eval.npz")["image"]
    labels = np.load(FIXTURE / "eval_labels.npy")
    return float(np.mean(run(path, {"image": images})[0].argmax(axis=1) == labels))


@pytest.mark.parametrize("output_format", ["qdq", "qoperator"])
def test_pytorch_qat_digits_converts_with_its_accuracy(tmp_path: Path, output_format: str) -> None:
    recorded = json.loads((FIXTURE / "accuracy.json").read_text())
    output = tmp_path / f"digits.{output_format}.onnx"
    result = CliRunner().invoke(main, ["convert", str(FIXTURE / "model.fakequant.onnx"), "-o", str(output),
                                       "--format", output_format, "--eval-data", str(FIXTURE / "eval.npz"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tensor_origins"]["calibrated"] == [] and report["nodes"]["by_status"]["int8"] == 4
    assert report["weights"]["folded_fake_quant"] == 4
    accuracy = digits_accuracy(output)
    assert abs(accuracy - recorded["qat_fakequant_accuracy"]) <= 0.011, (accuracy, recorded)
    model = onnx.load(str(output))
    weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) == 4
    fused = fused_op_types(output)
    assert fused.count("QLinearConv") == 2 and fused.count("QGemm") == 2
    assert "Conv" not in fused and "Gemm" not in fused
    assert report["fusion"]["avoidable"] == 0
