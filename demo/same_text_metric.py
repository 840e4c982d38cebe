"""`onnxq quantize --metric` for the demo recogniser: the share of lines read exactly as fp32 reads them.

    onnxq quantize demo/ppocr_v4_rec.onnx -o rec.int8.onnx --calib calibration_data/ocr_lines/calib \
        --image-size 320x48 --mean 0.5 --std 0.5 \
        --metric demo/same_text_metric.py --target-metric 1.0 --target-data calibration_data/ocr_lines/calib
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loaded by file path: make `demo` importable

from demo.ocr import ctc_decode, load_charset  # noqa: E402

CHARSET = load_charset(REPO / "demo" / "ppocr_v4_rec.onnx")


def score(references: list[dict[str, np.ndarray]], candidates: list[dict[str, np.ndarray]],
          _feeds: list[dict[str, np.ndarray]]) -> float:
    same = [_text(r) == _text(c) for r, c in zip(references, candidates, strict=True)]
    return sum(same) / len(same)


def _text(outputs: dict[str, np.ndarray]) -> str:
    return ctc_decode(next(iter(outputs.values())), CHARSET)[0]
