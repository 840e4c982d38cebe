"""`convert`: a model that already has QuantizeLinear/DequantizeLinear (a QAT export) to onnxq's int8 form.

Quantization-aware training exports (PyTorch, TensorFlow) carry learned scales and zero points
in Q/DQ pairs, but not where onnxruntime fuses them: fake-quant Q->DQ on float weights, pairs
after Relu, on graph outputs, behind shared Identity zero points. This module

1. reads every pair's parameters (validating them) and strips the pairs, which gives back the
   float graph the training ran (weights replaced by their fake-quantized values) plus a table
   of learned parameters by tensor name;
2. places pairs on that float graph with onnxq's own placement (onnxq.placement), taking each
   placed tensor's parameters from the table: its own, its shared-scale group's, or those of the
   input of a Relu it follows. A tensor with none was left float by the input model (onnxruntime's
   quantize_static leaves e.g. a ReduceMean float): by default every node that would read or write it
   quantized stays float too, as in the input; `calibrate_missing` calibrates such tensors instead;
3. writes the QuantPlan with onnxq's writers (QDQ, or QOperator on top of it).

Weights keep their learned integers exactly: the stripped graph holds dequantize(quantize(w)),
which the writer quantizes back with the same parameters.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__, qmath
from .calibrate import collect_statistics
from .cpu import default_weight_range, host_cpu
from .data import model_input_specs, open_source
from .enums import Format
from .errors import ModelError, UsageError
from .evaluate import compare_models
from .ir import NameAllocator, constant_values, export_model, import_graph, is_constant, node_label
from .model_io import load_model, save_model
from .ops import FOLDABLE_ACTIVATIONS, MATMUL_OPS, PASS_THROUGH_OPS
from .paths import DATA, MODEL, MODEL_OUTPUT, PathArg, check_paths
from .pipeline import DataOptions, check_batch_size, check_written_model
from .placement import Placement, PlacementOptions, place
from .plan import QuantPlan, QuantSettings, TensorPlan, bias_plan, clipped_fraction, weight_plan
from .prepare import infer_types, prepare_model
from .ranges import DEFAULT_METHOD, DEFAULT_PERCENTILE, compute_range
from .report import TIMINGS, fidelity_section, json_safe, report_header
from .rewrite_qdq import write_qdq
from .rewrite_qop import write_qoperator
from .session import ProgressFactory, no_progress

ACTIVATION_TYPES = ("keep", "uint8", "int8")
EVAL_LIMIT = 256  # samples the fidelity comparison runs on at most


@dataclass
class ConvertRequest:
    model: Path
    output: Path
    output_format: str = "qdq"  # or "qoperator"
    # uint8: every activation as uint8 (a learned int8 one with its zero point moved by 128: the same values, in
    # the type onnxruntime's x86 kernels fuse); int8: the other way; keep: each learned type as it is
    activations: str = "uint8"
    data: DataOptions = field(default_factory=DataOptions)
    method: str = DEFAULT_METHOD  # for tensors that have to be calibrated
    percentile: float = DEFAULT_PERCENTILE
    calibrate_missing: bool = False  # calibrate tensors the input left float (default: their nodes stay float)


@dataclass
class ConvertResult:
    report: dict
    plan: QuantPlan


@dataclass(frozen=True)
class Learned:
    """Parameters read from one Q/DQ pair (or a DequantizeLinear of stored integers)."""

    qtype: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None  # None: per tensor
    node: str  # where they were read, for messages

    def same_as(self, other: Learned) -> bool:
        return (self.qtype, self.scale, self.zero_point, self.axis) == (other.qtype, other.scale,
                                                                        other.zero_point, other.axis)

    def as_type(self, qtype: str) -> Learned:
        """The same quantization grid in another 8-bit type: uint8 zero point z is int8 z - 128."""
        if qtype == self.qtype:
            return self
        shift = {("uint8", "int8"): -128, ("int8", "uint8"): 128}[(self.qtype, qtype)]
        return Learned(qtype, self.scale, tuple(z + shift for z in self.zero_point), self.axis, self.node)


# ------------------------------------------------------------------ reading parameters


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    """A tensor's value if it is constant: an initializer, a Constant node, or an Identity of either."""
    if is_constant(tensor):
        return constant_values(tensor)
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Identity":
            return _constant(producer.inputs[0])
        if producer.op == "Constant" and isinstance(producer.attrs.get("value"), gs.Constant):
            return np.asarray(producer.attrs["value"].values)
    return None


