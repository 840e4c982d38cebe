"""onnxq --metric script for the teacher-forced Whisper decoder, for `--target-metric` in the weight-only int4 rows:
fp32's perplexity of the transcript tokens divided by the candidate's (1.0: no loss; 0.97: 3 % higher perplexity).

A feed is <|startoftranscript|><|notimestamps|> + the transcript's tokens; the logits after every position but the
first predict the next transcript token, the last one <|endoftext|>.
"""

from __future__ import annotations

import numpy as np

END_OF_TEXT = 50256


def _nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -float(log_probs[np.arange(len(tokens)), tokens].sum())


def score(references: list[dict], candidates: list[dict], feeds: list[dict]) -> float:
    nll_reference = nll_candidate = 0.0
    count = 0
    for r, c, f in zip(references, candidates, feeds, strict=True):
        tokens = np.append(f["input_ids"][0, 2:], END_OF_TEXT)
        nll_reference += _nll(r["logits"][0, 1:], tokens)
        nll_candidate += _nll(c["logits"][0, 1:], tokens)
        count += len(tokens)
    return float(np.exp((nll_reference - nll_candidate) / count))
