"""Weight-only int4 for transformers: MatMul/Gemm weights as MatMulNBits, embedding tables as
GatherBlockQuantized, rounded by --weight-method, mixed with int8 by measured sensitivity.

Flow (`quantize_int4`):
1. find the weights: every MatMul/Gemm with a constant 2-D weight (also in If/Loop/Scan bodies), every
   Gather on a constant 2-D float table (token, position embeddings), and tied pairs: an LM head
   whose weight equals an embedding table transposed is quantized once and both ops read the same bytes;
2. gptq/awq: one streaming pass over --calib collects X^T X and mean |x| of every MatMul input of the
   main graph (onnxq.runtime.weight_stats); awq then searches per-input-channel scales and folds 1/s into the
   producers of X (onnxq.passes.smooth's folding; where nothing can absorb it only the clipping search runs);
3. each weight is rounded once per bit width it needs (onnxq.quant.weight_rounding) and cached;
4. with an accuracy target, layers are ranked by measured sensitivity (only this layer int4, the rest at
   the fallback precision) and the most sensitive go to int8 (or float) until the target holds, as the
   static path does it (onnxq.search.sensitivity); the choices become recipe rules for --save-recipe.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxq.commands.dynamic import WeightOnlyOptions, finish_model, matmul_weight, rewrite_weight_only
from onnxq.commands.recipe import WEIGHT_BITS, NodeChoice, Rule, Selector, layer_options
from onnxq.commands.request import check_batch_size
from onnxq.enums import NodeStatus
from onnxq.errors import UsageError
from onnxq.model_io import is_spilled, read_tensor
from onnxq.passes.smooth import divide_activation, find_groups, scale_weight_rows
from onnxq.quant import weight_rounding as wr
from onnxq.quant.ir import (
    NameAllocator,
    all_graphs,
    all_proto_graphs,
    constant_values,
    import_domain,
    import_graph,
    is_constant,
    is_float32,
    node_label,
)
from onnxq.quant.ops import MATMUL_OPS, MS_DOMAIN
from onnxq.quant.placement import NodeDecision
from onnxq.quant.qmath import QType
from onnxq.runtime.data import SampleSource, model_input_specs, open_calibration, open_source
from onnxq.runtime.evaluate import CachedReference, load_metric
from onnxq.runtime.session import ProgressFactory, no_progress
from onnxq.runtime.weight_stats import InputStats, collect_input_stats
from onnxq.search.sensitivity import Target, measure_sensitivity, search_fallbacks

if TYPE_CHECKING:
    from onnxq.commands.request import QuantizeRequest

MIN_TABLE = 1024  # smaller Gather tables (token types) stay float: nothing to win
CHUNK = 4096  # output columns rounded at a time: bounds the float64 temporaries of a large table
NEEDS_DATA = ("gptq", "awq")


@dataclass
class Layer:
    """One weight to quantize: a MatMul/Gemm ([K, N] weight), or a Gather table (weight = table^T)."""

    label: str
    op: str
    weight: np.ndarray  # [K, N]
    stats: InputStats | None = None
    tied: list[str] = field(default_factory=list)  # Gather labels reading this MatMul's weight transposed
    awq_alpha: float | None = None


@dataclass
class Int4Result:
    model: onnx.ModelProto
    decisions: list[NodeDecision]
    rules: list[Rule]  # what the target search chose, for --save-recipe
    report: dict
    target: dict | None = None


def quantize_int4(model: onnx.ModelProto, options: WeightOnlyOptions, choices: dict[str, NodeChoice],
                  calib: SampleSource | None, *, batch_size: int = 1, memory_budget: int = 2 * 1024**3,
                  search: tuple[Target, CachedReference, int, str] | None = None,
                  progress: ProgressFactory = no_progress) -> Int4Result:
    """The int4 model. `search`: (target, reference, max fallbacks, fallback "int8"|"float")."""
    if options.method in NEEDS_DATA and calib is None:
        raise UsageError(f"--weight-method {options.method} measures each layer's inputs: give --calib "
                         "(rtn and hqq need no data)")
    graph = import_graph(model)
    layers = find_layers(graph, choices)
    notes: list[str] = []
    awq = {}
    if options.method in NEEDS_DATA:
        assert calib is not None
        stats = collect_input_stats(model, sorted({n for n in _inputs(graph, layers).values()}), calib,
                                    batch_size=batch_size, memory_budget=memory_budget, progress=progress)
        for label, name in _inputs(graph, layers).items():
            layers[label].stats = stats.get(name)
        if options.method == "awq":
            awq = fold_awq_scales(graph, layers, options)
            model = finish_model(graph, model)
            graph = import_graph(model)
        missing = [label for label, layer in layers.items() if layer.op != "Gather" and layer.stats is None]
        if missing:
            notes.append(f"{len(missing)} MatMul/Gemm inside control-flow bodies got no input statistics: "
                         f"rounded with hqq instead of {options.method}")
    cache = RoundingCache(layers, options)
    base = model
    bits = {label: _chosen_bits(choices.get(label), 4) for label in layers}

    def build(fallback: frozenset[str], to: int) -> onnx.ModelProto:
        return build_model(base, cache, {**bits, **dict.fromkeys(fallback, to)})[0]

    target_report, rules = None, []
    if search is not None:
        target, reference, limit, fallback = search
        to = 8 if fallback == NodeStatus.INT8 else 0
        candidates = {label: layers[label].op for label, b in bits.items() if b == 4}
        target_report, chosen = _search(lambda f: build(f, to), candidates, target, reference, limit, progress)
        bits.update(dict.fromkeys(chosen, to))
        rules = [Rule(Selector(name=label), weights="int8", reason="accuracy target") if to == 8 else
                 Rule(Selector(name=label), precision="float", reason="accuracy target") for label in chosen]
    quantized, decisions = build_model(base, cache, bits)
    report = {"method": options.method, "bits": 4, "block_size": options.block_size,
              "symmetric": options.symmetric, "notes": notes,
              "layers": {label: {"op": layer.op, "bits": bits[label], "tied_with": layer.tied,
                                 "calibration_rows": layer.stats.rows if layer.stats else None,
                                 **({"awq_alpha": layer.awq_alpha} if layer.awq_alpha is not None else {}),
                                 **cache.errors.get(label, {})}
                         for label, layer in sorted(layers.items())},
              "awq_folded": awq}
    return Int4Result(quantized, decisions, rules, report, target_report)


def _chosen_bits(choice: NodeChoice | None, default: int) -> int:
    if choice is None:
        return default
    if choice.precision == NodeStatus.FLOAT:
        return 0
    return WEIGHT_BITS.get(choice.weights or "", default)


def _inputs(graph: gs.Graph, layers: dict[str, Layer]) -> dict[str, str]:
    """Layer label -> its activation input, for MatMul/Gemm of the main graph (what can be observed)."""
    found = {}
    for node in graph.nodes:
        label = node_label(node)
        if label in layers and layers[label].op != "Gather" and not is_constant(node.inputs[0]):
            found[label] = node.inputs[0].name
    return found


def _gather_table(node: gs.Node) -> np.ndarray | None:
    if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or len(node.inputs) != 2:
        return None
    table, indices = node.inputs
    if not is_constant(table) or not is_float32(table) or is_constant(indices):
        return None
    values = np.asarray(constant_values(table), np.float32)
    return values if values.ndim == 2 and values.size >= MIN_TABLE else None


def _nodes(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node]]:
    for sub in all_graphs(graph):
        for node in list(sub.nodes):
            yield sub, node


def find_layers(graph: gs.Graph, choices: dict[str, NodeChoice]) -> dict[str, Layer]:
    """Every MatMul/Gemm weight and embedding table a recipe does not keep float; tied pairs linked."""
    layers: dict[str, Layer] = {}
    for _, node in _nodes(graph):
        label = node_label(node)
        if node.op in MATMUL_OPS:
            found = matmul_weight(node)
            if not isinstance(found, str):
                layers[label] = Layer(label, node.op, found[0])
        elif (table := _gather_table(node)) is not None:
            layers[label] = Layer(label, "Gather", table.T)  # a view: rounding copies blocks anyway
    heads = [layer for layer in layers.values() if layer.op != "Gather" and _chosen_bits(choices.get(layer.label), 4)]
    for label, layer in list(layers.items()):
        if layer.op != "Gather" or _chosen_bits(choices.get(label), 4) == 0:
            continue  # a table kept float stays its own (float) tensor, whatever the LM head becomes
        same_shape = [head for head in heads if head.weight.shape == layer.weight.shape]
        digest = _digest(layer.weight) if same_shape else None
        head = next((head for head in same_shape if _digest(head.weight) == digest), None)
        if head is not None:  # an LM head whose weight is this table transposed: quantized once
            head.tied.append(label)
            del layers[label]
    return {label: layer for label, layer in layers.items()
            if _chosen_bits(choices.get(label), 4) != 0 or layer.tied}


def _digest(weight: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(weight, np.float32).tobytes() + str(weight.shape).encode()).hexdigest()


def fold_awq_scales(graph: gs.Graph, layers: dict[str, Layer], options: WeightOnlyOptions) -> dict[str, dict]:
    """AWQ's per-input-channel scales, searched per activation shared by MatMul/Gemm layers and folded
    into the producer of the activation (the float function is unchanged)."""
    fmt = wr.BlockFormat(4, options.block_size, options.symmetric)
    groups, _ = find_groups(graph, insert_mul=False)
    names = NameAllocator(graph)
    folded = {}
    for group in groups:
        members = [layers.get(node_label(n)) for n in group.consumers]
        if any(m is None or m.stats is None or m.tied for m in members):
            continue  # a layer kept float (or tied to an embedding) must not see scaled weights
        stats = members[0].stats
        assert stats is not None
        s, alpha = wr.awq_scales([m.weight for m in members if m], stats.hessian(), stats.mean_abs(), fmt)
        if alpha == 0.0:
            continue
        for node, member in zip(group.consumers, members, strict=True):
            assert member is not None and member.stats is not None
            scale_weight_rows(node, s, names)
            member.weight = member.weight * s[:, None]
            member.stats = InputStats(member.stats.gram / np.outer(s, s), member.stats.abs_sum / s,
                                      member.stats.rows)
            member.awq_alpha = alpha
        divide_activation(graph, group, s, names)
        folded[group.activation.name] = {"alpha": alpha, "how": group.how,
                                         "consumers": [node_label(n) for n in group.consumers]}
    return folded


class RoundingCache:
    """Each layer rounded once per bit width, on first use (the target search builds many models)."""

    def __init__(self, layers: dict[str, Layer], options: WeightOnlyOptions) -> None:
        self.layers = layers
        self.options = options
        self.done: dict[tuple[str, int], wr.BlockQuant] = {}
        self.errors: dict[str, dict] = {}

    def get(self, label: str, bits: int) -> wr.BlockQuant:
        key = (label, bits)
        if key not in self.done:
            layer = self.layers[label]
            fmt = wr.BlockFormat(bits, self.options.block_size, self.options.symmetric)
            method = self.options.method
            hessian = layer.stats.hessian() if layer.stats is not None else None
            if layer.op == "Gather" or (layer.tied and method == "hqq") or (method in NEEDS_DATA and hessian is None):
                method = "rtn" if method == "rtn" else "hqq"  # lookups have no input statistics
            integer = layer.op == "Gather" or bool(layer.tied)  # GatherBlockQuantized stores uint8 zero points
            parts, error, rtn_error = [], 0.0, 0.0
            for start in range(0, layer.weight.shape[1], CHUNK):  # output columns are rounded independently
                w = layer.weight[:, start : start + CHUNK]
                part = (wr.hqq(w, fmt, integer_zeros=integer) if method == "hqq"
                        else wr.quantize(w, fmt, method, hessian))
                parts.append(part)
                if hessian is not None:
                    error += wr.output_error(w, part.dequantize(), hessian)
                    rtn_error += wr.output_error(w, wr.rtn(w, fmt).dequantize(), hessian)
            self.done[key] = wr.concatenate(parts)
            if hessian is not None:
                self.errors.setdefault(label, {})[f"int{bits}_error_vs_rtn"] = \
                    round(error / rtn_error, 4) if rtn_error > 0 else 1.0
        return self.done[key]


def build_model(model: onnx.ModelProto, cache: RoundingCache, bits: dict[str, int]
                ) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """`model` with every layer at its bits (0 = float): MatMulNBits, GatherBlockQuantized."""
    graph = import_graph(model)
    names = NameAllocator(graph)
    decisions: list[NodeDecision] = []
    gathers: dict[str, tuple[gs.Graph, gs.Node]] = {}
    for sub, node in _nodes(graph):
        label = node_label(node)
        if node.op == "Gather":
            gathers[label] = (sub, node)
        elif node.op == "Conv":
            decisions.append(NodeDecision(label, node.op, "float", "4-bit weights are for MatMul/Gemm (MatMulNBits)"))
    for sub, node in _nodes(graph):
        label = node_label(node)
        layer = cache.layers.get(label)
        if node.op not in MATMUL_OPS:
            continue
        if layer is None:
            why = matmul_weight(node)
            decisions.append(NodeDecision(label, node.op, "float", why if isinstance(why, str) else "recipe"))
            continue
        width = bits.get(label, 4)
        if width == 0:
            decisions.append(NodeDecision(label, node.op, "float", "kept float"))
            continue
        params = _matmul_nbits(sub, node, cache.get(label, width), names)
        decisions.append(NodeDecision(label, node.op, f"int{width}", f"{width}-bit weights, blocks of "
                                      f"{cache.options.block_size} ({cache.options.method}, MatMulNBits)"))
        for tied in layer.tied:
            if tied in gathers:
                decisions.append(_tied_gather(*gathers.pop(tied), cache.get(label, width), params, names))
    for label, (sub, node) in gathers.items():
        layer = cache.layers.get(label)
        width = bits.get(label, 4)
        if layer is None or width == 0:
            if _gather_table(node) is not None:
                decisions.append(NodeDecision(label, node.op, "float", "kept float"))
            continue
        decisions.append(_gather(sub, node, cache.get(label, width), names))
    return finish_model(graph, model), decisions


def _matmul_nbits(graph: gs.Graph, node: gs.Node, quant: wr.BlockQuant, names: NameAllocator) -> list[gs.Constant]:
    found = matmul_weight(node)
    assert not isinstance(found, str)
    _, bias = found
    packed, scales, zeros = wr.pack(quant)
    base = node.inputs[1].name
    params = [gs.Constant(names.new(f"{base}_int{quant.fmt.bits}"), packed),
              gs.Constant(names.new(f"{base}_scales"), scales)]
    if zeros is not None:
        params.append(gs.Constant(names.new(f"{base}_zero_points"), zeros))
    inputs = [node.inputs[0], *params]
    if bias is not None:
        inputs += [gs.Variable.empty()] * (5 - len(inputs)) + [bias]
    k, n = quant.k, quant.codes.shape[0]
    attrs = {"K": k, "N": n, "bits": quant.fmt.bits, "block_size": quant.fmt.block_size}
    if quant.fmt.bits == 8:  # onnxruntime's fast 8-bit kernel quantizes A per block (as it does for DQ -> MatMul)
        attrs["accuracy_level"] = 4
    new = gs.Node("MatMulNBits", node.name, attrs, inputs, list(node.outputs), domain=MS_DOMAIN)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.append(new)
    return params


def _gather_params(quant: wr.BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GatherBlockQuantized's data [V, D * bits / 8], scales [V, blocks], zero points (uint8) or None."""
    packed, scales, zeros = wr.pack(quant)
    v, count = quant.codes.shape[:2]
    return (packed.reshape(v, -1), scales.reshape(v, count),
            zeros.reshape(v, -1) if zeros is not None else None)


