"""What "the same answer" means for each output of a model, inferred from its graph.

A user judges an int8 model by its task answer, not by cosine: the same class, the same text,
the same decision. onnxq reads, for every output, the op that produces it (looking through
reshapes and transposes) and its rank, and infers the answer it carries:

- classes: rank 2 scores (or [N, C, 1, 1]) over C >= 2 classes from Softmax/LogSoftmax or a
  Gemm/MatMul/Conv head. A sample agrees when its top-1 class is fp32's (top-5 reported).
- sequence: rank >= 3 scores from Softmax/LogSoftmax or a MatMul/Gemm head (CTC text lines, decoder
  tokens). A sample agrees when its sequence of argmax classes is fp32's. When one class is the
  argmax at 30 % or more of fp32's positions, it is read as CTC's blank: sequences are compared
  after CTC decoding (repeats merged, blanks dropped), which is what reads as the same text; and a
  class that ends a quarter or more of fp32's decoded sequences, three times as often as any other
  or being the most frequent class but the blank, is read as padding (a recogniser's space after
  the text) and stripped from both ends.
- decisions: a Sigmoid/HardSigmoid (voice activity, text maps, multi-label), or a small output whose
  values all lie in [0, 1]. Agreement: up to SMALL_OUTPUT values per sample, the share on the same
  side of 0.5; a larger map (text pixels, many labels), where positives are rare and the share would
  be all background, the IoU of the values fp32 and the candidate call positive (1 when neither does).
- embedding: rank 2/3 features (last axis >= 8) from LayerNormalization, a normalisation or a
  pooling. Agreement: the cosine of each feature vector, averaged.
- labels: integer outputs (ArgMax, TopK indices). A sample agrees when they are equal.
- values: anything else. A sample agrees when its SQNR is at least 20 dB (the documented fallback).

The model's agreement is the lowest of its outputs', over the outputs that carry an answer (all but
`values`) when there are any: a recurrent state or a raw box tensor beside a decision is judged
through that decision. `--metric` replaces all of this with the user's own score.

Near ties: where fp32 itself barely decides, any change flips the answer (rounding the weights to
10 bits, with float compute, already flips such texts). A class sample is an fp32 near tie when its
top two probabilities (scores through a softmax unless they already are probabilities) are less
than NEAR_TIE apart; a CTC sequence sample when one position is and taking the runner-up there
changes the decoded text; a decision element when its probability is within NEAR_TIE of 0.5. A
sequence without CTC (a decoder's next-token scores, each position its own prediction) is judged on
the positions fp32 decides: its decided agreement asks those positions, not all, to keep their argmax.
Every output also reports the agreement on the samples (elements) fp32 decides, `decided_agreement`,
which the automatic search steers by; the plain agreement counts every sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.quant.ir import concrete_shapes

KINDS = ("classes", "sequence", "decisions", "embedding", "labels", "values")
VALUES_MIN_SQNR_DB = 20.0  # a `values` sample agrees at or above this SQNR
NEAR_TIE = 0.05  # probability margin under which fp32's own answer is a near tie
# Ops that only reshape or reorder on the way to an output.
_SHAPE_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"}
_HEADS = {"Gemm", "MatMul", "Conv", "Add", "FusedMatMul", "FusedGemm", "QLinearMatMul", "MatMulIntegerToFloat",
          "QGemm", "QLinearConv", "MatMulNBits", "DequantizeLinear"}
_FEATURES = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "ReduceMean",
             "GlobalAveragePool", "Div", "LpNormalization"}
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                  onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class OutputMeasure:
    name: str
    kind: str
    why: str  # the producer and shape it was inferred from
    ctc_blank: int | None = None  # sequence: CTC's blank class, when fp32's outputs show one
    ctc_padding: int | None = None  # sequence: a class that pads decoded text at its ends

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "why": self.why, "ctc_blank": self.ctc_blank,
                "ctc_padding": self.ctc_padding}


def infer_measures(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]] | None = None
                   ) -> list[OutputMeasure]:
    """The answer each graph output carries (see the module docstring).

    `samples` (fp32 outputs of some feeds, when there are any) give the real shapes, which some exports
    declare wrongly, let a small output whose values all lie in [0, 1] count as decisions (a speech
    probability averaged over frames, say) rather than plain values, and show a sequence's CTC blank."""
    producers = {out: node for node in model.graph.node for out in node.output}
    shapes = concrete_shapes(model)
    measures = []
    for output in model.graph.output:
        elem = output.type.tensor_type.elem_type
        if elem in _INTEGER_TYPES:
            measures.append(OutputMeasure(output.name, "labels", "integer output"))
            continue
        op = _effective_producer(output.name, producers)
        values = [s[output.name] for s in samples or [] if output.name in s]
        shape = tuple(values[0].shape) if values else (shapes.get(output.name) or _declared_shape(output))
        measure = _infer_one(output.name, op, shape)
        if measure.kind == "values" and values and all(_small_probabilities(v) for v in values):
            measure = OutputMeasure(output.name, "decisions", f"{values[0].size} values all in [0, 1] ({op})")
        if measure.kind == "sequence" and values:
            measure = _with_ctc(measure, [v.argmax(axis=-1) for v in values])
        measures.append(measure)
    return measures


