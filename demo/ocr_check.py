"""Task-level check for the demo: does the int8 recogniser read the same text as fp32?

Usage: python -m demo.ocr_check FP32.onnx INT8.onnx LINES_FOLDER [--json]
LINES_FOLDER holds NNN.png text-line images and labels.tsv (file<TAB>ground truth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from demo.ocr import char_accuracy, ctc_decode, load_charset, preprocess, text_margin

NEAR_TIE = 0.05  # a text margin below this: a small change of the weights may flip the line (demo.ocr.text_margin)


def read_lines(model: Path | bytes, images: list[Path], charset: list[str]) -> tuple[list[str], list[float]]:
    """Each line's text and its text margin (demo.ocr.text_margin); `model` is a file or serialized bytes."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    texts, margins = [], []
    for path in images:
        probs = session.run(None, {name: preprocess(path)})[0]
        texts.append(ctc_decode(probs, charset)[0])
        margins.append(text_margin(probs[0], charset))
    return texts, margins


def compare(fp32: Path, int8: Path, folder: Path) -> dict:
    rows = [line.split("\t", 1) for line in (folder / "labels.tsv").read_text().splitlines() if line]
    images = [folder / name for name, _ in rows]
    truth = [text for _, text in rows]
    charset = load_charset(fp32)
    ref, margins = read_lines(fp32, images, charset)
    got, _ = read_lines(int8, images, charset)
    same = [a == b for a, b in zip(ref, got, strict=True)]
    return {
        "lines": len(rows),
        "same_text_as_fp32": sum(same),
        "same_text_fraction": sum(same) / len(rows),
        "fp32_near_ties": sum(m < NEAR_TIE for m in margins),
        "fp32_char_accuracy": float(np.mean([char_accuracy(p, t) for p, t in zip(ref, truth, strict=True)])),
        "int8_char_accuracy": float(np.mean([char_accuracy(p, t) for p, t in zip(got, truth, strict=True)])),
        "fp32_exact_lines": sum(p == t for p, t in zip(ref, truth, strict=True)),
        "int8_exact_lines": sum(p == t for p, t in zip(got, truth, strict=True)),
        "differences": [{"image": i.name, "truth": t, "fp32": a, "int8": b, "fp32_margin": round(m, 4)}
                        for i, t, a, b, m in zip(images, truth, ref, got, margins, strict=True) if a != b],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = compare(args.fp32, args.int8, args.folder)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    n = result["lines"]
    print(f"task check on {n} held-back text lines ({args.folder}):")
    print(f"  int8 reads the same text as fp32 on {result['same_text_as_fp32']}/{n} lines "
          f"({result['same_text_fraction']:.1%})")
    print(f"  character accuracy vs ground truth: fp32 {result['fp32_char_accuracy']:.2%}, "
          f"int8 {result['int8_char_accuracy']:.2%}; exact lines fp32 {result['fp32_exact_lines']}/{n}, "
          f"int8 {result['int8_exact_lines']}/{n}")
    print(f"  fp32 is a near tie on {result['fp32_near_ties']}/{n} lines (a second-likeliest class within "
          f"{NEAR_TIE} probability would change the text): such lines flip under small changes of the weights")
    for diff in result["differences"]:
        print(f"  {diff['image']}: truth {diff['truth']!r}  fp32 {diff['fp32']!r}  int8 {diff['int8']!r}  "
              f"(fp32 margin {diff['fp32_margin']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
