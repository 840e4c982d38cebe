"""The quantization plan: one plain, serialisable table of per-tensor parameters.

Calibration fills it (from statistics), users and later passes may edit it, and
the writers read only it. Saved as JSON so any result can be inspected and reproduced.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.enums import RESOLVED_WEIGHT_RANGES, WeightRange
from onnxq.errors import DataError, UsageError
from onnxq.model_io import atomic_write_bytes
from onnxq.quant import qmath
from onnxq.quant.ir import constant_values
from onnxq.quant.placement import NodeDecision, Placement, widened_decisions
from onnxq.quant.ranges import DEFAULT_METHOD, METHODS, compute_range, stable_range
from onnxq.quant.statistics import BINS_PER_SIDE, Statistics, TensorStats

PLAN_FORMAT = "onnxq-plan/1"


@dataclass(frozen=True)
class QuantSettings:
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    symmetric: bool = False  # activations: False -> asymmetric range; True -> symmetric around zero
    per_channel: bool = True
    weight_range: str = WeightRange.FULL.value  # resolved: never "auto" (onnxq.enums.WeightRange)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.weight_range not in RESOLVED_WEIGHT_RANGES:
            raise UsageError(f"weight range must be {' or '.join(map(repr, RESOLVED_WEIGHT_RANGES))}, "
                             f"got {self.weight_range!r}")

    @property
    def activation_qtype(self) -> qmath.QType:
        """uint8 either way: symmetric ranges get zero point 128, the same values as int8 with zero point 0.

        onnxruntime's x86 int8 kernels take uint8 activations; it rewrites int8 Q/DQ pairs to uint8
        only where a QuantizeLinear feeds a single DequantizeLinear, so an int8 tensor read by two
        layers would leave their kernels unfused. Writing uint8 from the start fuses everywhere.
        """
        return qmath.UINT8

    @property
    def weight_qtype(self) -> qmath.QType:
        if self.weight_range == WeightRange.REDUCED:
            return qmath.QType("int8", np.dtype(np.int8), -64, 63, qmath.INT8.onnx_type)
        return qmath.INT8


@dataclass(frozen=True)
class ActivationOverride:
    """A recipe's per-tensor change to the settings (onnxq.commands.recipe.activation_overrides)."""

    method: str | None = None
    percentile: float | None = None
    wide: bool = False  # 16-bit instead of 8-bit


@dataclass
class TensorPlan:
    name: str
    role: str  # "activation", "weight" or "bias"
    qtype: str
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None
    # activations only
    source: str | None = None  # tensor whose statistics set the range (shared scale)
    range: list[float] | None = None
    clipped_fraction: float | None = None
    # weights only
    max_abs_error: float | None = None

    def scale_array(self) -> np.ndarray:
        values = np.asarray(self.scale, dtype=np.float32)
        return values if self.axis is not None else values.reshape(())

    def zero_point_array(self) -> np.ndarray:
        values = np.asarray(self.zero_point).astype(qmath.qtype_by_name(self.qtype).dtype)
        return values if self.axis is not None else values.reshape(())


@dataclass
class QuantPlan:
    settings: QuantSettings
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    nodes: list[NodeDecision] = field(default_factory=list)
    model_digest: str = ""

    def by_role(self, role: str) -> list[TensorPlan]:
        return [self.tensors[n] for n in sorted(self.tensors) if self.tensors[n].role == role]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PLAN_FORMAT,
                "model_digest": self.model_digest,
                "settings": asdict(self.settings),
                "tensors": [asdict(self.tensors[n]) for n in sorted(self.tensors)],
                "nodes": [asdict(n) for n in self.nodes],
            },
            indent=1,
            sort_keys=True,
        )

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(
                settings=QuantSettings(**data["settings"]),
                tensors={t["name"]: TensorPlan(**t) for t in data["tensors"]},
                nodes=[NodeDecision(**n) for n in data["nodes"]],
                model_digest=data["model_digest"],
            )
        except FileNotFoundError:
            raise DataError(f"plan file not found: {path}") from None
        except Exception as exc:
            raise DataError(f"not an onnxq plan file: {path} ({exc})") from None


def build_plan(
    graph: gs.Graph, placement: Placement, stats: Statistics, settings: QuantSettings, model_digest: str = "",
    overrides: dict[str, ActivationOverride] | None = None,
) -> QuantPlan:
    """Compute every scale and zero point the placement asks for.

    `overrides` (by the source tensor of a shared-scale group) change method, percentile or width.
    """
    settings.validate()
    overrides = overrides or {}
    wide_sources = {source for source, override in overrides.items() if override.wide}
    plan = QuantPlan(settings=settings, nodes=widened_decisions(graph, placement, wide_sources),
                     model_digest=model_digest)
    sources = sorted(set(placement.activations.values()))
    shared = {source: _activation_plan(source, stats, settings, overrides.get(source, ActivationOverride()))
              for source in sources}
    for name, source in sorted(placement.activations.items()):
        plan.tensors[name] = TensorPlan(**{**asdict(shared[source]), "name": name})
    constants = graph.tensors()
    for name, target in sorted(placement.weights.items()):
        if target.operand:
            plan.tensors[name] = operand_plan(name, constant_values(constants[name]), settings)
            continue
        qtype = qmath.INT8 if target.full_range else settings.weight_qtype
        plan.tensors[name] = weight_plan(name, constant_values(constants[name]), target.axis, qtype)
    for name, target in sorted(placement.biases.items()):
        plan.tensors[name] = bias_plan(name, constant_values(constants[name]),
                                        plan.tensors[target.input_name], plan.tensors[target.weight_name])
    return plan


