"""Run a command as if on a smaller CPU class: python -m bench.cpu_mask avx2 -- COMMAND [ARGS...]

The child sees the class's cpuid (bench/cpu_mask) and ONNXQ_HOST_CPU=<class>; the kernels are checked first
(AVX2's int8 kernel saturates, VNNI's and AMX's do not) and a mask that does not take is an error.
"""

from __future__ import annotations

import subprocess
import sys

from bench.cpu_mask import MASKABLE, cpuid_faulting_available, kernels_check, masked_env


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] not in MASKABLE or args[1] != "--":
        print(__doc__.strip().splitlines()[0] + f"\n(classes: {', '.join(MASKABLE)})", file=sys.stderr)
        return 2
    cpu_class, cmd = args[0], args[2:]
    if not cpuid_faulting_available():
        print("cpuid faulting is not available here (no cpuid_fault in /proc/cpuinfo)", file=sys.stderr)
        return 2
    want = "saturating" if cpu_class == "avx2" else "exact"
    got = kernels_check(cpu_class)
    if got != want:
        print(f"the mask did not take: int8 kernels {got}, {cpu_class} gives {want}", file=sys.stderr)
        return 2
    return subprocess.run(cmd, env=masked_env(cpu_class)).returncode


if __name__ == "__main__":
    raise SystemExit(main())
