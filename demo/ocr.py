"""Task-level helpers for the PP-OCRv4 text-recognition demo.

The model (``demo/ppocr_v4_rec.onnx``) takes a ``[N, 3, 48, W]`` float32 batch
of text-line images normalised to ``[-1, 1]`` and returns per-timestep class
probabilities ``[N, T, C]``.  Class 0 is the CTC blank, classes ``1..C-2`` are
the characters stored in the model's ``character`` metadata entry and class
``C-1`` is a space, following the rapidocr / PaddleOCR convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from PIL import Image

INPUT_HEIGHT = 48
INPUT_WIDTH = 320
BLANK = "blank"


def load_charset(model_path: str | Path) -> list[str]:
    """Return the CTC label list of a PaddleOCR recogniser.

    The list is ``['blank'] + chars + [' ']`` where ``chars`` are the
    newline-separated entries of the model's ``character`` metadata.
    """
    model = onnx.load(str(model_path), load_external_data=False)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    if "character" not in meta:
        raise ValueError(f"{model_path}: no 'character' entry in metadata_props")
    return [BLANK, *meta["character"].splitlines(), " "]


def preprocess(image_path: str | Path) -> np.ndarray:
    """Load a text-line image as a ``[1, 3, 48, 320]`` float32 model input.

    Pixels are RGB scaled to ``x / 255`` and then ``(x - 0.5) / 0.5``.  Images
    that are not already 320x48 are resized to height 48 keeping the aspect
    ratio (capped at width 320) and zero-padded on the right, as rapidocr does.
    """
    with Image.open(image_path) as img:
        rgb = img.convert("RGB")
    if rgb.size != (INPUT_WIDTH, INPUT_HEIGHT):
        width = min(INPUT_WIDTH, max(1, round(INPUT_HEIGHT * rgb.width / rgb.height)))
        rgb = rgb.resize((width, INPUT_HEIGHT), Image.Resampling.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    pixels = (pixels - 0.5) / 0.5
    batch = np.zeros((1, 3, INPUT_HEIGHT, INPUT_WIDTH), dtype=np.float32)
    batch[0, :, :, : pixels.shape[2]] = pixels
    return batch


def ctc_decode(
    probs: np.ndarray, charset: list[str], *, strip: bool = True
) -> list[str]:
    """Greedy CTC decoding of a ``[N, T, C]`` output into ``N`` strings.

    Takes the arg-max class per timestep, collapses repeated classes and drops
    the blank (class 0).  With ``strip`` (the default) leading and trailing
    spaces are removed: the model tends to emit a space for the empty padding
    right of the text.  ``strip=False`` matches rapidocr's output exactly.
    """
    if probs.ndim != 3:
        raise ValueError(f"expected [N, T, C] probabilities, got shape {probs.shape}")
    if probs.shape[2] != len(charset):
        raise ValueError(
            f"output has {probs.shape[2]} classes but charset has {len(charset)}"
        )
    return [_collapse(indices, charset, strip) for indices in probs.argmax(axis=2)]


def _collapse(indices: np.ndarray, charset: list[str], strip: bool) -> str:
    """CTC collapse of one line's class indices: merge repeats, drop blanks."""
    keep = np.ones(indices.shape, dtype=bool)
    keep[1:] = indices[1:] != indices[:-1]
    keep &= indices != 0
    text = "".join(charset[i] for i in indices[keep])
    return text.strip(" ") if strip else text


def text_margin(probs: np.ndarray, charset: list[str]) -> float:
    """How close one line ``[T, C]`` is to being read differently.

    The smallest top-1 minus top-2 probability over the time steps where taking the
    second class instead would change the decoded text (1.0 if no single step would).
    Ties that decode the same (blank or a repeated character) do not count.
    """
    order = np.argsort(probs, axis=-1)
    top1, top2 = order[:, -1], order[:, -2]
    steps = np.arange(len(probs))
    gaps = probs[steps, top1] - probs[steps, top2]
    text = _collapse(top1, charset, strip=True)
    for t in np.argsort(gaps, kind="stable"):
        changed = top1.copy()
        changed[t] = top2[t]
        if _collapse(changed, charset, strip=True) != text:
            return float(gaps[t])
    return 1.0


def levenshtein(a: str, b: str) -> int:
    """Return the edit distance (insert/delete/substitute) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,
                    current[j - 1] + 1,
                    previous[j - 1] + (char_a != char_b),
                )
            )
        previous = current
    return previous[-1]


def char_accuracy(pred: str, truth: str) -> float:
    """Return ``1 - levenshtein(pred, truth) / max(len(pred), len(truth))``.

    The result lies in ``[0, 1]``; two empty strings score 1.0.
    """
    longest = max(len(pred), len(truth))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred, truth) / longest
