"""`convert` on QDQ models written by onnxruntime's quantize_static: the input model's float tensors stay float.

The model is EfficientNet-like (squeeze-and-excitation through ReduceMean, a mean-pooling head);
quantize_static runs in the test (onnxruntime.quantization: tests may use it, onnxq never does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import bias, cosine, make_model, run, tensor, weight, write_npz_folder
from onnx import helper

from onnxq.commands.convert import ConvertRequest, convert
from onnxq.commands.convert_plan import fit_pooling_scales
from onnxq.commands.pipeline import DataOptions
from onnxq.quant.ir import import_graph
from onnxq.quant.plan import QuantPlan, QuantSettings, TensorPlan

quantization = pytest.importorskip("onnxruntime.quantization")


def se_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> squeeze-and-excitation (ReduceMean, 1x1 Convs, Sigmoid, Mul) -> Conv -> mean -> Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["c1"], ["r1"], name="stem_relu"),
             helper.make_node("ReduceMean", ["r1"], ["sq"], axes=[2, 3], keepdims=1, name="squeeze"),
             helper.make_node("Conv", ["sq", "w2", "b2"], ["e1"], name="reduce"),
             helper.make_node("Relu", ["e1"], ["e1r"], name="reduce_relu"),
             helper.make_node("Conv", ["e1r", "w3", "b3"], ["e2"], name="expand"),
             helper.make_node("Sigmoid", ["e2"], ["gate"], name="gate"),
             helper.make_node("Mul", ["r1", "gate"], ["scaled"], name="excite"),
             helper.make_node("Conv", ["scaled", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1], name="head"),
             helper.make_node("ReduceMean", ["c4"], ["pooled"], axes=[2, 3], keepdims=0, name="pool"),
             helper.make_node("Gemm", ["pooled", "fc", "fcb"], ["y"], transB=1, name="fc")]
    inits = {"w1": weight(rng, (8, 3, 3, 3)), "b1": bias(rng, 8), "w2": weight(rng, (4, 8, 1, 1)), "b2": bias(rng, 4),
             "w3": weight(rng, (8, 4, 1, 1)), "b3": bias(rng, 8), "w4": weight(rng, (16, 8, 3, 3)),
             "b4": bias(rng, 16), "fc": weight(rng, (10, 16)), "fcb": bias(rng, 10)}
    return make_model(nodes, [tensor("x", [1, 3, 16, 16])], [tensor("y", [1, 10])], inits)


class Reader(quantization.CalibrationDataReader):
    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.npz"))

    def get_next(self) -> dict | None:
        if not self.files:
            return None
        with np.load(self.files.pop(0)) as data:
            return {key: data[key] for key in data.files}


@pytest.fixture
def ort_qdq(tmp_path: Path) -> tuple[Path, Path]:
    """quantize_static's QDQ model (per channel) with the squeeze's 1x1 Conv and the classifier excluded:
    the mean tensors before them stay float in it."""
    source, output = tmp_path / "se.onnx", tmp_path / "se.qdq.onnx"
    onnx.save(se_model(), str(source))
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": rng.standard_normal((1, 3, 16, 16))
                                                               .astype(np.float32)}, 8)
    quantization.quantize_static(str(source), str(output), Reader(calib), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, nodes_to_exclude=["reduce", "fc"])
    return output, calib


def test_float_tensors_of_the_input_stay_float(tmp_path: Path, ort_qdq: tuple[Path, Path]) -> None:
    source, calib = ort_qdq
    out = tmp_path / "c.onnx"
    result = convert(ConvertRequest(model=source, output=out, data=DataOptions(eval_data=calib)))
    kept = {k["name"] for k in result.report["float_nodes"]}
    assert {"reduce", "fc"} <= kept  # what quantize_static excluded stays float
    assert result.report["tensor_origins"]["calibrated"] == []
    assert result.report["fidelity"]["outputs"][0]["cosine"] > 0.9999  # the same model, int8 where it was
    feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    assert cosine(run(source, feed)[0], run(out, feed)[0]) > 0.9999


def test_calibrating_them_is_opt_in_and_runs(tmp_path: Path, ort_qdq: tuple[Path, Path]) -> None:
    source, calib = ort_qdq
    out = tmp_path / "c.onnx"
    result = convert(ConvertRequest(model=source, output=out, data=DataOptions(calib=calib),
                                    calibrate_missing=True))
    assert result.report["float_nodes"] == [] and "sq" in result.report["tensor_origins"]["calibrated"]
    assert {"reduce", "fc"} <= {n["name"] for n in result.report["quantized_nodes"] if n["status"] == "int8"}
    feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    assert cosine(run(source, feed)[0], run(out, feed)[0]) > 0.8


def test_pooling_output_scale_fits_onnxruntimes_kernel() -> None:
    """QLinearGlobalAveragePool refuses x_scale / (y_scale * pixels) >= 256: a calibrated mean is widened."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["m"], name="gap")]
    graph = import_graph(make_model(nodes, [tensor("x", [1, 4, 8, 8])], [tensor("m", [1, 4, 1, 1])], {}))
    plan = QuantPlan(settings=QuantSettings(), tensors={
        "x": TensorPlan(name="x", role="activation", qtype="uint8", scale=[0.5], zero_point=[128], source="x"),
        "m": TensorPlan(name="m", role="activation", qtype="uint8", scale=[1e-6], zero_point=[128], source="m",
                        range=[-1e-4, 1.5e-4])})
    fit_pooling_scales(graph, plan, {"m"})
    assert 0.5 / (plan.tensors["m"].scale[0] * 64) < 256
    assert plan.tensors["m"].zero_point == [round(1e-4 / plan.tensors["m"].scale[0])]  # the range's low end stays
    learned = TensorPlan(name="m", role="activation", qtype="uint8", scale=[1e-6], zero_point=[128], source="m")
    plan.tensors["m"] = learned
    fit_pooling_scales(graph, plan, set())  # learned parameters are the input model's: left alone
    assert plan.tensors["m"] is learned
