"""The speed guard's decision table: is a kind of layer faster in int8, per CPU class and layer class?

Timing the model on the machine that runs `quantize` makes the output depend on that machine and
its load. The table ships with onnxq instead: `bench/speed_table.py` measured, per CPU class,
each layer class (kind, channels, output positions or rows) as the middle layer of a small
int8 model, once with that layer in int8 and once kept in float, so the conversions a float
layer costs between int8 neighbours are part of the measurement. A layer class goes to float
only when that made the model take at most FLOAT_MIN_GAIN of its all-int8 time: a tie stays
int8, the smaller file. Same inputs, same target class: same decisions on any machine.

Classes without measured rows use the nearest measured class (NEAREST_CLASSES), and layer
classes without a row the nearest measured bucket of the same kind; the report says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import onnx_graphsurgeon as gs

from onnxq.errors import DataError
from onnxq.quant.ir import constant_values, is_constant

TABLE_FORMAT = "onnxq-speed-table/1"
FLOAT_MIN_GAIN = 0.97
NEAREST_CLASSES = {"avx2": ("avx512-vnni", "amx"), "avx512-vnni": ("amx", "avx2"), "amx": ("avx512-vnni", "avx2"),
                   "arm64": ("avx512-vnni", "amx", "avx2")}

# Bucket edges (upper bounds, inclusive) and the representative value the bench measures per bucket.
CONV_CHANNELS = ((24, 16), (96, 64), (384, 256), (math.inf, 512))
MATMUL_CHANNELS = ((96, 64), (384, 256), (1536, 1024), (math.inf, 2048))
POSITIONS = ((64, 49), (256, 196), (1024, 784), (4096, 3136), (math.inf, 12544))
MATMUL_ROWS = ((1, 1), (16, 8), (128, 64), (math.inf, 256))
GEMM_ROWS = ((1, 1), (math.inf, 32))
CONV_KINDS = ("conv-1x1", "conv-3x3", "conv-large", "conv-dw3", "conv-dw5", "conv-grouped")


def bucket_label(value: float, edges: tuple[tuple[float, int], ...]) -> str:
    for index, (upper, _) in enumerate(edges):
        if value <= upper:
            return f"<={int(upper)}" if math.isfinite(upper) else f">{int(edges[index - 1][0])}"
    raise AssertionError("buckets end at infinity")


def bucket_values(edges: tuple[tuple[float, int], ...]) -> list[tuple[str, int]]:
    """(label, representative value) of every bucket."""
    return [(bucket_label(rep, edges), rep) for _, rep in edges]


@dataclass(frozen=True)
class LayerClass:
    """What decides a layer's int8 speed: its kind, channels and output positions (or rows)."""

    kind: str
    channels: str
    size: str  # output positions for convolutions, rows for MatMul/Gemm; "?" when the shape is unknown

    @property
    def key(self) -> str:
        return f"{self.kind} c{self.channels} n{self.size}"


def layer_class(node: gs.Node, shapes: dict[str, tuple[int, ...]]) -> LayerClass | None:
    """The class of a Conv/MatMul/Gemm with a constant weight (None for other nodes)."""
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return None
    weight = constant_values(node.inputs[1]).shape
    if node.op == "Conv":
        return _conv_class(node, weight, shapes.get(node.outputs[0].name))
    if node.op == "MatMul" and len(weight) == 2:
        rows = _rows(shapes.get(node.inputs[0].name), drop_last=True)
        return LayerClass("matmul", bucket_label(math.sqrt(weight[0] * weight[1]), MATMUL_CHANNELS),
                          "?" if rows is None else bucket_label(rows, MATMUL_ROWS))
    if node.op == "Gemm" and len(weight) == 2:
        rows = _rows(shapes.get(node.inputs[0].name), drop_last=True)
        return LayerClass("gemm", bucket_label(math.sqrt(weight[0] * weight[1]), MATMUL_CHANNELS),
                          "?" if rows is None else bucket_label(rows, GEMM_ROWS))
    return None


def _conv_class(node: gs.Node, weight: tuple[int, ...], output: tuple[int, ...] | None) -> LayerClass:
    group = int(node.attrs.get("group", 1))
    c_out, c_in = weight[0], weight[1] * group
    taps = math.prod(weight[2:])
    if group > 1 and weight[1] == 1:
        kind, channels = ("conv-dw3" if taps <= 9 else "conv-dw5"), c_in
    else:
        kind = "conv-grouped" if group > 1 else "conv-1x1" if taps == 1 else "conv-3x3" if taps <= 9 else "conv-large"
        channels = math.sqrt(c_in * c_out)
    positions = _rows(output[2:] if output is not None and len(output) > 2 else None, drop_last=False)
    return LayerClass(kind, bucket_label(channels, CONV_CHANNELS),
                      "?" if positions is None else bucket_label(positions, POSITIONS))