def read_params(node: gs.Node, data_dtype: np.dtype | None = None) -> Learned:
    """The scale, zero point and axis of a QuantizeLinear/DequantizeLinear, checked (ModelError naming the node).

    `data_dtype` is the stored integers' type (a DequantizeLinear of stored integers, whose zero point may be
    omitted).
    """
    label = f"{node.op} {node_label(node)}"
    if node.attrs.get("block_size", 0):
        raise ModelError(f"{label}: block-wise quantization (block_size) is not supported")
    scale = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        raise ModelError(f"{label}: the scale is not a constant")
    zero = _constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if len(node.inputs) > 2 and node.inputs[2].name and zero is None:
        raise ModelError(f"{label}: the zero point is not a constant")
    if zero is None:  # omitted: zero of the quantized type (uint8 for QuantizeLinear)
        output_dtype = node.attrs.get("output_dtype", 0)  # opset 21: the type without a zero point
        if data_dtype is None and output_dtype:
            data_dtype = onnx.helper.tensor_dtype_to_np_dtype(output_dtype)
        zero = np.zeros(scale.shape, dtype=data_dtype if data_dtype is not None else np.uint8)
    qtype = _qtype_of(zero.dtype, label)
    if qtype.name == "int32" and data_dtype is None:
        raise ModelError(f"{label}: unsupported quantized type int32 (only stored biases may be int32)")
    if scale.dtype.kind != "f":
        raise ModelError(f"{label}: the scale has type {scale.dtype}, expected a float type")
    scale = scale.astype(np.float32)
    if scale.ndim > 1 or zero.ndim > 1 or scale.size != zero.size or scale.size == 0:
        raise ModelError(f"{label}: scale {list(scale.shape)} and zero point {list(zero.shape)} shapes do not "
                         "match (expected both scalars or both 1-D of the same length)")
    bad = ~np.isfinite(scale) | (scale <= 0)
    if bad.any():
        raise ModelError(f"{label}: scale {float(scale.reshape(-1)[int(np.argmax(bad))])} is not a positive finite "
                         "number")
    zeros = zero.astype(np.int64).reshape(-1)
    if zeros.min() < qtype.qmin or zeros.max() > qtype.qmax:
        raise ModelError(f"{label}: zero point outside the {qtype.name} range [{qtype.qmin}, {qtype.qmax}]")
    if qtype.name == "int32" and zeros.any():
        raise ModelError(f"{label}: an int32 (bias) zero point must be 0")
    axis = _axis(node, scale, label)
    return Learned(qtype.name, tuple(float(s) for s in scale.reshape(-1)), tuple(int(z) for z in zeros), axis,
                   label)


def _qtype_of(dtype: np.dtype, label: str) -> qmath.QType:
    for qtype in (qmath.UINT8, qmath.INT8, qmath.INT32):
        if np.dtype(dtype) == qtype.dtype:
            return qtype
    raise ModelError(f"{label}: unsupported quantized type {np.dtype(dtype)} (onnxq converts uint8/int8 tensors "
                     "and int32 biases)")


def _axis(node: gs.Node, scale: np.ndarray, label: str) -> int | None:
    """Per-channel axis (normalised, checked against the tensor's shape when known), or None for per-tensor."""
    if scale.size == 1:
        return None  # a 1-element scale, scalar or [1], quantizes the whole tensor
    shape = _shape(node.inputs[0])
    axis = int(node.attrs.get("axis", 1))
    if shape is None:
        if axis < 0:
            raise ModelError(f"{label}: negative axis {axis} on a tensor of unknown rank")
        return axis
    if not -len(shape) <= axis < len(shape):
        raise ModelError(f"{label}: axis {axis} is out of range for a tensor of rank {len(shape)}")
    axis %= len(shape)
    if isinstance(shape[axis], int) and shape[axis] != scale.size:
        raise ModelError(f"{label}: {scale.size} per-channel scales for axis {axis} of size {shape[axis]}")
    return axis


def _shape(tensor: gs.Tensor) -> list | None:
    values = _constant(tensor)
    if values is not None:
        return list(values.shape)
    return list(tensor.shape) if tensor.shape is not None else None


# ------------------------------------------------------------------ stripping the pairs


