"""Planned precision against executed precision: does onnxruntime run each layer as onnxq planned it?

onnxruntime rewrites a model when it loads it: it fuses Q/DQ pairs into integer kernels, but it
can also quantize float layers by itself (see onnxq.quant.float_islands) or fail to fuse an int8 one.
For every compute node onnxq wrote, this module finds the node onnxruntime made of it in the
optimized graph at each level (basic, extended, all) and classifies what runs:

- "int8": an integer kernel (QLinearConv, QGemm, MatMulIntegerToFloat, QLinearAdd, ...);
- "int16": a float kernel reading a 16-bit DequantizeLinear (W8A16: float compute, 16-bit inputs);
- "fake-quant": a float kernel reading its weight through a DequantizeLinear (int8 weights);
- "float": a float kernel with float weights (its input may be a dequantized activation: the
  border of a float region);
- "fused": not in the optimized graph under its name or outputs: onnxruntime fused it into
  another op (float ops into LayerNormalization, Gelu, ...; an int8 layer must never be).

Expected: at "basic" onnxruntime fuses nothing, so int8 layers run as fake-quant; from
"extended" on they run as integer kernels. A float layer is float at every level. For int8
layers with weights, the weight scale's granularity (per channel or per tensor) must also
be the one onnxq wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from onnxq.enums import NodeStatus
from onnxq.quant.ops import (
    COMPUTE_OPS,
    FOLDABLE_ACTIVATIONS,
    INTEGER_WEIGHT_SCALE_INPUT,
    QUANTIZE_OPS,
    WEIGHT_INPUT,
    is_integer_kernel,
)

WIDE_TYPES = (onnx.TensorProto.INT16, onnx.TensorProto.UINT16)
# What each planned status may run as, per optimization level. At "basic" onnxruntime fuses no Q/DQ:
# int8 layers run on dequantized values ("fake-quant" with weights, "float" without). A float node that
# onnxruntime fused into another float op (LayerNormalization, Gelu, ...) is not found: "fused".
# A float op at the border of an int16 layer reads or feeds its 16-bit pairs ("int16") and still computes
# in float: onnxruntime's CPU provider has no 16-bit kernel it could become.
FLOAT_KINDS = {"float", "fused", "int16"}
ALLOWED = {
    "basic": {"int8": {"fake-quant", "int8", "float"}, "int16": {"int16"}, "float": FLOAT_KINDS,
              "dynamic": {"int8"}},
    "extended": {"int8": {"int8"}, "int16": {"int16"}, "float": FLOAT_KINDS, "dynamic": {"int8"}},
    "all": {"int8": {"int8"}, "int16": {"int16"}, "float": FLOAT_KINDS, "dynamic": {"int8"}},
}
PRECISION_OPS = COMPUTE_OPS | {"ConvTranspose"}
_SUFFIX = re.compile(r"(_token_\d+|_nchwc)+$")  # what onnxruntime appends to names it rewrites
_FUSION = re.compile(r"/\w*Fusion/?$")


@dataclass
class NodePrecision:
    node: str
    op_type: str
    planned: str  # int8, int16 or float
    executed: dict[str, str] = field(default_factory=dict)  # level -> int8 / int16 / fake-quant / float / fused
    planned_weights: str | None = None  # per-channel / per-tensor (int8 layers with a weight)
    executed_weights: str | None = None  # at level "all"

    @property
    def disagreements(self) -> list[str]:
        found = [f"{level}: runs {kind}" for level, kind in self.executed.items()
                 if kind not in ALLOWED[level][self.planned]]
        if self.planned_weights and self.executed_weights and self.planned_weights != self.executed_weights:
            found.append(f"all: weights {self.executed_weights}, planned {self.planned_weights}")
        return found

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "planned": self.planned, "executed": self.executed,
                "planned_weights": self.planned_weights, "executed_weights": self.executed_weights,
                "disagreements": self.disagreements}


def compare_precision(written: onnx.ModelProto, optimized: dict[str, onnx.ModelProto],
                      planned: dict[str, str] | None = None) -> list[NodePrecision]:
    """Per compute node of `written`: planned precision (from `planned`, label -> status, or read from
    the written Q/DQ pairs) against what runs in each optimized graph (level -> model)."""
    view = GraphView(written.graph)
    rows = []
    for node in written.graph.node:
        if node.op_type not in PRECISION_OPS and not is_integer_kernel(node.op_type):
            continue
        label = _label(node)
        status = planned.get(label) if planned is not None else view.planned_status(node)
        if status not in ("int8", "int16", "float", "dynamic"):
            continue
        rows.append(NodePrecision(label, node.op_type, status,
                                  planned_weights=view.weight_granularity(node) if status == NodeStatus.INT8 else None))
    for level, model in optimized.items():
        executed = GraphView(model.graph)
        for row, node in zip(rows, _nodes_of(written, rows), strict=True):
            found = executed.find(node, view)
            row.executed[level] = "fused" if found is None else executed.kind(found)
            if level == "all" and found is not None and row.planned_weights is not None:
                row.executed_weights = executed.weight_granularity(found)
    return rows


def _nodes_of(written: onnx.ModelProto, rows: list[NodePrecision]) -> list[onnx.NodeProto]:
    by_label = {_label(node): node for node in written.graph.node}
    return [by_label[row.node] for row in rows]


def _label(node: onnx.NodeProto) -> str:
    """The same label onnxq.quant.ir.node_label gives a node (name, or op and outputs)."""
    return node.name or f"{node.op_type}({', '.join(node.output)})"


class GraphView:
    """Producers, constants and name lookups of one protobuf graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.constants = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.by_name: dict[str, list[tuple[str, onnx.NodeProto]]] = {}  # name less affixes -> (name, node)
        self.by_output: dict[str, list[tuple[str, onnx.NodeProto]]] = {}
        for node in graph.node:
            if node.op_type in QUANTIZE_OPS:
                continue
            name = _FUSION.sub("", node.name).removeprefix("fused ")  # "name/LayerNormFusion/", "fused name"
            self.by_name.setdefault(_SUFFIX.sub("", name), []).append((name, node))
            for out in node.output:
                self.by_output.setdefault(_SUFFIX.sub("", out), []).append((out, node))

    def find(self, written: onnx.NodeProto, source: GraphView) -> onnx.NodeProto | None:
        """The node onnxruntime made of `written` (a node of `source`): same name (less onnxruntime's
        affixes), else same output, else the output of the Relu/Clip it fused with."""
        found = _lookup(self.by_name, written.name) if written.name else None
        if found is not None:
            return found
        outputs = list(written.output)
        users = source.consumers.get(outputs[0], []) if outputs else []
        if len(users) == 1 and users[0].op_type in FOLDABLE_ACTIVATIONS:
            outputs += list(users[0].output)
        for out in outputs:
            found = _lookup(self.by_output, out)
            if found is not None:
                return found
        return None

    def _dequantize_of(self, name: str) -> onnx.NodeProto | None:
        producer = self.producer.get(name)
        return producer if producer is not None and producer.op_type == "DequantizeLinear" else None

    def is_wide(self, pair_node: onnx.NodeProto) -> bool:
        """A QuantizeLinear or DequantizeLinear of 16-bit values (by its zero point or stored data)."""
        zero_point = (self.constants.get(pair_node.input[2])
                      if len(pair_node.input) > 2 and pair_node.input[2] else None)
        if zero_point is not None:
            return zero_point.data_type in WIDE_TYPES
        quantized = pair_node.input[0]
        return quantized in self.constants and self.constants[quantized].data_type in WIDE_TYPES

    def _is_weight(self, name: str) -> bool:
        """A constant, or the DequantizeLinear of one."""
        dq = self._dequantize_of(name)
        return name in self.constants or (dq is not None and dq.input[0] in self.constants)

    def _activations(self, node: onnx.NodeProto) -> list[str]:
        """Data inputs that are not weights (nor a Conv/Gemm bias)."""
        inputs = list(node.input[:2]) if node.op_type in WEIGHT_INPUT else list(node.input)
        return [name for name in inputs if name and not self._is_weight(name)]

    def kind(self, node: onnx.NodeProto) -> str:
        """What runs: an integer kernel, float on 16-bit inputs, float on int8 weights, or float.

        A float layer reading a dequantized activation is still float (a border of its float region)."""
        if is_integer_kernel(node.op_type):
            return "int8"
        if self.touches_wide(node):
            return "int16"
        weight = WEIGHT_INPUT.get(node.op_type)
        if weight is not None and len(node.input) > weight and self._dequantize_of(node.input[weight]) is not None:
            return "fake-quant"
        return "float"

    def touches_wide(self, node: onnx.NodeProto) -> bool:
        """Reads a 16-bit DequantizeLinear or writes into a 16-bit QuantizeLinear."""
        if any((dq := self._dequantize_of(name)) is not None and self.is_wide(dq) for name in node.input if name):
            return True
        users = [user for out in node.output for user in self.consumers.get(out, [])]
        users += [after for user in users if user.op_type in FOLDABLE_ACTIVATIONS
                  for after in self.consumers.get(user.output[0], [])]  # a Relu/Clip in between
        return any(user.op_type == "QuantizeLinear" and self.is_wide(user) for user in users)

    def planned_status(self, node: onnx.NodeProto) -> str:
        """What a written Q/DQ model asks for, read from its pairs (for `onnxq inspect` without a plan):
        int8 where every activation input comes from a DequantizeLinear with one scale (per-axis
        ones are onnxq's float views) and the weight, if any, is dequantized too."""
        if is_integer_kernel(node.op_type):
            return "int8"
        inputs = [self._dequantize_of(name) for name in self._activations(node)]
        if self.touches_wide(node):
            return "int16"
        weight = WEIGHT_INPUT.get(node.op_type)
        weight_dequantized = (weight is None or (len(node.input) > weight and node.input[weight] not in self.constants
                                                 and self._is_weight(node.input[weight])))
        if inputs and all(dq is not None and self._scale_size(dq, 1) == 1 for dq in inputs) and weight_dequantized:
            return "int8"
        return "float"

    def _scale_size(self, node: onnx.NodeProto, index: int) -> int | None:
        scale = self.constants.get(node.input[index]) if len(node.input) > index else None
        return None if scale is None else int(numpy_helper.to_array(scale).size)

    def weight_granularity(self, node: onnx.NodeProto) -> str | None:
        """per-channel / per-tensor for the weight of an int8 layer (written DQ or executed kernel)."""
        if node.op_type in INTEGER_WEIGHT_SCALE_INPUT:
            size = self._scale_size(node, INTEGER_WEIGHT_SCALE_INPUT[node.op_type])
        else:
            weight = WEIGHT_INPUT.get(node.op_type)
            dq = self._dequantize_of(node.input[weight]) if weight is not None and len(node.input) > weight else None
            size = self._scale_size(dq, 1) if dq is not None else None
        if size is None:
            return None
        return "per-channel" if size > 1 else "per-tensor"


def _lookup(index: dict[str, list[tuple[str, onnx.NodeProto]]], written: str) -> onnx.NodeProto | None:
    """The node named `written`, or `written` plus suffixes onnxruntime adds ("_token_3", "_nchwc")."""
    candidates = index.get(_SUFFIX.sub("", written), [])
    exact = [node for name, node in candidates if name == written]
    suffixed = [node for name, node in candidates
                if name.startswith(written) and _SUFFIX.fullmatch(name[len(written):])]
    return (exact or suffixed or [None])[0]


def disagreements(rows: list[NodePrecision]) -> list[dict]:
    return [{"node": row.node, "op_type": row.op_type, "planned": row.planned, "problems": row.disagreements}
            for row in rows if row.disagreements]
