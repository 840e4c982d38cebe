"""Measure the speed guard's decision table (onnxq/data/speed_table.json) on this machine.

For every layer class (onnxq.search.speed_table: kind x channel bucket x size bucket) a small model is
built around one representative layer: an int8 1x1 conv (or MatMul/Gemm) before it, one after
it, so the layer sits between int8 neighbours as in a real network. onnxq quantizes it twice,
with the middle layer in int8 and with it kept in float (`--exclude`), and onnxruntime times
both and the fp32 model, batch 1, one thread, runs interleaved so machine noise hits all three
alike; the medians are the row. Classes other than this machine's own are measured in a child
process that sees a smaller CPU (bench/cpu_mask: cpuid masked, so onnxruntime runs that class's
kernels; a saturation probe proves which int8 kernels ran).

    .venv/bin/python -m bench.speed_table                       # every class this machine can run
    .venv/bin/python -m bench.speed_table --classes avx2 --quick  # a few rows, to try it
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.cpu_mask import SMALLER, cpuid_faulting_available, kernels_check, masked_env
from onnxq.cpu import host_cpu
from onnxq.search.speed_table import (
    CONV_KINDS,
    LayerClass,
    Row,
    SpeedTable,
    bucket_edges,
    bucket_values,
)

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "onnxq" / "data" / "speed_table.json"
MAX_MACS = 8e8  # per middle layer: bigger rows are left to the nearest measured bucket
OPSET = 13


@dataclass(frozen=True)
class Case:
    layer: LayerClass
    kind: str
    channels: int
    size: int

    @property
    def macs(self) -> float:
        c, n = self.channels, self.size
        taps = {"conv-1x1": 1, "conv-3x3": 9, "conv-large": 25, "conv-dw3": 9, "conv-dw5": 25}.get(self.kind, 9)
        if self.kind.startswith("conv-dw"):
            return c * taps * n
        if self.kind == "conv-grouped":
            return c * 8 * taps * n
        if self.kind.startswith("conv"):
            return c * c * taps * n
        return c * c * n


def all_cases() -> list[Case]:
    cases = []
    for kind in (*CONV_KINDS, "matmul", "gemm"):
        channel_buckets, size_buckets = bucket_edges(kind)
        for channels_label, channels in bucket_values(channel_buckets):
            for size_label, size in bucket_values(size_buckets):
                case = Case(LayerClass(kind, channels_label, size_label), kind, channels, size)
                if case.macs <= MAX_MACS:
                    cases.append(case)
    return cases


def quick_cases() -> list[Case]:
    wanted = {("conv-3x3", 64, 784), ("conv-dw3", 64, 784), ("conv-1x1", 256, 196), ("matmul", 256, 64)}
    return [c for c in all_cases() if (c.kind, c.channels, c.size) in wanted]


# ---------------------------------------------------------------- the models


def _weight(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)


def sandwich(case: Case, seed: int = 0) -> onnx.ModelProto:
    """pre (int8 1x1 / MatMul / Gemm) -> Relu -> mid (the measured layer) -> Relu -> post."""
    rng = np.random.default_rng(seed)
    c = case.channels
    if case.kind.startswith("conv"):
        side = max(1, round(math.sqrt(case.size)))
        shape = [1, c, side, side]
        taps = 5 if case.kind in ("conv-large", "conv-dw5") else 1 if case.kind == "conv-1x1" else 3
        group = c if case.kind.startswith("conv-dw") else max(2, c // 8) if case.kind == "conv-grouped" else 1
        inits = {"w_pre": _weight(rng, (c, c, 1, 1), c), "b_pre": np.zeros(c, np.float32),
                 "w_mid": _weight(rng, (c, c // group, taps, taps), c // group * taps * taps),
                 "b_mid": (0.1 * rng.standard_normal(c)).astype(np.float32),
                 "w_post": _weight(rng, (c, c, 1, 1), c), "b_post": np.zeros(c, np.float32)}
        pad = taps // 2
        nodes = [helper.make_node("Conv", ["x", "w_pre", "b_pre"], ["p"], name="pre"),
                 helper.make_node("Relu", ["p"], ["pr"], name="pre_relu"),
                 helper.make_node("Conv", ["pr", "w_mid", "b_mid"], ["m"], name="mid", group=group,
                                  pads=[pad] * 4),
                 helper.make_node("Relu", ["m"], ["mr"], name="mid_relu"),
                 helper.make_node("Conv", ["mr", "w_post", "b_post"], ["y"], name="post")]
    else:
        op = "MatMul" if case.kind == "matmul" else "Gemm"
        shape = [1, case.size, c] if op == "MatMul" else [case.size, c]
        inits, nodes = {}, []
        source = "x"
        for index, name in enumerate(("pre", "mid", "post")):
            weight = _weight(rng, (c, c), c)
            inits[f"w_{name}"] = weight if op == "MatMul" else weight.T.copy()
            attrs = {} if op == "MatMul" else {"transB": 1}
            nodes.append(helper.make_node(op, [source, f"w_{name}"], [f"{name}_out"], name=name, **attrs))
            if index < 2:
                nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
                source = f"{name}_relu"
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, case.layer.key, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxq-bench")
    model.ir_version = 7
    return model


# ---------------------------------------------------------------- measuring (in the child)


def _quantize(fp32: Path, output: Path, calib: Path, cpu_class: str, keep_float: bool) -> None:
    from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize

    result = quantize(QuantizeRequest(model=fp32, output=output, data=DataOptions(calib=calib),
                                      speed_guard="off", target_cpu=cpu_class,
                                      exclude=("mid",) if keep_float else ()))
    wrong = result.report["fusion"]["disagreements"]
    if wrong:  # the row would time something else than it names
        raise SystemExit(f"{fp32}: onnxruntime does not run the layers as planned: {wrong}")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(case: Case, cpu_class: str, folder: Path) -> Row:
    from onnxq.runtime.latency import interleaved_runs

    fp32 = folder / "fp32.onnx"
    onnx.save(sandwich(case), str(fp32))
    shape = [d.dim_value for d in onnx.load(str(fp32)).graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    for index in range(8):
        np.save(calib / f"{index}.npy", rng.standard_normal(shape).astype(np.float32))
    int8, mid_float = folder / "int8.onnx", folder / "mid_float.onnx"
    _quantize(fp32, int8, calib, cpu_class, keep_float=False)
    _quantize(fp32, mid_float, calib, cpu_class, keep_float=True)
    feed = {"x": rng.standard_normal(shape).astype(np.float32)}
    sessions = [_session(p) for p in (int8, mid_float, fp32)]
    samples = interleaved_runs(sessions, feed, warmup=3, min_rounds=9, max_rounds=81, budget_s=1.5)
    int8_ms, float_ms, fp32_ms = (round(float(np.median(s)) * 1e3, 4) for s in samples)
    return Row(int8_ms, float_ms, fp32_ms)


PROGRESS = ROOT / "bench" / ".cache" / "speed_table"


def child(cpu_class: str, out: Path, quick: bool) -> None:
    """Measure every case; rows already measured by an interrupted run (same onnxruntime) are kept."""
    cases = quick_cases() if quick else all_cases()
    progress = PROGRESS / f"{cpu_class}-onnxruntime-{ort.__version__}{'-quick' if quick else ''}.jsonl"
    progress.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    if progress.exists():
        for line in progress.read_text().splitlines():
            key, values = json.loads(line)
            rows[key] = values
    with tempfile.TemporaryDirectory(prefix="onnxq-speed-table-") as tmp, progress.open("a") as log:
        for index, case in enumerate(cases, start=1):
            if case.layer.key in rows:
                continue
            row = measure(case, cpu_class, Path(tmp))
            rows[case.layer.key] = [row.int8_ms, row.float_ms, row.fp32_ms]
            log.write(json.dumps([case.layer.key, rows[case.layer.key]]) + "\n")
            log.flush()
            verdict = "float" if row.float_is_faster else "int8"
            print(f"[{cpu_class} {index}/{len(cases)}] {case.layer.key}: int8 {row.int8_ms:.3f} ms, mid float "
                  f"{row.float_ms:.3f} ms, fp32 {row.fp32_ms:.3f} ms -> {verdict}", file=sys.stderr, flush=True)
    out.write_text(json.dumps({c.layer.key: rows[c.layer.key] for c in cases}, indent=1, sort_keys=True))


# ---------------------------------------------------------------- the parent


def measurable_classes() -> list[str]:
    native = host_cpu().cpu_class
    smaller = list(SMALLER.get(native, ())) if cpuid_faulting_available() else []
    return [native, *smaller]


def run_class(cpu_class: str, native: str, quick: bool, table: SpeedTable, command: str) -> None:
    probe = kernels_check(cpu_class)
    expected = "saturating" if cpu_class == "avx2" else "exact"
    if probe != expected:
        raise SystemExit(f"{cpu_class}: the int8 kernels onnxruntime runs here are {probe}, expected {expected}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        subprocess.run([sys.executable, "-m", "bench.speed_table", "--child", cpu_class, "--out", str(out)]
                       + (["--quick"] if quick else []), env=masked_env(cpu_class), cwd=ROOT, check=True)
        rows = json.loads(out.read_text())
    host = host_cpu()
    flags = ", ".join(flag for flag in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if flag in host.features.flags)
    kernels = ("native" if cpu_class == native else
               f"cpuid masked to {cpu_class} on this {native} machine (MLAS's {cpu_class} kernels)")
    table.classes[cpu_class] = {
        "measured_on": f"{host.name} ({flags}; 2 cores, shared)", "kernels": kernels, "int8_probe": probe,
        "onnxruntime": ort.__version__,
        "date": datetime.date.today().isoformat(), "command": command, "rows": len(rows),
        "quick": quick}
    table.rows[cpu_class] = {key: Row(*values) for key, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", help="comma-separated CPU classes (default: every one this machine can run)")
    parser.add_argument("--quick", action="store_true", help="a few rows only")
    parser.add_argument("--table", type=Path, default=TABLE, help="table file to update")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out, args.quick)
        return
    native = host_cpu().cpu_class
    available = measurable_classes()
    wanted = args.classes.split(",") if args.classes else available
    table = SpeedTable.from_json(args.table.read_text(), str(args.table)) if args.table.exists() else SpeedTable()
    command = "python -m bench.speed_table" + (f" --classes {args.classes}" if args.classes else "")
    for cpu_class in wanted:
        if cpu_class not in available:
            print(f"skipping {cpu_class}: this {native} machine can run {', '.join(available)}", file=sys.stderr)
            continue
        run_class(cpu_class, native, args.quick, table, command + (" --quick" if args.quick else ""))
        args.table.write_text(table.to_json())
        print(f"{cpu_class}: {len(table.rows[cpu_class])} rows -> {args.table}", file=sys.stderr)


if __name__ == "__main__":
    main()
