"""Each bench model's int8 speed limit on this CPU, and how close onnxq and its peers come to it.

Every op onnxruntime has an int8 kernel for (Conv, ConvTranspose, MatMul, Gemm; Add, Mul, Concat, pooling,
Resize, Sigmoid, LeakyRelu, Softmax), at the shapes a real sample gives it and with a following Relu /
Relu6-Clip that int8 absorbs, is cut out of the prepared fp32 model and timed alone in fp32 and in fused int8
QDQ form (uint8 activations, int8 per-channel weights, int32 bias, uint8 constants: what onnxruntime runs as
QLinearConv / QLinearMatMul / QGemm / QLinearAdd ...), the two side by side, runs interleaved, one thread,
batch 1, per-kernel times from onnxruntime's profiler (central means: see central_mean). The int8 form's
QuantizeLinear / DequantizeLinear (and layout Transposes) at its float input and output are timed with it:
the conversions an int8 op pays where its neighbours are float. The limit model takes, op by op, the faster
of fp32 and int8 plus the conversions at the float/int8 boundaries that choice makes (a chain of int8 ops
pays none between its members, also through Reshape/Transpose/Slice; one Q feeds every int8 reader of a
float tensor; MatMul/Gemm may write float themselves instead of a Q/DQ pair); everything else (Div, LayerNorm,
...) costs what it costs in the fp32 model, and the fp32 model's NCHWc reorders in proportion to the
convolution time that stays fp32. For models over 16 MB the weights come from memory (caches flushed before
each run of a weighted layer, as in a model larger than the caches). The isolated times are scaled to the
share those ops take of the fp32 model's profiled time as it runs (NCHWc kernels, fusions), so a limit model
with every op in fp32 is exactly fp32. The same limit with only the heavy ops allowed in int8 (the rest at
its fp32 cost) is in the JSON as heavy_only.

Then fp32, onnxq's default and --fast models and every peer model the bench left in bench/.cache/work/
(ORT QDQ/QOperator/dynamic, NNCF; rows that ran ok) are run side by side, interleaved (1 thread, batch 1,
the first evaluation sample): wall-clock medians, and onnxruntime's profile, whose per-node times give the
speedups set against the limit and the time per op kind ("where the time goes"). All figures are ratios
measured in the same run on this machine's CPU class; absolute ms move with the machine's load.
--compare-only times fp32 and the --extra models only, with the bench's task metrics (a change's before
and after).

    .venv/bin/python -m bench.speed_limit                   # every model -> bench/results/limit/<model>.json
    .venv/bin/python -m bench.speed_limit --models ppocr-cls,ppocr-det
    .venv/bin/python -m bench.speed_limit --models ppocr-det --compare-only --extra ppocr-det:new=/tmp/new.onnx
    .venv/bin/python -m bench.cpu_mask avx2 -- .venv/bin/python -m bench.speed_limit --onnxq-results DIR \
        --results bench/results/limit-avx2     # AVX2 kernels; onnxq's models from bench.run --results DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench import datasets, metrics, models, report
from bench.run import DEFAULT_SAMPLES, RESULTS, UNSEEN
from onnxq.cpu import host_cpu
from onnxq.model_io import load_model
from onnxq.passes.prepare import prepare_model

LIMIT_RESULTS = RESULTS / "limit"
HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Profiled op kinds that are the heavy layers in onnxruntime's optimized fp32 graph (NCHWc Conv included).
HEAVY_KERNELS = {"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}
REORDERS = {"ReorderInput", "ReorderOutput"}  # the fp32 model's NCHWc layout changes around float convolutions
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput", "Cast"}
INT8_KERNELS = ("QLinear", "NhwcQLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize",
                "MatMulIntegerToFloat", "QAttention")
PEER_PREFIXES = ("ort-", "nncf-")
COLD_WEIGHTS_BYTES = 16_000_000  # fp32 models above this: layer timing with the caches flushed before each run
FLUSH_BYTES = 64_000_000
# Light ops onnxruntime runs in int8 between Q/DQ pairs (QLinearAdd, QLinearMul, QLinearConcat, QLinear pooling,
# QLinearSigmoid / LeakyRelu / Softmax; MaxPool and Resize on uint8 as they are).
LIGHT_OPS = ("Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool", "Resize", "Sigmoid",
             "LeakyRelu", "Softmax")
ABSORBING = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul")  # a Relu / Clip(0, hi) after them folds
# Ops a chain of int8 layers passes through without a conversion (they move uint8 values as they are).
TRANSPARENT = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split"}
# Profiled fp32 op kinds the limit's layers cover (everything else is the rest, at its fp32 cost).
COVERED_KERNELS = HEAVY_KERNELS | set(LIGHT_OPS) | {"Relu", "Clip"}
MODEL_ROWS = ("onnxq-default", "onnxq-fast")
DEFAULT_MODELS = ("ppocr-rec", "ppocr-cls", "ppocr-det", "nudenet-320n", "silero-vad-sr16k", "minilm-l6",
                  "efficientnet-lite0", "ddddocr-captcha", "mpnet-base", "picodet-layout", "ppocr-det-pages",
                  "ppocr-rec-photos")


# ---------------------------------------------------------------- sessions and profiles


def session(path: Path, *, profile: str | None = None) -> ort.InferenceSession:
    """One thread, onnxruntime's full optimisation (as a user runs the model)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class NodeTime:
    name: str
    op: str
    order: int
    int8_input: bool  # its first input is (u)int8: MaxPool / Resize run on uint8 as they are
    ms: float  # central mean over the measured runs (central_mean)