def _with_ctc(measure: OutputMeasure, ids: list[np.ndarray]) -> OutputMeasure:
    """The sequence measure with CTC's blank and padding class, when fp32's argmax shows them."""
    flat = np.concatenate([i.reshape(-1) for i in ids])
    classes, counts = np.unique(flat, return_counts=True)
    if not counts.size or counts.max() < CTC_BLANK_SHARE * flat.size:
        return measure
    blank = int(classes[np.argmax(counts)])
    ends = [seq[-1] for i in ids for seq in _ctc_decode(i, blank, None) if seq]
    padding = None
    if ends:
        last, times = np.unique(np.asarray(ends), return_counts=True)
        order = np.argsort(-times)
        runner_up = times[order[1]] if len(order) > 1 else 0
        candidate = int(last[order[0]])
        non_blank = counts[classes != blank]
        most_frequent = non_blank.size and int(classes[classes != blank][np.argmax(non_blank)]) == candidate
        if times[order[0]] >= 0.25 * len(ends) and (times[order[0]] >= 3 * runner_up or most_frequent):
            padding = candidate
    return OutputMeasure(measure.name, measure.kind, f"{measure.why}; CTC blank {blank}"
                         + (f", padding {padding}" if padding is not None else ""), blank, padding)


SMALL_OUTPUT = 16  # values per sample up to which [0, 1] outputs are read as decisions


def _small_probabilities(values: np.ndarray) -> bool:
    return 0 < values.size <= SMALL_OUTPUT and bool(np.all((values >= 0.0) & (values <= 1.0)))