@dataclass
class Stripped:
    """The float graph without Q/DQ, and what the pairs said."""

    model: onnx.ModelProto
    learned: dict[str, Learned] = field(default_factory=dict)
    folded_weights: list[str] = field(default_factory=list)  # fake-quant on float weights
    stored_weights: list[str] = field(default_factory=list)  # DequantizeLinear of stored integers
    notes: list[str] = field(default_factory=list)


def strip_qdq(model: onnx.ModelProto) -> Stripped:
    """Remove every Q/DQ pair, keeping the values the model computes (see the module docstring)."""
    graph = import_graph(infer_types(model))
    names = NameAllocator(graph)
    result = Stripped(model)
    outputs = {t.name for t in graph.outputs}
    clipped = _drop_integer_clips(graph, outputs)
    if clipped:
        result.notes.append(f"{len(clipped)} integer Clip(s) between QuantizeLinear and DequantizeLinear dropped "
                            f"(PyTorch's reduced activation range, e.g. {clipped[0]}): the int8 kernels use the "
                            "full range with the learned scale and zero point")
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        users = q.outputs[0].outputs
        if q.outputs[0].name in outputs or any(u.op != "DequantizeLinear" for u in users):
            raise ModelError(f"QuantizeLinear {node_label(q)}: its integer output is used other than by "
                             "DequantizeLinear (integer outputs and integer ops are not supported)")
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        _strip_dequantize(graph, dq, names, outputs, result)
    result.model = export_model(graph, model)
    return result


def _drop_integer_clips(graph: gs.Graph, outputs: set[str]) -> list[str]:
    """Remove Clip nodes on an activation's integers between its QuantizeLinear and DequantizeLinears.

    PyTorch exports fake-quant with quant range (0, 127), its x86 reduced range for activations,
    as QuantizeLinear -> Clip(0, 127) -> DequantizeLinear. The learned scale and zero point stay;
    only values above the 7-bit bound are no longer clipped. Returns "node: [lo, hi]" per Clip.
    """
    dropped = []
    for clip in [n for n in graph.nodes if n.op == "Clip"]:
        integers = clip.inputs[0]
        quantize = integers.inputs[0] if integers.inputs else None
        users = clip.outputs[0].outputs
        if (quantize is None or quantize.op != "QuantizeLinear" or clip.outputs[0].name in outputs
                or not users or any(u.op != "DequantizeLinear" for u in users)):
            continue
        label = node_label(quantize)
        if _constant(quantize.inputs[0]) is not None:
            raise ModelError(f"QuantizeLinear {label}: a Clip between a weight's QuantizeLinear and "
                             "DequantizeLinear is not supported (only activations may have a reduced range)")
        qtype = qmath.qtype_by_name(read_params(quantize).qtype)
        bounds = []
        for index, default in ((1, qtype.qmin), (2, qtype.qmax)):
            given = clip.inputs[index] if len(clip.inputs) > index and clip.inputs[index].name else None
            value = default if given is None else _constant(given)
            if value is None:
                raise ModelError(f"Clip {node_label(clip)} after QuantizeLinear {label}: min and max must be "
                                 "constants")
            bounds.append(int(value))
        for user in users:
            user.inputs[0] = integers
        clip.inputs.clear()
        clip.outputs.clear()
        dropped.append(f"{node_label(clip)}: [{bounds[0]}, {bounds[1]}]")
    return dropped


def _strip_dequantize(graph: gs.Graph, dq: gs.Node, names: NameAllocator, outputs: set[str],
                      result: Stripped) -> None:
    quantized, restored = dq.inputs[0], dq.outputs[0]
    if restored.name in outputs and _constant(quantized) is not None:
        raise ModelError(f"DequantizeLinear {node_label(dq)}: a dequantized constant as a graph output is not "
                         "supported")
    stored = _constant(quantized)
    if stored is not None:  # DequantizeLinear of stored integers: a weight or bias
        params = read_params(dq, stored.dtype)
        values = _fake_quantized(None, stored, params)
        name = _to_constant(dq, gs.Constant(names.new(f"{quantized.name}_float"), values))
        _remember(result, name, params)
        result.stored_weights.append(name)
        return
    quantize = quantized.inputs[0] if quantized.inputs else None
    if quantize is None or quantize.op != "QuantizeLinear":
        raise ModelError(f"DequantizeLinear {node_label(dq)}: its input is neither stored integers nor a "
                         "QuantizeLinear output (integer model inputs are not supported)")
    q_params, params = read_params(quantize), read_params(dq)
    if not params.same_as(q_params):
        raise ModelError(f"DequantizeLinear {node_label(dq)}: parameters differ from those of its "
                         f"QuantizeLinear {node_label(quantize)} (a requantization, not a fake-quant pair)")
    source = quantize.inputs[0]
    weight = _constant(source)
    if weight is not None:  # fake-quant on a float weight: keep the values training saw
        values = _fake_quantized(weight, None, params)
        only_here = is_constant(source) and all(c is quantize for c in source.outputs) and all(
            c.op == "DequantizeLinear" for c in quantized.outputs)
        if only_here:  # the weight keeps its name (quantizing fake-quantized values again changes nothing)
            source.values = values
            name = _to_constant(dq, source)
        else:
            name = _to_constant(dq, gs.Constant(names.new(f"{source.name}_fakequant"), values))
        _remember(result, name, q_params)
        result.folded_weights.append(name)
        return
    _remember(result, _drop_activation_pair(graph, dq, quantize, source, restored, outputs), q_params)


