"""Which tensors get quantized, in which role, so that onnxruntime fuses int8 kernels.

This stage looks only at the graph, never at data. Its result says:
- activation tensors to quantize, grouped so pass-through ops share one scale;
- weights (per-channel axis or per-tensor) and biases (int32, scale s_x * s_w);
- a decision with a reason for every node, for the report.

Every quantized tensor gets one QuantizeLinear->DequantizeLinear pair right after its
producer, so every consumer reads the same dequantized value. Heavy ops (Conv, MatMul,
Gemm) always get their activation inputs quantized; Conv also its output (the DQ -> Conv
-> Q pattern becomes QLinearConv), MatMul and Gemm only when a quantized consumer needs
it (otherwise onnxruntime runs MatMulIntegerToFloat / QGemm with a float output). Light
ops (Add, Mul, Concat, pooling, Sigmoid, LeakyRelu) run in int8 only when all their
inputs are quantized anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx_graphsurgeon as gs

from onnxq.enums import NodeStatus
from onnxq.quant.ir import constant_values, is_constant, is_empty, is_float32, node_label
from onnxq.quant.ops import (
    BIASED_OPS,
    COMPUTE_OPS,
    FLOAT_OUTPUT_OPS,
    FOLDABLE_ACTIVATIONS,
    HEAVY_OPS,
    PASS_THROUGH_OPS,
    QLINEAR_BINARY,
    QLINEAR_UNARY,
    VALUE_PRESERVING_OPS,
    gemm_attribute_problem,
)


@dataclass
class WeightTarget:
    name: str
    axis: int | None  # None: per-tensor
    full_range: bool = False  # all 8 bits even on CPUs that need 7 (the node computes in float: 16-bit inputs)
    operand: bool = False  # the single-value constant of an Add/Mul: quantized like an activation (exactly)


@dataclass
class BiasTarget:
    name: str
    input_name: str  # activation whose scale multiplies ...
    weight_name: str  # ... this weight's scale


@dataclass
class NodeDecision:
    name: str
    op_type: str
    status: str  # a NodeStatus value (kept a plain str: plans and recipes store it as written)
    reason: str = ""

    def __post_init__(self) -> None:
        self.status = NodeStatus(self.status).value


@dataclass
class Placement:
    # activation tensor -> the tensor whose statistics set its scale (itself unless shared)
    activations: dict[str, str] = field(default_factory=dict)
    weights: dict[str, WeightTarget] = field(default_factory=dict)
    biases: dict[str, BiasTarget] = field(default_factory=dict)
    nodes: list[NodeDecision] = field(default_factory=list)

    @property
    def statistics_tensors(self) -> list[str]:
        """Tensors whose statistics calibration must collect."""
        return sorted(set(self.activations.values()))


@dataclass
class PlacementOptions:
    per_channel: bool = True
    fold_activations: bool = True  # off for symmetric activations: zero point 0 cannot absorb Relu
    exclude_nodes: frozenset[str] = frozenset()
    exclude_op_types: frozenset[str] = frozenset()
    keep_float: dict[str, str] = field(default_factory=dict)  # node label -> why (e.g. the speed guard)
    int8_gates: bool = False  # hard-swish gates' single-value Add/Mul in int8 (_gate_operand)
    # from a recipe (onnxq.commands.recipe), by node label:
    int16_nodes: frozenset[str] = frozenset()  # 16-bit activations around these nodes
    per_channel_nodes: dict[str, bool] = field(default_factory=dict)  # overrides per_channel

    def excludes(self, node: gs.Node) -> bool:
        return (node.name in self.exclude_nodes or node_label(node) in self.exclude_nodes
                or node.op in self.exclude_op_types)

    def per_channel_for(self, node: gs.Node) -> bool:
        return self.per_channel_nodes.get(node_label(node), self.per_channel)


def place(graph: gs.Graph, options: PlacementOptions) -> Placement:
    placement = Placement()
    anchors: set[str] = set()
    decisions: dict[int, NodeDecision] = {}
    graph_outputs = {t.name for t in graph.outputs}

    def accept(node: gs.Node) -> None:
        inputs, weights, biases = _compute_roles(node, options)
        anchors.update(inputs)
        wide = node_label(node) in options.int16_nodes
        for target in weights:
            _add_weight(placement.weights, replace(target, full_range=wide))
        if not wide:  # 16-bit inputs run in float on CPU: the bias stays float too
            placement.biases.update({b.name: b for b in biases})
        status = "int16" if wide else "int8"
        output = node.outputs[0]
        activation = _foldable_consumer(output, graph_outputs)
        folded = activation if options.fold_activations and activation is not None else None
        if node.op in FLOAT_OUTPUT_OPS and (wide or activation is None or activation.outputs[0].name in graph_outputs):
            # MatMulIntegerToFloat / QGemm give float output from int8 inputs: quantizing the
            # output would only add error, unless a quantized consumer needs it (it then anchors it).
            # Not so with a Relu/Clip after it: onnxruntime then fuses only with a Q after the Relu
            # (QLinearMatMul), or right before it; a Relu feeding a float op leaves the MatMul in float.
            decisions[id(node)] = NodeDecision(node_label(node), node.op, status)
            return
        if folded is not None and not options.excludes(folded):
            decisions[id(folded)] = NodeDecision(node_label(folded), folded.op, "folded",
                                                 f"absorbed by the quantized output of {node_label(node)}")
            output = folded.outputs[0]
        anchors.add(output.name)
        decisions[id(node)] = NodeDecision(node_label(node), node.op, status)

    for node in graph.nodes:
        if node.op in HEAVY_OPS and _why_not_compute(node, options) is None:
            accept(node)
    for node in graph.nodes:  # topological order: inputs are settled before their consumers
        if node.op in PASS_THROUGH_OPS and node.inputs[0].name in anchors and _is_shareable(node, options):
            anchors.update(t.name for t in node.outputs)
        elif (node.op in COMPUTE_OPS - HEAVY_OPS and _why_not_compute(node, options) is None
              and all(name in anchors for name in _compute_roles(node, options)[0])):
            accept(node)

    roots = _share_through_pass_ops(graph, sorted(anchors), options, decisions)
    placement.activations = roots
    for node in graph.nodes:
        if id(node) not in decisions:
            decisions[id(node)] = NodeDecision(node_label(node), node.op, "float", _float_reason(node, options))
        placement.nodes.append(decisions[id(node)])
    placement.nodes.extend(_subgraph_decisions(graph))
    return placement


def _subgraph_decisions(graph: gs.Graph) -> list[NodeDecision]:
    """Nodes inside If/Loop/Scan bodies stay float: their activations cannot be observed as graph outputs."""
    decisions = []
    for node in graph.nodes:
        for value in node.attrs.values():
            subgraphs = value if isinstance(value, list) else [value]
            for sub in subgraphs:
                if isinstance(sub, gs.Graph):
                    for inner in sub.nodes:
                        decisions.append(NodeDecision(node_label(inner), inner.op, "float",
                                                      f"inside the {node.op} subgraph of {node_label(node)}"))
                    decisions.extend(_subgraph_decisions(sub))
    return decisions


def _why_not_compute(node: gs.Node, options: PlacementOptions) -> str | None:
    if node.op not in COMPUTE_OPS:
        return "not an int8 op"
    if options.excludes(node):
        return "excluded by the user"
    if node_label(node) in options.keep_float:
        return options.keep_float[node_label(node)]
    data_inputs = [t for t in node.inputs if not is_empty(t)]
    if node.op in BIASED_OPS:
        data_inputs = data_inputs[:2]
    if not all(is_float32(t) for t in data_inputs) or not all(is_float32(t) for t in node.outputs[:1]):
        return "inputs or output are not float32 (or their type is unknown)"
    if node.op == "Conv":
        weight = node.inputs[1]
        if not is_constant(weight) or constant_values(weight).ndim < 3:
            return "weight is not a constant"
        if len(node.inputs) > 2 and not is_empty(node.inputs[2]) and not is_constant(node.inputs[2]):
            return "bias is not a constant"
    if node.op == "Gemm":
        if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
            bias = node.inputs[2]
            if not is_constant(bias) or constant_values(bias).ndim != 1:
                return "bias is not a constant vector"
        problem = gemm_attribute_problem(node.attrs)
        if problem is not None:
            return problem
    if node.op in ("Add", "Mul") and any(is_constant(t) for t in node.inputs) and _gate_operand(node, options) is None:
        return "one operand is a constant (kept float for accuracy)"
    if node.op in ("MatMul",) and any(is_constant(t) and constant_values(t).ndim != 2 for t in node.inputs):
        return "constant operand is not a 2-D weight"
    return None


def _compute_roles(node: gs.Node, options: PlacementOptions) -> tuple[list[str], list[WeightTarget], list[BiasTarget]]:
    """Activation inputs, weights and biases of a compute node."""
    op = node.op
    if op == "Conv":
        weight = WeightTarget(node.inputs[1].name, 0 if options.per_channel_for(node) else None)
        biases = _bias(node, 2, weight)
        return [node.inputs[0].name], [weight], biases
    if op == "Gemm":
        axis = 0 if node.attrs.get("transB", 0) else 1
        weight_tensor = node.inputs[1]
        if not is_constant(weight_tensor):
            return [node.inputs[0].name, weight_tensor.name], [], []
        weight = WeightTarget(weight_tensor.name, axis if options.per_channel_for(node) else None)
        return [node.inputs[0].name], [weight], _bias(node, 2, weight)
    if op == "MatMul":
        activations, weights = [], []
        for index, tensor in enumerate(node.inputs[:2]):
            if is_constant(tensor):
                axis = 1 if (index == 1 and options.per_channel_for(node)) else None
                weights.append(WeightTarget(tensor.name, axis))
            else:
                activations.append(tensor.name)
        return activations, weights, []
    if op in QLINEAR_UNARY:
        return [node.inputs[0].name], [], []
    operand = _gate_operand(node, options) if op in QLINEAR_BINARY else None
    if operand is not None:  # hard-swish's x + 3 and gate * (1 / 6): c is exact in 8 bits, x decides
        return [t.name for t in node.inputs if t is not operand], [WeightTarget(operand.name, None, operand=True)], []
    return [t.name for t in node.inputs if not is_empty(t)], [], []


def _gate_operand(node: gs.Node, options: PlacementOptions) -> gs.Constant | None:
    """With --int8-gates, the single-value constant of a gate's Add (x + c feeding a Clip(0, hi)) or Mul
    (Clip(0, hi) * c).

    onnxruntime runs an Add/Mul as QLinearAdd / QLinearMul only with both inputs quantized; a single value
    quantized alone is exact (it sits at the end of its own range). In a gate the Clip bounds the result,
    so its 8-bit grid is fine and hard-swish (x * (clip(x + 3, 0, 6) * (1 / 6)), as onnxq.passes.simplify
    writes it) stays int8 between its convolutions. Elsewhere (a normalization's `var + eps`, a scale
    before a Softmax) the result's range is the input's and 8 bits cost accuracy, so those stay float.
    """
    constants = [t for t in node.inputs if is_constant(t)]
    if not options.int8_gates or len(node.inputs) != 2 or len(constants) != 1 or not is_float32(constants[0]):
        return None
    if constant_values(constants[0]).size != 1:
        return None
    if node.op == "Add":
        readers = node.outputs[0].outputs
        gated = len(readers) == 1 and _is_relu6(readers[0])
    else:
        other = next(t for t in node.inputs if not is_constant(t))
        gated = len(other.inputs) == 1 and _is_relu6(other.inputs[0])
    return constants[0] if gated else None


def _add_weight(known: dict[str, WeightTarget], target: WeightTarget) -> None:
    """One quantization per weight tensor, valid for every node that reads it.

    A shared weight (a tied Linear run as Gemm(transB) and as MatMul, or one Conv per-tensor by recipe)
    may want per-channel scales along different axes: it is then quantized per tensor, as scales along
    one consumer's axis would be wrong for the other (and for its bias). Full range only if all allow it.
    """
    seen = known.get(target.name)
    if seen is None:
        known[target.name] = target
        return
    known[target.name] = WeightTarget(target.name, seen.axis if seen.axis == target.axis else None,
                                      seen.full_range and target.full_range, seen.operand and target.operand)


def _bias(node: gs.Node, index: int, weight: WeightTarget) -> list[BiasTarget]:
    if len(node.inputs) <= index or is_empty(node.inputs[index]):
        return []
    return [BiasTarget(node.inputs[index].name, node.inputs[0].name, weight.name)]


def _foldable_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    if tensor.name in graph_outputs or len(tensor.outputs) != 1:
        return None
    consumer = tensor.outputs[0]
    if consumer.op not in FOLDABLE_ACTIVATIONS:
        return None
    if consumer.op == "Clip" and not _is_relu6(consumer):
        return None
    return consumer


def _is_relu6(node: gs.Node) -> bool:
    """A Relu6-style Clip(0, hi) with constant bounds: only then does the uint8 zero point absorb the clip."""
    if node.op != "Clip" or any(not is_constant(t) for t in node.inputs[1:] if not is_empty(t)):
        return False
    if len(node.inputs) < 2 or is_empty(node.inputs[1]):
        return False
    return float(constant_values(node.inputs[1])) == 0.0


def _share_through_pass_ops(
    graph: gs.Graph, anchors: list[str], options: PlacementOptions, decisions: dict[int, NodeDecision]
) -> dict[str, str]:
    """Group tensors joined by pass-through ops; each group takes its upstream tensor's scale."""
    parent: dict[str, str] = {name: name for name in anchors}
    order = {t: i for i, t in enumerate(_tensor_order(graph))}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            keep, drop = (ra, rb) if order.get(ra, 0) <= order.get(rb, 0) else (rb, ra)
            parent[drop] = keep

    pass_nodes = [n for n in graph.nodes if n.op in PASS_THROUGH_OPS and _is_shareable(n, options)]
    changed = True
    while changed:
        changed = False
        for node in pass_nodes:
            members = [node.inputs[0].name, *(t.name for t in node.outputs)]
            if not any(m in parent for m in members):
                continue
            for m in members:
                if m not in parent:
                    parent[m] = m
                    changed = True
                union(members[0], m)
            if id(node) not in decisions:
                decisions[id(node)] = NodeDecision(node_label(node), node.op, "shared-scale",
                                                   "runs on int8 values with its input's scale")
    return {name: find(name) for name in sorted(parent)}