def _effective_producer(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    node = producers.get(name)
    while node is not None and node.op_type in _SHAPE_OPS and node.input:
        node = producers.get(node.input[0])
    return node.op_type if node is not None else "graph input"


def _declared_shape(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)


def _infer_one(name: str, op: str, shape: tuple[int | None, ...] | None) -> OutputMeasure:
    rank = len(shape) if shape is not None else None
    classes = _class_axis_size(shape)
    where = f"{op}, shape {list(shape) if shape is not None else 'unknown'}"
    if op in ("Softmax", "LogSoftmax"):
        if rank is not None and rank >= 3 and not _is_image_like(shape):
            return OutputMeasure(name, "sequence", f"scores per position ({where})")
        return OutputMeasure(name, "classes", f"class scores ({where})")
    if op in ("Sigmoid", "HardSigmoid"):
        return OutputMeasure(name, "decisions", f"probabilities ({where})")
    if op in _HEADS and classes is not None and classes >= 2:
        if rank == 2 or _is_image_like(shape):
            return OutputMeasure(name, "classes", f"class logits ({where})")
        if rank is not None and rank >= 3 and op not in ("Conv", "QLinearConv", "Add"):
            return OutputMeasure(name, "sequence", f"scores per position ({where})")
    if op in _FEATURES and rank in (2, 3) and (shape[-1] or 0) >= 8:
        return OutputMeasure(name, "embedding", f"features ({where})")
    return OutputMeasure(name, "values", f"no task answer recognised ({where}): SQNR")


def _class_axis_size(shape: tuple[int | None, ...] | None) -> int | None:
    """The number of classes of [N, C], [N, C, 1, 1] or [..., C] scores (the last axis otherwise)."""
    if not shape:
        return None
    if _is_image_like(shape):
        return shape[1]
    return shape[-1]


def _is_image_like(shape: tuple[int | None, ...] | None) -> bool:
    """[N, C, 1, 1]: class scores from a 1x1 convolution head."""
    return shape is not None and len(shape) == 4 and shape[2] == 1 and shape[3] == 1


@dataclass
class OutputAgreement:
    """Streaming agreement of one output between fp32 and a candidate, sample by sample."""

    measure: OutputMeasure
    samples: int = 0
    agreeing: float = 0.0  # samples (classes, sequence, labels, values) or summed shares (decisions, embedding)
    decided: int = 0  # samples that are no fp32 near tie (with at least one decided element, for decisions)
    decided_agreeing: float = 0.0
    top5: int = 0
    elements: int = 0
    same_elements: int = 0
    worst: float = 1.0
    extra: dict = field(default_factory=dict)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Fold in one feed's outputs (a batch: each row along axis 0 is a sample for classes)."""
        kind = self.measure.kind
        ref, got = np.asarray(reference), np.asarray(candidate)
        if kind == "classes":
            r = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.reshape(1, -1)
            g = got.reshape(r.shape)
            same = r.argmax(axis=1) == g.argmax(axis=1)
            top5 = np.argsort(-g, axis=1)[:, :5]
            self.top5 += int(sum(int(a) in row for a, row in zip(r.argmax(axis=1), top5, strict=True)))
            self._count(same.astype(np.float64), _margins(r) >= NEAR_TIE)
        elif kind == "sequence":
            ref_ids, got_ids = ref.argmax(axis=-1), got.argmax(axis=-1)
            same = ref_ids == got_ids
            self.elements += int(same.size)
            self.same_elements += int(same.sum())
            blank, padding = self.measure.ctc_blank, self.measure.ctc_padding
            if blank is None:  # each position is its own prediction (a decoder's next token): judged on those decided
                decided_positions = _margins(ref) >= NEAR_TIE
                self._count(np.array([float(same.all())]), np.array([bool(decided_positions.any())]),
                            np.array([float(same[decided_positions].all())]))
            else:
                decided = not _sequence_near_tie(ref, blank, padding)
                self._count(np.array([float(_ctc_decode(ref_ids, blank, padding)
                                            == _ctc_decode(got_ids, blank, padding))]), np.array([decided]))
        elif kind == "decisions":
            same = (ref > 0.5) == (got > 0.5)
            self.elements += int(same.size)
            self.same_elements += int(same.sum())
            decided = np.abs(ref - 0.5) >= NEAR_TIE
            if same.size > SMALL_OUTPUT:
                plain, share = _iou(ref > 0.5, got > 0.5), _iou((ref > 0.5) & decided, (got > 0.5) & decided)
            else:
                plain = float(same.mean()) if same.size else 1.0
                share = float(same[decided].mean()) if decided.any() else 1.0
            self._count(np.array([plain]), np.array([bool(decided.any())]), np.array([share]))
        elif kind == "embedding":
            rows_r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
            rows_g = got.reshape(rows_r.shape).astype(np.float64)
            norms = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_g, axis=1)
            cosines = np.where(norms > 0, np.sum(rows_r * rows_g, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
            self._count(np.array([float(cosines.mean())]))
        elif kind == "labels":
            self._count(np.array([float(np.array_equal(ref, got))]))
        else:
            self._count(np.array([float(_sqnr(ref, got) >= VALUES_MIN_SQNR_DB)]))

    def _count(self, per_sample: np.ndarray, decided: np.ndarray | None = None,
               decided_share: np.ndarray | None = None) -> None:
        """Fold in per-sample agreement; `decided` marks the samples that are no fp32 near tie (all when
        None), `decided_share` their agreement on decided elements (their `per_sample` when None)."""
        decided = np.ones(per_sample.shape, dtype=bool) if decided is None else decided
        decided_share = per_sample if decided_share is None else decided_share
        self.samples += int(per_sample.size)
        self.agreeing += float(per_sample.sum())
        self.decided += int(decided.sum())
        self.decided_agreeing += float(decided_share[decided].sum())
        if per_sample.size:
            self.worst = min(self.worst, float(per_sample.min()))

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.samples if self.samples else None

    @property
    def decided_agreement(self) -> float | None:
        """Agreement on the samples fp32 decides (every sample a near tie: the plain agreement)."""
        return self.decided_agreeing / self.decided if self.decided else self.agreement

    def summary(self) -> dict:
        kind = self.measure.kind
        out = {"kind": kind, "agreement": self.agreement, "samples": self.samples, "worst_sample": self.worst,
               "near_ties": self.samples - self.decided, "decided_agreement": self.decided_agreement}
        if kind == "classes":
            out["top5_agreement"] = self.top5 / self.samples if self.samples else None
        if kind in ("sequence", "decisions"):
            out["element_agreement"] = self.same_elements / self.elements if self.elements else None
        out.update(self.extra)
        return out


CTC_BLANK_SHARE = 0.3


def _ctc_decode(ids: np.ndarray, blank: int, padding: int | None) -> list[tuple[int, ...]]:
    """Greedy CTC per sequence of argmax classes (the last axis): repeats merged, blanks dropped,
    the padding class stripped from both ends."""
    rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim > 1 else ids.reshape(1, -1)
    decoded = []
    for row in rows:
        keep = [int(k) for i, k in enumerate(row) if k != blank and (i == 0 or k != row[i - 1])]
        while padding is not None and keep and keep[-1] == padding:
            keep.pop()
        while padding is not None and keep and keep[0] == padding:
            keep.pop(0)
        decoded.append(tuple(keep))
    return decoded


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Scores along the last axis as probabilities: as they are when they already are (Softmax), else
    through a softmax (logits; LogSoftmax's log-probabilities come back exactly)."""
    x = scores.astype(np.float64)
    if x.size and x.min() >= 0.0 and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3):
        return x
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def _margins(scores: np.ndarray) -> np.ndarray:
    """fp32's top-1 minus top-2 probability along the last axis."""
    p = _probabilities(scores)
    if p.shape[-1] < 2:
        return np.full(p.shape[:-1], np.inf)
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def _sequence_near_tie(scores: np.ndarray, blank: int, padding: int | None) -> bool:
    """One position where fp32's top two are within NEAR_TIE and taking the runner-up changes the CTC text."""
    p = _probabilities(scores)
    rows = p.reshape(-1, p.shape[-2], p.shape[-1]) if p.ndim >= 2 else p.reshape(1, 1, -1)
    for row in rows:
        margins = _margins(row)
        close = np.flatnonzero(margins < NEAR_TIE)
        ids = row.argmax(axis=-1)
        text = _ctc_decode(ids, blank, padding) if close.size else None
        for position in close:
            other = ids.copy()
            other[position] = np.argsort(row[position])[-2]
            if _ctc_decode(other, blank, padding) != text:
                return True
    return False


def _iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Intersection over union of two boolean maps (1 when both are empty)."""
    union = int(np.count_nonzero(reference | candidate))
    return float(np.count_nonzero(reference & candidate)) / union if union else 1.0


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - candidate.astype(np.float64)) ** 2))
    if noise == 0.0:
        return math.inf
    signal = float(np.sum(ref**2))
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def model_agreement(outputs: list[dict], key: str = "agreement") -> float | None:
    """The lowest agreement (`key`: or "decided_agreement") over the outputs that carry an answer (all of
    them when none does)."""
    answered = [o["task"] for o in outputs if o.get("task") and o["task"]["kind"] != "values"]
    judged = answered or [o["task"] for o in outputs if o.get("task")]
    values = [t[key] for t in judged if t.get(key) is not None]
    return min(values) if values else None
