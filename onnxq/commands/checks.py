"""Input that would give a wrong or pointless model is refused (or noted) before any work.

- weights with NaN or Inf: every mode would write them (static mode only noticed through
  NaN activations, dynamic and weight-only not at all);
- a model that already carries QuantizeLinear/DequantizeLinear: `convert` is the command for it;
- accuracy targets and gates outside what a cosine or an SQNR can be;
- `--exclude` names that match no node or op type (a typo would otherwise go unnoticed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx

from onnxq.errors import ModelError, UsageError
from onnxq.model_io import is_spilled, read_tensor
from onnxq.quant.ops import QDQ_OPS, WEIGHT_INPUTS


def _nodes(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, dict[str, onnx.TensorProto]]]:
    """Every node with the initializers visible to it (subgraphs see their own and the outer ones)."""
    yield from _nodes_in(graph, {})


def _nodes_in(graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto]
              ) -> Iterator[tuple[onnx.NodeProto, dict[str, onnx.TensorProto]]]:
    visible = {**outer, **{t.name: t for t in graph.initializer}}
    for node in graph.node:
        yield node, visible
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _nodes_in(sub, visible)


def check_finite_weights(model: onnx.ModelProto) -> None:
    """ModelError naming the first Conv/MatMul/Gemm/RNN weight that holds NaN or Inf."""
    checked: set[str] = set()
    for node, initializers in _nodes(model.graph):
        for index in WEIGHT_INPUTS.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            tensor = initializers.get(name)
            if tensor is None or name in checked or tensor.data_type not in FLOAT_TYPES or (
                    tensor.data_location == onnx.TensorProto.EXTERNAL and not is_spilled(tensor)):
                continue
            checked.add(name)
            values = read_tensor(tensor)
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                raise ModelError(f"weight {name} of {node.op_type} {node.name or node.output[0]} holds {bad} NaN or "
                                 f"Inf value(s) of {values.size}: the model computes NaN/Inf; fix it before "
                                 "quantizing")


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def check_not_qdq(model: onnx.ModelProto, path: object) -> None:
    """A model with Q/DQ pairs is already quantized (or a QAT export): quantizing it again stacks a second layer."""
    count = sum(1 for node, _ in _nodes(model.graph) if node.op_type in QDQ_OPS)
    if count:
        raise ModelError(f"{path} already has {count} QuantizeLinear/DequantizeLinear nodes (a quantized or QAT "
                         f"model): `onnxq convert {path} -o OUT` turns it into onnxq's int8 form; `quantize` takes "
                         "the fp32 original")


def check_targets(min_cosine: float | None, min_sqnr: float | None, target_cosine: float | None,
                  target_sqnr: float | None, target_metric: float | None) -> None:
    """Gates and accuracy targets a measured cosine or SQNR can meet (a finite number; a cosine in [-1, 1])."""
    for option, value, cosine in (("--min-cosine", min_cosine, True), ("--target-cosine", target_cosine, True),
                                  ("--min-sqnr", min_sqnr, False), ("--target-sqnr", target_sqnr, False),
                                  ("--target-metric", target_metric, False)):
        if value is None:
            continue
        if not math.isfinite(value):
            raise UsageError(f"{option} must be a finite number, got {value}")
        if cosine and not -1.0 <= value <= 1.0:
            raise UsageError(f"{option} is a cosine similarity, between -1 and 1 (e.g. 0.99), got {value}")


def unmatched_excludes(exclude: tuple[str, ...], nodes: list[tuple[str, str]]) -> list[str]:
    """Notes for --exclude values that are neither a node name nor an op type of the (prepared) model."""
    names = {name for name, _ in nodes} | {op for _, op in nodes}
    return [f"--exclude {value} matches no node name or op type in the model (after preparation); nothing excluded "
            "by it" for value in exclude if value not in names]