def _gbq_node(graph: gs.Graph, node: gs.Node, inputs: list[gs.Tensor], quant: wr.BlockQuant,
              names: NameAllocator) -> None:
    attrs = {"bits": quant.fmt.bits, "block_size": quant.fmt.block_size, "gather_axis": 0, "quantize_axis": 1}
    data, scales, *zeros = inputs
    new = gs.Node("GatherBlockQuantized", node.name or names.new("GatherBlockQuantized"), attrs,
                  [data, node.inputs[1], scales, *zeros], list(node.outputs), domain=MS_DOMAIN)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.append(new)


def _gather(graph: gs.Graph, node: gs.Node, quant: wr.BlockQuant, names: NameAllocator) -> NodeDecision:
    label = node_label(node)
    if quant.k % quant.fmt.block_size:  # the table's rows do not fill whole blocks: int8 rows behind DQ
        return _dq_gather(graph, node, names)
    data, scales, zeros = _gather_params(quant)
    base = node.inputs[0].name
    inputs = [gs.Constant(names.new(f"{base}_int{quant.fmt.bits}"), data),
              gs.Constant(names.new(f"{base}_scales"), scales)]
    if zeros is not None:
        inputs.append(gs.Constant(names.new(f"{base}_zero_points"), zeros))
    _gbq_node(graph, node, inputs, quant, names)
    return NodeDecision(label, "Gather", f"int{quant.fmt.bits}",
                        f"{quant.fmt.bits}-bit table, blocks of {quant.fmt.block_size} (GatherBlockQuantized)")


