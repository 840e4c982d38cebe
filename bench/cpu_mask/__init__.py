"""Run a command as if on a smaller x86 CPU class (AVX2 without VNNI, or AVX-512 VNNI without AMX).

`cpuid_mask.c` (compiled here on first use into bench/.cache/cpu_mask/) is preloaded into the
child process; it hides the CPU features the class lacks from every cpuid instruction, so
onnxruntime's MLAS picks that class's kernels. It needs Linux's cpuid faulting (`cpuid_fault`
in /proc/cpuinfo); `kernels_check()` proves in a child which int8 kernels run (AVX2's u8s8
kernel saturates pairs of products in int16, VNNI's does not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY = HERE.parent / ".cache" / "cpu_mask" / "cpuid_mask.so"
MASKABLE = ("avx2", "avx512-vnni")
# What each host class can also run as (a class can only be masked down to a smaller one).
SMALLER = {"amx": ("avx512-vnni", "avx2"), "avx512-vnni": ("avx2",), "avx2": ()}


def library() -> Path:
    source = HERE / "cpuid_mask.c"
    if not LIBRARY.exists() or LIBRARY.stat().st_mtime < source.stat().st_mtime:
        LIBRARY.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(LIBRARY), str(source)], check=True)
    return LIBRARY


def cpuid_faulting_available() -> bool:
    text = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    return " cpuid_fault" in text


def masked_env(cpu_class: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child that sees `cpu_class` (also tells onnxq its host class)."""
    env = dict(os.environ if env is None else env)
    env["ONNXQ_HOST_CPU"] = cpu_class
    if cpu_class in MASKABLE:
        env["ONNXQ_CPUID_MASK"] = cpu_class
        env["LD_PRELOAD"] = " ".join(p for p in (str(library()), env.get("LD_PRELOAD", "")) if p)
    return env


SATURATION_PROBE = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
k = 64
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 16])],
                          [numpy_helper.from_array(np.full((k, 16), 127, np.int8), "b")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 7
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
got = int(session.run(None, {"a": np.full((4, k), 255, np.uint8)})[0][0, 0])
print("saturating" if got != 255 * 127 * k else "exact")
"""


def kernels_check(cpu_class: str) -> str:
    """'saturating' (AVX2's u8s8 kernel) or 'exact' (VNNI/AMX), as a child seeing `cpu_class` finds it."""
    result = subprocess.run([sys.executable, "-c", SATURATION_PROBE], env=masked_env(cpu_class),
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()
