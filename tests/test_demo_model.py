"""End to end on the bundled real model: PP-OCRv4 text recogniser on rendered text lines."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from demo.ocr_check import compare
from onnxq.data import ImagePreprocessing
from onnxq.pipeline import DataOptions, QuantizeRequest, quantize

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "ppocr_v4_rec.onnx"
LINES = ROOT / "calibration_data" / "ocr_lines"
PREPROCESSING = ImagePreprocessing(size=(320, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "rec.int8.onnx"
    request = QuantizeRequest(
        model=MODEL, output=out,
        data=DataOptions(calib=LINES / "calib", eval_data=LINES / "eval", images=PREPROCESSING, max_samples=24),
    )
    return out, quantize(request).report


def test_bundled_model_reads_the_same_text(quantized: tuple[Path, dict]) -> None:
    path, _ = quantized
    result = compare(MODEL, path, LINES / "eval")
    # Measured 46/48 with all 64 calibration lines; 24 lines keep the test quick.
    assert result["same_text_fraction"] >= 0.9, result["differences"]
    assert result["int8_char_accuracy"] >= result["fp32_char_accuracy"] - 0.005


def test_bundled_model_report(quantized: tuple[Path, dict]) -> None:
    path, report = quantized
    assert report["size"]["ratio"] > 3.0
    assert report["nodes"]["by_op_type"]["Conv"] == {"int8": 38}
    assert report["nodes"]["by_op_type"]["MatMul"] == {"int8": 13}
    output = report["fidelity"]["outputs"][0]
    assert output["cosine"] > 0.9 and output["top1_agreement"] > 0.88
    assert report["data"]["calibration"]["preprocessing"]["size"] == [320, 48]
    model = onnx.load(str(path))
    assert {p.key for p in model.metadata_props} == {"character"}  # the charset survives the rewrite
    onnx.checker.check_model(model)
