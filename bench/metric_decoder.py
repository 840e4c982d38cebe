"""onnxq --metric script for the teacher-forced decoder: how often the next-token choice (argmax of the logits
after each prompt token but the first) agrees with fp32's, for `--target-metric` in the weight-only int4 rows."""

from __future__ import annotations


def score(references: list[dict], candidates: list[dict], feeds: list[dict]) -> float:
    same = total = 0
    for r, c in zip(references, candidates, strict=True):
        a, b = r["logits"][0, 1:].argmax(-1), c["logits"][0, 1:].argmax(-1)
        same += int((a == b).sum())
        total += len(a)
    return same / max(total, 1)
