"""`onnxq convert` on QDQ models written by onnxruntime's quantize_static for the corpus's CNN exports.

    .venv/bin/python -m bench.robustness.convert_ort_qdq [--root /tmp/robust] [--only NAME ...]

For each OUT/models/<name>.onnx (export_corpus.py), after quant_pre_process (shapes, no symbolic
inference), quantize_static writes a QDQ model (per channel,
uint8 activations, its MinMax calibration on the export's 8 feeds), twice: all op types, and only
Conv (op_types_to_quantize), which leaves residual Adds, pooling and the classifier float. Then
`onnxq convert` runs on each with the defaults (tensors the input leaves float stay float) and with
`--calibrate-missing --calib`. Every result is checked independently: it loads and runs in
onnxruntime, and its outputs are compared with the QDQ model's over all feeds (cosine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime import quantization

from onnxq.commands.report import LEFT_FLOAT_BY_INPUT

DEFAULT_ONLY = ["resnet18__ts17", "mobilenet_v3_small__ts17", "efficientnet_b0__ts17", "shufflenet_v2_x0_5__ts17",
                "regnet_y_400mf__ts17"]


class Feeds(quantization.CalibrationDataReader):
    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("*.npz"))

    def get_next(self) -> dict | None:
        if not self.files:
            return None
        with np.load(self.files.pop(0)) as data:
            return {key: data[key] for key in data.files}


def outputs(path: Path, calib: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    found = []
    for file in sorted(calib.glob("*.npz")):
        with np.load(file) as data:
            found.append(np.concatenate([np.ravel(o) for o in session.run(None, dict(data))]).astype(np.float64))
    return np.concatenate(found)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def one(name: str, root: Path, work: Path) -> list[dict]:
    source, calib = root / "models" / f"{name}.onnx", root / "calib" / name
    prepared = work / f"{name}.pre.onnx"  # as onnxruntime recommends before quantize_static
    quantization.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    rows = []
    for variant, op_types in (("all ops", None), ("Conv only", ["Conv"])):
        qdq = work / f"{name}.{'conv' if op_types else 'all'}.qdq.onnx"
        quantization.quantize_static(str(prepared), str(qdq), Feeds(calib), quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, op_types_to_quantize=op_types)
        reference = outputs(qdq, calib)
        for mode, extra in (("default", []), ("--calibrate-missing", ["--calibrate-missing", "--calib", str(calib)])):
            out = work / f"{qdq.stem}.{'cal' if extra else 'def'}.onnx"
            command = [sys.executable, "-m", "onnxq", "convert", str(qdq), "-o", str(out), "--json", "-q", *extra]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            row = {"model": name, "input": variant, "convert": mode, "exit": done.returncode,
                   "error": done.stderr.strip()[:200]}
            if done.returncode == 0:
                report = json.loads(done.stdout)
                left = [n for n in report["float_nodes"] if n["reason"].startswith(LEFT_FLOAT_BY_INPUT)]
                row.update(kept_float=len(left), calibrated=len(report["tensor_origins"]["calibrated"]),
                           int8_kernels=sum(report["fusion"]["int8_kernels"].values()),
                           cosine_to_qdq=round(cosine(reference, outputs(out, calib)), 5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/robust"))
    parser.add_argument("--only", nargs="*", default=DEFAULT_ONLY)
    args = parser.parse_args()
    work = args.root / "ort-qdq"
    work.mkdir(exist_ok=True)
    rows = [row for name in args.only for row in one(name, args.root, work)]
    (args.root / "convert-ort-qdq.json").write_text(json.dumps(rows, indent=1))
    print("| model | quantize_static | convert | exit | nodes kept float | tensors calibrated | int8 kernels | "
          "cosine to the QDQ model |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['convert']} | {r['exit']} | {r.get('kept_float', '')} | "
              f"{r.get('calibrated', '')} | {r.get('int8_kernels', '')} | {r.get('cosine_to_qdq', r['error'])} |")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
