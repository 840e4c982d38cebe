"""Fusion check: what onnxruntime actually runs in int8 after it optimizes a QDQ model.

A QDQ model is only fast when onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear
into an int8 kernel. This module loads the model with every graph optimization on, reads
back the optimized graph onnxruntime saves, and sorts what is left:

- int8 kernels: QLinearConv, MatMulIntegerToFloat, QGemm, QLinearAdd, ...;
- weights still dequantized at run time: a DequantizeLinear of a constant feeding a float op
  (a layer meant to be int8 that runs in float: avoidable);
- unfused pairs: a QuantizeLinear whose output only feeds DequantizeLinear nodes, so the
  tensor is rounded for nothing (avoidable);
- borders: a DequantizeLinear into a float op or a QuantizeLinear after one, the
  conversions at the edges of float regions (expected wherever a region stays float);
- W8A16: the 8-bit weights and 16-bit pairs of int16 layers, which compute in float on CPU by
  design (expected; see the README's recipes).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxq.quant.ops import QUANTIZE_OPS, is_integer_kernel
from onnxq.runtime import session
from onnxq.runtime.precision import GraphView, NodePrecision, compare_precision, disagreements


@dataclass
class FusionReport:
    int8_kernels: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    dequantized_weights: list[dict] = field(default_factory=list)  # avoidable: int8 weight, float op
    unfused_pairs: list[dict] = field(default_factory=list)  # avoidable: Q -> DQ with nothing int8 around
    borders: dict[str, int] = field(default_factory=dict)  # expected at float regions' edges
    w8a16: dict[str, int] = field(default_factory=lambda: {"weights": 0, "pairs": 0})  # int16 layers' form
    precision: list[NodePrecision] = field(default_factory=list)  # planned vs executed, per compute node

    @property
    def avoidable(self) -> int:
        return len(self.dequantized_weights) + len(self.unfused_pairs)

    @property
    def disagreements(self) -> list[dict]:
        """Compute nodes onnxruntime runs at another precision than planned (see onnxq.runtime.precision)."""
        return disagreements(self.precision)

    def to_dict(self) -> dict:
        return {"int8_kernels": self.int8_kernels, "float_ops": self.float_ops,
                "dequantized_weights": self.dequantized_weights, "unfused_pairs": self.unfused_pairs,
                "borders": self.borders, "w8a16": self.w8a16, "avoidable": self.avoidable,
                "precision": [row.to_dict() for row in self.precision], "disagreements": self.disagreements}


LEVELS = ("basic", "extended", "all")  # onnxruntime optimization levels whose graphs onnxq.runtime.precision compares


def optimized_graphs(model: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """The graphs onnxruntime's CPU provider runs, after its optimizations at each of LEVELS."""
    with tempfile.TemporaryDirectory(prefix="onnxq-fusion-") as tmp:
        return session.optimized_graphs(model, Path(tmp), LEVELS)


def check_fusion(model: onnx.ModelProto, planned: dict[str, str] | None = None) -> FusionReport:
    """Sort what onnxruntime left of the model's Q/DQ nodes (see the module docstring), and compare
    each layer's planned precision with what runs (onnxq.runtime.precision; `planned`: label -> plan status)."""
    graphs = optimized_graphs(model)
    report = _sort_quantize_ops(graphs["all"].graph)
    report.precision = compare_precision(model, graphs, planned)
    return report


def _sort_quantize_ops(graph: onnx.GraphProto) -> FusionReport:
    view = GraphView(graph)
    constants = set(view.constants)
    constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    producer, consumers = view.producer, view.consumers
    report = FusionReport()
    kernels, floats, borders, wide = Counter(), Counter(), Counter(), Counter()
    for node in graph.node:
        if is_integer_kernel(node.op_type):
            kernels[node.op_type] += 1
        elif node.op_type not in QUANTIZE_OPS:
            floats[node.op_type] += 1
        if node.op_type == "DequantizeLinear":
            users = consumers.get(node.output[0], [])
            if node.input[0] in constants:
                for user in (u for u in users if u.op_type not in QUANTIZE_OPS):
                    if view.touches_wide(user):
                        wide["weights"] += 1
                    else:
                        report.dequantized_weights.append({"weight": node.input[0], "op": user.op_type,
                                                           "node": user.name})
            elif node.input[0] not in producer or producer[node.input[0]].op_type != "QuantizeLinear":
                borders["dequantize"] += 1
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not (users and all(u.op_type == "DequantizeLinear" for u in users)):
                borders["quantize"] += 1
            elif view.is_wide(node):
                wide["pairs"] += 1
            else:
                source = producer.get(node.input[0])
                report.unfused_pairs.append({"tensor": node.input[0], "producer": source.op_type if source else "input",
                                             "consumers": sorted({c.op_type for u in users
                                                                  for c in consumers.get(u.output[0], [])})})
    report.int8_kernels = dict(sorted(kernels.items()))
    report.float_ops = dict(sorted(floats.items()))
    report.borders = dict(sorted(borders.items()))
    report.w8a16 = {"weights": wide["weights"], "pairs": wide["pairs"]}
    return report