def profile_nodes(sess: ort.InferenceSession, skip: int) -> list[NodeTime]:
    """Per-node kernel time (central_mean) from a profiled session (the first ``skip`` runs are warm-up)."""
    path = Path(sess.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    times: dict[str, list[float]] = defaultdict(list)
    ops, order, int8_input = {}, {}, {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name = event["name"][: -len("_kernel_time")]
        times[name].append(event["dur"] / 1e3)
        ops[name] = event["args"].get("op_name", "?")
        types = event["args"].get("input_type_shape") or [{}]
        int8_input[name] = bool(types) and next(iter(types[0]), "") in ("uint8", "int8")
        order.setdefault(name, len(order))
    return [NodeTime(n, ops[n], order[n], int8_input[n], central_mean(t[skip:] if len(t) > skip else t))
            for n, t in times.items()]


def central_mean(values: list[float]) -> float:
    """Mean of the middle 60% plus half a microsecond: the profiler truncates each duration to whole
    microseconds, which a median would keep for layers of a few microseconds; the mean of many runs
    averages the truncation out (the middle only, so a run the shared machine interrupted does not count)."""
    ordered = sorted(values)
    cut = len(ordered) // 5
    middle = ordered[cut:len(ordered) - cut] or ordered
    return statistics.fmean(middle) + 0.5e-3


def interleaved_profiles(paths: list[Path], feeds: list[dict], tmp: Path, *, warmup: int = 3, min_rounds: int = 9,
                         max_rounds: int = 200, budget_s: float = 0.4,
                         flush: np.ndarray | None = None) -> list[list[NodeTime]]:
    """Profile the models side by side: each round runs every model once, so machine noise hits all alike.
    ``flush``: a buffer larger than the caches, written before every run, after which the inputs are read
    again: weights come from memory, as in a model too large for the caches, activations from the caches."""
    sessions = [session(p, profile=str(tmp / f"prof{i}")) for i, p in enumerate(paths)]
    for sess, feed in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            sess.run(None, feed)
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for sess, feed in zip(sessions, feeds, strict=True):
            if flush is not None:  # weights out of the caches, the inputs back in (a producer just wrote them)
                flush += 1
                for value in feed.values():
                    value.sum()
            sess.run(None, feed)
        rounds += 1
    return [profile_nodes(sess, warmup) for sess in sessions]


def by_op(nodes: list[NodeTime]) -> dict[str, dict]:
    """ms and node count per op kind, largest first."""
    out: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "nodes": 0})
    for node in nodes:
        out[node.op]["ms"] += node.ms
        out[node.op]["nodes"] += 1
    return {op: {"ms": round(v["ms"], 4), "nodes": v["nodes"]}
            for op, v in sorted(out.items(), key=lambda kv: -kv[1]["ms"])}


# ---------------------------------------------------------------- the heavy layers


@dataclass
class Layer:
    node: onnx.NodeProto
    act: onnx.NodeProto | None  # Relu / Clip(0, hi) after it, absorbed by int8's output range
    inputs: list[str]  # activation inputs (not constants)
    output: str  # after the activation
    consumers: list[str] = field(default_factory=list)  # layers reading ``output`` ("" for anything else)
    sources: list[str] = field(default_factory=list)  # per input: the layer making it ("" for anything else)
    siblings: dict[str, list[str]] = field(default_factory=dict)  # per input: the other layers reading it

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


