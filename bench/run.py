"""Benchmark CLI: quantize each model with every configuration, measure, write JSON and BENCHMARKS.md.

python -m bench.run                      # full suite, all models
python -m bench.run --quick              # one small model, onnxq default + one ORT peer (~1 min)
python -m bench.run --models ppocr-cls --n-calib 16 --n-eval 16
python -m bench.run --configs onnxq-target,onnxq-adaround --merge   # add rows to the saved results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from bench import configs, datasets, metrics, models, report, runners
from bench.configs import Config

RESULTS = models.REPO / "bench" / "results"
MARKDOWN = models.REPO / "BENCHMARKS.md"
DEFAULT_SAMPLES = {"ppocr-rec": (64, 48), "ppocr-cls": (64, 48), "ppocr-det": (24, 24),
                   "nudenet-320n": (32, 32), "silero-vad": (256, 256),
                   "silero-vad-sr16k": (256, 256), "minilm-l6": (64, 64)}


def quantize(cfg: Config, model: Path, data: datasets.DataSet, work: Path, stats: Path | None,
             timeout_s: int, rss_limit_mb: float) -> tuple[Path, dict]:
    """Run one configuration's quantizer as a child; return the output path and the row so far."""
    out = work / f"{cfg.id}.onnx"
    out.unlink(missing_ok=True)
    report_file = work / f"{cfg.id}.report.json"
    if cfg.tool == "onnxq":
        if "--mode" in cfg.args:  # dynamic / weight-only: no calibration (smoothing measures channels on it)
            src: tuple = ("--calib", data.calib) if "--smooth-alpha" in cfg.args else ()
        elif any(a in cfg.args for a in ("--equalize", "--smooth-alpha")):  # they change the model: own statistics
            src = ("--calib", data.calib)
        else:
            src = ("--load-stats", stats) if stats and cfg.args else ("--calib", data.calib)
            if stats and any(a in cfg.args for a in ("--bias-correction", "--adaround")):
                src += ("--calib", data.calib)  # the layer inputs come from the samples themselves
        cmd = runners.onnxq_cmd("quantize", model, "-o", out, *src, "--eval-data", data.eval,
                                "--report", report_file, "-q", *cfg.args)
    elif cfg.tool == "ort":
        if not cfg.args:
            return out, {"status": "n/a"}
        cmd = runners.peer_cmd(cfg.args[0], model, out, "--calib", data.calib, *cfg.args[1:])
    elif cfg.tool == "nncf":
        if not runners.NNCF_PYTHON.exists():
            return out, {"status": "skipped", "error": "bench/.venv-nncf is missing (make bench creates it)"}
        cmd = runners.nncf_cmd(model, out, data.calib, *cfg.args)
    else:
        raise ValueError(cfg.tool)
    res = runners.run_child(cmd, log=work / f"{cfg.id}.log", timeout_s=timeout_s, rss_limit_mb=rss_limit_mb)
    row: dict = {"status": res.status, "quant_wall_s": res.wall_s, "peak_rss_mb": res.peak_rss_mb,
                 "command": shlex.join(cmd)}
    if res.status == "failed" and res.returncode == 6 and cfg.tool == "onnxq" and out.exists():
        row["status"], row["gate_missed"] = "ok", True  # exit 6: target or gate missed, best model written
    if res.status == "ok" and not out.exists():
        row["status"] = "failed"
    notes = [ln[6:] for ln in (work / f"{cfg.id}.log").read_text(errors="replace").splitlines()
             if ln.startswith("NOTE: ")]
    if notes:
        row["notes"] = notes
    if row["status"] != "ok":
        row["error"] = res.log_tail[-1500:]
    if cfg.tool == "onnxq" and report_file.exists():
        rep = json.loads(report_file.read_text())
        row["onnxq_timings_s"] = rep.get("timings_s", {})
        row["onnxq_fidelity"] = rep.get("fidelity", {}).get("outputs")
        row["quant_wall_excl_eval_s"] = round(res.wall_s - row["onnxq_timings_s"].get("evaluate", 0.0), 3)
        row["onnxq_nodes"] = {k: rep["nodes"][k] for k in ("quantized", "float", "total")}
        if rep.get("accuracy_target"):
            target = rep["accuracy_target"]
            row["onnxq_target"] = {k: target[k] for k in ("met", "start", "final", "float_nodes", "speed")}
    return out, row


