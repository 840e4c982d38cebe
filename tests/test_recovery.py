"""Accuracy recovery (onnxq.passes.recovery): equalization, bias correction and AdaRound, each against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import CHANNELS, IMAGE, conv_relu_model, make_model, run, save, tensor, weight, write_npz_folder
from onnx import helper, numpy_helper

from onnxq.cli import main
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.errors import UsageError
from onnxq.passes.recovery import adaround, apply_equalization, equalization_scales, equalize_model, rounding_loss
from onnxq.quant import qmath
from onnxq.quant.plan import QuantSettings
from onnxq.runtime.session import Progress, ProgressFactory, no_progress

QMAX = 127


# ------------------------------------------------------------------ helpers


def skewed_conv_model(seed: int = 0, depthwise: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> Conv whose first conv's output channels have ranges from 0.01 to 10."""
    rng = np.random.default_rng(seed)
    w1 = weight(rng, (CHANNELS, 3, 3, 3)) * np.geomspace(0.01, 10, CHANNELS, dtype=np.float32)[:, None, None, None]
    b1 = (0.1 * rng.standard_normal(CHANNELS)).astype(np.float32) * np.geomspace(0.01, 10, CHANNELS, dtype=np.float32)
    if depthwise:
        w2 = weight(rng, (CHANNELS, 1, 3, 3))
        conv2 = helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], group=CHANNELS, name="conv2")
    else:
        w2 = weight(rng, (CHANNELS, CHANNELS, 3, 3))
        conv2 = helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), conv2]
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])],
                      {"w1": w1, "b1": b1, "w2": w2.astype(np.float32)})


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def fake_quantized(values: np.ndarray) -> np.ndarray:
    """Per-tensor symmetric int8 quantize -> dequantize."""
    q, scale, zp = qmath.symmetric_weights(values, qmath.INT8, None)
    return qmath.dequantize(q, scale, zp)


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
    return copy


def dequantized_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of every DequantizeLinear of an initializer, by the DQ output's name."""
    inits = initializers(model)
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = inits[node.input[0]]
            scale = inits[node.input[1]]
            zp = inits[node.input[2]] if len(node.input) > 2 else np.zeros_like(scale, dtype=np.int64)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale.ndim else None
            found[node.output[0]] = qmath.dequantize(q, scale, zp, axis)
    return found


def gemm_model(seed: int = 0, fan_in: int = 64, out: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="gemm")]
    return make_model(nodes, [tensor("x", [1, fan_in])], [tensor("y", [1, out])],
                      {"w": weight(rng, (out, fan_in)), "b": (0.1 * rng.standard_normal(out)).astype(np.float32)})


def positive_feeds(fan_in: int):
    """Inputs with a large common mean: weight rounding then shifts each output channel's mean."""
    return lambda rng: {"x": (2.0 + 0.5 * rng.standard_normal((1, fan_in))).astype(np.float32)}


def quantize_gemm(tmp_path: Path, name: str, progress: ProgressFactory = no_progress,
                  **kwargs) -> tuple[onnx.ModelProto, dict, list[np.ndarray]]:
    model_path = save(gemm_model(), tmp_path / "gemm.onnx")
    calib = write_npz_folder(tmp_path / "calib", positive_feeds(64), 24)
    evaluation = write_npz_folder(tmp_path / "eval", positive_feeds(64), 4, seed=7)
    out = tmp_path / f"{name}.onnx"
    result = quantize(QuantizeRequest(model=model_path, output=out, data=DataOptions(calib=calib, eval_data=evaluation),
                                      weight_range="full", **kwargs), progress)
    xs = [np.load(p)["x"] for p in sorted(calib.glob("*.npz"))]
    return onnx.load(str(out)), result.report, xs


# ------------------------------------------------------------------ cross-layer equalization


def test_equalization_scales_balance_both_layers() -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)) * np.array([0.01, 0.1, 1, 10])[:, None, None, None]
    w2 = rng.standard_normal((5, 4, 3, 3))
    s = equalization_scales(w1, w2, 1)
    r1 = np.abs(w1).reshape(4, -1).max(axis=1)
    r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(4, -1).max(axis=1)
    np.testing.assert_allclose(s, np.sqrt(r1 / r2))
    new_w1, _, new_w2 = apply_equalization(w1, None, w2, 1, s)
    np.testing.assert_allclose(np.abs(new_w1).reshape(4, -1).max(axis=1), np.sqrt(r1 * r2), rtol=1e-5)
    np.testing.assert_allclose(np.abs(new_w2).transpose(1, 0, 2, 3).reshape(4, -1).max(axis=1), np.sqrt(r1 * r2),
                               rtol=1e-5)


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalize_keeps_the_float_function_and_cuts_per_tensor_error(depthwise: bool) -> None:
    model = skewed_conv_model(depthwise=depthwise)
    equalized, report = equalize_model(model)
    assert report["pairs"] == 1 and report["layers"][0]["activation"] == "Relu"
    feed = {"x": np.random.default_rng(1).standard_normal(IMAGE).astype(np.float32)}
    before, after = run_model(model, feed), run_model(equalized, feed)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())

    # per-tensor weight quantization: the equalized weights lose far less of the output
    def error(m: onnx.ModelProto) -> float:
        weights = initializers(m)
        fake = with_weights(m, {k: fake_quantized(weights[k]) for k in ("w1", "w2")})
        return float(np.mean((run_model(fake, feed) - before) ** 2))

    # expected ranges after one pair's equalization: sqrt(r1 r2) per channel (numpy, from the originals)
    r1 = np.abs(initializers(model)["w1"]).reshape(CHANNELS, -1).max(axis=1)
    w2 = initializers(model)["w2"]
    r2 = np.abs(w2).reshape(CHANNELS, -1).max(axis=1) if depthwise else np.abs(w2).transpose(1, 0, 2, 3).reshape(
        CHANNELS, -1).max(axis=1)
    new_r1 = np.abs(initializers(equalized)["w1"]).reshape(CHANNELS, -1).max(axis=1)
    np.testing.assert_allclose(new_r1, np.sqrt(r1 * r2), rtol=1e-4)
    # conv1's per-tensor step shrinks by max(r1) / max(sqrt(r1 r2)); the output error drops (3.5x measured)
    assert np.abs(r1).max() / new_r1.max() > 2
    assert error(equalized) < error(model) / 2


