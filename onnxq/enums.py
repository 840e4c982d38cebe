"""The closed sets of values onnxq's options, plans and reports use, each declared once.

Members are strings (`Mode.STATIC == "static"`), so reports, plans and recipes hold the same
plain strings as before and code may compare with either; `values()` lists what the command
line, recipes and validation accept.
"""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """A str-valued enum (enum.StrEnum is Python 3.11+; onnxq supports 3.10): str() and format() give the value."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Mode(StrEnum):
    """--mode: how activations are quantized."""

    STATIC = "static"  # ranges from calibration
    DYNAMIC = "dynamic"  # MatMul/Gemm/LSTM activations at run time
    WEIGHT_ONLY = "weight-only"  # integer weights, float compute


class Format(StrEnum):
    """--format: how the int8 model is written."""

    QDQ = "qdq"  # QuantizeLinear/DequantizeLinear pairs onnxruntime fuses
    QOPERATOR = "qoperator"  # integer operators (onnxq.quant.rewrite_qop)


class WeightRange(StrEnum):
    """--weight-range. A request may say AUTO (choose by the target CPU, onnxq.cpu); the settings a plan is
    built with always hold FULL or REDUCED (RESOLVED)."""

    AUTO = "auto"
    FULL = "full"  # 8-bit weights
    REDUCED = "reduced"  # 7-bit weights for x86 CPUs without VNNI (int8 products may saturate)


RESOLVED_WEIGHT_RANGES = (WeightRange.FULL.value, WeightRange.REDUCED.value)


class NodeStatus(StrEnum):
    """What the plan makes of one node (onnxq.quant.placement.NodeDecision.status)."""

    INT8 = "int8"
    INT16 = "int16"  # float compute on 16-bit quantized inputs
    INT4 = "int4"  # weight-only, 4-bit weights
    DYNAMIC = "dynamic"  # int8 with activations quantized at run time
    FOLDED = "folded"  # an activation folded into its producer's output range
    SHARED_SCALE = "shared-scale"  # moves values: shares its input's scale
    FLOAT = "float"


# Statuses counted as quantized in reports.
QUANTIZED_STATUSES = (NodeStatus.INT8, NodeStatus.INT4, NodeStatus.FOLDED, NodeStatus.SHARED_SCALE,
                      NodeStatus.DYNAMIC)


class SpeedGuard(StrEnum):
    """--speed-guard: how int8 layers that do not pay are found (onnxq.search.speed_guard)."""

    TABLE = "table"
    MEASURE = "measure"
    OFF = "off"