def _fake_quantized(weight: np.ndarray | None, stored: np.ndarray | None, params: Learned) -> np.ndarray:
    """dequantize(quantize(weight)) for a fake-quant weight, dequantize(stored) for stored integers."""
    ndim = (weight if weight is not None else stored).ndim
    shape: tuple[int, ...] = ()
    if params.axis is not None:
        if params.axis >= ndim:
            raise ModelError(f"{params.node}: axis {params.axis} is out of range for a weight of rank {ndim}")
        shape = tuple(len(params.scale) if i == params.axis else 1 for i in range(ndim))
    scale = np.asarray(params.scale, np.float32).reshape(shape)
    zero = np.asarray(params.zero_point, np.int64).reshape(shape)
    if stored is None:
        stored = qmath.quantize(weight, scale, zero, qmath.qtype_by_name(params.qtype))
    return qmath.dequantize(stored, scale, zero)


def _to_constant(dq: gs.Node, constant: gs.Constant) -> str:
    """Consumers of `dq` read the float constant instead; returns its name."""
    restored = dq.outputs[0]
    for consumer in list(restored.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is restored:
                consumer.inputs[index] = constant
    dq.inputs.clear()
    dq.outputs.clear()
    return constant.name


def _drop_activation_pair(graph: gs.Graph, dq: gs.Node, quantize: gs.Node, source: gs.Tensor,
                          restored: gs.Tensor, outputs: set[str]) -> str:
    """Drop a Q->DQ pair on an activation; returns the name the float tensor keeps.

    The dequantized name survives where it can (it is what onnxq's own writer restores, and
    graph outputs must keep theirs): the producer then writes it directly.
    """
    dq.inputs.clear()
    dq.outputs.clear()
    if not quantize.outputs[0].outputs:  # the last DequantizeLinear of this QuantizeLinear
        quantize.inputs.clear()
        quantize.outputs.clear()
    if source.inputs and not source.outputs and source.name not in outputs:
        producer = source.inputs[0]
        producer.outputs[producer.outputs.index(source)] = restored
        return restored.name
    if restored.name in outputs:
        graph.nodes.append(gs.Node("Identity", inputs=[source], outputs=[restored]))
        return source.name
    for consumer in list(restored.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is restored:
                consumer.inputs[index] = source
    return source.name


def _remember(result: Stripped, name: str, params: Learned) -> None:
    known = result.learned.get(name)
    if known is not None and not known.same_as(params):
        raise ModelError(f"tensor {name} is quantized twice with different parameters ({known.node} and "
                         f"{params.node})")
    result.learned[name] = params


# ------------------------------------------------------------------ the plan


@dataclass
class Origins:
    learned: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)  # took a neighbour's learned parameters
    calibrated: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)  # weights/biases onnxq quantized itself
    converted: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)


def _learned_for(tensors: dict[str, gs.Tensor], name: str, root: str, group: list[str],
                 learned: dict[str, Learned]) -> tuple[Learned | None, str]:
    """Parameters for a placed activation: its own, its shared-scale group's, or its Relu input's.

    Relu(DQ(Q(x))) equals DQ(Q(Relu(x))) with the same parameters (Q is monotone and Q(0) is the
    zero point), so a pair before a Relu serves the Relu's output.
    """
    for candidate in (name, root, *group):
        if candidate in learned:
            return learned[candidate], candidate
    tensor = tensors.get(name)
    if tensor is not None and tensor.inputs and tensor.inputs[0].op in FOLDABLE_ACTIVATIONS | PASS_THROUGH_OPS:
        upstream = tensor.inputs[0].inputs[0].name
        if upstream in learned:
            return learned[upstream], upstream
    return None, ""


