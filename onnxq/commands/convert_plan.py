"""The plan `onnxq convert` writes: learned Q/DQ parameters where the QAT model has them, others calibrated.

Each placed tensor takes its own learned parameters, its shared-scale group's, or those of the
input of a Relu it follows. A tensor with none was left float by the input model: by default every
node that would read or write it quantized stays float too (respect_float_tensors); with
--calibrate-missing it is calibrated instead (calibrate_missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.commands.pipeline import DataOptions, check_batch_size
from onnxq.commands.report import LEFT_FLOAT_BY_INPUT
from onnxq.enums import NodeStatus
from onnxq.errors import ModelError, UsageError
from onnxq.quant import qmath
from onnxq.quant.ir import constant_values, is_constant, node_label
from onnxq.quant.ops import FOLDABLE_ACTIVATIONS, MATMUL_OPS, PASS_THROUGH_OPS
from onnxq.quant.placement import Placement, PlacementOptions, place
from onnxq.quant.plan import QuantPlan, QuantSettings, TensorPlan, activation_plan, bias_plan, weight_plan
from onnxq.quant.qdq_params import Learned
from onnxq.runtime.calibrate import collect_statistics
from onnxq.runtime.data import SampleSource, model_input_specs, open_calibration
from onnxq.runtime.session import ProgressFactory


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



def calibrate_missing(prepared: onnx.ModelProto, roots: list[str], data: DataOptions, method: str,
                      percentile: float, qtype: qmath.QType, progress: ProgressFactory
                      ) -> tuple[dict[str, TensorPlan], SampleSource | None]:
    """Activation parameters for the tensors the QAT model left without (asymmetric, in `qtype`), and the
    samples they were calibrated on (None: none needed it).

    Their ranges are used as calibrated, not rounded outward as `quantize` rounds them (stable=False).
    """
    if not roots:
        return {}, None
    if data.calib is None:
        shown = ", ".join(roots[:5]) + (f" and {len(roots) - 5} more" if len(roots) > 5 else "")
        raise UsageError(f"--calibrate-missing: {len(roots)} tensors have no learned parameters and need calibration "
                         f"data (--calib): {shown}")
    specs = model_input_specs(prepared)
    check_batch_size(data.batch_size, specs)
    source = open_calibration(data.calib, specs, data.images, data.max_samples)
    stats = collect_statistics(prepared, roots, source, batch_size=data.batch_size, memory_budget=data.memory_budget,
                               progress=progress)
    return {root: activation_plan(root, stats.tensors[root], qtype, method, percentile, symmetric=False, stable=False)
            for root in roots}, source


def respect_float_tensors(graph: gs.Graph, options: PlacementOptions, learned: dict[str, Learned]
                          ) -> tuple[Placement, dict[str, str]]:
    """Place with every node kept float that would read or write, quantized, a tensor without learned parameters.

    Returns the placement and the nodes kept float (label -> why). Keeping nodes float only removes
    quantized tensors, so the loop ends.
    """
    kept: dict[str, str] = {}
    while True:
        placement = place(graph, replace(options, keep_float=dict(kept)))
        missing = set(roots_without_params(graph, placement, learned))
        if not missing:
            return placement, kept
        tensors = {name for name, root in placement.activations.items() if root in missing}
        status = {d.name: d.status for d in placement.nodes}
        found = {}
        for node in graph.nodes:
            if status.get(node_label(node)) != NodeStatus.INT8:
                continue
            written = [c for t in node.outputs for c in t.outputs if status.get(node_label(c)) == NodeStatus.FOLDED]
            touched = [t.name for t in (*node.inputs, *node.outputs, *(o for c in written for o in c.outputs))
                       if t.name in tensors]
            if touched:
                found[node_label(node)] = (f"{LEFT_FLOAT_BY_INPUT} {touched[0]} float (no QuantizeLinear/"
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


def roots_without_params(graph: gs.Graph, placement: Placement, learned: dict[str, Learned]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for name, root in placement.activations.items():
        groups.setdefault(root, []).append(name)
    missing = set()
    tensors = graph.tensors()
    for name, root in placement.activations.items():
        if _learned_for(tensors, name, root, groups[root], learned)[0] is None:
            missing.add(root)
    return sorted(missing)

