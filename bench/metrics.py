"""Measurements: fidelity vs fp32, task metrics, interleaved latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from demo.ocr import char_accuracy, ctc_decode, load_charset


def session(model: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; ``threads`` 0 means onnxruntime's default (all cores)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """First output of every feed."""
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """SQNR (dB) and cosine of all outputs together, and the worst per-sample cosine."""
    a = np.concatenate([r.ravel() for r in ref]).astype(np.float64)
    b = np.concatenate([g.ravel() for g in got]).astype(np.float64)
    noise = float(np.sum((a - b) ** 2))
    sqnr = float("inf") if noise == 0 else 10 * np.log10(float(np.sum(a**2)) / noise)
    return {"sqnr_db": round(sqnr, 2), "cosine": round(_cos(a, b), 5),
            "worst_sample_cosine": round(min(_cos(r.ravel(), g.ravel()) for r, g in zip(ref, got, strict=True)), 5)}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def rec_metrics(model: Path, ref: list[np.ndarray], got: list[np.ndarray], labels: list[str]) -> dict:
    """OCR: character accuracy vs ground truth (greedy CTC), exact lines, same text as fp32."""
    charset = load_charset(model)
    ref_t = [ctc_decode(r, charset)[0] for r in ref]
    got_t = [ctc_decode(g, charset)[0] for g in got]
    acc = float(np.mean([char_accuracy(p, t) for p, t in zip(got_t, labels, strict=True)]))
    return {"char_accuracy": round(acc, 5),
            "exact_lines": sum(p == t for p, t in zip(got_t, labels, strict=True)),
            "same_text_as_fp32": sum(p == r for p, r in zip(got_t, ref_t, strict=True)),
            "lines": len(labels)}


def cls_metrics(ref: list[np.ndarray], got: list[np.ndarray], labels: list[int]) -> dict:
    """Direction classifier: accuracy vs the 0°/180° ground truth, agreement with fp32."""
    pred = [int(g.argmax()) for g in got]
    refp = [int(r.argmax()) for r in ref]
    return {"accuracy": round(float(np.mean([p == t for p, t in zip(pred, labels, strict=True)])), 5),
            "agreement_with_fp32": round(float(np.mean([p == r for p, r in zip(pred, refp, strict=True)])), 5)}


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes [N,4] x [M,4] given as x0, y0, x1, y1."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_f1(ref: list[tuple[np.ndarray, np.ndarray]], got: list[tuple[np.ndarray, np.ndarray]],
             thr: float = 0.5) -> dict:
    """F1 of predicted boxes against reference boxes (same class, IoU >= thr, greedy by IoU)."""
    tp = n_ref = n_got = 0
    for (rb, rc), (gb, gc) in zip(ref, got, strict=True):
        n_ref += len(rb)
        n_got += len(gb)
        if len(rb) == 0 or len(gb) == 0:
            continue
        m = iou(rb, gb) * (rc[:, None] == gc[None, :])
        while m.size and m.max() >= thr:
            i, j = np.unravel_index(m.argmax(), m.shape)
            tp += 1
            m[i, :] = 0
            m[:, j] = 0
    if n_ref == 0 and n_got == 0:
        return {"f1_vs_fp32": 1.0, "boxes_fp32": 0, "boxes": 0}
    prec = tp / n_got if n_got else 0.0
    rec = tp / n_ref if n_ref else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"f1_vs_fp32": round(f1, 5), "boxes_fp32": n_ref, "boxes": n_got}


def db_boxes(prob: np.ndarray, thresh: float = 0.3, min_area: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """DBNet post-processing, simplified: bounding boxes of connected regions above ``thresh``."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob[0, 0] > thresh)
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        ys, xs = sl
        if (ys.stop - ys.start) * (xs.stop - xs.start) >= min_area:
            boxes.append([xs.start, ys.start, xs.stop, ys.stop])
    arr = np.array(boxes, np.float32).reshape(-1, 4)
    return arr, np.zeros(len(arr), np.int64)