def test_equalize_skips_relu6() -> None:
    model = skewed_conv_model()
    relu = model.graph.node[1]
    relu.op_type = "Clip"
    relu.input.extend(["lo", "hi"])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "lo"),
                                    numpy_helper.from_array(np.array(6, np.float32), "hi")])
    equalized, report = equalize_model(model)
    assert report["pairs"] == 0 and report["skipped"] == {"Clip between convs is not positive-homogeneous": 1}
    assert equalized is model


def run_model(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


# ------------------------------------------------------------------ bias correction


def test_bias_correction_removes_the_mean_shift_per_channel(tmp_path: Path) -> None:
    shifts = {}
    for name, flag in (("plain", False), ("corrected", True)):
        model, report, xs = quantize_gemm(tmp_path, name, bias_correction=flag)
        values = dequantized_constants(model)
        x_entry = next(t for t in report["tensors"] if t["name"] == "x")
        w, b = initializers(gemm_model())["w"], initializers(gemm_model())["b"]
        w_q, b_q = values["w_dequantized"], values["b_dequantized"]
        x = np.concatenate(xs).astype(np.float64)
        x_q = qmath.dequantize(qmath.quantize(x, x_entry["scale"], x_entry["zero_point"], qmath.UINT8),
                               x_entry["scale"], x_entry["zero_point"]).astype(np.float64)
        # mean output error per channel from the int8 weights and bias, on the input the int8 model sees
        shifts[name] = (x_q @ w_q.T.astype(np.float64) + b_q).mean(axis=0) - (x_q @ w.T.astype(np.float64) + b).mean(
            axis=0)
        if flag:
            row = report["recovery"]["bias_correction"]
            assert row["layers_corrected"] == 1
    step = float(np.abs(w).max() / QMAX)  # one weight step: the size of the shift without correction
    assert np.abs(shifts["plain"]).max() > 2 * step  # the problem is real ...
    assert np.abs(shifts["corrected"]).max() < 0.01 * np.abs(shifts["plain"]).max()  # ... and gone


def test_bias_correction_adds_a_bias_to_a_conv_without_one(tmp_path: Path) -> None:
    model = skewed_conv_model()  # conv2 has no bias
    path = save(model, tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": (1 + rng.standard_normal(IMAGE)).astype(np.float32)},
                             8)
    out = tmp_path / "out.onnx"
    result = quantize(QuantizeRequest(model=path, output=out, data=DataOptions(calib=calib, eval_data=calib),
                                      bias_correction=True))
    assert result.report["recovery"]["bias_correction"]["layers_corrected"] == 2
    conv2 = next(n for n in onnx.load(str(out)).graph.node if n.name == "conv2")
    assert len(conv2.input) == 3


# ------------------------------------------------------------------ AdaRound


def correlated_columns(rng: np.random.Generator, count: int, fan_in: int) -> np.ndarray:
    mix = rng.standard_normal((fan_in, fan_in)) / np.sqrt(fan_in)
    return rng.standard_normal((count, fan_in)) @ mix + 0.5


def test_adaround_beats_round_to_nearest_within_floor_and_ceil() -> None:
    rng = np.random.default_rng(0)
    out, fan_in = 12, 24
    w = rng.standard_normal((1, out, fan_in))
    scale = np.abs(w).max(axis=2) / 63
    x = correlated_columns(rng, 400, fan_in)
    gram = (x.T @ x)[None]
    result = adaround(w, scale, gram, len(x), -64, 63, steps=400)
    ratio = w / scale[..., None]
    assert np.all((result.q == np.floor(ratio)) | (result.q == np.ceil(ratio)))
    nearest = np.rint(ratio)
    mse = {name: float(np.mean((x @ ((w - q * scale[..., None])[0]).T) ** 2)) for name, q in
           (("nearest", nearest), ("adaround", result.q))}
    assert mse["adaround"] < 0.8 * mse["nearest"]
    assert result.loss_chosen == pytest.approx(mse["adaround"])
    assert result.loss_nearest == pytest.approx(mse["nearest"])
    assert rounding_loss(w, nearest * scale[..., None], gram, len(x)) == pytest.approx(mse["nearest"])
    np.testing.assert_array_equal(np.abs(result.q).max(axis=2), 63)  # the scale cannot change


def test_adaround_in_the_pipeline_lowers_the_layer_error_and_keeps_the_scales(tmp_path: Path) -> None:
    plain, _, xs = quantize_gemm(tmp_path, "plain")
    learned, report, _ = quantize_gemm(tmp_path, "learned", adaround_seconds=5.0)
    rows = report["recovery"]["adaround"]["layers"]
    assert len(rows) == 1 and rows[0]["loss_adaround"] < rows[0]["loss_nearest"]
    w = initializers(gemm_model())["w"].astype(np.float64)
    q_plain = initializers(plain)["w_quantized"].astype(np.float64)
    q_learned = initializers(learned)["w_quantized"].astype(np.float64)
    scale = initializers(learned)["w_scale"].astype(np.float64)
    np.testing.assert_array_equal(scale, initializers(plain)["w_scale"])
    ratio = w / scale[:, None]
    assert np.all((q_learned == np.floor(ratio)) | (q_learned == np.ceil(ratio)))
    assert np.any(q_learned != q_plain)
    x = np.concatenate(xs).astype(np.float64)
    error = {name: float(np.mean((x @ (w - q * scale[:, None]).T) ** 2)) for name, q in
             (("plain", q_plain), ("learned", q_learned))}
    assert error["learned"] < error["plain"]


def test_adaround_shows_its_progress(tmp_path: Path) -> None:
    bars: dict[str, list[int]] = {}

    class Recording(Progress):
        def __init__(self, total: int, label: str) -> None:
            self.done = bars.setdefault(label, [total, 0])

        def update(self, n: int) -> None:
            self.done[1] += n

    quantize_gemm(tmp_path, "m", Recording, adaround_seconds=0.5)
    assert bars["reading layer inputs"] == [24, 24] and bars["adaround"][0] == bars["adaround"][1] >= 1


def test_adaround_output_is_byte_identical(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    first, _, _ = quantize_gemm(tmp_path / "a", "m", adaround_seconds=1.0)
    second, _, _ = quantize_gemm(tmp_path / "b", "m", adaround_seconds=1.0)
    assert first.SerializeToString() == second.SerializeToString()


# ------------------------------------------------------------------ CLI and errors


def test_cli_flags_end_to_end(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "conv.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": rng.standard_normal(IMAGE).astype(np.float32)}, 8)
    report_path = tmp_path / "r.json"
    args = ["quantize", model_path, "-o", tmp_path / "out.onnx", "--calib", calib, "--eval-data", calib, "-q",
            "--no-speed-guard", "--report", report_path, "--equalize", "--bias-correction", "--adaround",
            "--adaround-seconds", "2"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    recovery = json.loads(report_path.read_text())["recovery"]
    assert recovery["equalization"]["pairs"] == 1
    assert recovery["bias_correction"]["layers_corrected"] == 2
    assert len(recovery["adaround"]["layers"]) == 2
    feed = {"x": np.load(calib / "s000.npz")["x"]}
    reference, got = run(model_path, feed)[0], run(tmp_path / "out.onnx", feed)[0]
    assert np.dot(reference.ravel(), got.ravel()) / (np.linalg.norm(reference) * np.linalg.norm(got)) > 0.99


def test_recovery_needs_calibration_samples(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "conv.onnx")
    request = QuantizeRequest(model=model_path, output=tmp_path / "o.onnx", load_stats=tmp_path / "s.npz",
                              bias_correction=True, settings=QuantSettings())
    with pytest.raises(UsageError, match="need calibration samples"):
        quantize(request)
    request.mode, request.load_stats = "dynamic", None
    with pytest.raises(UsageError, match="static only"):
        quantize(request)


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 2, 1, 0], "strides": [2, 1]},
                                   {"pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 2}])
def test_conv_input_sums_equal_the_im2col_sums(attrs: dict) -> None:
    from onnxq.passes.recovery import _window_sums, find_layers
    from onnxq.quant.ir import import_graph
    from onnxq.quant.placement import PlacementOptions, place

    rng = np.random.default_rng(0)
    group = attrs.get("group", 1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], **attrs)]
    model = make_model(nodes, [tensor("x", [2, 4, 9, 11])], [tensor("y", [2, 6, None, None])],
                       {"w": weight(rng, (6, 4 // group, 3, 3))})
    graph = import_graph(model)
    layer = find_layers(graph, place(graph, PlacementOptions()))[0][0]
    x = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    cols, _ = layer.columns(x)
    expected = cols.reshape(int(np.prod(cols.shape[:3])), -1).sum(axis=0, dtype=np.float64)  # [groups * fan-in]
    got = _window_sums(layer, x, cols.shape[1:3]).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
