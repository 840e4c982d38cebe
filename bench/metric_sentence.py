"""onnxq --metric script for the sentence encoder: mean cosine of the mean-pooled, L2-normalised sentence
embeddings to fp32's (the bench's task measure), for `--target-metric` in the weight-only int4 rows."""

from __future__ import annotations

import numpy as np


def _embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    emb = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def score(references: list[dict], candidates: list[dict], feeds: list[dict]) -> float:
    cosines = [float(np.sum(_embedding(r["last_hidden_state"], f["attention_mask"])
                            * _embedding(c["last_hidden_state"], f["attention_mask"])))
               for r, c, f in zip(references, candidates, feeds, strict=True)]
    return float(np.mean(cosines))