def yolo_boxes(out: np.ndarray, conf: float = 0.2, nms: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """YOLOv8 post-processing as NudeNet does it: score >= conf, per-class NMS."""
    rows = out[0].T  # [anchors, 4 + classes]
    scores = rows[:, 4:].max(axis=1)
    keep = scores >= conf
    rows, scores = rows[keep], scores[keep]
    cls = rows[:, 4:].argmax(axis=1)
    xy, wh = rows[:, :2], rows[:, 2:4]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    final: list[int] = []
    for c in np.unique(cls):
        idx = np.where(cls == c)[0]
        idx = idx[np.argsort(-scores[idx])]
        while len(idx):
            final.append(idx[0])
            rest = idx[1:]
            idx = rest[iou(boxes[idx[:1]], boxes[rest])[0] < nms] if len(rest) else rest
    final_arr = np.array(final, dtype=np.int64)
    return boxes[final_arr].reshape(-1, 4), cls[final_arr]


def det_metrics(task: str, ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """Detection agreement with fp32 boxes: F1 at IoU 0.5."""
    post = db_boxes if task == "text-det" else yolo_boxes
    return match_f1([post(r) for r in ref], [post(g) for g in got])


def vad_metrics(ref_probs: np.ndarray, probs: np.ndarray, thr: float = 0.5) -> dict:
    """Speech/non-speech decision agreement with fp32 over a whole track (each model carries its own state)."""
    return {"decision_agreement": round(float(np.mean((ref_probs > thr) == (probs > thr))), 5),
            "speech_chunks_fp32": int((ref_probs > thr).sum()), "speech_chunks": int((probs > thr).sum()),
            "chunks": len(probs)}


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers makes them: mean of the token embeddings under the
    attention mask, L2-normalised. ``hidden`` [batch, tokens, dim], ``mask`` [batch, tokens]."""
    m = mask[..., None].astype(np.float64)
    emb = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def embedding_metrics(ref: list[np.ndarray], got: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """Sentence encoder: cosine of each sentence embedding to fp32's (mean and worst), how often each
    sentence's nearest other sentence (by embedding cosine) is the one fp32 finds, and the SQNR of the
    token embeddings at real (unpadded) positions only."""
    ref_e = np.concatenate([sentence_embeddings(r, m) for r, m in zip(ref, masks, strict=True)])
    got_e = np.concatenate([sentence_embeddings(g, m) for g, m in zip(got, masks, strict=True)])
    cos = np.sum(ref_e * got_e, axis=1)
    real = [m.astype(bool) for m in masks]
    token_fid = fidelity([r[k] for r, k in zip(ref, real, strict=True)], [g[k] for g, k in zip(got, real, strict=True)])
    return {"embedding_cosine": round(float(cos.mean()), 6), "min_embedding_cosine": round(float(cos.min()), 6),
            "same_nearest_neighbour": round(float(np.mean(_nearest(ref_e) == _nearest(got_e))), 5),
            "token_sqnr_db": float(token_fid["sqnr_db"]), "sentences": len(cos)}


def _nearest(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine; rows are unit vectors)."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def decoder_metrics(ref: list[np.ndarray], got: list[np.ndarray], labels: list[list[int]]) -> dict:
    """Teacher-forced decoder on held-out transcripts: how often the next-token choice (argmax) is fp32's,
    and the perplexity of the reference text (its tokens and the end token) under the model and under fp32.
    Position 0 of the prompt (<|startoftranscript|>) predicts <|notimestamps|>, so labels start at 1."""
    agree = correct = count = 0
    nll = nll_fp32 = 0.0
    for r, g, lab in zip(ref, got, labels, strict=True):
        tokens = np.asarray(lab)
        r, g = r[0, 1 : 1 + len(tokens)], g[0, 1 : 1 + len(tokens)]
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        correct += int((g.argmax(-1) == tokens).sum())
        rows = np.arange(len(tokens))
        nll -= float(_log_softmax(g)[rows, tokens].sum())
        nll_fp32 -= float(_log_softmax(r)[rows, tokens].sum())
        count += len(tokens)
    return {"next_token_agreement": round(agree / count, 5), "perplexity": round(float(np.exp(nll / count)), 4),
            "perplexity_fp32": round(float(np.exp(nll_fp32 / count)), 4),
            "next_token_accuracy": round(correct / count, 5), "tokens": count}


def run_outputs(sess: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of every feed."""
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


def imagenet_metrics(ref: list[np.ndarray], got: list[np.ndarray], labels: list[list[int]]) -> dict:
    """ImageNet classifier: top-1 agreement with fp32, fp32's class among the top 5, overlap of the two
    top-5 sets, and top-1/top-5 accuracy on the photos with a plain class (``labels`` not empty)."""
    ref_l = np.stack([r.reshape(-1) for r in ref])
    got_l = np.stack([g.reshape(-1) for g in got])
    ref5, got5 = np.argsort(-ref_l, axis=1)[:, :5], np.argsort(-got_l, axis=1)[:, :5]
    labelled = [i for i, lab in enumerate(labels) if lab]
    overlap = [len(set(r) & set(g)) / 5 for r, g in zip(ref5, got5, strict=True)]
    out = {"top1_agreement": round(float(np.mean(got5[:, 0] == ref5[:, 0])), 5),
           "fp32_top1_in_top5": round(float(np.mean([r in g for r, g in zip(ref5[:, 0], got5, strict=True)])), 5),
           "top5_overlap": round(float(np.mean(overlap)), 5), "samples": len(ref), "labelled": len(labelled)}
    if labelled:
        out["top1_accuracy_labelled"] = round(float(np.mean([got5[i, 0] in labels[i] for i in labelled])), 5)
        out["top5_accuracy_labelled"] = round(float(np.mean([bool(set(got5[i]) & set(labels[i]))
                                                             for i in labelled])), 5)
    return out


def ctc_greedy(out: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC as ddddocr does it: argmax per step, repeats collapsed, index 0 (blank) dropped."""
    idx = out.reshape(-1, out.shape[-1]).argmax(axis=1)
    keep = [int(k) for i, k in enumerate(idx) if k != 0 and (i == 0 or k != idx[i - 1])]
    return "".join(charset[k] for k in keep if k < len(charset))


def captcha_metrics(ref: list[np.ndarray], got: list[np.ndarray], labels: list[str], charset: list[str]) -> dict:
    """Captcha reader: same text as fp32; exact text and character accuracy vs the captcha's own text
    (letters compared in lower case: the reader's charset has both cases, the captchas one)."""
    ref_t = [ctc_greedy(r, charset) for r in ref]
    got_t = [ctc_greedy(g, charset) for g in got]
    return {"text_agreement": round(float(np.mean([a == b for a, b in zip(got_t, ref_t, strict=True)])), 5),
            "exact_vs_truth": round(float(np.mean([g.lower() == t for g, t in zip(got_t, labels, strict=True)])), 5),
            "char_accuracy": round(float(np.mean([char_accuracy(g.lower(), t)
                                                  for g, t in zip(got_t, labels, strict=True)])), 5),
            "samples": len(labels)}


def rec_photo_metrics(model: Path, ref: list[np.ndarray], got: list[np.ndarray], labels: list[str | None]) -> dict:
    """Recogniser on lines from real images: same text as fp32 (all, and on the detector's crops alone,
    which have no ground truth); character accuracy and exact lines vs truth on the rendered ones."""
    charset = load_charset(model)
    ref_t = [ctc_decode(r, charset)[0] for r in ref]
    got_t = [ctc_decode(g, charset)[0] for g in got]
    same = [a == b for a, b in zip(got_t, ref_t, strict=True)]
    crops = [s for s, lab in zip(same, labels, strict=True) if lab is None]
    truth = [(g, lab) for g, lab in zip(got_t, labels, strict=True) if lab is not None]
    acc = [char_accuracy(g, t) for g, t in truth]
    return {"text_agreement": round(float(np.mean(same)), 5),
            "text_agreement_crops": round(float(np.mean(crops)), 5) if crops else None,
            "char_accuracy_rendered": round(float(np.mean(acc)), 5) if acc else None,
            "exact_rendered": sum(g == t for g, t in truth), "crops": len(crops), "rendered": len(truth)}


def picodet_boxes(outs: list[np.ndarray], size: tuple[int, int] = (800, 608), conf: float = 0.5,
                  nms: float = 0.5, strides: tuple[int, ...] = (8, 16, 32, 64)) -> tuple[np.ndarray, np.ndarray]:
    """PP-PicoDet post-processing as rapid_layout does it: per stride, class scores and 4 x (reg_max + 1) bin
    logits; distances are the softmax expectation x stride from the cell centre; per class score > ``conf``,
    hard NMS at ``nms`` (top 100). Boxes in input pixels, with their classes."""
    n = len(outs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(strides, outs[:n], outs[n:], strict=True):
        h, w = int(np.ceil(size[0] / stride)), int(np.ceil(size[1] / stride))
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        cx, cy = (xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride
        logits = dist[0].reshape(-1, dist.shape[-1] // 4)
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        d = (prob @ np.arange(prob.shape[1])).reshape(-1, 4) * stride
        boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], axis=1))
        scores.append(score[0])
    allb, alls = np.concatenate(boxes), np.concatenate(scores)
    kept_b, kept_c = [], []
    for c in range(alls.shape[1]):
        idx = np.where(alls[:, c] > conf)[0]
        idx = idx[np.argsort(-alls[idx, c])][:200]
        picked: list[int] = []
        while len(idx) and len(picked) < 100:
            picked.append(idx[0])
            rest = idx[1:]
            idx = rest[iou(allb[idx[:1]], allb[rest])[0] <= nms] if len(rest) else rest
        kept_b += [allb[i] for i in picked]
        kept_c += [c] * len(picked)
    return np.array(kept_b, np.float32).reshape(-1, 4), np.array(kept_c, np.int64)


def truth_f1(pred: list[tuple[np.ndarray, np.ndarray]], truth: list[list[list[float]] | None],
             thr: float = 0.5) -> dict:
    """F1 of predicted boxes against the truth of the samples that have one (``[x0, y0, x1, y1(, class)]``)."""
    pairs = [(p, t) for p, t in zip(pred, truth, strict=True) if t is not None]
    if not pairs:
        return {}
    ref = []
    for _, t in pairs:
        arr = np.array(t, np.float32).reshape(len(t), -1)
        ref.append((arr[:, :4], arr[:, 4].astype(np.int64) if arr.shape[1] > 4 else np.zeros(len(arr), np.int64)))
    got = [p if len(t) and len(t[0]) > 4 else (p[0], np.zeros(len(p[0]), np.int64)) for p, t in pairs]
    res = match_f1(ref, got, thr)
    return {"f1_vs_truth": res["f1_vs_fp32"], "boxes_truth": res["boxes_fp32"], "pages_with_truth": len(pairs)}


def unclip(boxes: tuple[np.ndarray, np.ndarray], ratio: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """DB's unclip on axis-aligned boxes: each side grown by area x ``ratio`` / perimeter."""
    b, c = boxes
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    d = (w * h * ratio / np.maximum(2 * (w + h), 1e-9))[:, None]
    return np.concatenate([b[:, :2] - d, b[:, 2:] + d], axis=1), c


def layout_metrics(ref_boxes: list, got_boxes: list, truth: list, kinds: list[str]) -> dict:
    """Layout detector: F1 of boxes vs fp32's (same class, IoU 0.5), on all pages and on the real scans
    alone, and vs the rendered pages' truth."""
    scans = [i for i, k in enumerate(kinds) if k == "scan"]
    return {**match_f1(ref_boxes, got_boxes),
            "f1_vs_fp32_scans": match_f1([ref_boxes[i] for i in scans], [got_boxes[i] for i in scans])["f1_vs_fp32"],
            **truth_f1(got_boxes, truth)}


PRIMARY = {"ocr-rec": "char_accuracy", "ocr-cls": "accuracy", "text-det": "f1_vs_fp32",
           "yolo-det": "f1_vs_fp32", "vad": "decision_agreement", "sentence-emb": "embedding_cosine",
           "asr-decoder": "next_token_agreement",
           "imagenet-cls": "top1_agreement", "captcha-ocr": "text_agreement", "layout-det": "f1_vs_fp32",
           "ocr-rec-photos": "text_agreement"}


def latency(models: dict[str, Path], feed: dict[str, np.ndarray], threads: int,
            rounds: int = 7, budget_s: float = 0.25) -> dict[str, float]:
    """Median ms per batch-1 run of each model, measured in interleaved rounds.

    Each round runs every model ``k`` times (k sized so one model takes about ``budget_s``),
    so drifts in machine load hit all models alike.
    """
    sessions = {}
    for name, path in models.items():
        try:
            sess = session(path, threads)
            names = {i.name for i in sess.get_inputs()}
            f = {k: v for k, v in feed.items() if k in names}
            sess.run(None, f)  # warm-up
            sessions[name] = (sess, f)
        except Exception:  # a model that cannot run gets no latency
            continue
    times: dict[str, list[float]] = {n: [] for n in sessions}
    t0 = time.perf_counter()
    first = next(iter(sessions.values()))
    first[0].run(None, first[1])
    k = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-4)))
    for _ in range(rounds):
        for name, (sess, f) in sessions.items():
            for _ in range(k):
                start = time.perf_counter()
                sess.run(None, f)
                times[name].append(time.perf_counter() - start)
    return {n: round(1000 * statistics.median(t), 3) for n, t in times.items()}
