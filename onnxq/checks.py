"""Input that would give a wrong or pointless model is refused (or noted) before any work.

- weights with NaN or Inf: every mode would write them (static mode only noticed through
  NaN activations, dynamic and weight-only not at all);
- a model that already carries QuantizeLinear/DequantizeLinear: `convert` is the command for it;
- accuracy targets and gates outside what a cosine or an SQNR can be;
- options that do nothing in the chosen mode (`--weight-bits 4` in static mode, ...): a user who
  gives one expects it to act;
- `--exclude` names that match no node or op type (a typo would otherwise go unnoticed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx

from .errors import ModelError, UsageError
from .model_io import is_spilled, read_tensor
from .ops import QDQ_OPS, WEIGHT_INPUTS


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


# (option, parameter, when it does something, what to say): quantize options that only act in some settings
ONLY_WHEN = [
    ("--weight-bits", "weight_bits", lambda v: v["mode"] == "weight-only", "applies to --mode weight-only"),
    ("--block-size", "block_size", lambda v: v["mode"] == "weight-only" and v["weight_bits"] == "4",
     "applies to --mode weight-only --weight-bits 4"),
    ("--weight-zero-points", "weight_zero_points", lambda v: v["mode"] == "weight-only" and v["weight_bits"] == "4",
     "applies to --mode weight-only --weight-bits 4"),
    ("--method", "method", lambda v: v["mode"] == "static", "sets how static mode calibrates activation ranges"),
    ("--percentile", "percentile", lambda v: v["mode"] == "static" and v["method"] == "percentile",
     "applies to --method percentile"),
    ("--symmetric", "symmetric", lambda v: v["mode"] == "static", "sets static mode's activation type (dynamic "
     "mode quantizes activations to uint8 at run time, weight-only not at all)"),
    ("--weight-range", "weight_range", lambda v: v["mode"] != "weight-only", "does nothing in weight-only mode "
     "(float compute: full 8-bit weights)"),
    ("--speed-guard", "speed_guard", lambda v: v["mode"] == "static" or v["speed_guard"] == "off",
     "decides static mode's int8 layers"),
    ("--speed-profile", "speed_profile", lambda v: v["mode"] == "static" and v["speed_guard"] == "measure",
     "holds the timings of --speed-guard measure (static mode)"),
    ("--memory-budget", "memory_budget", lambda v: v["mode"] == "static", "bounds static mode's calibration"),
    ("--max-samples", "max_samples", lambda v: v["mode"] == "static", "limits static mode's calibration samples"),
    ("--allow-random", "allow_random", lambda v: v["mode"] == "static", "lets static mode calibrate on random data"),
    ("--target-cpu", "target_cpu", lambda v: v["mode"] != "weight-only", "sets the int8 weight range (static and "
     "dynamic modes; weight-only computes in float)"),
    ("--smooth-mul", "smooth_mul", lambda v: v["smooth_alpha"] is not None, "applies with --smooth-alpha"),
    ("--adaround-seconds", "adaround_seconds", lambda v: v["adaround"] or v["adaround_rules"],
     "applies with --adaround (or recipe rules with adaround: true)"),
    ("--holdout", "holdout", lambda v: v["mode"] == "static" and v["calib"] is not None and v["load_stats"] is None,
     "holds back part of --calib (static mode, calibrating on --calib)"),
    ("--budget", "budget", lambda v: _searches(v), "limits the automatic search (static mode without --fast or an "
     "accuracy target)"),
    ("--target-agreement", "target_agreement", lambda v: _searches(v), "is the automatic search's aim (static mode "
     "without --fast or an accuracy target)"),
]


def _searches(values: dict) -> bool:
    """The automatic search runs: static mode, no --fast, no accuracy target of the user's."""
    return values["mode"] == "static" and not values["fast"] and all(
        values[p] is None for p in ("target_sqnr", "target_cosine", "target_metric"))
TARGET_OPTIONS = [("--target-sqnr", "target_sqnr"), ("--target-cosine", "target_cosine"),
                  ("--target-metric", "target_metric"), ("--target-samples", "target_samples"),
                  ("--target-data", "target_data"), ("--fallback", "fallback"), ("--max-fallbacks", "max_fallbacks")]


def check_effective(given: set[str], values: dict) -> None:
    """UsageError for an option given on the command line that the chosen settings would ignore."""
    for option, param, acts, what in ONLY_WHEN:
        if param in given and not acts(values):
            raise UsageError(f"{option} {what}; it does nothing here (--mode {values['mode']}): leave it out")
    has_target = any(values[p] is not None for p in ("target_sqnr", "target_cosine", "target_metric"))
    for option, param in TARGET_OPTIONS:
        if param in given and values["mode"] == "dynamic":
            raise UsageError(f"{option} (accuracy target) applies to --mode static and weight-only; it does nothing "
                             "with --mode dynamic")
        if param in given and not has_target:
            raise UsageError(f"{option} applies with an accuracy target (--target-sqnr, --target-cosine or "
                             "--target-metric)")
