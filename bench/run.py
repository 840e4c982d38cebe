"""Benchmark CLI: quantize each model with every configuration, measure, write JSON and BENCHMARKS.md.

python -m bench.run                      # full suite, all models
python -m bench.run --quick              # one small model, onnxq default + one ORT peer (~1 min)
python -m bench.run --models ppocr-cls --n-calib 16 --n-eval 16
python -m bench.run --configs onnxq-target,onnxq-adaround --merge   # add rows to the saved results
python -m bench.run --set new --configs fp32,onnxq-default,ort-qdq-minmax   # the unseen suite only
python -m bench.run --models ppocr-det --configs onnxq-default,onnxq-fast --results DIR --work DIR/work \
    --markdown DIR/BENCH.md    # under bench.cpu_mask.masked_env("avx2"): onnxq's models for that class

The ``new`` suite (models nobody tuned onnxq on, and the main models on wider data) writes its
results to bench/results/unseen/ and its own UNSEEN.md there; BENCHMARKS.md shows its headline.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

from bench import configs, datasets, metrics, models, report, runners
from bench.configs import Config

RESULTS = models.REPO / "bench" / "results"
# --metric script, --target-metric value and the samples it is measured on, for the int4/int8 target rows.
# MiniLM: on the held-back sentences, as the static onnxq-target row (its calibration sentences, pydoc topics,
# overstate int4 quality after gptq: 0.9955 there, 0.9854 held back); Whisper: on the calibration utterances.
METRICS = {"sentence-emb": (models.REPO / "bench" / "metric_sentence.py", "0.99", "eval"),  # embedding cosine
           "asr-decoder": (models.REPO / "bench" / "metric_decoder.py", "0.97", "calib")}  # fp32 / int4 perplexity
MARKDOWN = models.REPO / "BENCHMARKS.md"
WORK = models.CACHE / "work"  # the quantized models of each run, <model>-<calib>-<eval>/<config id>.onnx
UNSEEN = RESULTS / "unseen"  # the new suite's results (BENCHMARKS.md shows their headline)
DEFAULT_SAMPLES = {"ppocr-rec": (64, 48), "ppocr-cls": (64, 48), "ppocr-det": (24, 24),
                   "nudenet-320n": (32, 32), "silero-vad": (256, 256),
                   "silero-vad-sr16k": (256, 256), "minilm-l6": (64, 64),
                   "whisper-tiny-en": (64, 48),
                   "efficientnet-lite0": (96, 96), "ddddocr-captcha": (96, 96), "mpnet-base": (64, 64),
                   "picodet-layout": (24, 24), "ppocr-rec-photos": (64, 96), "ppocr-det-pages": (24, 24)}


def uses_stats(cfg: Config) -> bool:
    """An onnxq row that quantizes from the one `onnxq calibrate` run's statistics (--load-stats)."""
    return (cfg.tool == "onnxq" and bool(cfg.args) and "--mode" not in cfg.args
            and not any(a in cfg.args for a in ("--equalize", "--smooth-alpha", "--fast")))


