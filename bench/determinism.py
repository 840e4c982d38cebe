"""Same inputs, same target class -> the same model bytes, whatever the machine and its load.

Quantizes the demo recogniser (or MODEL with its options) several times with the same
--target-cpu and compares the written files byte for byte:
- with different host classes forced (ONNXQ_HOST_CPU), which is what onnxq reads;
- with onnxruntime's kernels of other classes really running (bench/cpu_mask hides CPU features
  from cpuid, so the fp32 calibration pass computes with AVX2 or AVX-512 kernels instead of AMX
  and its float results differ in the last bits);
- while two busy processes keep both cores loaded.

    .venv/bin/python -m bench.determinism            # default method
    .venv/bin/python -m bench.determinism --method kl
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.cpu_mask import SMALLER, cpuid_faulting_available, masked_env
from onnxq.cpu import host_cpu

ROOT = Path(__file__).resolve().parent.parent
DEMO = ["demo/ppocr_v4_rec.onnx", "--calib", "calibration_data/ocr_lines/calib", "--image-size", "320x48",
        "--mean", "0.5", "--std", "0.5"]


def quantize(args: list[str], out: Path, env: dict[str, str]) -> str:
    subprocess.run([str(ROOT / ".venv" / "bin" / "onnxq"), "quantize", *args, "-o", str(out), "-q"], env=env,
                   cwd=ROOT, check=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="global")
    parser.add_argument("--target-cpu", default="avx512-vnni")
    args = parser.parse_args()
    base = [*DEMO, "--method", args.method, "--target-cpu", args.target_cpu]
    env = {k: v for k, v in os.environ.items() if k != "ONNXQ_HOST_CPU"}
    native = host_cpu().cpu_class
    runs: dict[str, dict[str, str]] = {
        f"host forced to {cls}": {**env, "ONNXQ_HOST_CPU": cls} for cls in ("avx2", "amx")}
    if cpuid_faulting_available():
        runs.update({f"{cls} kernels (cpuid masked)": masked_env(cls, env) for cls in SMALLER.get(native, ())})
    runs[f"{native} kernels, native"] = env
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, run_env) in enumerate(runs.items()):
            digests[name] = quantize(base, Path(tmp) / f"{index}.onnx", run_env)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
        try:
            for index in range(2):
                digests[f"both cores busy, run {index + 1}"] = quantize(base, Path(tmp) / f"busy{index}.onnx", env)
        finally:
            for process in busy:
                process.kill()
    for name, digest in digests.items():
        print(f"{digest[:16]}  {name}")
    same = len(set(digests.values())) == 1
    print(f"{'identical' if same else 'DIFFERENT'}: {len(digests)} runs of `onnxq quantize {' '.join(base)}`")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