def _is_shareable(node: gs.Node, options: PlacementOptions) -> bool:
    if options.excludes(node):
        return False
    if node.op == "MaxPool" and len(node.outputs) > 1:
        return False
    return is_float32(node.inputs[0]) and all(is_float32(t) for t in node.outputs)


def _tensor_order(graph: gs.Graph) -> list[str]:
    names = [t.name for t in graph.inputs]
    for node in graph.nodes:
        names.extend(t.name for t in node.outputs)
    return names


def _float_reason(node: gs.Node, options: PlacementOptions) -> str:
    if node.op in PASS_THROUGH_OPS:
        return "no quantized neighbour"
    if node.op in COMPUTE_OPS - HEAVY_OPS and _why_not_compute(node, options) is None:
        return "inputs come from float ops (quantizing would add error and conversions)"
    if node.op in FOLDABLE_ACTIVATIONS:
        if not options.fold_activations:
            return "symmetric activations: a zero point of 0 cannot absorb it"
        producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if producer is not None and producer.op in FLOAT_OUTPUT_OPS:
            return f"follows {producer.op}, whose int8 kernel gives a float output"
        return "producer not quantized"
    return _why_not_compute(node, options) or "not an int8 op"


def quantized_tensors_of(node: gs.Node, placement: Placement) -> list[str]:
    """The node's quantized activation inputs and its quantized output (after a folded Relu/Clip)."""
    names = [t.name for t in node.inputs if t.name in placement.activations]
    output = node.outputs[0]
    if output.name not in placement.activations and len(output.outputs) == 1 and output.outputs[0].outputs:
        output = output.outputs[0].outputs[0]  # a folded Relu/Clip's output carries the pair
    if output.name in placement.activations:
        names.append(output.name)
    return names


