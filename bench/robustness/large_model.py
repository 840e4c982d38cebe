"""Models over 2 GB for real: generate one, quantize it static, dynamic and weight-only int4, check every result.

    .venv/bin/python -m bench.robustness.large_model [--out DIR] [--gigabytes 2.3] [--hidden 8192] [--keep]

The model is a stack of MatMul -> Relu layers with [hidden, hidden] fp32 weights from a seeded
generator (He-scaled, so activations keep their range), written straight to external data one
layer at a time: it never exists in memory whole. Each `onnxq quantize` runs as a child process
whose peak RSS (VmHWM) is polled; each result is then loaded and run in onnxruntime and compared
with the fp32 model on held-out feeds. Prints a markdown table (bench/README.md has the last one).
`tests/test_large_model.py` runs the same generator scaled down, with onnxq's 2 GiB threshold lowered.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

SEED = 7
TOKENS = 16
ALIGN = 4096


def generate(folder: Path, hidden: int, layers: int, name: str = "big.onnx") -> Path:
    """Write `name` (+ `name`.data) in `folder`: x [1, TOKENS, hidden] -> layers x (MatMul -> Relu) -> y."""
    folder.mkdir(parents=True, exist_ok=True)
    data_name = f"{name}.data"
    initializers, nodes, previous = [], [], "x"
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            rng = np.random.default_rng([SEED, i])
            values = rng.standard_normal((hidden, hidden), dtype=np.float32)
            values *= np.float32(math.sqrt(2.0 / hidden))
            data.write(b"\0" * (-data.tell() % ALIGN))
            offset = data.tell()
            data.write(values.tobytes())
            del values
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[hidden, hidden],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(hidden * hidden * 4))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            output = "y" if i == layers - 1 else f"r{i}"
            nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}" if output != "y" else "y"],
                                          name=f"mm{i}"))
            if output != "y":
                nodes.append(helper.make_node("Relu", [f"m{i}"], [output], name=f"relu{i}"))
            previous = output
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, TOKENS, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, hidden])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxq-bench")
    model.ir_version = 8
    (folder / name).write_bytes(model.SerializeToString())
    return folder / name


def write_feeds(folder: Path, hidden: int, count: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(folder / f"s{i:03d}.npz", x=rng.standard_normal((1, TOKENS, hidden), dtype=np.float32))
    return folder


def outputs(model: Path, feeds: Path) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    results = []
    for file in sorted(feeds.glob("*.npz")):
        with np.load(file) as data:
            results.append(session.run(None, {"x": data["x"]})[0].astype(np.float64))
    return results


def agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    a, b = np.concatenate([r.ravel() for r in reference]), np.concatenate([c.ravel() for c in candidate])
    noise = float(np.sum((a - b) ** 2))
    return {"cosine": round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 5),
            "sqnr_db": round(10 * math.log10(float(a @ a) / noise), 1) if noise else math.inf}


def size_on_disk(model: Path) -> int:
    return sum(p.stat().st_size for p in model.parent.glob(f"{model.name}*"))


MODES = {"static": ["--calib", "{calib}", "--speed-guard", "off"], "dynamic": ["--mode", "dynamic"],
         "weight-only int4": ["--mode", "weight-only", "--weight-bits", "4"]}


def main() -> int:
    from bench import runners

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/work/tmp/onnxq-large"))
    parser.add_argument("--gigabytes", type=float, default=2.3, help="fp32 weights to generate (GB, 1e9 bytes)")
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--keep", action="store_true", help="keep the generated and quantized models")
    args = parser.parse_args()
    layers = math.ceil(args.gigabytes * 1e9 / (args.hidden * args.hidden * 4))
    work = args.out
    shutil.rmtree(work, ignore_errors=True)
    model = generate(work / "fp32", args.hidden, layers)
    calib, held = write_feeds(work / "calib", args.hidden, 8, 1), write_feeds(work / "held", args.hidden, 4, 2)
    fp32_bytes = size_on_disk(model)
    print(f"fp32 model: {layers} x MatMul [{args.hidden}, {args.hidden}], {fp32_bytes / 1e9:.2f} GB", flush=True)
    reference = outputs(model, held)
    rows = []
    for mode in args.modes:
        out = work / mode.replace(" ", "-") / "q.onnx"
        out.parent.mkdir()
        extra = [a.format(calib=calib) for a in MODES[mode]]
        command = runners.onnxq_cmd("quantize", model, "-o", out, "-q", "--report", out.with_suffix(".json"), *extra)
        result = runners.run_child(command, log=out.with_suffix(".log"), timeout_s=7200, rss_limit_mb=20000)
        row = {"mode": mode, "status": result.status, "wall_s": result.wall_s,
               "peak_rss_gb": round(result.peak_rss_mb * 2**20 / 1e9, 2),
               "rss_over_model": round(result.peak_rss_mb * 2**20 / fp32_bytes, 2), "command": " ".join(command[1:])}
        if result.status == "ok":
            row.update(output_gb=round(size_on_disk(out) / 1e9, 3), **agreement(reference, outputs(out, held)))
        else:
            row["error"] = result.log_tail[-300:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(out.parent, ignore_errors=True)
    print("\n| mode | status | wall s | peak RSS GB | peak RSS / fp32 size | output GB | cosine vs fp32 | SQNR dB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['status']} | {r['wall_s']} | {r['peak_rss_gb']} | {r['rss_over_model']} | "
              f"{r.get('output_gb', '')} | {r.get('cosine', '')} | {r.get('sqnr_db', '')} |")
    (work / "results.json").write_text(json.dumps({"fp32_bytes": fp32_bytes, "layers": layers,
                                                   "hidden": args.hidden, "rows": rows}, indent=1))
    if not args.keep:
        shutil.rmtree(work / "fp32", ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