def _clip_min(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> float | None:
    if len(node.input) > 1 and node.input[1]:
        return float(consts[node.input[1]]) if node.input[1] in consts else None
    for attr in node.attribute:
        if attr.name == "min":
            return attr.f
    return None


def op_layers(model: onnx.ModelProto) -> list[Layer]:
    """Every op onnxruntime has an int8 kernel for, with a float activation input: the heavy ones
    (Conv/ConvTranspose/Gemm with a constant weight, every MatMul) and the light ones (LIGHT_OPS)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    floats = {v.name for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    layers, absorbed = [], set()
    for node in model.graph.node:
        if id(node) in absorbed or node.op_type not in (*HEAVY_OPS, *LIGHT_OPS):
            continue
        if node.op_type in HEAVY_OPS and node.op_type != "MatMul" and (
                len(node.input) < 2 or node.input[1] not in consts or node.input[0] in consts):
            continue
        limit = 1 if node.op_type in ("Resize", "MaxPool") else None
        inputs = [n for n in node.input[:limit] if n and n not in consts]
        if not inputs or not all(n in floats for n in inputs) or node.output[0] not in floats:
            continue
        act = None
        users = consumers[node.output[0]]
        if len(users) == 1 and node.output[0] not in outputs and node.op_type in ABSORBING and (
                users[0].op_type == "Relu" or (users[0].op_type == "Clip" and _clip_min(users[0], consts) == 0.0)):
            act = users[0]
            absorbed.add(id(act))
        out = act.output[0] if act is not None else node.output[0]
        layers.append(Layer(node, act, inputs, out))
    producers = {o: node for node in model.graph.node for o in node.output}
    made_by = {layer.output: layer.name for layer in layers}

    def source(tensor: str) -> str:
        while tensor not in made_by and tensor in producers and producers[tensor].op_type in TRANSPARENT:
            tensor = producers[tensor].input[0]
        return made_by.get(tensor, "")

    def readers(tensor: str) -> list[str]:
        found = ["" if tensor in outputs else None]
        for user in consumers[tensor]:
            if user.op_type in TRANSPARENT:
                found += [r for out in user.output for r in readers(out)]
            else:
                found.append(layer_names.get(id(user), ""))
        return [r for r in found if r is not None]

    layer_names = {id(layer.node): layer.name for layer in layers}
    readers_of: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        for name in layer.inputs:
            readers_of[name].append(layer.name)
    for layer in layers:
        layer.sources = [source(name) for name in layer.inputs]
        layer.consumers = readers(layer.output)
        layer.siblings = {name: [r for r in readers_of[name] if r != layer.name] for name in layer.inputs}
    return layers


def real_values(model: onnx.ModelProto, names: set[str], feed: dict, tmp: Path) -> dict[str, np.ndarray]:
    """The tensors ``names`` on a real sample (the model run with them as extra outputs)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    have = {o.name for o in work.graph.output}
    for name in sorted(names - have):
        work.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    path = tmp / "values.onnx"
    onnx.save(work, str(path), save_as_external_data=work.ByteSize() > 1_500_000_000)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in sess.get_outputs() if o.name in names]
    inputs = {i.name for i in sess.get_inputs()}
    values = sess.run(wanted, {k: v for k, v in feed.items() if k in inputs})
    return dict(zip(wanted, values, strict=True))


def _u8_qparams(values: np.ndarray) -> tuple[np.float32, np.uint8]:
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return np.float32(scale), np.uint8(round(-lo / scale))


