"""Quantize time against its floor, side by side in one run.

The floor is what any quantizer must pay: process start, model load and one plain fp32
onnxruntime pass over the calibration data (a child that imports only numpy and
onnxruntime). Each round runs the floor, `onnxq calibrate`, `onnxq quantize
--fast --method M` for every method (the single pass; the automatic search is timed by
bench.run) and the peers (onnxruntime.quantization's quantize_static, QDQ per-channel with
MinMax and with Entropy calibration, as bench.peers runs it; NNCF's nncf.quantize with its
defaults in bench/.venv-nncf), one after the other, as child processes on the same calibration
folder; ratios are taken per round (same machine state) and their median is reported.

python -m bench.quantize_time                                  # every bench model in bench/.cache
python -m bench.quantize_time --models ppocr-rec --rounds 5
python -m bench.quantize_time --models ppocr-rec --rss-samples 100,1000 --rounds 1
python -m bench.quantize_time --before /path/to/other/checkout   # also that onnxq's rows, same rounds
python -m bench.quantize_time --before /tmp/old --before-python /tmp/oldvenv/bin/python  # ... in another Python
python -m bench.quantize_time --no-peers                        # the floor and onnxq only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

METHODS = ("global", "max", "percentile", "mse", "kl")
PEERS = ("ort minmax", "ort entropy", "nncf")  # row names of the peers, in table order


def floor_child(model: str, folder: str) -> None:
    """The floor itself: load the model, run every .npz feed of `folder` once."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    files = sorted(Path(folder).glob("*.npz"), key=lambda p: [int(t) if t.isdigit() else t
                                                               for t in re.split(r"(\d+)", p.name)])
    for file in files:
        with np.load(file) as data:
            session.run(None, {k: data[k] for k in data.files if k in names})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--floor", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--models", help="comma-separated bench models (default: every one whose model is cached)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rss-samples", help="instead: peak RSS of calibrate/quantize at these sample counts "
                   "(the calibration set repeated), e.g. 100,1000")
    p.add_argument("--before", type=Path, help="another onnxq checkout (e.g. `git worktree add /tmp/base main`): "
                   "its calibrate/quantize rows run in the same rounds, marked 'before'")
    p.add_argument("--before-python", type=Path, help="the Python the 'before' rows run in (default: this one), "
                   "e.g. a copy of the venv with other dependency versions")
    p.add_argument("--no-peers", action="store_true", help="leave out the onnxruntime.quantization and NNCF rows")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/timing/quantize_time[_rss].json)")
    args = p.parse_args(argv)
    if args.floor:
        floor_child(*args.floor)
        return 0
    from bench import models

    names = args.models.split(",") if args.models else [n for n, s in models.MODELS.items() if _cached(s)]
    if args.rss_samples:
        result = rss_run(names, [int(n) for n in args.rss_samples.split(",")], args.rounds)
        out = args.out or models.REPO / "bench" / "results" / "timing" / "quantize_time_rss.json"
    else:
        out = args.out or models.REPO / "bench" / "results" / "timing" / "quantize_time.json"
        result = time_run(names, args.methods.split(","), args.rounds, Side(args.before, args.before_python),
                          peers=not args.no_peers, out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def _cached(spec) -> bool:
    from bench import models

    return bool(spec.local) or (models.CACHE / "models" / f"{spec.name}.onnx").exists()


def _data(name: str) -> tuple[Path, Path]:
    """The model and its calibration folder, as bench.run prepares them."""
    from bench import datasets, models
    from bench.run import DEFAULT_SAMPLES

    spec = models.MODELS[name]
    model = models.prepare(spec)
    n_calib, n_eval = DEFAULT_SAMPLES[name]
    return model, datasets.build(spec.name, spec.task, model, n_calib, n_eval).calib


@dataclass(frozen=True)
class Side:
    """Where the 'before' rows come from: an onnxq checkout and the Python that runs it (None: this one)."""

    source: Path | None = None
    python: Path | None = None

    def __bool__(self) -> bool:
        return self.source is not None or self.python is not None


def _onnxq(python: Path | str, *args: str | Path) -> list[str]:
    """`python -m onnxq ARGS` (the console script's code). `-m` puts the working folder first on the path, so
    a row runs in its checkout's folder (and with it first on PYTHONPATH): that checkout's onnxq runs."""
    return [str(python), "-m", "onnxq", *map(str, args)]


def _env(source: Path | None = None) -> dict[str, str]:
    """This checkout (or `source`, another one) first on the path: its onnxq and bench run."""
    from bench import models

    return {**os.environ, "PYTHONPATH": str(source or models.REPO)}


def pythons(before: Side) -> dict[str, dict[str, str]]:
    """Each row kind's interpreter and the versions that set its import cost (ml_dtypes, onnx, onnxruntime)."""
    from bench import runners

    kinds = {"floor, onnxq, onnxruntime.quantization": Path(sys.executable),
             "nncf": runners.NNCF_PYTHON}
    if before:
        kinds["onnxq (before)"] = before.python or Path(sys.executable)
    code = ("import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' "
            "for p in ('ml_dtypes', 'onnx', 'onnxruntime')))")
    out = {}
    for kind, python in kinds.items():
        if not python.exists():
            continue
        run = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
        out[kind] = {"python": str(python), "versions": run.stdout.strip() or run.stderr.strip()[-200:]}
    return out


def _commit(source: Path) -> str | None:
    """The short commit of a checkout (None when it is not a git work tree)."""
    run = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    return run.stdout.strip() or None


def peer_commands(model: Path, calib: Path, work: Path) -> dict[str, list[str]]:
    """The peers' rows: quantize_static QDQ per-channel (MinMax, Entropy) and nncf.quantize defaults."""
    from bench import runners

    cmds = {f"ort {m.lower()}": runners.peer_cmd("static", model, work / f"ort-{m.lower()}.onnx", "--calib", calib,
                                                "--format", "QDQ", "--method", m) for m in ("MinMax", "Entropy")}
    if runners.NNCF_PYTHON.exists():
        cmds["nncf"] = runners.nncf_cmd(model, work / "nncf.onnx", calib)
    return cmds


def commands(name: str, methods: list[str], work: Path, before: Side = Side(), peers: bool = True
             ) -> dict[str, tuple[list[str], Path | None]]:
    """Row name -> (command, checkout first on its PYTHONPATH or None for this one) for a bench model."""
    model, calib = _data(name)
    return row_commands(model, calib, methods, work, before, peers)


def row_commands(model: Path, calib: Path, methods: list[str], work: Path, before: Side = Side(),
                 peers: bool = True) -> dict[str, tuple[list[str], Path | None]]:
    """Row name -> (command, checkout first on its PYTHONPATH or None for this one): the floor, then per side
    calibrate and quantize --fast per method, then the peers."""
    cmds: dict[str, tuple[list[str], Path | None]] = {
        "floor": ([sys.executable, "-m", "bench.quantize_time", "--floor", str(model), str(calib)], None)}
    sides = ((before.source, before.python or sys.executable, " (before)"), (None, sys.executable, ""))
    for source, python, mark in sides if before else sides[1:]:
        cmds[f"calibrate{mark}"] = (_onnxq(python, "calibrate", model, "--calib", calib, "-o", work / "stats.npz",
                                           "-q"), source)
        for method in methods:
            cmds[f"quantize {method}{mark}"] = (_onnxq(python, "quantize", model, "-o", work / f"{method}.onnx",
                                                       "--calib", calib, "--method", method, "--fast", "-q"), source)
    if peers:
        cmds.update({key: (cmd, None) for key, cmd in peer_commands(model, calib, work).items()})
    return cmds


def time_run(names: list[str], methods: list[str], rounds: int, before: Side = Side(), peers: bool = True,
             out: Path | None = None) -> dict:
    """Every row of every model `rounds` times; `out` gets the results after each model."""
    from bench import models, report

    result = {"machine": report.machine(), "before": str(before.source) if before.source else None,
              "before_commit": _commit(before.source) if before.source else None,
              "before_python": str(before.python) if before.python else None, "pythons": pythons(before),
              "rounds": rounds, "models": {},
              "kernels": os.environ.get("ONNXQ_CPUID_MASK")}  # bench/cpu_mask: the class whose kernels ran
    for name in names:
        work = models.CACHE / "work" / f"quantize-time-{name}"
        work.mkdir(parents=True, exist_ok=True)
        cmds = commands(name, methods, work, before, peers)
        runs: dict[str, list] = {key: [] for key in cmds}
        for _ in range(rounds):
            for key, (cmd, source) in cmds.items():
                for old in work.glob("*.onnx*"):
                    old.unlink()
                (work / "stats.npz").unlink(missing_ok=True)
                res = run_row(cmd, source, work / f"{key.replace(' ', '-')}.log")
                if res["status"] == "ok" and key in PEERS and not any(work.glob(key.replace(" ", "-") + ".onnx")):
                    res["status"] = "failed"  # no model written
                runs[key].append(res)
                print(f"  {name} {key}: {res['status']} {res['wall_s']:.2f} s {res['peak_rss_mb']:.0f} MB",
                      flush=True)
        result["models"][name] = summarise(runs)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_row(cmd: list[str], source: Path | None, log: Path) -> dict:
    """One timed child in `source`'s folder with it first on PYTHONPATH (None: this checkout)."""
    from bench import models, runners

    return runners.run_child(cmd, log=log, timeout_s=1800, rss_limit_mb=12_000, env=_env(source),
                             cwd=source or models.REPO).to_dict()


def summarise(runs: dict[str, list]) -> dict:
    floor = [r["wall_s"] for r in runs["floor"]]
    rows = {}
    for key, results in runs.items():
        walls = [r["wall_s"] for r in results]
        ok = all(r["status"] == "ok" for r in results)
        rows[key] = {"status": "ok" if ok else results[-1]["status"], "wall_s": walls,
                     "median_s": round(statistics.median(walls), 3),
                     "ratio_to_floor": round(statistics.median(w / f for w, f in zip(walls, floor, strict=True)), 2),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                     "error": None if ok else results[-1]["log_tail"][-400:]}
    return rows


def rss_run(names: list[str], counts: list[int], rounds: int) -> dict:
    from bench import models, report, runners

    result = {"machine": report.machine(), "models": {}}
    for name in names:
        model, calib = _data(name)
        files = sorted(calib.glob("*.npz"))
        rows = {}
        for count in counts:
            folder = models.CACHE / "data" / f"{name}-repeat-{count}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):  # the calibration set repeated: links, no copies
                link = folder / f"{i:06d}.npz"
                if not link.exists():
                    link.symlink_to(files[i % len(files)])
            work = models.CACHE / "work" / f"quantize-rss-{name}-{count}"
            work.mkdir(parents=True, exist_ok=True)
            py = sys.executable
            for key, cmd in {"calibrate": _onnxq(py, "calibrate", model, "--calib", folder, "-o", work / "s.npz", "-q"),
                             "quantize": _onnxq(py, "quantize", model, "-o", work / "m.onnx", "--calib", folder,
                                                "--no-speed-guard", "-q")}.items():
                peaks, walls = [], []
                for _ in range(rounds):
                    for old in work.glob("*"):
                        old.unlink()
                    res = runners.run_child(cmd, log=models.CACHE / "work" / f"rss-{name}-{count}-{key}.log",
                                            timeout_s=3600, rss_limit_mb=12_000, env=_env())
                    peaks.append(res.peak_rss_mb)
                    walls.append(res.wall_s)
                    print(f"  {name} {count} {key}: {res.status} {res.wall_s:.1f} s {res.peak_rss_mb:.0f} MB",
                          flush=True)
                rows[f"{key} {count}"] = {"samples": count, "peak_rss_mb": max(peaks), "wall_s": walls}
        result["models"][name] = rows
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']}"
             + (f"; 'before' rows: onnxq from {result['before']}" if result.get("before") else "")
             + (f" in {result['before_python']}" if result.get("before_python") else ""), ""]
    for name, rows in result["models"].items():
        if "floor" in rows:
            lines += [f"{name} (median of {result['rounds']} rounds)", "",
                      "| command | median s | × floor | peak RSS MB |", "|---|---|---|---|"]
            lines += [f"| {key} | {row['median_s']:.2f} | {row['ratio_to_floor']:.2f} | {row['peak_rss_mb']:.0f} |"
                      + ("" if row["status"] == "ok" else f" {row['status']}") for key, row in rows.items()]
        else:
            lines += [f"{name}", "", "| command | samples | peak RSS MB | wall s |", "|---|---|---|---|"]
            lines += [f"| {key.split()[0]} | {row['samples']} | {row['peak_rss_mb']:.0f} | "
                      f"{statistics.median(row['wall_s']):.1f} |" for key, row in rows.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