def quantize(cfg: Config, model: Path, data: datasets.DataSet, work: Path, stats: Path | None,
             timeout_s: int, rss_limit_mb: float, task: str = "") -> tuple[Path, dict]:
    """Run one configuration's quantizer as a child; return the output path and the row so far."""
    out = work / f"{cfg.id}.onnx"
    out.unlink(missing_ok=True)
    env: dict[str, str] = {}
    report_file = work / f"{cfg.id}.report.json"
    if cfg.tool == "onnxq":
        if "--mode" in cfg.args:  # dynamic / weight-only: no calibration (smoothing measures channels on it)
            needs = any(a in cfg.args for a in ("--smooth-alpha", "gptq", "awq", "--target-metric"))
            src: tuple = ("--calib", data.calib) if needs else ()
            if "--target-metric" in cfg.args:  # the task measure, tuned on calibration samples, not on eval
                script, value, samples = METRICS[task]
                src += ("--metric", script, "--target-metric", value)
                src += ("--target-data", data.calib) if samples == "calib" else ()
        elif not uses_stats(cfg):  # own statistics (--fast: timed as a user runs it; the default: no args)
            src = ("--calib", data.calib)
        else:
            src = ("--load-stats", stats) if stats and cfg.args else ("--calib", data.calib)
            if stats and any(a in cfg.args for a in ("--bias-correction", "--adaround")):
                src += ("--calib", data.calib)  # the layer inputs come from the samples themselves
        cmd = runners.onnxq_cmd("quantize", model, "-o", out, *src, "--eval-data", data.eval,
                                "--report", report_file, "-q", *(a for a in cfg.args if a != "--target-metric"))
    elif cfg.tool == "ort":
        if not cfg.args:
            return out, {"status": "n/a"}
        cmd = runners.peer_cmd(cfg.args[0], model, out, "--calib", data.calib, *cfg.args[1:])
    elif cfg.tool == "ort4":
        cmd, env = runners.nbits_cmd(cfg.args[0], model, out, "--calib", data.calib)
    elif cfg.tool == "nncf":
        if not runners.NNCF_PYTHON.exists():
            return out, {"status": "skipped", "error": "bench/.venv-nncf is missing (make bench creates it)"}
        cmd = runners.nncf_cmd(model, out, data.calib, *cfg.args)
    else:
        raise ValueError(cfg.tool)
    if cfg.tool == "onnxq" and cfg.id != "onnxq-default":  # a row measures its one setting, not the search
        env = {**os.environ, "ONNXQ_FAST": "1"}
    res = runners.run_child(cmd, log=work / f"{cfg.id}.log", timeout_s=timeout_s, rss_limit_mb=rss_limit_mb,
                            env=env or None)
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
        if rep.get("auto"):
            row["onnxq_auto"] = {"chosen": rep["auto"]["chosen"], "why": rep["auto"]["why"],
                                 "candidates": len(rep["auto"]["candidates"]), "seconds": rep["auto"].get("seconds")}
        if rep.get("accuracy_target"):
            target = rep["accuracy_target"]
            row["onnxq_target"] = {k: target.get(k) for k in ("met", "start", "final", "float_nodes", "speed")}
        if rep.get("weight_only"):
            row["onnxq_weight_only"] = {k: rep["weight_only"].get(k) for k in ("method", "notes", "awq_folded")}
            layers = rep["weight_only"].get("layers", {}).values()
            row["onnxq_weight_only"]["bits"] = dict(Counter(d["bits"] for d in layers))
    return out, row