def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    """The output-channel axis of a weight (per-channel scales), None for per-tensor."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if weight.ndim > 1 and _attr(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return weight.ndim - 1 if weight.ndim == 2 else None


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def layer_models(layer: Layer, consts: dict[str, np.ndarray], values: dict[str, np.ndarray],
                 opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The layer alone in fp32, and in QDQ int8 with float input and output (Q/DQ around it)."""
    node = layer.node
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(values[n].shape)) for n in layer.inputs]
    out_value = values[layer.output]
    graph_output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_value.shape))]
    const_inputs = [n for n in node.input if n and n in consts]
    act_consts = [n for n in (layer.act.input[1:] if layer.act is not None else []) if n and n in consts]

    def renamed(proto: onnx.NodeProto, inputs: list[str], output: str) -> onnx.NodeProto:
        copy = onnx.NodeProto()
        copy.CopyFrom(proto)
        del copy.input[:]
        copy.input.extend(inputs)
        del copy.output[:]
        copy.output.append(output)
        return copy

    # fp32
    inits = [numpy_helper.from_array(consts[n], n) for n in {*const_inputs, *act_consts}]
    nodes = [renamed(node, list(node.input), "h" if layer.act is not None else "y")]
    if layer.act is not None:
        nodes.append(renamed(layer.act, ["h", *layer.act.input[1:]], "y"))
    fp32 = _model(nodes, graph_inputs, graph_output, inits, opset)

    # int8: Q -> DQ on each activation input, int8 weight and int32 bias through DQ, Q -> DQ on the output
    inits, nodes, new_inputs = [], [], []
    scales = {}
    for index, name in enumerate(node.input):
        if not name:
            new_inputs.append("")
            continue
        if name not in consts:
            scale, zero = _u8_qparams(values[name])
            scales[name] = scale
            inits += [numpy_helper.from_array(np.array(scale), f"{name}_s"),
                      numpy_helper.from_array(np.array(zero), f"{name}_z")]
            nodes += [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                      helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
            new_inputs.append(f"{name}_dq")
        elif index == 1 and node.op_type in HEAVY_OPS:
            weight = consts[name].astype(np.float32)
            axis = _weight_axis(node, weight)
            reduce = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
            w_scale = np.maximum(np.abs(weight).max(axis=reduce), 1e-8) / 127.0
            shaped = w_scale.reshape([-1 if i == axis else 1 for i in range(weight.ndim)]) if axis is not None \
                else w_scale
            q = np.clip(np.round(weight / shaped), -127, 127).astype(np.int8)
            w_scale = np.asarray(w_scale, np.float32)
            inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(w_scale, f"{name}_s"),
                      numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), f"{name}_z")]
            attrs = {"axis": axis} if axis is not None else {}
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                          [f"{name}_dq"], **attrs))
            new_inputs.append(f"{name}_dq")
        elif index == 2 and node.op_type in ("Conv", "Gemm") and consts[name].ndim == 1:
            w_scale = numpy_helper.to_array(next(t for t in inits if t.name == f"{node.input[1]}_s"))
            x_scale = scales[node.input[0]]
            b_scale = (x_scale * w_scale).astype(np.float32)
            bias = consts[name].astype(np.float64)
            q = np.clip(np.round(bias / b_scale), -2**31, 2**31 - 1).astype(np.int32)
            b_scale = np.broadcast_to(b_scale, q.shape).astype(np.float32).copy()
            inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(b_scale, f"{name}_s"),
                      numpy_helper.from_array(np.zeros(q.shape, np.int32), f"{name}_z")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                          [f"{name}_dq"], axis=0))
            new_inputs.append(f"{name}_dq")
        elif node.op_type in ("Add", "Mul", "Concat") and consts[name].dtype == np.float32:
            scale, zero = _u8_qparams(consts[name])
            q = np.clip(np.round(consts[name] / scale) + zero, 0, 255).astype(np.uint8)
            inits += [numpy_helper.from_array(q, f"{name}_q"), numpy_helper.from_array(np.array(scale), f"{name}_s"),
                      numpy_helper.from_array(np.array(zero), f"{name}_z")]
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"],
                                          [f"{name}_dq"]))
            new_inputs.append(f"{name}_dq")
        else:
            inits.append(numpy_helper.from_array(consts[name], name))
            new_inputs.append(name)
    scale, zero = _u8_qparams(out_value)
    inits += [numpy_helper.from_array(np.array(scale), "y_s"), numpy_helper.from_array(np.array(zero), "y_z")]
    nodes += [renamed(node, new_inputs, "h"),
              helper.make_node("QuantizeLinear", ["h", "y_s", "y_z"], ["y_q"]),
              helper.make_node("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"])]
    int8 = _model(nodes, graph_inputs, graph_output, inits, max(opset, 13))
    float_out = None
    if node.op_type in ("MatMul", "Gemm") and any(n in consts for n in node.input[:2]):
        # int8 inputs, float output (MatMulIntegerToFloat / QGemm): no output conversion to pay
        nodes = [*nodes[:-3], renamed(node, new_inputs, "y")]
        float_out = _model(nodes, graph_inputs, graph_output, inits[:-2], max(opset, 13))
    return fp32, int8, float_out


def _model(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="speed-limit")
    model.ir_version = 8
    return model


@dataclass
class LayerTime:
    fp32_ms: float  # the fp32 kernel(s), without NCHWc reorders at the model's edge
    int8_ms: float  # the int8 kernel
    in_ms: float  # conversions before it (Q, layout), per activation input
    out_ms: float  # conversions after it (layout, DQ)
    int8_ops: list[str]
    fused: bool


def time_layer(fp32: onnx.ModelProto, int8: onnx.ModelProto, float_out: onnx.ModelProto | None, feed: dict,
               tmp: Path, budget_s: float, flush: np.ndarray | None = None) -> LayerTime:
    """fp32 kernel, int8 kernel and its conversions; with ``float_out`` (MatMul/Gemm) the output conversion is
    the cheaper of Q/DQ after the kernel and the extra cost of the kernel that writes float itself."""
    forms = [fp32, int8] + ([float_out] if float_out is not None else [])
    paths = [tmp / f"form{i}.onnx" for i in range(len(forms))]
    for form, path in zip(forms, paths, strict=True):
        onnx.save(form, str(path))
    f_nodes, q_nodes, *rest = interleaved_profiles(paths, [feed] * len(paths), tmp, budget_s=budget_s, flush=flush)
    fp32_ms = sum(n.ms for n in f_nodes if n.op not in CONVERSIONS)
    kernels = [n for n in q_nodes if n.op not in CONVERSIONS]
    first = min(n.order for n in kernels) if kernels else 0
    last = max(n.order for n in kernels) if kernels else 0
    in_ms = sum(n.ms for n in q_nodes if n.op in CONVERSIONS and n.order < first)
    out_ms = sum(n.ms for n in q_nodes if n.op in CONVERSIONS and n.order > last)
    ops = sorted({n.op for n in kernels})
    fused = bool(kernels) and all(n.op.startswith(INT8_KERNELS) or n.int8_input for n in kernels)
    int8_ms = sum(n.ms for n in kernels)
    if rest:
        f_kernels = [n for n in rest[0] if n.op not in CONVERSIONS]
        if f_kernels and all(n.op.startswith(INT8_KERNELS) for n in f_kernels):
            out_ms = min(out_ms, max(0.0, sum(n.ms for n in f_kernels) - int8_ms))
            ops = sorted({*ops, *(n.op for n in f_kernels)})
    return LayerTime(fp32_ms, int8_ms, in_ms / max(len(feed), 1), out_ms, ops, fused)