def _dq_gather(graph: gs.Graph, node: gs.Node, names: NameAllocator) -> NodeDecision:
    """int8 rows, one scale each, DequantizeLinear -> Gather (any table width)."""
    table = constant_values(node.inputs[0]).astype(np.float32)
    scale = np.abs(table).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
    base = node.inputs[0].name
    restored = gs.Variable(names.new(f"{base}_dequantized"), dtype=np.float32, shape=list(table.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", names.new(f"{base}_DequantizeLinear"), {"axis": 0},
                               [gs.Constant(names.new(f"{base}_quantized"), q),
                                gs.Constant(names.new(f"{base}_scale"), scale),
                                gs.Constant(names.new(f"{base}_zero_point"), np.zeros(scale.shape, np.int8))],
                               [restored]))
    node.inputs[0] = restored
    return NodeDecision(node_label(node), "Gather", "int8", "int8 rows (DequantizeLinear -> Gather: the table "
                        "width is not a multiple of the block size)")


def _tied_gather(graph: gs.Graph, node: gs.Node, quant: wr.BlockQuant, params: list[gs.Constant],
                 names: NameAllocator) -> NodeDecision:
    """The embedding lookup reading the LM head's quantized bytes (reshaped, not copied, in the file)."""
    label = node_label(node)
    if quant.k % quant.fmt.block_size:
        return _dq_gather(graph, node, names)
    v, count = quant.codes.shape[:2]
    shapes = [(v, -1), (v, count), (v, -1)]
    inputs: list[gs.Tensor] = []
    for param, shape in zip(params, shapes, strict=False):
        out = gs.Variable(names.new(f"{param.name}_rows"), dtype=param.values.dtype)
        graph.nodes.append(gs.Node("Reshape", names.new(f"{param.name}_Reshape"), {},
                                   [param, gs.Constant(names.new(f"{param.name}_shape"), np.array(shape, np.int64))],
                                   [out]))
        inputs.append(out)
    _gbq_node(graph, node, inputs, quant, names)
    return NodeDecision(label, "Gather", f"int{quant.fmt.bits}", "tied to the LM head: its quantized weight, "
                        "read by GatherBlockQuantized")


