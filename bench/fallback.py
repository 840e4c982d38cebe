"""Does keeping a kind of layer in float ever hurt? (issue: a layer onnxq keeps in float must run in float)

For every bench model and a MobileNetV2 (depthwise convolutions; bench/mobile_cnn_child.py, seeded
weights, calibrated on real photos), onnxq quantizes the model all-int8 (speed guard off), then once
per kind of layer the speed guard knows (onnxq.search.speed_table: conv-1x1, conv-3x3, conv-dw3, matmul, ...)
with every layer of that kind kept float. Each model's output SQNR against fp32 on the held-back
samples is compared with the all-int8 model's; with float layers really running in float, keeping
layers float can only remove rounding error, so no row should be below the all-int8 one (beyond the
noise of cancelling errors). Statistics are collected once per model and reused.

    .venv/bin/python -m bench.fallback                 # all models -> bench/results/fallback.json + a table
    .venv/bin/python -m bench.fallback --models mobilenet-v2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

from bench import datasets, models, runners
from bench.run import DEFAULT_SAMPLES
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, calibrate_only, quantize
from onnxq.cpu import host_cpu
from onnxq.errors import OnnxqError
from onnxq.model_io import load_model
from onnxq.passes.prepare import prepare_model
from onnxq.quant.ir import concrete_shapes, import_graph, node_label
from onnxq.runtime.data import ImagePreprocessing, model_input_specs, open_source
from onnxq.search.speed_table import layer_class

RESULTS = models.REPO / "bench" / "results" / "fallback" / "fallback.json"
MOBILENET = models.CACHE / "models" / "mobilenet-v2-seeded.onnx"
IMAGENET = ImagePreprocessing(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def mobilenet_data(work: Path) -> tuple[Path, Path, ImagePreprocessing]:
    """Real photos split by source (bench.datasets.photos), as folders of links onnxq preprocesses itself."""
    if not MOBILENET.exists():
        MOBILENET.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(runners.EXPORT_PYTHON), str(models.REPO / "bench" / "mobile_cnn_child.py"),
                        str(MOBILENET)], check=True)
    calib, held = datasets.photos()
    folders = []
    for split, paths in (("calib", calib[:32]), ("eval", held[:32])):
        folder = work / "mobilenet" / split
        folder.mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(paths):
            link = folder / f"{index:03d}{path.suffix.lower()}"
            if not link.exists():
                link.symlink_to(path)
        folders.append(folder)
    return folders[0], folders[1], IMAGENET


def model_and_data(name: str, work: Path) -> tuple[Path, DataOptions, Path]:
    if name == "mobilenet-v2":
        calib, held, images = mobilenet_data(work)
        return MOBILENET, DataOptions(calib=calib, eval_data=held, images=images), calib
    spec = models.MODELS[name]
    path = models.prepare(spec)
    n_calib, n_eval = DEFAULT_SAMPLES[name]
    data = datasets.build(name, spec.task, path, n_calib, n_eval)
    return path, DataOptions(calib=data.calib, eval_data=data.eval), data.calib


def kinds_of(model: Path, int8: set[str], sample_shapes: dict) -> dict[str, list[str]]:
    """The int8 Conv/MatMul/Gemm nodes by the speed guard's layer kind."""
    prepared = prepare_model(load_model(model)).model
    shapes = concrete_shapes(prepared, sample_shapes)
    groups: dict[str, list[str]] = defaultdict(list)
    for node in import_graph(prepared).nodes:
        layer = layer_class(node, shapes) if node_label(node) in int8 else None
        if layer is not None:
            groups[layer.kind].append(node_label(node))
    return dict(sorted(groups.items()))


def min_sqnr(report: dict) -> float:
    return min(float(out["sqnr_db"]) for out in report["fidelity"]["outputs"])


def run_model(name: str, work: Path, *, isolate: bool = True) -> dict:
    model, data, calib = model_and_data(name, work)
    stats = work / f"{name}.stats.npz"
    calibrate_only(model, stats, DataOptions(calib=calib, images=data.images))

    def quantized(exclude: tuple[str, ...]) -> dict:
        request = QuantizeRequest(model=model, output=work / f"{name}.onnx", data=DataOptions(
            eval_data=data.eval_data, images=data.images), load_stats=stats, speed_guard="off", exclude=exclude)
        report = quantize(request).report
        assert not isolate or not report["fusion"]["disagreements"], report["fusion"]["disagreements"]
        return report

    try:
        base = quantized(())
    except OnnxqError as exc:
        return {"model": name, "error": exc.message}
    sample = open_source(data.eval_data, model_input_specs(load_model(model)), data.images).sample(0)
    int8 = {row["node"] for row in base["fusion"]["precision"] if row["planned"] == "int8"}
    groups = kinds_of(model, int8, {k: v.shape for k, v in sample.items()})
    rows = []
    for kind, nodes in groups.items():
        report = quantized(tuple(nodes))
        rows.append({"kind": kind, "layers": len(nodes), "sqnr_db": round(min_sqnr(report), 2),
                     "delta_db": round(min_sqnr(report) - min_sqnr(base), 2)})
        print(f"{name}: {kind} x{len(nodes)} float -> {rows[-1]['sqnr_db']} dB ({rows[-1]['delta_db']:+} dB)",
              flush=True)
    return {"model": name, "all_int8_sqnr_db": round(min_sqnr(base), 2), "kinds": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| model | CPU | all int8 (min output SQNR, dB) | one kind kept float: SQNR (change) |",
             "|---|---|---|---|"]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['model']} | {result.get('cpu_class', '?')} | — ({result['error'][:80]}) | |")
            continue
        cells = "; ".join(f"{r['kind']} ×{r['layers']}: {r['sqnr_db']} ({r['delta_db']:+})" for r in result["kinds"])
        lines.append(f"| {result['model']} | {result.get('cpu_class', '?')} | {result['all_int8_sqnr_db']} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([*models.MODELS, "mobilenet-v2"]))
    parser.add_argument("--without-isolation", action="store_true",
                        help="the writer as before float layers were isolated: onnxruntime re-quantizes them")
    args = parser.parse_args()
    results = RESULTS
    if args.without_isolation:
        from onnxq.quant import rewrite_qdq

        rewrite_qdq.isolate_float_layers = lambda *_args, **_kwargs: None
        results = RESULTS.with_name("fallback-without-isolation.json")
    saved = {r["model"]: r for r in json.loads(results.read_text())} if results.exists() else {}
    results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxq-fallback-") as tmp:
        for name in args.models.split(","):
            saved[name] = {**run_model(name, Path(tmp), isolate=not args.without_isolation),
                           "cpu_class": host_cpu().cpu_class}
            results.write_text(json.dumps(list(saved.values()), indent=1))  # each model as soon as it is done
    print(markdown(list(saved.values())))


if __name__ == "__main__":
    main()