def _shape_key(layer: Layer, consts: dict, values: dict) -> str:
    node = layer.node
    attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
    shapes = [tuple(values[n].shape) if n in values else tuple(consts[n].shape) if n in consts else ()
              for n in node.input]
    return json.dumps([node.op_type, attrs, [list(s) for s in shapes], layer.act.op_type if layer.act else ""])


# ---------------------------------------------------------------- the limit


def choose(layers: list[Layer], times: dict[str, LayerTime]) -> dict[str, bool]:
    """Per op: int8 or fp32, for the least total time (own time + conversions at float/int8 boundaries).
    Local search by single flips (each flip priced on the op and its neighbours), from two starts: every op
    that is faster alone in int8, and every op with an int8 kernel (chains that pay only as a whole)."""
    neighbours: dict[str, set[str]] = {layer.name: set() for layer in layers}
    for layer in layers:
        for other in (*layer.sources, *layer.consumers, *(n for names in layer.siblings.values() for n in names)):
            if other in neighbours and other != layer.name:
                neighbours[layer.name].add(other)
                neighbours[other].add(layer.name)
    by_name = {layer.name: layer for layer in layers}

    def cost(names, int8: dict[str, bool]) -> float:
        total = 0.0
        for name in names:
            t = times[name]
            total += t.int8_ms + conversions(by_name[name], int8, t) if int8[name] else t.fp32_ms
        return total

    def descend(int8: dict[str, bool]) -> dict[str, bool]:
        for _ in range(50):
            changed = False
            for layer in layers:
                if not times[layer.name].fused:
                    continue
                around = {layer.name, *neighbours[layer.name]}
                before = cost(around, int8)
                int8[layer.name] = not int8[layer.name]
                if cost(around, int8) < before - 1e-9:
                    changed = True
                else:
                    int8[layer.name] = not int8[layer.name]
            if not changed:
                break
        return int8

    alone = descend({n.name: times[n.name].fused and times[n.name].int8_ms < times[n.name].fp32_ms for n in layers})
    every = descend({n.name: times[n.name].fused for n in layers})
    return min(alone, every, key=lambda int8: cost(by_name, int8))


def conversions(layer: Layer, int8: dict[str, bool], t: LayerTime, assume_int8: bool = False) -> float:
    """Q on each input no int8 layer makes (shared by the int8 layers reading that tensor: one Q feeds them
    all); DQ on the output when anything but int8 layers reads it."""
    if not (assume_int8 or int8[layer.name]):
        return 0.0
    cost = 0.0
    for name, source in zip(layer.inputs, layer.sources, strict=True):
        if not int8.get(source, False):
            sharing = sum(1 for other in layer.siblings.get(name, ()) if int8.get(other, False))
            cost += t.in_ms / (1 + sharing)
    if not layer.consumers or not all(int8.get(c, False) for c in layer.consumers):
        cost += t.out_ms
    return cost


