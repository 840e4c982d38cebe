"""How much "same text as fp32" any weight change costs the demo recogniser (README, demo section).

Rounds the Conv/MatMul/Gemm weights of the prepared fp32 model (what onnxq quantizes) to N bits
per output channel, or multiplies every weight by (1 + r * N(0, 1)), keeps all compute in float,
and counts the held-back lines read as fp32 reads them.

Usage: python -m demo.noise_floor [--bits 10 8 7] [--noise 0.003 0.01] [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from demo.ocr import load_charset
from demo.ocr_check import read_lines
from onnxq.passes.prepare import prepare_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "demo" / "ppocr_v4_rec.onnx"
LINES = ROOT / "calibration_data" / "ocr_lines" / "eval"
WEIGHTED_OPS = {"Conv": 0, "MatMul": -1, "Gemm": -1}  # output-channel axis of the weight


def rounded(weight: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Symmetric per-channel rounding to `bits` bits, back in float."""
    levels = 2 ** (bits - 1) - 1
    axis = axis % weight.ndim
    others = tuple(i for i in range(weight.ndim) if i != axis)
    scale = np.abs(weight).max(axis=others, keepdims=True) / levels
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(weight / scale), -levels, levels) * scale).astype(np.float32)


def jittered(weight: np.ndarray, _axis: int, rng: np.random.Generator, relative: float) -> np.ndarray:
    """weight * (1 + relative * N(0, 1)), element-wise."""
    return (weight * (1 + relative * rng.standard_normal(weight.shape))).astype(np.float32)


def with_weights(model: onnx.ModelProto, change: Callable[[np.ndarray, int], np.ndarray]) -> onnx.ModelProto:
    """A copy whose Conv/MatMul/Gemm constant weights (rank >= 2) went through `change(weight, axis)`."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    initializers = {t.name: t for t in changed.graph.initializer}
    for node in changed.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in initializers:
            tensor = initializers[node.input[1]]
            weight = numpy_helper.to_array(tensor)
            if weight.ndim >= 2 and weight.dtype == np.float32:
                tensor.CopyFrom(numpy_helper.from_array(change(weight, WEIGHTED_OPS[node.op_type]), tensor.name))
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="*", default=[10, 8, 7])
    parser.add_argument("--noise", type=float, nargs="*", default=[0.003, 0.01])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    charset = load_charset(MODEL)
    images = [LINES / line.split("\t", 1)[0] for line in (LINES / "labels.tsv").read_text().splitlines() if line]
    prepared = prepare_model(onnx.load(str(MODEL))).model
    reference, _ = read_lines(MODEL, images, charset)

    def same(model: onnx.ModelProto) -> int:
        texts, _ = read_lines(model.SerializeToString(), images, charset)
        return sum(a == b for a, b in zip(reference, texts, strict=True))

    print(f"same text as fp32 on {len(images)} held-back lines ({LINES.relative_to(ROOT)}):")
    print(f"  prepared fp32 model: {same(prepared)}")
    for bits in args.bits:
        count = same(with_weights(prepared, partial(rounded, bits=bits)))
        print(f"  weights rounded to {bits} bits per channel: {count}")
    for noise in args.noise:
        counts = [same(with_weights(prepared, partial(jittered, rng=np.random.default_rng(seed), relative=noise)))
                  for seed in range(args.seeds)]
        print(f"  every weight x (1 + {noise} N(0,1)), seeds 0..{args.seeds - 1}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