def build_convert_plan(graph: gs.Graph, placement: Placement, learned: dict[str, Learned], target: str,
                       calibrated: dict[str, TensorPlan], weight_settings: QuantSettings
                       ) -> tuple[QuantPlan, Origins]:
    """The plan: learned parameters where the QAT model has them, calibrated ones elsewhere."""
    origins = Origins()
    plan = QuantPlan(settings=weight_settings, nodes=list(placement.nodes))
    groups: dict[str, list[str]] = {}
    for name, root in sorted(placement.activations.items()):
        groups.setdefault(root, []).append(name)
    used: set[str] = set()
    constants = graph.tensors()
    for name, root in sorted(placement.activations.items()):
        params, where = _learned_for(constants, name, root, groups[root], learned)
        if params is None:
            plan.tensors[name] = TensorPlan(**{**calibrated[root].__dict__, "name": name})
            origins.calibrated.append(name)
            continue
        used.add(where)
        (origins.learned if where == name else origins.shared).append(name)
        wanted = params.qtype if target == "keep" else target
        if wanted != params.qtype:
            origins.converted.append({"tensor": name, "from": params.qtype, "to": wanted})
        params = params.as_type(wanted)
        plan.tensors[name] = TensorPlan(name=name, role="activation", qtype=params.qtype, scale=list(params.scale),
                                        zero_point=list(params.zero_point), source=where or root)
    for name, target_weight in sorted(placement.weights.items()):
        if name in learned:
            used.add(name)
            params = learned[name]
            if params.axis is not None and params.axis != target_weight.axis:
                raise ModelError(f"{params.node}: weight {name} has per-channel scales on axis {params.axis}, but "
                                 f"its int8 kernel needs them on the output-channel axis {target_weight.axis}")
            plan.tensors[name] = TensorPlan(name=name, role="weight", qtype=params.qtype, scale=list(params.scale),
                                            zero_point=list(params.zero_point), axis=params.axis)
            origins.learned.append(name)
        else:
            plan.tensors[name] = weight_plan(name, constant_values(constants[name]), target_weight.axis,
                                             weight_settings.weight_qtype)
            origins.computed.append(name)
    for name, target_bias in sorted(placement.biases.items()):
        entry = bias_plan(name, constant_values(constants[name]), plan.tensors[target_bias.input_name],
                          plan.tensors[target_bias.weight_name])
        if name in learned:
            used.add(name)
            if np.allclose(learned[name].scale, entry.scale, rtol=1e-6, atol=0):
                origins.learned.append(name)
            else:
                origins.dropped.append({"tensor": name, "reason": "bias scale is not input scale x weight scale; "
                                        "requantized with that product"})
                origins.computed.append(name)
        else:
            origins.computed.append(name)
        plan.tensors[name] = entry
    for name in sorted(set(learned) - used):
        origins.dropped.append({"tensor": name, "reason": _drop_reason(graph, name)})
    return plan, origins


def _drop_reason(graph: gs.Graph, name: str) -> str:
    tensor = graph.tensors().get(name)
    if tensor is None:
        return "the tensor is gone after graph preparation (folded or eliminated)"
    if is_constant(tensor):
        return "a constant no int8 node reads as a weight"
    if tensor.inputs and tensor.inputs[0].op in MATMUL_OPS:
        return f"output of {tensor.inputs[0].op}: its int8 kernel gives float output directly"
    if name in {t.name for t in graph.outputs}:
        return "a graph output of a float node (no int8 consumer)"
    return "no int8 node reads or writes it"


