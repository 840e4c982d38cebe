"""`onnxq doctor`: this CPU's int8 features, the onnxruntime build, and what they mean for the defaults.

Also reads a deployment machine's description (its /proc/cpuinfo, or `onnxq doctor --json`
written there) for `quantize --target-cpu`.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from onnxq.cpu import INT8_FEATURES, TargetCpu, default_weight_range, host_cpu, resolve_target
from onnxq.search.speed_table import shipped_table


def diagnose(target: TargetCpu) -> dict:
    """Features present, the CPU class, and the defaults they lead to."""
    features = target.features
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
    table = shipped_table()
    row_class, note = table.row_class_for(target.cpu_class)
    measured = table.classes.get(row_class, {})
    speed = (f"the speed guard decides from onnxq's speed table, {row_class} rows (measured on "
             f"{measured.get('measured_on', '?')}, {measured.get('kernels', '?')})" + (f"; {note}" if note else ""))
    implications.append(speed)
    implications.append("quantize for another CPU class with --target-cpu avx2|avx512-vnni|amx|arm64 (or a file "
                        "from `onnxq doctor --json` run there); --speed-guard measure times this machine instead")
    return {
        "cpu": target.name,
        "cpu_class": target.cpu_class,
        "class_note": target.class_note or None,
        "source": target.source,
        "speed_table_rows": row_class,
        "arch": features.arch,
        "int8_features": {flag: (flag in features.flags) for flag in INT8_FEATURES},
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "defaults": {"weight_range": weight_range, "activations": "uint8 asymmetric"},
        "implications": implications,
    }


def this_machine(cpuinfo_path: Path | None = None) -> dict:
    """diagnose() for this machine, or for the CPU a cpuinfo copy / doctor --json / class name describes."""
    return diagnose(host_cpu() if cpuinfo_path is None else resolve_target(str(cpuinfo_path)))


def format_diagnosis(info: dict) -> str:
    lines = [f"CPU: {info['cpu']} ({info['arch']}); class {info['cpu_class']} ({info['source']})"
             + (f"; {info['class_note']}" if info["class_note"] else "")]
    for flag, present in info["int8_features"].items():
        lines.append(f"  {'yes' if present else 'no ':3} {INT8_FEATURES[flag]}")
    lines.append(f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info['providers'])}")
    lines.append(f"defaults here: weights --weight-range {info['defaults']['weight_range']}, "
                 f"activations {info['defaults']['activations']}")
    lines.extend(f"- {text}" for text in info["implications"])
    return "\n".join(lines)