def _search(build, candidates: dict[str, str], target: Target, reference: CachedReference, limit: int,
            progress: ProgressFactory) -> tuple[dict, list[str]]:
    """The accuracy-target search of onnxq.search.sensitivity over int4 layers; (report, layers moved)."""
    all_int4 = build(frozenset())
    start = reference.fidelity_of(all_int4)
    ranking: list[str] = []
    chosen: list[str] = []
    steps: list[dict] = []
    if not target.met_by(start):
        ranking = measure_sensitivity(build, candidates, reference, progress, all_but=False).ranked_nodes()
        result = search_fallbacks(build, ranking, target, reference, min(limit, len(ranking)), progress)
        chosen, steps = result.float_nodes, result.steps
    final = reference.fidelity_of(build(frozenset(chosen))) if chosen else start
    return {"target": {"min_sqnr_db": target.min_sqnr_db, "min_cosine": target.min_cosine,
                       "min_metric": target.min_metric, "data": reference.source},
            "met": target.met_by(final), "samples": len(reference.feeds),
            "start": {"min_sqnr_db": start.min_sqnr, "min_cosine": start.min_cosine, "metric": start.metric},
            "final": {"min_sqnr_db": final.min_sqnr, "min_cosine": final.min_cosine, "metric": final.metric},
            "ranking": ranking, "moved": chosen, "float_nodes": chosen, "speed": None, "steps": steps}, chosen