def calibrate_missing(prepared: onnx.ModelProto, roots: list[str], request: ConvertRequest, qtype: qmath.QType,
                      progress: ProgressFactory) -> dict[str, TensorPlan]:
    """Activation parameters for the tensors the QAT model left without (asymmetric, in `qtype`)."""
    if not roots:
        return {}
    if request.data.calib is None:
        shown = ", ".join(roots[:5]) + (f" and {len(roots) - 5} more" if len(roots) > 5 else "")
        raise UsageError(f"--calibrate-missing: {len(roots)} tensors have no learned parameters and need calibration "
                         f"data (--calib): {shown}")
    specs = model_input_specs(prepared)
    check_batch_size(request.data.batch_size, specs)
    source = open_source(request.data.calib, specs, request.data.images)
    if request.data.max_samples is not None:
        source = source.subset(range(min(request.data.max_samples, len(source))), source.description)
    stats = collect_statistics(prepared, roots, source, batch_size=request.data.batch_size,
                               memory_budget=request.data.memory_budget, progress=progress)
    plans = {}
    for root in roots:
        lo, hi = compute_range(stats.tensors[root], request.method, symmetric=False,
                               levels=qtype.qmax - qtype.qmin, percentile=request.percentile)
        scale, zero = qmath.asymmetric_params(np.float64(lo), np.float64(hi), qtype)
        plans[root] = TensorPlan(name=root, role="activation", qtype=qtype.name, scale=[float(scale)],
                                 zero_point=[int(zero)], source=root, range=[float(lo), float(hi)],
                                 clipped_fraction=clipped_fraction(stats.tensors[root], lo, hi))
    return plans


# ------------------------------------------------------------------ the command


def convert(request: ConvertRequest, progress: ProgressFactory = no_progress) -> ConvertResult:
    """Convert a Q/DQ (QAT) model to onnxq's int8 form; see the module docstring."""
    start = time.perf_counter()
    if request.output_format not in Format.values():
        raise UsageError(f"unknown format {request.output_format!r}; choose {' or '.join(Format.values())}")
    if request.activations not in ACTIVATION_TYPES:
        raise UsageError(f"--activations must be one of {', '.join(ACTIVATION_TYPES)}, got {request.activations!r}")
    check_paths(convert_paths(request))
    original = load_model(request.model)
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in original.graph.node):
        raise ModelError(f"{request.model} has no QuantizeLinear/DequantizeLinear nodes; use `onnxq quantize` "
                         "for a float model")
    stripped = strip_qdq(original)
    prepared = prepare_model(stripped.model)
    graph = import_graph(prepared.model)
    activation_types = Counter(p.qtype for n, p in stripped.learned.items() if n not in stripped.folded_weights
                               and n not in stripped.stored_weights)
    target = request.activations
    calib_type = target if target != "keep" else (activation_types.most_common(1)[0][0] if activation_types
                                                  else "uint8")
    weight_settings = QuantSettings(method=request.method, percentile=request.percentile,
                                    symmetric=calib_type == "int8",
                                    weight_range=default_weight_range(host_cpu().features))
    options = PlacementOptions(per_channel=True, fold_activations=True)
    placement, kept_float = place(graph, options), {}
    if not request.calibrate_missing:
        placement, kept_float = respect_float_tensors(graph, options, stripped.learned)
    if not any(d.status == "int8" for d in placement.nodes):
        hint = (" once the tensors the input model leaves float stay float (--calibrate-missing --calib DATA "
                "quantizes them)") if kept_float else ""
        raise ModelError(f"nothing to convert: no Conv, MatMul or Gemm can run in int8{hint}")
    missing = _roots_without_params(graph, placement, stripped.learned)
    calibrated = calibrate_missing(prepared.model, missing, request, qmath.qtype_by_name(calib_type), progress)
    plan, origins = build_convert_plan(graph, placement, stripped.learned, target, calibrated, weight_settings)
    fit_pooling_scales(graph, plan, set(origins.calibrated))
    quantized = write_qdq(prepared.model, plan)
    if request.output_format == "qoperator":
        quantized = write_qoperator(quantized)
    fusion = check_written_model(quantized, {d.name: d.status for d in plan.nodes})
    fidelity = None
    held_path = request.data.eval_data or request.data.calib
    if held_path is not None:
        held = open_source(held_path, model_input_specs(original), request.data.images)
        held = held.subset(range(min(EVAL_LIMIT, len(held))), held.description)
        fidelity = compare_models(original, quantized, held, batch_size=request.data.batch_size, progress=progress)
    save_model(quantized, request.output)
    report = {
        **report_header("convert", request.model, request.output, __version__),
        "format": request.output_format, "activations": request.activations,
        "nodes": _node_counts(plan), "int8_nodes": [d.name for d in plan.nodes if d.status == "int8"],
        "weights": {"folded_fake_quant": len(stripped.folded_weights), "stored_integers": len(stripped.stored_weights)},
        "tensors": {"learned": origins.learned, "shared_learned": origins.shared, "calibrated": origins.calibrated,
                    "computed": origins.computed},
        "converted_types": origins.converted, "dropped": origins.dropped,
        "kept_float": [{"node": node, "reason": why} for node, why in sorted(kept_float.items())],
        "fusion": fusion.to_dict(), "notes": stripped.notes + prepared.notes,
        "fidelity": fidelity_section(fidelity, "the input (fake-quant) model"),
        TIMINGS: {"convert": round(time.perf_counter() - start, 3)},
    }
    return ConvertResult(json_safe(report), plan)