def task_metrics(spec: models.ModelSpec, path: Path, ref: list[np.ndarray], got: list[np.ndarray],
                 data: datasets.DataSet, ref_probs: np.ndarray | None,
                 eval_feeds: list[dict[str, np.ndarray]]) -> tuple[dict, np.ndarray | None]:
    """The model's task metric for one model file."""
    if spec.task == "ocr-rec":
        return metrics.rec_metrics(path, ref, got, data.meta["eval_labels"]), None
    if spec.task == "ocr-cls":
        return metrics.cls_metrics(ref, got, data.meta["eval_labels"]), None
    if spec.task in ("text-det", "yolo-det"):
        return metrics.det_metrics(spec.task, ref, got), None
    if spec.task == "sentence-emb":
        return metrics.embedding_metrics(ref, got, [f["attention_mask"] for f in eval_feeds]), None
    audio = np.load(data.eval.parent / "eval_audio.npy")
    _, probs = datasets.vad_sequence(metrics.session(path), audio)
    return metrics.vad_metrics(probs if ref_probs is None else ref_probs, probs), probs


def bench_model(spec: models.ModelSpec, cfgs: list[Config], n_calib: int, n_eval: int,
                rss_limit_mb: float, rounds: int, log=print) -> dict:
    """Benchmark one model with ``cfgs``; return its result dict."""
    t_start = time.perf_counter()
    model = models.prepare(spec)
    data = datasets.build(spec.name, spec.task, model, n_calib, n_eval)
    work = models.CACHE / "work" / f"{spec.name}-{n_calib}-{n_eval}"
    work.mkdir(parents=True, exist_ok=True)
    calib_feeds, eval_feeds = datasets.load_feeds(data.calib), datasets.load_feeds(data.eval)
    sess = metrics.session(model)
    t0 = time.perf_counter()
    metrics.run_all(sess, calib_feeds)
    fp32_calib_pass_s = time.perf_counter() - t0
    ref = metrics.run_all(sess, eval_feeds)
    del sess

    stats = None
    calibrate_row = None
    if any(c.tool == "onnxq" and c.args for c in cfgs):
        stats = work / "onnxq.stats.npz"
        res = runners.run_child(runners.onnxq_cmd("calibrate", model, "-o", stats, "--calib", data.calib, "-q"),
                                log=work / "onnxq-calibrate.log", timeout_s=spec.timeout_s, rss_limit_mb=rss_limit_mb)
        calibrate_row = res.to_dict()
        calibrate_row["calib_ratio"] = round(max(1.0, res.wall_s / fp32_calib_pass_s), 2)
        log(f"  onnxq calibrate: {res.status} {res.wall_s:.1f}s")

    rows, paths = [], {}
    ref_probs = None
    for cfg in cfgs:
        row: dict = {"id": cfg.id, "tool": cfg.tool, "label": cfg.label}
        if cfg.tool == "fp32":
            path, row["status"] = model, "ok"
        else:
            path, extra = quantize(cfg, model, data, work, stats, spec.timeout_s, rss_limit_mb)
            row.update(extra)
            if cfg.id == "onnxq-default" and "onnxq_timings_s" in row:
                row["calib_ratio"] = round(max(1.0, row["onnxq_timings_s"]["calibrate"] / fp32_calib_pass_s), 2)
        if row["status"] == "ok":
            try:
                got = ref if cfg.tool == "fp32" else metrics.run_all(metrics.session(path), eval_feeds)
                row["fidelity"] = metrics.fidelity(ref, got)
                row["task"], probs = task_metrics(spec, path, ref, got, data, ref_probs, eval_feeds)
                if cfg.tool == "fp32":
                    ref_probs = probs
                row["size_bytes"] = path.stat().st_size
                row["size_ratio"] = round(model.stat().st_size / path.stat().st_size, 3)
                paths[cfg.id] = path
            except Exception as exc:  # an int8 model onnxruntime cannot run is a row that says so
                row["status"] = "runtime-error"
                row["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        log(f"  {cfg.id}: {row['status']} {row.get('task', '')} {row.get('quant_wall_s', '')}")
        rows.append(row)

    lat = {t: metrics.latency(paths, eval_feeds[0], threads=n, rounds=rounds) for t, n in (("1", 1), ("all", 0))}
    cpu_class = report.machine()["cpu_class"]
    for row in rows:
        row["cpu_class"] = cpu_class  # merged rows may come from another machine: each row says where it ran
        if row["id"] in paths:
            row["latency_ms"] = {t: lat[t].get(row["id"]) for t in lat}
            row["speedup"] = {t: round(lat[t]["fp32"] / lat[t][row["id"]], 3) if lat[t].get(row["id"]) else None
                              for t in lat}
    return {"model": spec.name, "task": spec.task, "primary_metric": metrics.PRIMARY[spec.task],
            "source": {"requirement": spec.requirement, "member": spec.member, "licence": spec.licence,
                       "file": str(model.relative_to(models.REPO)) if model.is_relative_to(models.REPO) else str(model),
                       "sha256_16": models.sha256(model), "size_bytes": model.stat().st_size},
            "data": {"n_calib": data.n_calib, "n_eval": data.n_eval, **data.meta},
            "fp32_calib_pass_s": round(fp32_calib_pass_s, 3), "onnxq_calibrate": calibrate_row,
            "rows": rows, "machine": report.machine(), "elapsed_s": round(time.perf_counter() - t_start, 1)}


def merge_rows(path: Path, new: dict) -> dict:
    """The saved results with ``new``'s rows added or replaced by id (fp32 stays the saved run's).

    Every row's speedup is a ratio to fp32 measured in the same run as that row, so rows from
    different runs stay comparable as ratios; each merged row records the run that made it.
    """
    if not path.exists() or "rows" not in new:
        return new
    saved = json.loads(path.read_text())
    fresh = {row["id"]: {**row, "merged_from": new["command"]} for row in new["rows"] if row["id"] != "fp32"}
    rows = [fresh.pop(row["id"], row) for row in saved.get("rows", [])]
    saved["rows"] = rows + list(fresh.values())
    saved.setdefault("merged_commands", []).append(new["command"])
    return saved


def run(names: list[str], cfg_fn, samples: dict[str, tuple[int, int]], results: Path, markdown: Path | None,
        command: str, rss_limit_mb: float = 12_000, rounds: int = 7, log=print, merge: bool = False) -> list[dict]:
    """Benchmark ``names``; write results/<model>.json (and the markdown when given)."""
    results.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        spec = models.MODELS[name]
        n_calib, n_eval = samples[name]
        log(f"== {name} ({n_calib} calib / {n_eval} eval)")
        try:
            res = bench_model(spec, cfg_fn(spec), n_calib, n_eval, rss_limit_mb, rounds, log=log)
        except Exception:  # one broken model must not lose the others' results
            log(traceback.format_exc())
            res = {"model": name, "task": spec.task, "primary_metric": metrics.PRIMARY[spec.task], "rows": [],
                   "error": traceback.format_exc()[-3000:], "machine": report.machine()}
        res["command"] = command
        if merge:
            res = merge_rows(results / f"{name}.json", res)
        (results / f"{name}.json").write_text(json.dumps(res, indent=1))
        out.append(res)
    if markdown is not None:
        report.write_markdown(results, markdown)
    return out


def run_quick(results: Path = RESULTS / "quick", n: int = 8, markdown: Path | None = None,
              command: str = "python -m bench.run --quick") -> dict:
    """bench-quick: the PP-OCRv4 recogniser, ``n`` calibration and ``n`` evaluation lines, 3 rows."""
    return run(["ppocr-rec"], lambda spec: configs.quick(), {"ppocr-rec": (n, n)}, results, markdown,
               command, rounds=3)[0]


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small model, onnxq default + one ORT peer")
    p.add_argument("--models", default=",".join(models.MODELS), help="comma-separated: " + ",".join(models.MODELS))
    p.add_argument("--n-calib", type=int, help="calibration samples (default: per model)")
    p.add_argument("--n-eval", type=int, help="evaluation samples (default: per model)")
    p.add_argument("--results", type=Path, help="folder for <model>.json (default bench/results[/quick])")
    p.add_argument("--markdown", type=Path, help="write this markdown (default BENCHMARKS.md; quick: none)")
    p.add_argument("--rss-limit-mb", type=float, default=12_000, help="kill a quantizer above this RSS")
    p.add_argument("--report-only", action="store_true", help="only regenerate the markdown from results")
    p.add_argument("--configs", help="only these configuration ids (fp32 always runs as the reference)")
    p.add_argument("--merge", action="store_true", help="add the rows to the saved results instead of replacing them")
    a = p.parse_args(argv)
    command = "python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    if a.quick:
        res = run_quick(a.results or RESULTS / "quick", a.n_calib or 8, a.markdown, command.strip())
        print(report.model_table(res))
        return 0
    results = a.results or RESULTS
    if a.report_only:
        report.write_markdown(results, a.markdown or MARKDOWN)
        return 0
    names = [n for n in a.models.split(",") if n]
    unknown = [n for n in names if n not in models.MODELS]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    samples = {n: (a.n_calib or DEFAULT_SAMPLES[n][0], a.n_eval or DEFAULT_SAMPLES[n][1]) for n in names}
    wanted = set(a.configs.split(",")) if a.configs else None

    def chosen(spec: models.ModelSpec) -> list[Config]:
        return [c for c in configs.full(spec.dynamic, spec.transformer)
                if wanted is None or c.id in wanted or c.id == "fp32"]

    run(names, chosen, samples, results, a.markdown or MARKDOWN, command.strip(), a.rss_limit_mb, merge=a.merge)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