def _rows(shape: tuple[int, ...] | None, *, drop_last: bool) -> int | None:
    if shape is None:
        return None
    dims = shape[:-1] if drop_last else shape
    if any(not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return math.prod(dims)


@dataclass(frozen=True)
class Row:
    int8_ms: float  # the measured model with this layer in int8
    float_ms: float  # ... with this layer kept float
    fp32_ms: float  # ... all float (for the speed-limit figures)

    @property
    def float_is_faster(self) -> bool:
        return self.float_ms <= FLOAT_MIN_GAIN * self.int8_ms


@dataclass
class Decision:
    layer: LayerClass
    precision: str  # "int8" or "float"
    row_class: str  # the CPU class whose row decided
    row_key: str  # the row's layer class key (another bucket when this one was not measured)
    row: Row

    def to_dict(self) -> dict:
        return {"class": self.layer.key, "decision": self.precision, "row": f"{self.row_class}: {self.row_key}",
                "int8_ms": self.row.int8_ms, "float_ms": self.row.float_ms}


@dataclass
class SpeedTable:
    classes: dict[str, dict] = field(default_factory=dict)  # CPU class -> how its rows were measured
    rows: dict[str, dict[str, Row]] = field(default_factory=dict)  # CPU class -> layer class key -> Row

    @classmethod
    def from_json(cls, text: str, origin: str) -> SpeedTable:
        try:
            body = json.loads(text)
            if body.get("format") != TABLE_FORMAT:
                raise ValueError(f"format {body.get('format')!r}")
            rows = {cpu: {key: Row(*map(float, values)) for key, values in table.items()}
                    for cpu, table in body["rows"].items()}
            return cls(dict(body["classes"]), rows)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"not an onnxq speed table: {origin} ({exc})") from None

    def to_json(self) -> str:
        body = {"format": TABLE_FORMAT, "decision_rule": f"float when float_ms <= {FLOAT_MIN_GAIN} * int8_ms",
                "classes": self.classes,
                "rows": {cpu: {key: [r.int8_ms, r.float_ms, r.fp32_ms] for key, r in sorted(table.items())}
                         for cpu, table in sorted(self.rows.items())}}
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    def row_class_for(self, cpu_class: str) -> tuple[str, str]:
        """The measured class to decide for `cpu_class`, and a note when it is another one."""
        if self.rows.get(cpu_class):
            return cpu_class, ""
        for other in NEAREST_CLASSES.get(cpu_class, ()):
            if self.rows.get(other):
                return other, f"no measured rows for {cpu_class}: decisions from the nearest measured class, {other}"
        raise DataError("the speed table has no measured rows; use --speed-guard measure or off")

    def decide(self, row_class: str, layer: LayerClass) -> Decision | None:
        """The decision for `layer` from `row_class`'s rows (the nearest measured bucket of its kind);
        None when the class has no row of that kind at all."""
        rows = self.rows[row_class]
        key = layer.key if layer.key in rows else _nearest_key(layer, rows)
        if key is None:
            return None
        row = rows[key]
        return Decision(layer, "float" if row.float_is_faster else "int8", row_class, key, row)


def _nearest_key(layer: LayerClass, rows: dict[str, Row]) -> str | None:
    """The measured row of the same kind closest in (channels, size) bucket order; unknown sizes take the middle."""
    channels_order, size_order = _orders(layer.kind)
    want_c = channels_order.index(layer.channels) if layer.channels in channels_order else len(channels_order) // 2
    want_s = size_order.index(layer.size) if layer.size in size_order else len(size_order) // 2
    best: tuple[tuple[int, int, int], str] | None = None
    for c_index, channels in enumerate(channels_order):
        for s_index, size in enumerate(size_order):
            key = LayerClass(layer.kind, channels, size).key
            if key in rows:
                distance = (abs(c_index - want_c) + abs(s_index - want_s), abs(c_index - want_c), c_index + s_index)
                if best is None or distance < best[0]:
                    best = (distance, key)
    return None if best is None else best[1]


def bucket_edges(kind: str) -> tuple[tuple[tuple[float, int], ...], tuple[tuple[float, int], ...]]:
    """(channel buckets, size buckets) of a layer kind."""
    if kind == "matmul":
        return MATMUL_CHANNELS, MATMUL_ROWS
    if kind == "gemm":
        return MATMUL_CHANNELS, GEMM_ROWS
    return CONV_CHANNELS, POSITIONS


def _orders(kind: str) -> tuple[list[str], list[str]]:
    channels, sizes = bucket_edges(kind)
    return [label for label, _ in bucket_values(channels)], [label for label, _ in bucket_values(sizes)]


@cache
def shipped_table() -> SpeedTable:
    """The table in the package (onnxq/data/speed_table.json)."""
    resource = resources.files("onnxq") / "data" / "speed_table.json"
    return SpeedTable.from_json(resource.read_text(), "onnxq/data/speed_table.json")
