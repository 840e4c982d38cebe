"""What the CPU's int8 kernels can do, read from the operating system.

x86 CPUs without VNNI multiply uint8 activations by int8 weights with an
instruction (vpmaddubsw) that adds pairs of products into int16 and saturates:
with full-range weights (|w| up to 127) and activations near 255 the sum
overflows and the int8 model silently computes wrong values. Weights limited
to 7 bits (|w| <= 63) cannot overflow. VNNI and AMX accumulate in int32.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8")


@dataclass(frozen=True)
class CpuFeatures:
    arch: str
    flags: frozenset[str]

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "i386", "i686")

    @property
    def has_vnni(self) -> bool:
        return any(flag in self.flags for flag in VNNI_FLAGS)

    @property
    def int8_products_may_saturate(self) -> bool:
        return self.is_x86 and not self.has_vnni


def read_cpu_features(cpuinfo: str | None = None, arch: str | None = None) -> CpuFeatures:
    """Parse /proc/cpuinfo (or the given text); unknown platforms report no flags."""
    arch = (arch or platform.machine()).lower()
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    return CpuFeatures(arch, frozenset(flags))


def default_weight_range(features: CpuFeatures) -> str:
    """'reduced' (7-bit weights) where int8 products can saturate, else 'full'."""
    return "reduced" if features.int8_products_may_saturate else "full"