def limit_of(layers: list[Layer], times: dict[str, LayerTime], fp32_ms: float, share: float,
             reorder_share: float) -> tuple[dict, dict]:
    """The limit when ``layers`` may run in int8 and everything else runs as in fp32. ``share``: the part of
    the fp32 model's profiled time those layers take (the isolated times are scaled to it); ``reorder_share``:
    the fp32 model's NCHWc layout reorders, which only its float convolutions need (kept in proportion to the
    convolution time that stays fp32)."""
    int8 = choose(layers, times)
    fp32_sum = sum(times[n.name].fp32_ms for n in layers)
    conv_sum = sum(conversions(n, int8, times[n.name]) for n in layers if int8[n.name])
    best_sum = conv_sum + sum(times[n.name].int8_ms if int8[n.name] else times[n.name].fp32_ms for n in layers)
    convs = [n for n in layers if n.node.op_type in ("Conv", "ConvTranspose")]
    conv_fp32 = sum(times[n.name].fp32_ms for n in convs)
    float_convs = sum(times[n.name].fp32_ms for n in convs if not int8[n.name]) / conv_fp32 if conv_fp32 else 1.0
    covered_ms, reorder_ms = fp32_ms * share, fp32_ms * reorder_share
    scale = covered_ms / fp32_sum if fp32_sum else 0.0
    rest_ms = fp32_ms - covered_ms - reorder_ms
    limit_ms = rest_ms + reorder_ms * float_convs + best_sum * scale
    return {"limit_ms": round(limit_ms, 4), "limit_speedup": round(fp32_ms / limit_ms, 3),
            "rest_ms": round(rest_ms, 4), "reorder_fp32_ms": round(reorder_ms, 4),
            "reorder_kept_ms": round(reorder_ms * float_convs, 4), "covered_fp32_ms_in_model": round(covered_ms, 4),
            "covered_fp32_ms_isolated": round(fp32_sum, 4), "isolated_to_model_scale": round(scale, 3),
            "covered_best_ms": round(best_sum * scale, 4), "conversions_ms": round(conv_sum * scale, 4),
            "layers": len(layers), "layers_int8": sum(int8.values()),
            "layers_without_int8_kernel": sum(1 for n in layers if not times[n.name].fused)}, int8


# ---------------------------------------------------------------- one model


def work_dir(name: str) -> Path:
    n_calib, n_eval = DEFAULT_SAMPLES[name]
    return models.CACHE / "work" / f"{name}-{n_calib}-{n_eval}"


def saved_rows(name: str) -> dict[str, dict]:
    spec = models.MODELS[name]
    path = (RESULTS if spec.suite == "main" else UNSEEN) / f"{name}.json"
    if not path.exists():
        return {}
    return {row["id"]: row for row in json.loads(path.read_text()).get("rows", [])}


def candidate_models(name: str, fp32: Path, onnxq_results: Path | None = None) -> tuple[dict[str, Path], dict]:
    """fp32, onnxq's rows and the peers' models the bench left in the work folder (rows that ran ok), and the
    bench's rows of them. ``onnxq_results``: a `bench.run --results DIR --work W` folder whose onnxq rows and
    models (in W) replace the bench's (e.g. made under bench/cpu_mask for another CPU class)."""
    rows, work = saved_rows(name), work_dir(name)
    if onnxq_results is not None:
        res = json.loads((onnxq_results / f"{name}.json").read_text())
        theirs = {row["id"]: {**row, "model_file": str(models.REPO / res["work"] / f"{row['id']}.onnx")}
                  for row in res.get("rows", []) if row["id"] in MODEL_ROWS}
        rows = {**{cid: row for cid, row in rows.items() if cid not in MODEL_ROWS}, **theirs}
    found = {"fp32": fp32}
    for cid in sorted(rows):
        path = Path(rows[cid].get("model_file") or work / f"{cid}.onnx")
        if (cid in MODEL_ROWS or cid.startswith(PEER_PREFIXES)) and rows[cid].get("status") == "ok" and path.exists():
            found[cid] = path
    return found, rows


def command() -> str:
    """This run's command line, with the bench/cpu_mask prefix when it runs under a mask."""
    mask = os.environ.get("ONNXQ_CPUID_MASK")
    return (f"python -m bench.cpu_mask {mask} -- " if mask else "") + "python -m bench.speed_limit " + " ".join(
        sys.argv[1:])