def quantize_embeddings_int8(model: onnx.ModelProto, choices: dict[str, NodeChoice], block_size: int
                             ) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """--weight-bits 8: embedding tables as 8-bit GatherBlockQuantized (rounded to nearest, blocks along a row)."""
    graph = import_graph(model)
    names = NameAllocator(graph)
    decisions = []
    fmt = wr.BlockFormat(8, block_size, True)
    for sub, node in _nodes(graph):
        table = _gather_table(node)
        if table is None:
            continue
        if _chosen_bits(choices.get(node_label(node)), 8) == 0:
            decisions.append(NodeDecision(node_label(node), "Gather", "float", "recipe"))
            continue
        decisions.append(_gather(sub, node, wr.rtn(np.ascontiguousarray(table.T), fmt), names))
    return (finish_model(graph, model) if decisions else model), decisions


def int8_embedding_tables(model: onnx.ModelProto, choices: dict[str, NodeChoice],
                          decisions: list[NodeDecision]) -> tuple[onnx.ModelProto, list[NodeDecision]]:
    """Static and dynamic modes: each embedding table one Gather alone reads becomes an 8-bit
    GatherBlockQuantized (symmetric, rounded to nearest, blocks of 32 along a row, 16 where 32 do not
    fill it: 39-46 dB SQNR on MiniLM's and mpnet's tables, where blocks of 128 give 34-44 dB). The
    plan's decisions for those Gathers are replaced. A table other nodes also read (a tied LM head)
    stays float: a second, quantized copy would make the file larger. --exclude and a recipe's
    `precision: float` keep a table float. Edits the proto in place (no graph import: the model is large).
    """
    graphs = list(all_proto_graphs(model.graph))
    found = list(_tables_to_quantize(graphs, choices))
    if not found:  # most models: nothing more to read
        return model, decisions
    uses = Counter(name for graph in graphs for node in graph.node for name in node.input)
    uses.update(v.name for graph in graphs for v in [*graph.input, *graph.output])  # a table also an input
    names = NameAllocator.for_proto(model.graph)
    changed: dict[str, NodeDecision] = {}
    for graph, node, label, table in found:
        width = table.dims[1]
        if uses[node.input[0]] != 1:
            changed[label] = NodeDecision(label, "Gather", "float", "its table is also read by another node")
        elif width % 16:
            changed[label] = NodeDecision(label, "Gather", "float", f"rows of {width} values fill no block of 16")
        else:
            changed[label] = _table_to_gbq(graph, node, label, table, names)
    if not any(d.status == NodeStatus.INT8 for d in changed.values()):
        return model, decisions
    import_domain(model, MS_DOMAIN)
    kept = [changed.pop(d.name, d) for d in decisions]
    return model, kept + list(changed.values())


