"""Machine description and BENCHMARKS.md generation from bench/results/*.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import cache
from pathlib import Path

from bench import runners
from bench.metrics import PRIMARY
from bench.runners import REPO


@cache
def machine() -> dict:
    """CPU model, int8-relevant flags, cores, library versions."""
    import onnxruntime

    import onnxq

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    nncf = None
    if runners.NNCF_PYTHON.exists():
        out = subprocess.run([str(runners.NNCF_PYTHON), "-c", "import nncf; print(nncf.__version__)"],
                             capture_output=True, text=True)
        nncf = out.stdout.strip() or None
    from onnxq.cpu import cpu_class, parse_cpuinfo

    host_class = cpu_class(parse_cpuinfo(f"flags: {' '.join(sorted(flags))}"))[0]  # the real host, never forced
    return {"cpu": model, "cores": os.cpu_count(), "cpu_class": host_class,
            "int8_flags": sorted(f for f in flags if "vnni" in f or f.startswith("amx") or f.startswith("avx512")),
            "avx2": "avx2" in flags, "vnni": any("vnni" in f for f in flags),
            "amx": any(f.startswith("amx") for f in flags),
            "onnxruntime": onnxruntime.__version__, "onnxq": onnxq.__version__, "nncf": nncf,
            "python": platform.python_version()}


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def _metric(row: dict, key: str) -> float | None:
    return row.get("task", {}).get(key)


def fp32_agreement(row: dict | None, task: str) -> float | None:
    """The row's task agreement with fp32 (the issue's measure): same text / class / decision / boxes as fp32;
    the primary metric where it already is one (f1_vs_fp32, decision_agreement, top1_agreement, ...)."""
    t = (row or {}).get("task") or {}
    if (row or {}).get("status") != "ok":
        return None
    if task == "ocr-rec" and t.get("lines"):
        return t["same_text_as_fp32"] / t["lines"]
    if task == "ocr-cls":
        return t.get("agreement_with_fp32")
    return t.get(PRIMARY[task])


def row_cpu_class(row: dict, res: dict) -> str:
    """The CPU class a row was measured on (rows from before the column: their file's machine)."""
    if "cpu_class" in row:
        return row["cpu_class"]
    if "machine_cpu" in row:  # merged rows that named their machine before the column existed
        flags = row["machine_cpu"]
        return "amx" if "AMX: True" in flags else "avx512-vnni" if "VNNI: True" in flags else "avx2"
    machine_ = res["machine"]
    return machine_.get("cpu_class") or ("amx" if machine_.get("amx") else "avx512-vnni" if machine_.get("vnni")
                                         else "avx2")


def model_table(res: dict) -> str:
    """One markdown table: a row per configuration, each naming the CPU class it was measured on."""
    key = res["primary_metric"]
    head = (f"| config | CPU | status | {key} | SQNR dB | cosine | speedup 1t | speedup {res['machine']['cores']}t "
            "| ms 1t | size ÷ | quant s | peak RSS MB | calib ratio |")
    lines = [head, "|" + "---|" * 13]
    for r in res["rows"]:
        fid = r.get("fidelity", {})
        sp, lat = r.get("speedup", {}), r.get("latency_ms", {})
        quant = r.get("quant_wall_excl_eval_s", r.get("quant_wall_s"))
        status = r["status"]
        if status not in ("ok",) and r.get("error"):
            status += f": {_short_error(r['error'])}"
        lines.append(f"| {r['id']} | {row_cpu_class(r, res)} | {status} | {_fmt(_metric(r, key), '.4f')} "
                     f"| {_fmt(fid.get('sqnr_db'), '.1f')} "
                     f"| {_fmt(fid.get('cosine'), '.4f')} | {_fmt(sp.get('1'), '.2f')} | {_fmt(sp.get('all'), '.2f')} "
                     f"| {_fmt(lat.get('1'), '.2f')} | {_fmt(r.get('size_ratio'), '.2f')} | {_fmt(quant, '.1f')} "
                     f"| {_fmt(r.get('peak_rss_mb'), '.0f')} | {_fmt(r.get('calib_ratio'), '.2f')} |")
    return "\n".join(lines)


def _short_error(text: str) -> str:
    """Last meaningful log line, shortened and made table-safe."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("^")]
    last = lines[-1] if lines else ""
    return last.replace("|", "/")[:140]


def best(rows: list[dict], tool: str, key: str) -> dict | None:
    """Best working row of ``tool`` by task metric, then by all-thread speedup."""
    ok = [r for r in rows if r["tool"] == tool and r["status"] == "ok" and _metric(r, key) is not None]
    return max(ok, key=lambda r: (_metric(r, key), r.get("speedup", {}).get("all") or 0), default=None)


def _cell(r: dict | None, key: str, name: bool = False) -> str:
    """Task metric of a row (with its id when ``name``), or its status when it did not work."""
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    val = _fmt(_metric(r, key), ".4f")
    return f"{val} ({r['id']})" if name else val


def _trio(rows: tuple[dict | None, ...], field: str, spec: str) -> str:
    """``field`` of each row (speedups: the 1-thread one), joined by slashes."""
    vals = []
    for r in rows:
        v = (r or {}).get(field)
        vals.append(_fmt(v.get("1") if isinstance(v, dict) else v, spec))
    return " / ".join(vals)


def headline(results: list[dict]) -> str:
    """Per model: onnxq default (the automatic search) and --fast (the old default) vs best ORT config vs NNCF."""
    lines = ["| model | CPU | metric | fp32 | onnxq default | onnxq --fast (old default) | best ORT config | NNCF "
             "| agreement with fp32 (default / fast / ORT / NNCF) | speedup 1t (default / fast / ORT / NNCF) "
             "| quantize s ÷ floor (default / fast) | default's choice |",
             "|" + "---|" * 12]
    for res in results:
        key = res["primary_metric"]
        if res.get("error"):
            lines.append(f"| {res['model']} | — | {key} | benchmark failed (see below) |" + " |" * 8)
            continue
        rows = {r["id"]: r for r in res["rows"]}
        oq, fast = rows.get("onnxq-default"), rows.get("onnxq-fast")
        ort, nn = best(res["rows"], "ort", key), best(res["rows"], "nncf", key)
        nn_row = nn or rows.get("nncf-default")
        shown = (oq, fast, ort, nn_row)
        classes = sorted({row_cpu_class(r, res) for r in (rows.get("fp32"), *shown) if r is not None})
        choice = ((oq or {}).get("onnxq_auto") or {}).get("chosen", "—")
        lines.append(f"| {res['model']} | {', '.join(classes)} | {key} | {_cell(rows.get('fp32'), key)} "
                     f"| {_cell(oq, key)} | {_cell(fast, key)} "
                     f"| {_cell(ort, key, True)} | {_cell(nn_row, key)} "
                     f"| {' / '.join(_fmt(fp32_agreement(r, res['task']), '.3f') for r in shown)} "
                     f"| {_trio(shown, 'speedup', '.2f')} "
                     f"| {_trio((oq, fast), 'quant_floor_ratio', '.1f')} | {choice} |")
    return "\n".join(lines)


def unseen_section(folder: Path) -> list[str]:
    """The headline of the `new` set (models nobody tuned onnxq on, and the main models on wider data), and
    beside it the run made with the default as frozen before anyone looked (`<folder>-frozen`, when kept)."""
    results = _results(folder)
    if not results:
        return []
    commands = sorted({c for r in results for c in [r.get("command", ""), *r.get("merged_commands", [])]} - {""})
    lines = ["## Models nobody tuned onnxq on, and wider data (`--set new`)", "",
             "EfficientNet-Lite0, the ddddocr captcha reader, all-mpnet-base-v2 and PicoDet-layout were not looked at "
             "with the automatic default before its settings were frozen (commit 883acd6); ppocr-rec-photos / "
             "ppocr-det-pages are the main bench's recogniser and detector on crops and pages from real photographs "
             "and scans, calibration and evaluation split by source. Made by: "
             + "; ".join(f"`{c}`" for c in commands) + f". Per-model tables: `{folder.name}/UNSEEN.md`.", "",
             headline(results), ""]
    frozen = _results(folder.with_name(f"{folder.name}-frozen"))
    if frozen:
        lines += ["The same set with the default as frozen, before its results were seen (`" + folder.name
                  + "-frozen/`). The table above reruns onnxq-default after two later changes: the run-time "
                  "quantization candidates come before the layer-ranking probe, whose cost counts against the "
                  "budget (made on seeing mpnet-base, where the probe had spent the budget before any dynamic "
                  "candidate), and candidates are measured as the target's integer arithmetic rather than this "
                  "host's kernels (made for bench.determinism). mpnet-base's choice depends on the 20 s budget: "
                  "0.900 (MatMuls dynamic) in a run that reached the run-time candidates, 0.790 in the last run, "
                  "where its two static candidates took about 7 s each and spent it.",
                  "", headline(frozen), ""]
    return lines


def _results(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def write_markdown(results_dir: Path, path: Path, title: str = "# onnxq benchmarks") -> None:
    """Write BENCHMARKS.md (or another suite's markdown, under ``title``) from every <model>.json in ``results_dir``."""
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    m = results[0]["machine"] if results else machine()
    commands = sorted({c for r in results for c in [r.get("command", ""), *r.get("merged_commands", [])]})
    shown = results_dir.relative_to(REPO) if results_dir.is_relative_to(REPO) else results_dir
    out = [title, "",
           f"Generated by `bench/report.py` from `{shown}/*.json`; do not edit by hand.", "",
           f"- Machine of the last full run: {m['cpu']}, {m['cores']} cores, CPU class "
           f"{m.get('cpu_class') or row_cpu_class({}, {'machine': m})}; AVX2: {m['avx2']}; VNNI: {m['vnni']}; "
           f"AMX: {m['amx']}; int8-relevant flags: {', '.join(m['int8_flags']) or 'none'}. Every table names the "
           "CPU class of each row (the CPU column): rows added later with --merge may come from another class.",
           f"- onnxruntime {m['onnxruntime']}, onnxq {m['onnxq']}, NNCF {m['nncf'] or 'not installed'}, "
           f"Python {m['python']}",
           "- Made by: " + "; ".join(f"`{c}`" for c in commands) + " (`make bench` runs `python -m bench.run`)", "",
           "## Headline", "", headline(results), "",
           *unseen_section(results_dir / "unseen"),
           *limit_section(results_dir / "limit", results_dir / "limit-avx2"),
           "## How to read the tables", "",
           "- onnxq default = `onnxq quantize MODEL --calib DATA` (the automatic search, README 'The automatic "
           "default'); --fast = the single pass that was the default before it. Quantize s ÷ floor: the quantize "
           "child's wall time (without its evaluation on --eval-data) ÷ (process start + model load + one plain "
           "fp32 pass over the calibration data), both in the same run. "
           "Best ORT config = the onnxruntime.quantization row with the best task metric (ties: faster). "
           "Speedup = fp32 median latency ÷ int8 median latency at batch 1, interleaved runs.",
           "- Task metric on held-back data (split from calibration by source). ocr-rec: character accuracy vs "
           "ground truth (greedy CTC); ocr-cls: 0°/180° accuracy; detectors: F1 of boxes vs fp32 boxes at IoU 0.5; "
           "VAD: speech/non-speech decision agreement with fp32 (each model carries its own state); sentence "
           "encoder: cosine of each sentence embedding (mean of the token embeddings under the attention mask, "
           "L2-normalised) to fp32's, averaged over the evaluation sentences (worst one in the JSON); ASR decoder "
           "(Whisper tiny.en, teacher-forced on held-out transcripts of espeak-ng speech, fp32 encoder output as "
           "input): how often the next-token choice (argmax) agrees with fp32's; its perplexity of the reference "
           "tokens is in the weight-only table.",
           "- SQNR/cosine: first output vs fp32 over all evaluation samples. The sentence encoder's feeds are padded "
           "to 64 tokens and these columns include the padded positions, which pooling ignores; its JSON has "
           "task.token_sqnr_db over real tokens only.",
           "- quant s: wall time of the quantizing child process (onnxq: without its built-in fidelity "
           "evaluation on --eval-data; ORT: includes quant_pre_process); peak RSS: that process's ru_maxrss.",
           "- calib ratio: onnxq's calibration time ÷ one plain fp32 onnxruntime pass over the same data "
           "(floor 1.0). onnxq-default: its calibrate stage; the --load-stats rows reuse one `onnxq calibrate` "
           "run (its ratio is in the JSON under onnxq_calibrate).",
           "- A crash, timeout or memory-limit kill is a row with that status and the last log line.", ""]
    out += fallback_section(results_dir / "fallback" / "fallback.json")
    for res in results:
        if res.get("error"):
            out += [f"## {res['model']} ({res['task']})", "", "The benchmark of this model failed:", "",
                    "```", res["error"].strip()[-1500:], "```", ""]
            continue
        d = res["data"]
        out += [f"## {res['model']} ({res['task']})", "",
                f"Source: `{res['source']['requirement']}` → `{res['source']['member']}` "
                f"({res['source']['size_bytes'] / 1e6:.2f} MB, {res['source']['licence']}). "
                f"Data: {d['n_calib']} calibration / {d['n_eval']} evaluation samples. "
                f"fp32 pass over calibration data: {res['fp32_calib_pass_s']:.2f} s.", "",
                model_table(res), ""]
        out += weight_only_lines(res)
        out += target_lines(res)
    out += quantize_time_lines(results_dir / "timing")
    out += quantize_time_lines(results_dir / "timing-avx2")
    path.write_text("\n".join(out))


def limit_section(*folders: Path) -> list[str]:
    """The speed limit per model (bench/speed_limit.py), when it was run: one folder per CPU class (the host's,
    then classes measured under bench/cpu_mask)."""
    results = [r for folder in folders for r in _results(folder) if "limit_speedup" in r]  # not --compare-only
    if not results:
        return []
    commands = sorted({r["command"].strip() for r in results}, key=lambda c: ("cpu_mask" in c, c))
    built = sorted({r["onnxq_models_command"] for r in results if r.get("onnxq_models_command")})
    masked = sorted({r["cpu_class"] for r in results if r.get("cpuid_mask")})
    lines = ["## Speed limit per model", "",
             "Made by " + "; ".join(f"`{c}`" for c in commands) + " (bench/README.md, 'Speed limit'). "
             "Limit: every op onnxruntime has an int8 kernel for timed alone in fp32 and in fused int8 QDQ form at "
             "its real shapes, side by side, the faster of the two per op plus the Q/DQ conversions at the "
             "float/int8 boundaries that choice makes, everything else at its fp32 cost; heavy only: the same "
             "with only Conv/MatMul/Gemm allowed in int8. The model columns are fp32 ÷ model, 1 thread, batch 1, "
             "all models of a row timed in one interleaved run: ratios, measured side by side on a shared "
             "2-core machine (fp32 ms moves with its load). Best peer: the fastest ORT/NNCF model of that run whose "
             "agreement with fp32 (the headline's measure, from the bench's results) is at least 0.9 × onnxq "
             "default's, else the most agreeing one; % of limit: the default's speedup ÷ the limit (the "
             "peer's in brackets). Above 100%: the limit misses a form that model uses (bench/README.md)."
             + (f" Rows of class {', '.join(masked)}: this machine with cpuid masked to that class (bench/cpu_mask; "
                "MLAS runs that class's kernels), agreement measured under the mask, onnxq's models made for that "
                "class under the mask by " + "; ".join(f"`{c}`" for c in built) + ", the peers' models the bench's "
                "cached ones (onnxruntime.quantization and NNCF write the same model whatever the host)."
                if masked else ""), "",
             "| model | CPU class | fp32 ms | limit × | limit, heavy ops only × | onnxq default × | onnxq --fast × "
             "| best peer × (which, agreement) | onnxq default as % of limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed, agreement = r["speedup"], r.get("fp32_agreement", {})
        peers = [cid for cid in speed if cid.startswith(("ort-", "nncf-"))]
        # the fastest peer that answers about as well as onnxq's default (a fast peer that answers wrongly is no
        # target); when none does, the most agreeing one
        floor = 0.9 * (agreement.get("onnxq-default") or 0.0)
        usable = [cid for cid in peers if (agreement.get(cid) or 0.0) >= floor]
        peer = (max(usable, key=lambda cid: speed[cid]) if usable else
                max(peers, key=lambda cid: (agreement.get(cid) or 0.0, speed[cid]), default=None))
        agree = agreement.get(peer) if peer else None
        peer_cell = (f"{speed[peer]:.2f} ({peer}, {_fmt(agree)})" if peer else "—")
        share = r.get("onnxq_default_of_limit")
        peer_share = f" (peer {100 * speed[peer] / r['limit_speedup']:.0f}%)" if peer else ""
        lines.append(f"| {r['model']} | {r['cpu_class']} | {r['fp32_ms']:.1f} | {r['limit_speedup']:.2f} "
                     f"| {r['heavy_only']['limit_speedup']:.2f} | {_fmt(speed.get('onnxq-default'), '.2f')} "
                     f"| {_fmt(speed.get('onnxq-fast'), '.2f')} | {peer_cell} "
                     f"| {'—' if share is None else f'{100 * share:.0f}%'}{peer_share} |")
    notes = folders[0] / "NOTES.md"  # how the rows were made and the before/after runs, written by who ran them
    return [*lines, "", *([notes.read_text().strip(), ""] if notes.exists() else [])]


def quantize_time_lines(folder: Path) -> list[str]:
    """The quantize-time table from bench/quantize_time.py's JSON, when there is one."""
    from bench.quantize_time import PEERS

    path = folder / "quantize_time.json"
    if not path.exists():
        return []
    res = json.loads(path.read_text())
    m = res["machine"]
    rows = next(iter(res["models"].values()))
    methods = [k.split()[1] for k in rows if k.startswith("quantize ") and "(before)" not in k]
    before = any("(before)" in k for r in res["models"].values() for k in r)
    peers = [k for k in PEERS if any(k in r for r in res["models"].values())]
    where = "; ".join(f"{kind}: `{p['python']}` ({p['versions']})" for kind, p in res.get("pythons", {}).items())
    masked = res.get("kernels")
    out = [f"## Quantize time against its floor{f', {masked} kernels (cpuid masked)' if masked else ''}", "",
           (f"`python -m bench.cpu_mask {masked} -- python -m bench.quantize_time --rounds {res['rounds']}" if masked
            else f"`python -m bench.quantize_time --rounds {res['rounds']}")
           + (f" --before <{res.get('before_commit') or 'an earlier checkout'}>" if before else "")
           + (" --before-python <another venv>" if res.get("before_python") else "") + "` on "
           f"{m['cpu']}, {m['cores']} cores, VNNI: {m['vnni']}, AMX: {m['amx']} (see bench/README.md). "
           "Floor: process start + model load + one plain "
           "fp32 onnxruntime pass over the calibration data. Each cell: median over rounds of (time ÷ the same "
           "round's floor)" + ("; before → now" if before else "") + ". quantize runs `--fast --method M` (the "
           "single pass, speed table included) and includes its evaluation of the held-back samples; calibrate "
           "always keeps histograms (its statistics are saved)."
           + (" Peers, in the same rounds on the same calibration folder: onnxruntime.quantization's "
              "quantize_static (QDQ, per-channel, after quant_pre_process; MinMax and Entropy calibration; "
              "bench/peers.py) and nncf.quantize with its defaults (bench/nncf_child.py); a peer that did not "
              "write a model shows its status." if peers else "")
           + (f" Interpreters: {where}." if where else ""), "",
           "| model | floor s | calibrate | " + " | ".join(f"quantize {x}" for x in methods)
           + "".join(f" | {PEER_TITLES[k]}" for k in peers) + " | peak RSS MB |"
           + (" peers' peak RSS MB (" + " / ".join(PEER_TITLES[k] for k in peers) + ") |" if peers else ""),
           "|---|---|---|" + "---|" * (len(methods) + len(peers)) + "---|" + ("---|" if peers else "")]
    for name, rows in res["models"].items():
        def ratio(row: dict | None) -> str:
            if row is None:
                return "—"
            return f"{row['ratio_to_floor']:.2f}" if row["status"] == "ok" else row["status"]

        def cell(key: str, rows=rows) -> str:
            was = rows.get(key + " (before)")
            return f"{ratio(was)} → {ratio(rows.get(key))}" if before and was else ratio(rows.get(key))
        keys = ["calibrate", *(f"quantize {x}" for x in methods)]
        rss = f"{max(rows[k]['peak_rss_mb'] for k in keys):.0f}"
        was = [rows[k + " (before)"]["peak_rss_mb"] for k in keys if k + " (before)" in rows]
        rss_cell = f"{max(was):.0f} → {rss}" if was else rss
        peer_rss = " / ".join(f"{rows[k]['peak_rss_mb']:.0f}" if k in rows else "—" for k in peers)
        out.append(f"| {name} | {rows['floor']['median_s']:.2f} | " + " | ".join(cell(k) for k in [*keys, *peers])
                   + f" | {rss_cell} |" + (f" {peer_rss} |" if peers else ""))
    notes = folder / "NOTES.md"  # what the run's numbers mean, written by whoever ran it
    return [*out, "", *([notes.read_text().strip(), ""] if notes.exists() else [])]


PEER_TITLES = {"ort minmax": "ORT MinMax", "ort entropy": "ORT Entropy", "nncf": "NNCF"}


def fallback_section(path: Path) -> list[str]:
    """Keeping one kind of layer in float against all-int8 (bench/fallback.py), when it was run."""
    if not path.exists():
        return []
    from bench.fallback import markdown

    lines = ["## Keeping a kind of layer in float", "",
            "Made by `python -m bench.fallback`: each model quantized all-int8 (speed guard off), then once per kind "
            "of layer the speed guard knows with every layer of that kind kept float; output SQNR vs fp32 on the "
            "held-back samples (the lowest over outputs). Every written model runs as planned (precision check).", "",
            markdown(json.loads(path.read_text())), ""]
    notes = path.parent / "NOTES.md"
    return lines + ([notes.read_text().strip(), ""] if notes.exists() else [])


WEIGHT_ONLY_PREFIXES = ("onnxq-int4", "ort-int4", "nncf-int4")


def weight_only_lines(res: dict) -> list[str]:
    """The weight-only int4 rows side by side (with fp32 and int8 weight-only for reference): task metric,
    perplexity and its increase where the task has one, size, latency at 1 and 2 threads, peak RSS."""
    key = res["primary_metric"]
    rows = [r for r in res["rows"]
            if r["id"] in ("fp32", "onnxq-weight-only") or r["id"].startswith(WEIGHT_ONLY_PREFIXES)]
    if not any(r["id"].startswith(WEIGHT_ONLY_PREFIXES) for r in rows):
        return []
    fp32_ppl = next((r.get("task", {}).get("perplexity") for r in rows if r["id"] == "fp32"), None)
    m = res["machine"]
    here = f"{m['cpu']} (AVX2: {m['avx2']}, VNNI: {m['vnni']}, AMX: {m['amx']})"
    cpus = sorted({r.get("machine_cpu") or here for r in rows if r["id"] != "fp32"})
    lines = ["Weight-only rows side by side (blocks of 32; ORT's matmul_nbits_quantizer leaves the embedding tables "
             "float; NNCF keeps embeddings and the last layer in 8 bits). Speedup: fp32 ÷ row, batch 1, measured in "
             "the row's own run (ms 1t is that run's and differs between merged runs on this shared machine). "
             f"Measured on: {'; '.join(cpus)}.", "",
             f"| config | status | {key} | perplexity (+ vs fp32) | size ÷ | speedup 1t | speedup 2t | ms 1t "
             "| quant s | peak RSS MB | bits (layers) |", "|" + "---|" * 11]
    for r in rows:
        ppl = r.get("task", {}).get("perplexity")
        ppl_cell = f"{ppl:.4f} (+{ppl - fp32_ppl:.4f})" if ppl is not None and fp32_ppl is not None else "—"
        lat, speed = r.get("latency_ms", {}), r.get("speedup", {})
        bits = (r.get("onnxq_weight_only") or {}).get("bits") or {}
        bits_cell = ", ".join(f"int{b}: {n}" for b, n in sorted(bits.items(), key=lambda kv: -int(kv[0]))) or "—"
        status = r["status"]
        if status != "ok" and r.get("error"):
            status += f": {_short_error(r['error'])}"
        quant = r.get("quant_wall_excl_eval_s", r.get("quant_wall_s"))
        lines.append(f"| {r['id']} | {status} | {_fmt(_metric(r, key), '.4f')} | {ppl_cell} "
                     f"| {_fmt(r.get('size_ratio'), '.2f')} | {_fmt(speed.get('1'), '.2f')} "
                     f"| {_fmt(speed.get('all'), '.2f')} | {_fmt(lat.get('1'), '.2f')} "
                     f"| {_fmt(quant, '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | {bits_cell} |")
    return [*lines, ""]


def target_lines(res: dict) -> list[str]:
    """What the accuracy-target rows kept in higher precision, in the order the search chose."""
    lines = []
    for r in res["rows"]:
        target = r.get("onnxq_target")
        if not target:
            continue
        start, final = target["start"], target["final"]
        cost = f", {target['speed']['cost']:.2f}x the all-int8 latency" if target.get("speed") else ""
        nodes = ", ".join(f"`{n}`" for n in target["float_nodes"]) or "none"
        lines += [f"{r['id']}: target {'met' if target['met'] else 'NOT met'}; held-back cosine "
                  f"{_fmt(start['min_cosine'], '.4f')} -> {_fmt(final['min_cosine'], '.4f')}, SQNR "
                  f"{_fmt(start['min_sqnr_db'], '.1f')} -> {_fmt(final['min_sqnr_db'], '.1f')} dB{cost}; "
                  f"fallbacks in order: {nodes}", ""]
    return lines
