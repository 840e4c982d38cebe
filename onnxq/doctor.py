"""`onnxq doctor`: this CPU's int8 features, the onnxruntime build, and what they mean for the defaults.

Also reads a deployment machine's description (its /proc/cpuinfo, or `onnxq doctor --json`
written there) for `quantize --target-cpu`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import onnxruntime as ort

from .cpu import CpuFeatures, default_weight_range, read_cpu_features
from .errors import DataError

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


def cpu_model_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or "unknown"


def diagnose(features: CpuFeatures, model_name: str) -> dict:
    """Features present and the defaults they lead to."""
    weight_range = default_weight_range(features)
    implications = []
    if features.int8_products_may_saturate:
        implications.append("x86 without VNNI: onnxruntime's uint8 x int8 kernels add pairs of products in "
                            "saturating int16; full-range int8 weights can give wrong results, so quantize "
                            "keeps weights within 7 bits (--weight-range reduced)")
        implications.append("int8 activations (--symmetric) run int8 x int8 kernels that are slow here; the "
                            "default uint8 activations are faster")
    elif features.has_vnni:
        implications.append("VNNI/AMX accumulate int8 products in int32: full 8-bit weights are exact "
                            "(--weight-range full)")
    elif not features.is_x86:
        implications.append(f"{features.arch}: no int16 saturation in onnxruntime's int8 kernels; full 8-bit "
                            "weights")
    if features.is_x86 and "avx2" not in features.flags:
        implications.append("no AVX2: onnxruntime's int8 kernels fall back to SSE and are rarely faster than "
                            "float; expect the speed guard to keep many layers in float")
    if features.arch in ("aarch64", "arm64") and "asimddp" not in features.flags:
        implications.append("no ARM dot-product instructions: int8 gains are small on this CPU")
    implications.append("the speed guard times int8 against float per kind of layer on the CPU that runs "
                        "quantize; for another deployment CPU give --target-cpu and a --speed-profile made there")
    return {
        "cpu": model_name,
        "arch": features.arch,
        "int8_features": {flag: (flag in features.flags) for flag in INT8_FEATURES},
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "defaults": {"weight_range": weight_range, "activations": "uint8 asymmetric"},
        "implications": implications,
    }


def this_machine(cpuinfo_path: Path | None = None) -> dict:
    """diagnose() for this machine, or for the cpuinfo text in `cpuinfo_path`."""
    if cpuinfo_path is None:
        source = Path("/proc/cpuinfo")
        text = source.read_text(errors="replace") if source.exists() else ""
        return diagnose(read_cpu_features(text), cpu_model_name(text))
    return diagnose(*read_target_cpu(cpuinfo_path))


def read_target_cpu(path: Path) -> tuple[CpuFeatures, str]:
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
    return read_cpu_features(text, arch), cpu_model_name(text)


def format_diagnosis(info: dict) -> str:
    lines = [f"CPU: {info['cpu']} ({info['arch']})"]
    for flag, present in info["int8_features"].items():
        lines.append(f"  {'yes' if present else 'no ':3} {INT8_FEATURES[flag]}")
    lines.append(f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info['providers'])}")
    lines.append(f"defaults here: weights --weight-range {info['defaults']['weight_range']}, "
                 f"activations {info['defaults']['activations']}")
    lines.extend(f"- {text}" for text in info["implications"])
    return "\n".join(lines)