def _tables_to_quantize(graphs: list[onnx.GraphProto], choices: dict[str, NodeChoice]
                        ) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto, str, onnx.TensorProto]]:
    """(graph, Gather, its label, its table) for each embedding table no recipe rule or --exclude keeps float."""
    for graph in graphs:
        if not any(node.op_type == "Gather" for node in graph.node):
            continue
        tables = {t.name: t for t in graph.initializer}
        for node in graph.node:
            table = _proto_table(node, tables)
            if table is None:
                continue
            label = node.name or f"Gather({', '.join(node.output)})"
            if _chosen_bits(choices.get(label), 8) != 0:
                yield graph, node, label, table


def _proto_table(node: onnx.NodeProto, tables: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    """The constant 2-D float table a Gather on axis 0 reads with run-time indices (as `_gather_table`)."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    if any(a.name == "axis" and a.i != 0 for a in node.attribute) or node.input[1] in tables:
        return None
    table = tables.get(node.input[0])
    if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2:
        return None
    if table.data_location == onnx.TensorProto.EXTERNAL and not is_spilled(table):
        return None  # its file is not where this process could read it
    return table if table.dims[0] * table.dims[1] >= MIN_TABLE else None


def _table_to_gbq(graph: onnx.GraphProto, node: onnx.NodeProto, label: str, table: onnx.TensorProto,
                  names: NameAllocator) -> NodeDecision:
    width = table.dims[1]
    block = 32 if width % 32 == 0 else 16
    data, scales = _symmetric_rows(read_tensor(table).astype(np.float32, copy=False), block)
    base = table.name
    data_name, scales_name = names.new(f"{base}_int8"), names.new(f"{base}_scales")
    graph.initializer.remove(table)
    graph.initializer.extend([numpy_helper.from_array(data, data_name), numpy_helper.from_array(scales, scales_name)])
    indices = node.input[1]
    del node.input[:]
    node.input.extend([data_name, indices, scales_name])
    del node.attribute[:]
    node.attribute.extend([onnx.helper.make_attribute(k, v) for k, v in
                           (("bits", 8), ("block_size", block), ("gather_axis", 0), ("quantize_axis", 1))])
    node.op_type, node.domain = "GatherBlockQuantized", MS_DOMAIN
    return NodeDecision(label, "Gather", "int8", f"8-bit table, blocks of {block} (GatherBlockQuantized)")


def _symmetric_rows(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes [V, D] and scales [V, D / block] in GatherBlockQuantized's symmetric form (zero point
    128, as weight_rounding's minmax_params: the value of largest magnitude is code 0), in float32:
    a 30k-row table in 0.2 s, where the float64 block rounding of the int4 path takes 2 s."""
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    scales = (largest / np.float32(-128)).astype(np.float32)
    scales[scales == 0] = 1
    codes = np.clip(np.rint(blocks / scales[..., None]) + 128, 0, 255).astype(np.uint8)
    return codes.reshape(rows, width), scales


def run_weight_only(request: QuantizeRequest, model: onnx.ModelProto, reference: onnx.ModelProto, qtype: QType,
                    choices: dict[str, NodeChoice], held: SampleSource | None,
                    progress: ProgressFactory = no_progress) -> Int4Result:
    """--mode weight-only as the pipeline runs it: int8 per channel (+ 8-bit embeddings), or int4."""
    options = request.weight_only
    if options.bits == 8:
        if request.target is not None:
            raise UsageError("an accuracy target in --mode weight-only mixes int4 and int8: give --weight-bits 4")
        quantized, decisions = rewrite_weight_only(model, options, qtype, layer_options(choices))
        quantized, embedded = quantize_embeddings_int8(quantized, choices, options.block_size)
        return Int4Result(quantized, decisions + embedded, [], {"method": "rtn", "bits": 8})
    specs = model_input_specs(model)
    data = request.data
    calib = open_calibration(data.calib, specs, data.images, data.max_samples) if data.calib is not None else None
    if calib is not None:
        check_batch_size(data.batch_size, specs)
    search = None
    if request.target is not None:
        if request.fallback not in ("int8", "float"):
            raise UsageError("--mode weight-only falls back to int8 or float weights: --fallback int8|float")
        samples = open_source(request.target_data, specs, data.images) if request.target_data is not None else held
        if samples is None:
            raise UsageError("an accuracy target needs samples to measure it on: give --eval-data or --calib")
        metric = load_metric(request.metric) if request.metric is not None else None
        reference_outputs = CachedReference(reference, samples, request.target_samples, metric)
        limit = request.max_fallbacks if request.max_fallbacks is not None else 10**9
        search = (request.target, reference_outputs, limit, request.fallback)
    return quantize_int4(model, options, choices, calib, batch_size=data.batch_size,
                         memory_budget=data.memory_budget, search=search, progress=progress)


def target_gates(target_report: dict) -> list[dict]:
    """The accuracy target as report gates (exit 6 when missed), as the static path reports them."""
    gates = []
    for key, measured_key, gate in (("min_sqnr_db", "min_sqnr_db", "target_sqnr_db"),
                                    ("min_cosine", "min_cosine", "target_cosine"),
                                    ("min_metric", "metric", "target_metric")):
        required = target_report["target"][key]
        if required is not None:
            measured = target_report["final"][measured_key]
            gates.append({"gate": gate, "required": required, "measured": measured,
                          "passed": measured is not None and bool(measured >= required)})
    return gates