def widened_decisions(graph: gs.Graph, placement: Placement, wide_sources: set[str]) -> list[NodeDecision]:
    """The node decisions once some activation groups are 16-bit (`wide_sources`: their source tensors).

    An int8 node that reads or writes a 16-bit activation has no int8 kernel: onnxruntime computes it
    in float between its 16-bit (and 8-bit) pairs, like the int16 node next to it, so the plan says so.
    """
    wide = {tensor for tensor, source in placement.activations.items() if source in wide_sources}
    nodes = {node_label(node): node for node in graph.nodes}
    decisions = []
    for decision in placement.nodes:
        node = nodes.get(decision.name)
        if (decision.status == NodeStatus.INT8 and node is not None
                and wide.intersection(quantized_tensors_of(node, placement))):
            decision = NodeDecision(decision.name, decision.op_type, "int16",
                                    "reads or writes a 16-bit activation of an int16 neighbour: computes in float")
        decisions.append(decision)
    return decisions


def tensors_to_observe(graph: gs.Graph, int8_gates: bool = False) -> list[str]:
    """Statistics that cover every placement a later run may choose (any symmetry, no exclusions).

    Every activation is observed, not only the roots of shared-scale groups, because
    excluding a node can split a group and give it another root. Collecting this
    superset once lets a user switch method, symmetry or exclusions with
    --load-stats and no new inference pass. --int8-gates rewrites the model (another digest), so its
    gates' tensors are observed only on its own run.
    """
    folded = place(graph, PlacementOptions(fold_activations=True, int8_gates=int8_gates))
    unfolded = place(graph, PlacementOptions(fold_activations=False, int8_gates=int8_gates))
    return sorted(set(folded.activations) | set(unfolded.activations))


def value_aliases(graph: gs.Graph, tensors: list[str]) -> dict[str, str]:
    """Observed tensors whose statistics equal another observed tensor's: alias -> source.

    Their statistics are copied instead of collected, which saves an exposed output and
    a histogram update per batch.
    """
    wanted = set(tensors)
    aliases: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in VALUE_PRESERVING_OPS or not node.inputs or not node.outputs:
            continue
        source, result = node.inputs[0].name, node.outputs[0].name
        if result in wanted and source in wanted:
            aliases[result] = aliases.get(source, source)
    return aliases
