"""Calibration on Ray against the single-process path, and what Ray itself costs per task.

Runs in one process with a local Ray (ray.init(num_cpus=CPUS)), rounds interleaved:
single-process collect_statistics (onnxruntime on all cores, and on one), then
collect_statistics_on_ray with 1 and 2 workers (one CPU, one onnxruntime thread each).
Besides the totals it measures the pieces a cluster model needs: an empty task's round
trip, putting the model into the object store, a worker's model load (session creation
with the exposed outputs), the merge of N shards, and samples per second per core.

python -m bench.ray_scaling                       # ppocr-rec, its 64 bench samples repeated to 256
python -m bench.ray_scaling --samples 128 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ppocr-rec")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import onnx
    import ray

    from bench import models, report
    from bench.quantize_time import _data
    from onnxq.passes.prepare import prepare_model
    from onnxq.quant.ir import import_graph
    from onnxq.quant.placement import tensors_to_observe, value_aliases
    from onnxq.runtime.calibrate import collect_statistics
    from onnxq.runtime.data import model_input_specs, open_source
    from onnxq.runtime.session import session_for, with_outputs
    from onnxq.search.distributed import RayOptions, collect_statistics_on_ray, fold_shard, merge_shards, shards

    path, calib = _data(args.model)
    original = onnx.load(str(path))
    model = prepare_model(original).model
    graph = import_graph(model)
    tensors = tensors_to_observe(graph)
    aliases = value_aliases(graph, tensors)
    base = open_source(calib, model_input_specs(original))
    source = base.subset([i % len(base) for i in range(args.samples)], f"{calib} repeated to {args.samples}")

    ray.init(num_cpus=args.cpus, logging_level="ERROR", log_to_driver=False)
    noop = ray.remote(lambda: None)
    ray.get([noop.remote() for _ in range(2 * args.cpus)])  # start the workers

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    runs: dict[str, list[float]] = {k: [] for k in ("single, all cores", "single, 1 thread", "ray 1 worker",
                                                    "ray 2 workers")}
    for _ in range(args.rounds):
        runs["single, all cores"].append(timed(lambda: collect_statistics(model, tensors, source, aliases=aliases)))
        runs["single, 1 thread"].append(timed(lambda: collect_statistics(model, tensors, source, aliases=aliases,
                                                                          threads=1)))
        for workers in (1, 2):
            runs[f"ray {workers} worker{'s' if workers > 1 else ''}"].append(timed(
                lambda w=workers: collect_statistics_on_ray(model, tensors, source, RayOptions(workers=w),
                                                            aliases=aliases)))
        print({k: round(v[-1], 2) for k, v in runs.items()}, flush=True)

    task_ms = [1000 * timed(lambda: ray.get(noop.remote())) for _ in range(50)]
    model_bytes = model.SerializeToString()
    put_ms = [1000 * timed(lambda: ray.put(model_bytes)) for _ in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        exposed = [t for t in tensors if t not in aliases and t not in {i.name for i in model.graph.input}]
        load_s = statistics.median(timed(lambda: session_for(with_outputs(model, exposed), Path(tmp), 1))
                                   for _ in range(3))
    parts = [fold_shard(model_bytes, source.subset(range(32), ""), shard, tensors, 1, 2**31, aliases, 1)
             for shard in shards(32, 8)]
    merge_ms = {n: 1000 * statistics.median(timed(lambda n=n: merge_shards(parts[:n], 32, "", 1)) for _ in range(3))
                for n in (2, 4, 8)}
    ray.shutdown()

    medians = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    result = {
        "machine": report.machine(), "model": args.model, "model_bytes": len(model_bytes), "samples": args.samples,
        "observed_tensors": len(tensors), "rounds": runs, "median_s": medians,
        "samples_per_s_per_core": round(args.samples / medians["single, 1 thread"], 2),
        "ray_task_round_trip_ms": round(statistics.median(task_ms), 2),
        "object_store_put_model_ms": round(statistics.median(put_ms), 2),
        "worker_model_load_s": round(load_s, 3),
        "merge_ms_by_shards": {n: round(v, 1) for n, v in merge_ms.items()},
    }
    out = args.out or models.REPO / "bench" / "results" / "timing" / "ray_scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; {args.model}, {args.samples} samples, {len(tensors)} tensors observed")
    print("| run | median s | × single (all cores) |\n|---|---|---|")
    for key, value in medians.items():
        print(f"| {key} | {value:.2f} | {value / medians['single, all cores']:.2f} |")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "rounds", "median_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