def convert_paths(request: ConvertRequest) -> list[PathArg]:
    return [PathArg("MODEL", request.model, MODEL), PathArg("--calib", request.data.calib, DATA),
            PathArg("--eval-data", request.data.eval_data, DATA), PathArg("-o", request.output, MODEL_OUTPUT)]


def respect_float_tensors(graph: gs.Graph, options: PlacementOptions, learned: dict[str, Learned]
                          ) -> tuple[Placement, dict[str, str]]:
    """Place with every node kept float that would read or write, quantized, a tensor without learned parameters.

    Returns the placement and the nodes kept float (label -> why). Keeping nodes float only removes
    quantized tensors, so the loop ends.
    """
    kept: dict[str, str] = {}
    while True:
        placement = place(graph, replace(options, keep_float=dict(kept)))
        missing = set(_roots_without_params(graph, placement, learned))
        if not missing:
            return placement, kept
        tensors = {name for name, root in placement.activations.items() if root in missing}
        status = {d.name: d.status for d in placement.nodes}
        found = {}
        for node in graph.nodes:
            if status.get(node_label(node)) != "int8":
                continue
            written = [c for t in node.outputs for c in t.outputs if status.get(node_label(c)) == "folded"]
            touched = [t.name for t in (*node.inputs, *node.outputs, *(o for c in written for o in c.outputs))
                       if t.name in tensors]
            if touched:
                found[node_label(node)] = (f"the input model leaves {touched[0]} float (no QuantizeLinear/"
                                           "DequantizeLinear on it)")
        if not found:
            raise ModelError(f"cannot keep the tensors the input model leaves float ({sorted(missing)[0]}, ...) "
                             "float; give --calibrate-missing --calib DATA")
        kept.update(found)


def fit_pooling_scales(graph: gs.Graph, plan: QuantPlan, calibrated: set[str]) -> None:
    """Widen calibrated GlobalAveragePool output scales to what onnxruntime's kernel accepts.

    QLinearGlobalAveragePool refuses x_scale / (y_scale * pixels) >= 256 ("parameter out of
    computation range"): a calibrated mean can have a far narrower range than its input.
    """
    for node in graph.nodes:
        if node.op != "GlobalAveragePool" or node.outputs[0].name not in calibrated:
            continue
        source, output = node.inputs[0], node.outputs[0].name
        dims = list(source.shape or [])[2:]
        if source.name not in plan.tensors or not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            continue
        entry = plan.tensors[output]
        lowest = plan.tensors[source.name].scale[0] / (POOL_RATIO_LIMIT * int(np.prod(dims)))
        if entry.scale[0] < lowest:
            qtype = qmath.qtype_by_name(entry.qtype)
            low = entry.range[0] if entry.range else 0.0
            zero = int(np.clip(np.round(qtype.qmin - low / lowest), qtype.qmin, qtype.qmax))
            for name, member in list(plan.tensors.items()):  # the tensors sharing its scale
                if name == output or (member.role == "activation" and member.source == entry.source):
                    plan.tensors[name] = replace(member, scale=[float(lowest)], zero_point=[zero])


POOL_RATIO_LIMIT = 255.0  # onnxruntime: x_scale / (y_scale * pixels) < 256, with a margin for rounding


def _roots_without_params(graph: gs.Graph, placement: Placement, learned: dict[str, Learned]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for name, root in placement.activations.items():
        groups.setdefault(root, []).append(name)
    missing = set()
    tensors = graph.tensors()
    for name, root in placement.activations.items():
        if _learned_for(tensors, name, root, groups[root], learned)[0] is None:
            missing.add(root)
    return sorted(missing)


def _node_counts(plan: QuantPlan) -> dict[str, int]:
    return dict(sorted(Counter(d.status for d in plan.nodes).items()))
