"""Markdown table of sweep results: python bench/robustness/table.py /tmp/robust/sweep-before.json [...]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIGS = ["default", "qop", "dyn", "nosg"]
REFUSALS = {"speed guard": "speed guard", "If subgraph": "inside If", "no dynamic int8 kernel": "no dynamic kernel"}


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("traceback"):
        return f"**TRACEBACK rc{row['rc']}**"
    if row["rc"] != 0:
        last = row["last"].removeprefix("onnxq: error: ")
        reasons = [label for marker, label in REFUSALS.items() if marker in last]
        return f"rc{row['rc']} refused: {', '.join(reasons)}" if reasons else f"rc{row['rc']}: {last[:60]}"
    problems = [row[k] for k in ("ort",) if row.get(k)] + ([row["checker"]] if row.get("checker") != "ok" else [])
    cos = row.get("cos_min")
    text = f"{row.get('quantized', '?')} {cos:.4f}" if cos is not None else f"{row.get('quantized', '?')}"
    return text + (f" **{'; '.join(problems)}**" if problems else "")


def main() -> None:
    results: dict = {}
    for path in sys.argv[1:]:
        for key, rows in json.loads(Path(path).read_text()).items():
            results.setdefault(key, {}).update(rows)
    print("| model | exporter | " + " | ".join(CONFIGS) + " |")
    print("|---|---|" + "---|" * len(CONFIGS))
    for key in sorted(results):
        model, exporter = key.split("__")
        print(f"| {model} | {exporter} | " + " | ".join(cell(results[key].get(c)) for c in CONFIGS) + " |")


if __name__ == "__main__":
    main()
