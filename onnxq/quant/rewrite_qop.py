"""Write the QOperator form: integer operators instead of DequantizeLinear -> op -> QuantizeLinear.

Built from the QDQ model the plan produced, so both forms carry exactly the same scales,
zero points and integer weights. Every pattern onnxruntime's CPU provider has an integer
kernel for is replaced:

    DQ(x) [, DQ(w) [, DQ(b)]] -> op [-> Relu/Clip] -> Q   becomes   QLinear<op>(x_q, ...) -> y_q

Conv -> QLinearConv; MatMul -> QLinearMatMul, or com.microsoft MatMulIntegerToFloat when its
output stays float; Gemm -> com.microsoft QGemm; Add, Mul, Concat, AveragePool,
GlobalAveragePool, Sigmoid, LeakyRelu -> their com.microsoft QLinear ops. Ops that only move
values (MaxPool, Reshape, Transpose, ...) run directly on the integer tensor. What is left of
QuantizeLinear/DequantizeLinear sits at the borders of float regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.quant.ir import export_model, import_domain, import_graph, is_constant, replace_nodes
from onnxq.quant.ops import FOLDABLE_ACTIVATIONS, HEAVY_OPS, MS_DOMAIN, PASS_THROUGH_OPS, QLINEAR_BINARY, QLINEAR_UNARY


@dataclass
class Quantized:
    """An integer tensor with its parameters (an activation pair, a weight or a bias)."""

    tensor: gs.Tensor
    scale: gs.Tensor
    zero_point: gs.Tensor | None
    axis: int | None = None


def write_qoperator(qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    graph = import_graph(qdq_model)
    rewriter = _Rewriter(graph)
    for node in list(graph.nodes):
        rewriter.visit(node)
    model = export_model(graph, qdq_model)
    import_domain(model, MS_DOMAIN)
    model.producer_name = "onnxq"
    return model


class _Rewriter:
    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.outputs = {t.name for t in graph.outputs}
        self.dequantized: dict[str, Quantized] = {}  # DQ output name -> what it dequantizes
        for node in graph.nodes:
            if node.op == "DequantizeLinear":
                zero = node.inputs[2] if len(node.inputs) > 2 else None
                self.dequantized[node.outputs[0].name] = Quantized(node.inputs[0], node.inputs[1], zero,
                                                                   node.attrs.get("axis"))

    def visit(self, node: gs.Node) -> None:
        if node.op in HEAVY_OPS:
            self._heavy(node)
        elif node.op in QLINEAR_BINARY:
            self._simple(node, QLINEAR_BINARY[node.op], list(node.inputs), interleave_output_first=False)
        elif node.op == "Concat":
            self._simple(node, "QLinearConcat", list(node.inputs), interleave_output_first=True)
        elif node.op in QLINEAR_UNARY:
            self._simple(node, QLINEAR_UNARY[node.op], node.inputs[:1], interleave_output_first=False)
        elif node.op in PASS_THROUGH_OPS:
            self._pass_through(node)

    # -------------------------------------------------------------- helpers

    def _activation(self, tensor: gs.Tensor) -> Quantized | None:
        """The integer tensor behind a dequantized activation (not a constant weight)."""
        found = self.dequantized.get(tensor.name)
        if found is None or is_constant(found.tensor) or found.axis is not None:
            return None
        return found

    def _output_quantizer(self, tensor: gs.Tensor, through_activation: bool) -> tuple[gs.Node, list[gs.Node]] | None:
        """The QuantizeLinear that is `tensor`'s only consumer (optionally after a folded Relu/Clip)."""
        skipped: list[gs.Node] = []
        while True:
            if tensor.name in self.outputs or len(tensor.outputs) != 1:
                return None
            consumer = tensor.outputs[0]
            if consumer.op == "QuantizeLinear":
                return consumer, skipped
            if not through_activation or consumer.op not in FOLDABLE_ACTIVATIONS or skipped:
                return None
            skipped.append(consumer)
            tensor = consumer.outputs[0]

    def _folds_into(self, activations: list[gs.Node], quantizer: gs.Node) -> bool:
        """A Relu/Clip(0, hi) disappears only when the output's zero point is the type's minimum."""
        if not activations:
            return True
        zero = np.asarray(quantizer.inputs[2].values) if len(quantizer.inputs) > 2 else np.zeros((), np.uint8)
        return zero.dtype == np.uint8 and int(zero) == 0

    def _replace(self, removed: list[gs.Node], new: gs.Node) -> None:
        replace_nodes(self.graph, removed, new)

    # -------------------------------------------------------------- patterns

    def _heavy(self, node: gs.Node) -> None:
        a = self._activation(node.inputs[0])
        if a is None:
            return
        b = self.dequantized.get(node.inputs[1].name)
        if b is None or (node.op == "Conv" and not is_constant(b.tensor)):
            return
        bias = self.dequantized.get(node.inputs[2].name) if len(node.inputs) > 2 else None
        if len(node.inputs) > 2 and bias is None:
            return
        found = self._output_quantizer(node.outputs[0], through_activation=node.op == "Conv")
        if found is not None and not self._folds_into(found[1], found[0]):
            found = None
        if node.op == "Conv":
            if found is None:
                return
            quantizer, activations = found
            inputs = [a.tensor, a.scale, a.zero_point, b.tensor, b.scale, b.zero_point, quantizer.inputs[1],
                      quantizer.inputs[2]] + ([bias.tensor] if bias else [])
            self._replace([node, *activations, quantizer],
                          gs.Node("QLinearConv", node.name, dict(node.attrs), inputs, [quantizer.outputs[0]]))
        elif node.op == "MatMul":
            self._matmul(node, a, b, found)
        else:
            self._gemm(node, a, b, bias, found)

    def _matmul(self, node: gs.Node, a: Quantized, b: Quantized, found) -> None:
        if found is not None and not found[1]:
            quantizer = found[0]
            inputs = [a.tensor, a.scale, a.zero_point, b.tensor, b.scale, b.zero_point, quantizer.inputs[1],
                      quantizer.inputs[2]]
            self._replace([node, quantizer], gs.Node("QLinearMatMul", node.name, {}, inputs, [quantizer.outputs[0]]))
            return
        output = node.outputs[0]
        inputs = [a.tensor, b.tensor, a.scale, b.scale, a.zero_point, b.zero_point]
        self._replace([node], gs.Node("MatMulIntegerToFloat", node.name, {}, inputs, [output], domain=MS_DOMAIN))

    def _gemm(self, node: gs.Node, a: Quantized, b: Quantized, bias: Quantized | None, found) -> None:
        attrs = {k: v for k, v in node.attrs.items() if k in ("transA", "transB", "alpha")}
        c = [bias.tensor] if bias is not None else [gs.Variable.empty()]
        inputs = [a.tensor, a.scale, a.zero_point, b.tensor, b.scale, b.zero_point, *c]
        if found is not None and not found[1]:
            quantizer = found[0]
            self._replace([node, quantizer], gs.Node("QGemm", node.name, attrs,
                                                     [*inputs, quantizer.inputs[1], quantizer.inputs[2]],
                                                     [quantizer.outputs[0]], domain=MS_DOMAIN))
            return
        output = node.outputs[0]
        if bias is None:
            inputs = inputs[:6]
        self._replace([node], gs.Node("QGemm", node.name, attrs, inputs, [output], domain=MS_DOMAIN))

    def _simple(self, node: gs.Node, op: str, sources: list[gs.Tensor], interleave_output_first: bool) -> None:
        quantized = [self._activation(t) for t in sources]
        if not sources or any(q is None for q in quantized):
            return
        found = self._output_quantizer(node.outputs[0], through_activation=False)
        if found is None:
            return
        quantizer = found[0]
        out_params = [quantizer.inputs[1], quantizer.inputs[2]]
        flat = [t for q in quantized for t in (q.tensor, q.scale, q.zero_point)]
        inputs = out_params + flat if interleave_output_first else flat + out_params
        attrs = dict(node.attrs)
        if node.op in ("AveragePool", "GlobalAveragePool"):
            attrs["channels_last"] = 0
        new = gs.Node(op, node.name, attrs, inputs, [quantizer.outputs[0]], domain=MS_DOMAIN)
        self._replace([node, quantizer], new)

    def _pass_through(self, node: gs.Node) -> None:
        source = self._activation(node.inputs[0])
        if source is None:
            return
        quantizers = []
        for output in node.outputs:
            found = self._output_quantizer(output, through_activation=False)
            if found is None or not _same_params(found[0], source):
                return
            quantizers.append(found[0])
        new_outputs = [q.outputs[0] for q in quantizers]
        inputs = [source.tensor, *node.inputs[1:]]
        self._replace([node, *quantizers], gs.Node(node.op, node.name, dict(node.attrs), inputs, new_outputs))


def _same_params(quantizer: gs.Node, source: Quantized) -> bool:
    """Moving values keeps their scale: only then may the op run on the integer tensor."""
    def values(tensor: gs.Tensor | None) -> np.ndarray | None:
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

    scale, zero = values(quantizer.inputs[1]), values(quantizer.inputs[2] if len(quantizer.inputs) > 2 else None)
    return (scale is not None and zero is not None and source.zero_point is not None
            and np.array_equal(scale, values(source.scale)) and np.array_equal(zero, values(source.zero_point))
            and zero.dtype == values(source.zero_point).dtype)
