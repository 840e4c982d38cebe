"""Per-layer input statistics for GPTQ and AWQ, in one streaming pass over the calibration data.

For every observed MatMul input X (rows = tokens, last axis = K input channels) only running sums
are kept: X^T X (float64 [K, K], GPTQ's Hessian up to a factor and the output error measure
tr(D^T H D)), sum |x| per channel (AWQ's activation scale) and the row count. Raw activations are
dropped after each batch. Tensors are fetched as extra outputs in groups that keep one batch of a
group under the memory budget (one pass over the data per group), as calibration does.

Padding is not data: when a feed has a 2-D integer input whose name contains "mask" (a transformer's
attention_mask), rows of an activation whose leading dimensions match that mask's shape are counted
only where the mask is non-zero, so padded positions of variable-length token sequences do not
steer the rounding.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxq.runtime.calibrate import pack_under_budget
from onnxq.runtime.data import Feed, SampleSource, batches
from onnxq.runtime.session import ProgressFactory, no_progress, run, session_for, with_outputs

PENDING_VALUES = 1 << 19  # rows are folded into X^T X in chunks of about this many values (2 MB)


@dataclass
class InputStats:
    gram: np.ndarray  # sum of x x^T over rows, float64 [K, K]
    abs_sum: np.ndarray  # sum of |x| per channel, float64 [K]
    rows: int = 0
    pending: list[np.ndarray] = field(default_factory=list)  # a few batches' rows, folded in one product

    @classmethod
    def empty(cls, k: int) -> InputStats:
        return cls(np.zeros((k, k)), np.zeros(k))

    def update(self, rows: np.ndarray) -> None:
        self.pending.append(np.asarray(rows, np.float32))
        if sum(r.size for r in self.pending) >= PENDING_VALUES:
            self.flush()

    def flush(self) -> None:
        """Fold the pending rows in (one K x K product for many small batches: the sum is what costs)."""
        if not self.pending:
            return
        rows = np.concatenate(self.pending).astype(np.float64)
        self.pending.clear()
        self.gram += rows.T @ rows
        self.abs_sum += np.abs(rows).sum(axis=0)
        self.rows += len(rows)

    def hessian(self) -> np.ndarray:
        """Mean x x^T (GPTQ's H up to the factor 2, which no method depends on)."""
        return self.gram / max(self.rows, 1)

    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)


def mask_of(feed: Feed) -> np.ndarray | None:
    """The attention mask of a feed: a 2-D integer input named like "*mask*", else None."""
    for name in sorted(feed):
        value = feed[name]
        if "mask" in name.lower() and value.ndim == 2 and np.issubdtype(value.dtype, np.integer):
            return value
    return None


def token_rows(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[..., K] activation -> [rows, K], without padded positions when `mask` matches its leading axes."""
    if mask is not None and values.ndim == 3 and values.shape[:2] == mask.shape:
        return values[mask != 0]
    return values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)


def collect_input_stats(model: onnx.ModelProto, tensors: list[str], source: SampleSource, *, batch_size: int = 1,
                        memory_budget: int = 2 * 1024**3, progress: ProgressFactory = no_progress
                        ) -> dict[str, InputStats]:
    """InputStats of each named float tensor (graph input or node output) over every sample of `source`."""
    found: dict[str, InputStats] = {}
    inputs = {i.name for i in model.graph.input}
    from_model = [t for t in tensors if t not in inputs]
    with tempfile.TemporaryDirectory(prefix="onnxq-wstats-") as tmp:
        session = session_for(with_outputs(model, from_model), Path(tmp))
        groups = _groups(session, source, from_model, batch_size, memory_budget) or [[]]
        bar = progress(len(source) * len(groups), "layer statistics")
        try:
            for index, group in enumerate(groups):
                for feed, count in batches(source, batch_size):
                    mask = mask_of(feed)
                    named = list(zip(group, run(session, feed, group), strict=True)) if group else []
                    if index == 0:
                        named += [(t, feed[t]) for t in tensors if t in inputs]
                    for name, values in named:
                        _fold(found, name, np.asarray(values), mask)
                    del named
                    bar.update(count)
        finally:
            bar.close()
    for stats in found.values():
        stats.flush()
    return found


def _fold(found: dict[str, InputStats], name: str, values: np.ndarray, mask: np.ndarray | None) -> None:
    if not np.issubdtype(values.dtype, np.floating) or values.ndim == 0:
        return
    rows = token_rows(values, mask)
    if name not in found:
        found[name] = InputStats.empty(rows.shape[-1])
    if rows.shape[-1] == len(found[name].abs_sum):
        found[name].update(rows)


def _groups(session, source: SampleSource, names: list[str], batch_size: int, budget: int) -> list[list[str]]:
    """Tensors split so one batch of a group stays under `budget` bytes (sizes from a one-sample probe)."""
    if not names:
        return []
    sizes = [a.nbytes * batch_size for a in run(session, source.sample(0), names)]
    return pack_under_budget(names, sizes, budget)