def _activation_plan(source: str, stats: Statistics, settings: QuantSettings, override: ActivationOverride
                     ) -> TensorPlan:
    tensor_stats = stats.tensors.get(source)
    if tensor_stats is None:
        raise DataError(f"the statistics have no entry for tensor {source!r}; were they collected on this model?")
    qtype = settings.activation_qtype
    if override.wide:
        qtype = qmath.INT16 if settings.symmetric else qmath.UINT16
    return activation_plan(source, tensor_stats, qtype, override.method or settings.method,
                           override.percentile or settings.percentile, symmetric=settings.symmetric)


def activation_plan(source: str, stats: TensorStats, qtype: qmath.QType, method: str, percentile: float, *,
                    symmetric: bool, stable: bool = True) -> TensorPlan:
    """The scale and zero point of activation `source` (and of the tensors sharing its scale) from its statistics.

    `stable`: round the range outward to the grid of onnxq.quant.ranges.stable_range (the same bytes on every
    CPU class).
    """
    lo, hi = compute_range(stats, method, symmetric=symmetric, levels=qtype.qmax - qtype.qmin, percentile=percentile)
    if stable:
        lo, hi = stable_range(lo, hi)
    params = qmath.symmetric_params if symmetric else qmath.asymmetric_params
    scale, zero_point = params(np.float64(lo), np.float64(hi), qtype)
    return TensorPlan(
        name=source, role="activation", qtype=qtype.name, scale=[float(scale)], zero_point=[int(zero_point)],
        source=source, range=[float(lo), float(hi)], clipped_fraction=clipped_fraction(stats, lo, hi),
    )


def weight_plan(name: str, values: np.ndarray, axis: int | None, qtype: qmath.QType) -> TensorPlan:
    values = values.astype(np.float32)
    if axis is None or values.ndim <= axis or values.shape[axis] <= 1:
        axis = None
    q, scale, zero_point = qmath.symmetric_weights(values, qtype, axis)
    restored = qmath.dequantize(q, scale, zero_point, axis)
    error = float(np.max(np.abs(restored - values), initial=0.0))
    return TensorPlan(name=name, role="weight", qtype="int8", scale=np.atleast_1d(scale).tolist(),
                      zero_point=np.atleast_1d(zero_point).astype(int).tolist(), axis=axis, max_abs_error=error)


def operand_plan(name: str, values: np.ndarray, settings: QuantSettings) -> TensorPlan:
    """A single-value Add/Mul operand in the activations' type, so onnxruntime fuses the op; its own range
    [min(c, 0), max(c, 0)] puts c on the grid's end, so it is stored exactly."""
    values = values.astype(np.float32)
    qtype = settings.activation_qtype
    params = qmath.symmetric_params if settings.symmetric else qmath.asymmetric_params
    scale, zero_point = params(np.float64(values.min()), np.float64(values.max()), qtype)
    restored = qmath.dequantize(qmath.quantize(values, scale, zero_point, qtype), scale, zero_point)
    return TensorPlan(name=name, role="weight", qtype=qtype.name, scale=[float(scale)], zero_point=[int(zero_point)],
                      max_abs_error=float(np.max(np.abs(restored - values), initial=0.0)))


def bias_plan(name: str, values: np.ndarray, input_plan: TensorPlan, weight_plan: TensorPlan) -> TensorPlan:
    weight_scale = np.asarray(weight_plan.scale, dtype=np.float32)
    if weight_plan.axis is None:
        weight_scale = np.full(values.shape, weight_scale[0], dtype=np.float32)
    _, scale = qmath.quantize_bias(values, input_plan.scale[0], weight_scale)
    return TensorPlan(name=name, role="bias", qtype="int32", scale=np.asarray(scale).reshape(-1).tolist(),
                      zero_point=[0] * int(np.asarray(scale).size), axis=0)


def clipped_fraction(stats: TensorStats, lo: float, hi: float) -> float:
    """Share of calibration values outside [lo, hi].

    Exact (0) when the range covers [min, max]; otherwise bins wholly outside count
    fully and the bin that straddles a bound counts in proportion (values are taken
    as spread evenly inside a bin).
    """
    total = stats.counts.sum()
    if total == 0 or stats.width_exp is None or (lo <= stats.min and hi >= stats.max):
        return 0.0
    width = stats.width
    left = (np.arange(2 * BINS_PER_SIDE) - BINS_PER_SIDE) * width
    above = np.clip((left + width - hi) / width, 0.0, 1.0) if hi < stats.max else 0.0
    below = np.clip((lo - left) / width, 0.0, 1.0) if lo > stats.min else 0.0
    return float(np.sum(stats.counts * (above + below)) / total)
