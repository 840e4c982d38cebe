"""Child process: quantize with onnxruntime.quantization (static after quant_pre_process, or dynamic).

Usage: python -m bench.peers static|dynamic MODEL OUT [--calib DIR] [--format QDQ|QOperator]
       [--method MinMax|Entropy|Percentile] [--reduce-range]
Calibration data is the same folder of .npz feeds onnxq gets.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


class NpzReader(CalibrationDataReader):
    """Feeds every ``*.npz`` of a folder in sorted order."""

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.npz"))
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next feed, or None at the end."""
        if self.index >= len(self.files):
            return None
        with np.load(self.files[self.index]) as data:
            feed = {k: data[k] for k in data.files}
        self.index += 1
        return feed

    def rewind(self) -> None:
        """Start again from the first file."""
        self.index = 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and quantize."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["static", "dynamic"])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calib", type=Path)
    p.add_argument("--format", default="QDQ", choices=["QDQ", "QOperator"])
    p.add_argument("--method", default="MinMax", choices=["MinMax", "Entropy", "Percentile"])
    p.add_argument("--reduce-range", action="store_true")
    a = p.parse_args(argv)
    a.model, a.out = a.model.resolve(), a.out.resolve()
    a.calib = a.calib.resolve() if a.calib else None
    os.chdir(a.out.parent)  # quant_pre_process writes sym_shape_infer_temp.onnx into the working folder
    pre = a.out.with_name(a.out.stem + ".pre.onnx")
    src = a.model
    model = onnx.load(str(a.model))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:  # per-channel DequantizeLinear needs opset 13; onnxq converts the same way
        src = a.out.with_name(a.out.stem + ".op13.onnx")
        onnx.save(version_converter.convert_version(model, 13), str(src))
        print(f"NOTE: opset {opset} converted to 13 before quantization", flush=True)
    del model
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as exc:  # ORT's symbolic shape inference fails on some exports
        print(f"NOTE: quant_pre_process failed ({exc}); retried with skip_symbolic_shape=True", flush=True)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    if a.mode == "dynamic":
        quantize_dynamic(str(pre), str(a.out), per_channel=True, weight_type=QuantType.QInt8,
                         reduce_range=a.reduce_range)
    else:
        quantize_static(str(pre), str(a.out), NpzReader(a.calib),
                        quant_format=getattr(QuantFormat, a.format), per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, a.method),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=a.reduce_range)
    pre.unlink(missing_ok=True)
    if src != a.model:
        src.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
