"""CPU classes: what the deployment CPU's int8 kernels can do, and which decisions follow from it.

x86 CPUs without VNNI multiply uint8 activations by int8 weights with an instruction
(vpmaddubsw) that adds pairs of products into int16 and saturates: with full-range weights
(|w| up to 127) and activations near 255 the sum overflows and the int8 model silently
computes wrong values. Weights limited to 7 bits (|w| <= 63) cannot overflow. VNNI and AMX
accumulate in int32.

Everything CPU-dependent in onnxq (weight range, the speed guard's table row) reads a
`TargetCpu`, never the host directly: by default the host's class, `--target-cpu` names a
preset (avx2, avx512-vnni, amx, arm64, host) or a file (a /proc/cpuinfo copy or `onnxq doctor
--json` output). The environment variable ONNXQ_HOST_CPU=<preset> makes onnxq describe the host
as that preset (tests and CI pools use it to get the same decisions on every machine).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from onnxq.errors import DataError, UsageError

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8")
HOST_OVERRIDE_ENV = "ONNXQ_HOST_CPU"

# cpuinfo flag -> what it is, for the int8 kernels onnxruntime picks.
INT8_FEATURES = {
    "avx2": "AVX2 (256-bit integer SIMD)",
    "avx512bw": "AVX-512 BW",
    "avx512_vnni": "AVX-512 VNNI (int8 dot products, int32 accumulation)",
    "avx_vnni": "AVX-VNNI (int8 dot products on 256-bit registers)",
    "amx_int8": "AMX-INT8 (int8 tile matrix multiply)",
    "asimddp": "ARM dot product (SDOT/UDOT)",
    "i8mm": "ARM int8 matrix multiply (SMMLA)",
}


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


# The named classes (--target-cpu presets): a representative feature set each.
PRESETS: dict[str, CpuFeatures] = {
    "avx2": CpuFeatures("x86_64", frozenset({"sse4_1", "avx", "avx2", "fma"})),
    "avx512-vnni": CpuFeatures("x86_64", frozenset({"sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw",
                                                    "avx512vl", "avx512_vnni"})),
    "amx": CpuFeatures("x86_64", frozenset({"sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                            "avx512_vnni", "amx_tile", "amx_int8"})),
    "arm64": CpuFeatures("aarch64", frozenset({"asimd", "asimddp"})),
}
CPU_CLASSES = tuple(PRESETS)


def cpu_class(features: CpuFeatures) -> tuple[str, str]:
    """The class whose int8 kernels this CPU runs, and a note when the match is not exact."""
    if not features.is_x86:
        note = "" if features.arch in ("aarch64", "arm64") else f"{features.arch}: decisions of the arm64 class"
        return "arm64", note
    if "amx_int8" in features.flags:
        return "amx", ""
    if "avx512_vnni" in features.flags:
        return "avx512-vnni", ""
    if "avx_vnni" in features.flags:
        return "avx512-vnni", "AVX-VNNI without AVX-512: int32 accumulation like the avx512-vnni class"
    if "avx2" in features.flags:
        return "avx2", "" if "avx512bw" not in features.flags else "AVX-512 without VNNI: int8 kernels as on avx2"
    return "avx2", "no AVX2: onnxruntime's int8 kernels fall back to SSE; decisions of the avx2 class"


def default_weight_range(features: CpuFeatures) -> str:
    """'reduced' (7-bit weights) where int8 products can saturate, else 'full'."""
    return "reduced" if features.int8_products_may_saturate else "full"


def parse_cpuinfo(cpuinfo: str, arch: str | None = None) -> CpuFeatures:
    """Features from /proc/cpuinfo text; unknown platforms report no flags."""
    arch = (arch or platform.machine()).lower()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    return CpuFeatures(arch, frozenset(flags))


def cpu_model_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class TargetCpu:
    """The CPU onnxq quantizes for: its features, class and where that description came from."""

    features: CpuFeatures
    name: str  # CPU model name, or the preset
    source: str  # "host", "host, forced by ONNXQ_HOST_CPU=amx", "--target-cpu amx", "--target-cpu FILE"

    @property
    def cpu_class(self) -> str:
        return cpu_class(self.features)[0]

    @property
    def is_host(self) -> bool:
        """Describes the machine running onnxq (possibly forced), not a named deployment target."""
        return self.source.startswith("host")

    @property
    def class_note(self) -> str:
        return cpu_class(self.features)[1]

    def to_dict(self) -> dict:
        return {"class": self.cpu_class, "cpu": self.name, "arch": self.features.arch, "source": self.source,
                "class_note": self.class_note or None}


def host_cpu() -> TargetCpu:
    """This machine, unless ONNXQ_HOST_CPU names a preset to describe it as."""
    forced = os.environ.get(HOST_OVERRIDE_ENV, "").strip()
    if forced:
        if forced not in PRESETS:
            raise UsageError(f"{HOST_OVERRIDE_ENV}={forced!r} is not a CPU class; choose one of "
                             f"{', '.join(CPU_CLASSES)}")
        return TargetCpu(PRESETS[forced], f"{forced} (preset)", f"host, forced by {HOST_OVERRIDE_ENV}={forced}")
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.exists() else ""
    return TargetCpu(parse_cpuinfo(text), cpu_model_name(text), "host")


def resolve_target(spec: str | Path | None) -> TargetCpu:
    """--target-cpu: None or 'host' for this machine, a preset name, or a file describing the target."""
    if spec is None or str(spec) == "host":
        return host_cpu()
    if str(spec) in PRESETS:
        return TargetCpu(PRESETS[str(spec)], f"{spec} (preset)", f"--target-cpu {spec}")
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"--target-cpu {spec}: neither a CPU class ({', '.join(CPU_CLASSES)}, host) nor a file")
    features, name = read_cpu_description(path)
    return TargetCpu(features, name, f"--target-cpu {path}")


def read_cpu_description(path: Path) -> tuple[CpuFeatures, str]:
    """A deployment CPU from its /proc/cpuinfo text or from `onnxq doctor --json` output."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read CPU description {path}: {exc.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            info = json.loads(text)
            flags = frozenset(flag for flag, present in info["int8_features"].items() if present)
            return CpuFeatures(str(info["arch"]).lower(), flags), str(info.get("cpu", "unknown"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}: not `onnxq doctor --json` output ({type(exc).__name__})") from None
    if not any(line.partition(":")[0].strip() in ("flags", "Features") for line in text.splitlines()):
        raise DataError(f"{path}: no 'flags' or 'Features' line; give a copy of the target's /proc/cpuinfo "
                        "or its `onnxq doctor --json` output")
    arch = "aarch64" if any(line.startswith("Features") for line in text.splitlines()) else "x86_64"
    return parse_cpuinfo(text, arch), cpu_model_name(text)