def floor_seconds(model: Path, fp32_pass_s: float) -> float:
    """The floor a quantize is measured against: process start + model load (a child that loads the model
    into onnxruntime, timed whole) + one plain fp32 pass over the calibration data (measured in this run)."""
    code = ("import onnxruntime as ort, sys; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(model)], check=True, capture_output=True)
    return time.perf_counter() - start + fp32_pass_s


def task_metrics(spec: models.ModelSpec, path: Path, ref: list[np.ndarray], got: list[np.ndarray],
                 data: datasets.DataSet, ref_extra,
                 eval_feeds: list[dict[str, np.ndarray]]) -> tuple[dict, object]:
    """The model's task metric for one model file, and what the fp32 row keeps for the others to be
    compared with (``ref_extra``: silero's speech probabilities, the layout detector's boxes)."""
    meta = data.meta
    if spec.task == "imagenet-cls":
        return metrics.imagenet_metrics(ref, got, meta["eval_labels"]), None
    if spec.task == "captcha-ocr":
        charset = json.loads((data.eval.parent / "charset.json").read_text())
        return metrics.captcha_metrics(ref, got, meta["eval_labels"], charset), None
    if spec.task == "ocr-rec-photos":
        return metrics.rec_photo_metrics(path, ref, got, meta["eval_labels"]), None
    if spec.task == "layout-det":
        boxes = [metrics.picodet_boxes(o) for o in metrics.run_outputs(metrics.session(path), eval_feeds)]
        ref_boxes = boxes if ref_extra is None else ref_extra
        return metrics.layout_metrics(ref_boxes, boxes, meta["eval_truth"], meta["eval_kinds"]), boxes
    if spec.task == "text-det" and "eval_truth" in meta:
        truth = metrics.truth_f1([metrics.unclip(metrics.db_boxes(g)) for g in got], meta["eval_truth"])
        scans = [i for i, k in enumerate(meta["eval_kinds"]) if k == "scan"]
        real = metrics.det_metrics(spec.task, [ref[i] for i in scans], [got[i] for i in scans])["f1_vs_fp32"]
        return {**metrics.det_metrics(spec.task, ref, got), "f1_vs_fp32_scans": real, **truth}, None
    if spec.task == "ocr-rec":
        return metrics.rec_metrics(path, ref, got, data.meta["eval_labels"]), None
    if spec.task == "ocr-cls":
        return metrics.cls_metrics(ref, got, data.meta["eval_labels"]), None
    if spec.task in ("text-det", "yolo-det"):
        return metrics.det_metrics(spec.task, ref, got), None
    if spec.task == "sentence-emb":
        return metrics.embedding_metrics(ref, got, [f["attention_mask"] for f in eval_feeds]), None
    if spec.task == "asr-decoder":
        return metrics.decoder_metrics(ref, got, data.meta["eval_labels"]), None
    audio = np.load(data.eval.parent / "eval_audio.npy")
    _, probs = datasets.vad_sequence(metrics.session(path), audio)
    return metrics.vad_metrics(probs if ref_extra is None else ref_extra, probs), probs


def kernel_class() -> str:
    """The CPU class whose kernels onnxruntime runs here: the class bench/cpu_mask masks cpuid to, else the host's."""
    return os.environ.get("ONNXQ_CPUID_MASK") or report.machine()["cpu_class"]


def bench_model(spec: models.ModelSpec, cfgs: list[Config], n_calib: int, n_eval: int,
                rss_limit_mb: float, rounds: int, log=print, work_root: Path = WORK) -> dict:
    """Benchmark one model with ``cfgs`` (quantized models in ``work_root``/<model>-<calib>-<eval>/); return its
    result dict."""
    t_start = time.perf_counter()
    model = models.prepare(spec)
    data = datasets.build(spec.name, spec.task, model, n_calib, n_eval, data=spec.data)
    work = work_root / f"{spec.name}-{n_calib}-{n_eval}"
    work.mkdir(parents=True, exist_ok=True)
    calib_feeds, eval_feeds = datasets.load_feeds(data.calib), datasets.load_feeds(data.eval)
    sess = metrics.session(model)
    t0 = time.perf_counter()
    metrics.run_all(sess, calib_feeds)
    fp32_calib_pass_s = time.perf_counter() - t0
    floor_s = floor_seconds(model, fp32_calib_pass_s)
    ref = metrics.run_all(sess, eval_feeds)
    del sess

    stats = None
    calibrate_row = None
    if any(uses_stats(c) for c in cfgs):
        stats = work / "onnxq.stats.npz"
        res = runners.run_child(runners.onnxq_cmd("calibrate", model, "-o", stats, "--calib", data.calib, "-q"),
                                log=work / "onnxq-calibrate.log", timeout_s=spec.timeout_s, rss_limit_mb=rss_limit_mb)
        calibrate_row = res.to_dict()
        calibrate_row["calib_ratio"] = round(max(1.0, res.wall_s / fp32_calib_pass_s), 2)
        log(f"  onnxq calibrate: {res.status} {res.wall_s:.1f}s")

    rows, paths = [], {}
    ref_extra = None
    for cfg in cfgs:
        row: dict = {"id": cfg.id, "tool": cfg.tool, "label": cfg.label}
        if cfg.tool == "fp32":
            path, row["status"] = model, "ok"
        else:
            path, extra = quantize(cfg, model, data, work, stats, spec.timeout_s, rss_limit_mb, spec.task)
            row.update(extra)
            if cfg.id in ("onnxq-default", "onnxq-fast") and "onnxq_timings_s" in row:
                calibrate_s = row["onnxq_timings_s"].get("calibrate", 0.0)
                row["calib_ratio"] = round(max(1.0, calibrate_s / fp32_calib_pass_s), 2)
                row["quant_floor_ratio"] = round(row["quant_wall_excl_eval_s"] / floor_s, 2)
        if row["status"] == "ok":
            try:
                got = ref if cfg.tool == "fp32" else metrics.run_all(metrics.session(path), eval_feeds)
                row["fidelity"] = metrics.fidelity(ref, got)
                row["task"], extra = task_metrics(spec, path, ref, got, data, ref_extra, eval_feeds)
                if cfg.tool == "fp32":
                    ref_extra = extra
                row["size_bytes"] = path.stat().st_size
                row["size_ratio"] = round(model.stat().st_size / path.stat().st_size, 3)
                paths[cfg.id] = path
            except Exception as exc:  # an int8 model onnxruntime cannot run is a row that says so
                row["status"] = "runtime-error"
                row["error"] = f"{type(exc).__name__}: {exc}"[:1500]
        log(f"  {cfg.id}: {row['status']} {row.get('task', '')} {row.get('quant_wall_s', '')}")
        rows.append(row)

    lat = {t: metrics.latency(paths, eval_feeds[0], threads=n, rounds=rounds) for t, n in (("1", 1), ("all", 0))}
    cpu_class = kernel_class()
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
            "fp32_calib_pass_s": round(fp32_calib_pass_s, 3), "quantize_floor_s": round(floor_s, 3),
            "onnxq_calibrate": calibrate_row,
            "rows": rows, "machine": report.machine(), "work": str(work),
            "elapsed_s": round(time.perf_counter() - t_start, 1)}


