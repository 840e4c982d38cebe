"""Quantize every model of the robustness corpus with onnxq and check the results independently.

Run from the repository root with the onnxq venv:
    .venv/bin/python -m bench.robustness.sweep [--root /tmp/robust] [--only SUBSTRING ...] [--tag before]
For each OUT/models/<key>.onnx and configuration (default, --format qoperator, --mode dynamic) it runs
`onnxq quantize` one at a time and records the exit code, the last stderr line, whether a traceback or
"internal error" appeared, the report's fidelity cosine and, independently of onnxq, onnx.checker (full
check) and the cosine to fp32 over all 8 calibration feeds in onnxruntime. Results: OUT/sweep-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

CONFIGS = {"default": [], "qop": ["--format", "qoperator"], "dyn": ["--mode", "dynamic"],
           "nosg": ["--no-speed-guard"]}  # the speed guard (timings) hides code paths: also sweep without it
TIMEOUT = 900
ENV = dict(os.environ)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path: Path, calib: Path) -> list[np.ndarray]:
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    result = []
    for feed in sorted(calib.glob("*.npz")):
        with np.load(feed) as data:
            result.append(np.concatenate([np.asarray(v, np.float64).ravel()
                                          for v in sess.run(names, dict(data))]))
    return result


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def verify(out: Path, calib: Path, reference: list[np.ndarray]) -> dict:
    found: dict = {}
    try:
        onnx.checker.check_model(str(out), full_check=True)
        found["checker"] = "ok"
    except Exception as exc:
        found["checker"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    try:
        candidate = outputs(out, calib)
        found["cos_min"] = min(cosine(r, c) for r, c in zip(reference, candidate, strict=True))
        # Random-init models often have outputs dominated by a constant (biases): cosine ~1 whatever the
        # weights. Centred on the fp32 mean over the samples, the cosine sees the input-dependent part.
        mean = np.mean(reference, axis=0)
        # How much of the fp32 output depends on the input at all (random-init googlenet, mobilenet_v3 and
        # deeplabv3 give ~1e-7: their cosines say nothing about the quantization).
        found["input_dependence"] = float(np.linalg.norm(np.array(reference) - mean) / np.linalg.norm(reference))
        found["ccos"] = cosine(np.concatenate(reference) - np.tile(mean, len(reference)),
                               np.concatenate(candidate) - np.tile(mean, len(reference)))
    except Exception as exc:
        found["ort"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return found


def run_one(model: Path, calib: Path, work: Path, config: str, reference: list[np.ndarray] | None) -> dict:
    out, report = work / f"{model.stem}.{config}.onnx", work / f"{model.stem}.{config}.json"
    out.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    cmd = [str(Path(".venv/bin/onnxq").resolve()), "quantize", str(model), "-o", str(out), "--calib", str(calib),
           "--report", str(report), *CONFIGS[config]]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
        rc, stderr, stdout = proc.returncode, proc.stderr, proc.stdout
    except subprocess.TimeoutExpired:
        rc, stderr, stdout = "timeout", "", ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    row = {"rc": rc, "seconds": round(time.time() - start, 1), "last": lines[-1][:240] if lines else "",
           "traceback": "Traceback" in stderr or "internal error" in (stderr + stdout).lower()}
    if row["traceback"]:
        (work / f"{model.stem}.{config}.stderr").write_text(stderr)
    if rc == 0 and report.exists():
        fidelity = json.loads(report.read_text()).get("fidelity") or {}
        cosines = [o.get("cosine") for o in fidelity.get("outputs", []) if o.get("cosine") is not None]
        row["report_cos"] = min(cosines) if cosines else None
        nodes = json.loads(report.read_text()).get("nodes") or {}
        row["quantized"] = f"{nodes.get('quantized')}/{nodes.get('total')}"
    if rc == 0 and out.exists() and reference is not None:
        row.update(verify(out, calib, reference))
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=Path("/tmp/robust"))
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--resume", action="store_true", help="skip runs already in the results file")
    parser.add_argument("--configs", nargs="*", default=["default", "qop", "dyn"])
    parser.add_argument("--tag", default="before")
    parser.add_argument("--onnxq-path", help="import onnxq from this folder instead (e.g. an export of the "
                        "commit before the fixes)")
    args = parser.parse_args()
    if args.onnxq_path:
        ENV["PYTHONPATH"] = args.onnxq_path
    work = args.root / f"out-{args.tag}"
    work.mkdir(parents=True, exist_ok=True)
    result_path = args.root / f"sweep-{args.tag}.json"
    results = json.loads(result_path.read_text()) if result_path.exists() else {}
    for model in sorted((args.root / "models").glob("*.onnx")):
        if (args.only and not any(s in model.stem for s in args.only)) or any(s in model.stem for s in args.skip):
            continue
        calib = args.root / "calib" / model.stem
        try:
            reference = outputs(model, calib)
        except Exception as exc:
            reference = None
            results.setdefault(model.stem, {})["fp32"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        for config in args.configs:
            if args.resume and config in results.get(model.stem, {}):
                continue
            row = run_one(model, calib, work, config, reference)
            results.setdefault(model.stem, {})[config] = row
            print(model.stem, config, json.dumps(row), flush=True)
            result_path.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
