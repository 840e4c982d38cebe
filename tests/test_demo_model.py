"""End to end on the bundled real model: PP-OCRv4 text recogniser on rendered text lines."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from demo.ocr import text_margin
from demo.ocr_check import compare
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.runtime.data import ImagePreprocessing

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "ppocr_v4_rec.onnx"
LINES = ROOT / "calibration_data" / "ocr_lines"
PREPROCESSING = ImagePreprocessing(size=(320, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


EVAL_LINES = 60  # of the 200 held-back lines: keeps the test quick


@pytest.fixture(scope="module")
def eval_lines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    rows = (LINES / "eval" / "labels.tsv").read_text().splitlines()[:EVAL_LINES]
    for row in rows:
        name = row.split("\t", 1)[0]
        shutil.copy(LINES / "eval" / name, folder / name)
    (folder / "labels.tsv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, eval_lines: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "rec.int8.onnx"
    request = QuantizeRequest(
        model=MODEL, output=out,
        data=DataOptions(calib=LINES / "calib", eval_data=eval_lines, images=PREPROCESSING, max_samples=24),
        speed_guard="off",  # every layer int8: the numerics under test do not depend on this machine's timings
    )
    return out, quantize(request).report


def test_bundled_model_reads_the_same_text(quantized: tuple[Path, dict], eval_lines: Path) -> None:
    path, _ = quantized
    result = compare(MODEL, path, eval_lines)
    # make demo (all 64 calibration lines, 200 held-back lines) measures 95 %; 60 lines keep the test quick.
    assert result["same_text_fraction"] >= 0.9, result["differences"]
    assert result["int8_char_accuracy"] >= result["fp32_char_accuracy"] - 0.005
    assert 0 <= result["fp32_near_ties"] < EVAL_LINES // 10
    assert all(0.0 <= d["fp32_margin"] <= 1.0 for d in result["differences"])


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


def test_text_margin_counts_only_ties_that_change_the_text() -> None:
    charset = ["blank", "a", "b", " "]
    # frames: a (sure), a vs blank 0.51/0.49 (either way "a"), b vs a 0.60/0.30 (changes the text)
    probs = np.array([[0.0, 1.0, 0.0, 0.0],
                      [0.49, 0.51, 0.0, 0.0],
                      [0.10, 0.30, 0.60, 0.0]], dtype=np.float32)
    assert text_margin(probs, charset) == pytest.approx(0.30)
    confident = np.eye(4, dtype=np.float32)[[1, 0, 2]]
    assert text_margin(confident, charset) == pytest.approx(1.0)