def merge_rows(path: Path, new: dict) -> dict:
    """The saved results with ``new``'s rows added or replaced by id (fp32 stays the saved run's).

    Every row's speedup is a ratio to fp32 measured in the same run as that row, so rows from
    different runs stay comparable as ratios; each merged row records the run that made it.
    """
    if not path.exists() or "rows" not in new:
        return new
    saved = json.loads(path.read_text())
    m = new.get("machine", {})
    cpu = f"{m.get('cpu')} (AVX2: {m.get('avx2')}, VNNI: {m.get('vnni')}, AMX: {m.get('amx')})"
    fresh = {row["id"]: {**row, "merged_from": new["command"], "machine_cpu": cpu}
             for row in new["rows"] if row["id"] != "fp32"}
    rows = [fresh.pop(row["id"], row) for row in saved.get("rows", [])]
    saved["rows"] = rows + list(fresh.values())
    saved.setdefault("merged_commands", []).append(new["command"])
    return saved


def run(names: list[str], cfg_fn, samples: dict[str, tuple[int, int]], results: Path, markdown: Path | None,
        command: str, rss_limit_mb: float = 12_000, rounds: int = 7, log=print, merge: bool = False,
        title: str = "# onnxq benchmarks", work: Path | None = None) -> list[dict]:
    """Benchmark ``names``; write results/<model>.json (and the markdown when given)."""
    results.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        spec = models.MODELS[name]
        n_calib, n_eval = samples[name]
        log(f"== {name} ({n_calib} calib / {n_eval} eval)")
        try:
            res = bench_model(spec, cfg_fn(spec), n_calib, n_eval, rss_limit_mb, rounds, log=log,
                              work_root=work or WORK)
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
        report.write_markdown(results, markdown, title=title)
    return out


def run_quick(results: Path = RESULTS / "quick", n: int = 8, markdown: Path | None = None,
              command: str = "python -m bench.run --quick") -> dict:
    """bench-quick: the PP-OCRv4 recogniser, ``n`` calibration and ``n`` evaluation lines, 3 rows."""
    return run(["ppocr-rec"], lambda _spec: configs.quick(), {"ppocr-rec": (n, n)}, results, markdown,
               command, rounds=3)[0]


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small model, onnxq default + one ORT peer")
    p.add_argument("--set", choices=models.SUITES, default="main", dest="suite",
                   help="the models of one suite (main: the tuned-on bench; new: unseen models and wider data)")
    p.add_argument("--models", help="comma-separated, any suite (default: the --set's): " + ",".join(models.MODELS))
    p.add_argument("--n-calib", type=int, help="calibration samples (default: per model)")
    p.add_argument("--n-eval", type=int, help="evaluation samples (default: per model)")
    p.add_argument("--results", type=Path, help="folder for <model>.json (default bench/results[/quick])")
    p.add_argument("--markdown", type=Path, help="write this markdown (default BENCHMARKS.md; quick: none)")
    p.add_argument("--work", type=Path, help="folder for the quantized models (default bench/.cache/work; another "
                   "one keeps the cache's models, e.g. for models made under bench/cpu_mask for another CPU class)")
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
    if a.report_only:
        folder, markdown = suite_outputs(a.suite)
        report.write_markdown(a.results or folder, a.markdown or markdown, title=SUITE_TITLES[a.suite])
        return 0
    names = [n for n in a.models.split(",") if n] if a.models else models.suite(a.suite)
    unknown = [n for n in names if n not in models.MODELS]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    samples = {n: (a.n_calib or DEFAULT_SAMPLES[n][0], a.n_eval or DEFAULT_SAMPLES[n][1]) for n in names}
    wanted = set(a.configs.split(",")) if a.configs else None

    def chosen(spec: models.ModelSpec) -> list[Config]:
        return [c for c in configs.full(spec.dynamic, spec.transformer, spec.weight_only)
                if wanted is None or c.id in wanted or c.id == "fp32"]

    for suite in models.SUITES:  # each suite's results go to its own folder and markdown
        mine = [n for n in names if models.MODELS[n].suite == suite]
        if mine:
            folder, markdown = suite_outputs(suite)
            run(mine, chosen, samples, a.results or folder, a.markdown or markdown, command.strip(), a.rss_limit_mb,
                merge=a.merge, title=SUITE_TITLES[suite], work=a.work)
    return 0


SUITE_TITLES = {"main": "# onnxq benchmarks",
                "new": "# onnxq on models nobody tuned it for (suite new; its headline is in BENCHMARKS.md)"}


def suite_outputs(suite: str) -> tuple[Path, Path]:
    """Results folder and markdown of a suite: main -> bench/results, BENCHMARKS.md; new -> bench/results/unseen."""
    return (RESULTS, MARKDOWN) if suite == "main" else (UNSEEN, UNSEEN / "UNSEEN.md")


if __name__ == "__main__":
    raise SystemExit(main())