def run_model(name: str, tmp: Path, *, budget_s: float, rounds: int, extra: dict[str, Path] | None = None,
              compare_only: bool = False, onnxq_results: Path | None = None, log=print) -> dict:
    spec = models.MODELS[name]
    fp32 = models.prepare(spec)
    n_calib, n_eval = DEFAULT_SAMPLES[name]
    data = datasets.build(spec.name, spec.task, fp32, n_calib, n_eval, data=spec.data)
    feed = datasets.load_feeds(data.eval)[0]
    t0 = time.perf_counter()

    # 1. side by side: fp32, onnxq, peers (1 thread, batch 1): wall-clock medians, then onnxruntime's profile
    found, rows = candidate_models(name, fp32, onnxq_results)
    onnxq_command = (json.loads((onnxq_results / f"{name}.json").read_text())["command"]
                     if onnxq_results is not None else None)
    candidates = {"fp32": fp32, **(extra or {})} if compare_only else {**found, **(extra or {})}
    wall = metrics.latency(candidates, feed, threads=1, rounds=rounds)
    wall_speedups = {cid: round(wall["fp32"] / ms, 3) for cid, ms in wall.items()}
    inputs = {i.name for i in session(fp32).get_inputs()}
    feed = {k: v for k, v in feed.items() if k in inputs}
    timed = interleaved_profiles(list(candidates.values()), [feed] * len(candidates), tmp, warmup=2, min_rounds=7,
                                 max_rounds=40, budget_s=4.0)
    profiles = dict(zip(candidates, timed, strict=True))
    kernel_ms = {cid: round(sum(n.ms for n in nodes), 4) for cid, nodes in profiles.items()}
    speedups = {cid: round(kernel_ms["fp32"] / ms, 3) for cid, ms in kernel_ms.items()}
    fp32_ms = kernel_ms["fp32"]
    log(f"{name}: fp32 {fp32_ms:.2f} ms (kernels; wall {wall['fp32']:.2f}); "
        + ", ".join(f"{k} {v:.2f}x (wall {wall_speedups.get(k, 0):.2f}x)" for k, v in speedups.items() if k != "fp32"))

    if compare_only:
        return {"model": name, "cpu_class": host_cpu().cpu_class, "command": command(), "threads": 1, "batch": 1,
                "fp32_ms": fp32_ms, "kernel_ms": kernel_ms,
                "speedup": speedups, "wall_ms": wall, "wall_speedup": wall_speedups,
                "task": task_agreement(spec, data, fp32, extra or {}),
                "profile_by_op": {cid: by_op(nodes) for cid, nodes in profiles.items()}}

    # 2. the share of the fp32 model's time the ops below take as onnxruntime runs it
    fp32_nodes = profiles["fp32"]
    total = sum(n.ms for n in fp32_nodes)
    heavy_share = sum(n.ms for n in fp32_nodes if n.op in HEAVY_KERNELS) / total if total else 0.0
    covered_share = sum(n.ms for n in fp32_nodes if n.op in COVERED_KERNELS) / total if total else 0.0
    reorder_share = sum(n.ms for n in fp32_nodes if n.op in REORDERS) / total if total else 0.0

    # 3. every op with an int8 kernel alone, fp32 and int8
    prepared = prepare_model(load_model(fp32), source=fp32).model
    layers = op_layers(prepared)
    consts = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    needed = {n for layer in layers for n in (*layer.inputs, layer.output)}
    values = real_values(prepared, needed, feed, tmp)
    opset = next(o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx"))
    times: dict[str, LayerTime] = {}
    cache: dict[str, LayerTime] = {}
    # weights of a model larger than the caches come from memory in every run: so in the layer timing too
    # (heavy layers with a constant weight; the light ops' inputs are the previous op's output, in the caches)
    cold = fp32.stat().st_size > COLD_WEIGHTS_BYTES
    flush = np.zeros(FLUSH_BYTES // 4, np.float32) if cold else None
    skipped = []
    for layer in layers:
        # no value, or one a uint8 range cannot hold (MPNet's relative-position buckets take log(0) = -inf):
        # that op stays fp32, at its cost in the fp32 model
        if any(n not in values or not np.isfinite(values[n]).all() for n in (*layer.inputs, layer.output)):
            skipped.append(layer.name)
            continue
        key = _shape_key(layer, consts, values)
        if key not in cache:
            forms = layer_models(layer, consts, values, opset)
            weighted = layer.node.op_type in HEAVY_OPS and any(n in consts for n in layer.node.input[1:2])
            cache[key] = time_layer(*forms, {n: values[n] for n in layer.inputs}, tmp, budget_s,
                                    flush if weighted else None)
        times[layer.name] = cache[key]
    layers = [layer for layer in layers if layer.name in times]
    limit, int8 = limit_of(layers, times, fp32_ms, covered_share, reorder_share)
    heavy_limit, _ = limit_of([n for n in layers if n.node.op_type in HEAVY_OPS], times, fp32_ms, heavy_share,
                              reorder_share)
    log(f"{name}: {len(layers)} layers ({len(cache)} shapes timed), limit {limit['limit_speedup']:.2f}x "
        f"(heavy layers only: {heavy_limit['limit_speedup']:.2f}x), {time.perf_counter() - t0:.0f} s")

    peers = {cid: s for cid, s in speedups.items() if cid.startswith(PEER_PREFIXES)}
    best_peer = max(peers, key=peers.get) if peers else None
    agreement = {cid: report.fp32_agreement(rows.get(cid), spec.task) for cid in speedups}
    # a row measured on another CPU class (the bench's peers under a cpuid mask: AVX2's int8 kernel saturates
    # where VNNI's does not) has its agreement with fp32 measured again here, on this class's kernels
    here = host_cpu().cpu_class
    elsewhere = {cid: candidates[cid] for cid in speedups if cid != "fp32" and cid in rows
                 and rows[cid].get("status") == "ok" and rows[cid].get("cpu_class") != here}
    measured = task_agreement(spec, data, fp32, elsewhere) if elsewhere else {}
    agreement.update({cid: m["fp32_agreement"] for cid, m in measured.items()})
    result = {
        "model": name, "cpu_class": host_cpu().cpu_class, "machine": report.machine(),
        "cpuid_mask": os.environ.get("ONNXQ_CPUID_MASK"), "date": time.strftime("%Y-%m-%d"), "command": command(),
        "onnxq_models_command": onnxq_command,
        "feed": {k: list(v.shape) for k, v in feed.items()}, "threads": 1, "batch": 1,
        "fp32_ms": fp32_ms, "kernel_ms": kernel_ms, "speedup": speedups, "wall_ms": wall,
        "wall_speedup": wall_speedups, "fp32_agreement": agreement, "agreement_measured_here": sorted(measured),
        "models": {cid: str(path) for cid, path in candidates.items()},
        "best_peer": best_peer, "best_peer_speedup": peers.get(best_peer),
        "cold_weights": cold, "heavy_share_of_fp32": round(heavy_share, 4),
        "covered_share_of_fp32": round(covered_share, 4), "reorder_share_of_fp32": round(reorder_share, 4), **limit,
        "heavy_only": heavy_limit,
        "onnxq_default_of_limit": _share(speedups.get("onnxq-default"), limit["limit_speedup"]),
        "onnxq_fast_of_limit": _share(speedups.get("onnxq-fast"), limit["limit_speedup"]),
        "best_peer_of_limit": _share(peers.get(best_peer), limit["limit_speedup"]),
        "skipped_layers": skipped,
        "layer_times": [{"layer": n.name, "op": n.node.op_type, "act": n.act.op_type if n.act else None,
                         "input_shapes": [list(values[i].shape) for i in n.inputs],
                         "fp32_ms": round(times[n.name].fp32_ms, 4), "int8_ms": round(times[n.name].int8_ms, 4),
                         "in_conversion_ms": round(times[n.name].in_ms, 4),
                         "out_conversion_ms": round(times[n.name].out_ms, 4),
                         "int8_kernels": times[n.name].int8_ops, "limit_int8": int8[n.name]} for n in layers],
        "profile_by_op": {cid: by_op(nodes) for cid, nodes in profiles.items()},
        "elapsed_s": round(time.perf_counter() - t0, 1)}
    return result


def task_agreement(spec: models.ModelSpec, data: datasets.DataSet, fp32: Path, paths: dict[str, Path]) -> dict:
    """The bench's task metrics (bench.run.task_metrics) of each model on the held-back samples."""
    from bench.run import task_metrics

    eval_feeds = datasets.load_feeds(data.eval)
    ref = metrics.run_all(metrics.session(fp32), eval_feeds)
    _, ref_extra = task_metrics(spec, fp32, ref, ref, data, None, eval_feeds)
    out = {}
    for label, path in paths.items():
        got = metrics.run_all(metrics.session(path), eval_feeds)
        task, _ = task_metrics(spec, path, ref, got, data, ref_extra, eval_feeds)
        out[label] = {"task": task, "fidelity": metrics.fidelity(ref, got),
                      "fp32_agreement": report.fp32_agreement({"status": "ok", "task": task}, spec.task)}
    return out


def _share(speedup: float | None, limit: float) -> float | None:
    return None if speedup is None else round(speedup / limit, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated bench model names")
    parser.add_argument("--layer-budget-s", type=float, default=0.3, help="timing budget per layer shape")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the whole-model timing")
    parser.add_argument("--results", type=Path, default=LIMIT_RESULTS)
    parser.add_argument("--onnxq-results", type=Path, metavar="DIR",
                        help="onnxq's default and --fast rows and models from this `bench.run --results DIR --work W` "
                        "folder instead of the bench's (e.g. made under bench/cpu_mask for another CPU class); peers "
                        "stay the bench's")
    parser.add_argument("--compare-only", action="store_true",
                        help="only fp32 and the --extra models side by side, with their task metrics (no limit)")
    parser.add_argument("--extra", action="append", default=[], metavar="MODEL:LABEL=PATH",
                        help="another model file to time side by side with that model's rows (e.g. a change's output)")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        if name not in models.MODELS:
            parser.error(f"unknown model {name}")
    extras: dict[str, dict[str, Path]] = defaultdict(dict)
    for item in args.extra:
        model_label, _, path = item.partition("=")
        model, _, label = model_label.partition(":")
        if not (model and label and path):
            parser.error(f"--extra wants MODEL:LABEL=PATH, got {item}")
        extras[model][label] = Path(path)
    failed = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="onnxq-limit-") as tmp:
            try:
                result = run_model(name, Path(tmp), budget_s=args.layer_budget_s, rounds=args.rounds,
                                   extra=extras.get(name), compare_only=args.compare_only,
                                   onnxq_results=args.onnxq_results)
            except Exception as exc:  # one model's failure is reported, the others still run
                print(f"{name}: failed: {type(exc).__name__}: {exc}"[:2000], file=sys.stderr)
                failed.append(name)
                continue
        suffix = "-compare" if args.compare_only else ""
        (args.results / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
