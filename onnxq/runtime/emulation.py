"""A quantized model as float arithmetic that gives the target CPU's integer results on any host.

The automatic search (onnxq.search.auto) measures candidates on this machine, but the model is for a
target CPU class. Fused int8 kernels do not compute alike on every host: x86 CPUs without VNNI
multiply uint8 by int8 in pairs that saturate at 16 bits, so a model with full 8-bit weights (made
for a VNNI, AMX or ARM target) reads other answers on an AVX2 host. Measured that way, the same
input would choose another candidate on another machine. So candidates are measured as what the
integer arithmetic means, without onnxruntime's fusions: QuantizeLinear/DequantizeLinear pairs run
as they are (round, clip, scale back; the layer computes in float on exactly the dequantized
values), and every DynamicQuantizeMatMul becomes DynamicQuantizeLinear -> DequantizeLinear ->
MatMul on the dequantized weight (+ bias). Float summation order aside, that is the exact int32
result every target class computes. DynamicQuantizeLSTM stays as it is: its kernel is the only
form onnxruntime has (on a host without VNNI, an LSTM with full-range weights may saturate).

The model written is never this one: onnxq.runtime.precision checks that it runs at its planned precision
in the graph onnxruntime builds.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.quant.ir import NameAllocator, all_graphs, export_model, import_graph

LEVEL = "disabled"  # onnxruntime optimization level the emulated model runs at: no fusion into int8 kernels


def emulated(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every DynamicQuantizeMatMul written out in standard ops (see the module docstring)."""
    graph = import_graph(model)
    names = NameAllocator(graph)
    changed = False
    for sub in all_graphs(graph):
        for node in [n for n in sub.nodes if n.op == "DynamicQuantizeMatMul"]:
            standard = _matmul_in_standard_ops(node, names)
            node.inputs.clear()
            node.outputs.clear()
            sub.nodes.extend(standard)
            changed = True
    return export_model(graph, model) if changed else model


def _matmul_in_standard_ops(node: gs.Node, names: NameAllocator) -> list[gs.Node]:
    """DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, [bias]) as the ops it stands for."""
    a, weight, scale, zero_point = node.inputs[:4]
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    base = node.name or names.new("dynamic_matmul")
    a_q = gs.Variable(names.new(f"{base}_a_quantized"), dtype=np.uint8)
    a_scale = gs.Variable(names.new(f"{base}_a_scale"), dtype=np.float32)
    a_zero = gs.Variable(names.new(f"{base}_a_zero_point"), dtype=np.uint8)
    a_float = gs.Variable(names.new(f"{base}_a_dequantized"), dtype=np.float32)
    w_float = gs.Variable(names.new(f"{base}_weight_dequantized"), dtype=np.float32)
    per_column = {"axis": 1} if np.asarray(scale.values).size > 1 else {}
    nodes = [gs.Node("DynamicQuantizeLinear", names.new(f"{base}_quantize_a"), inputs=[a],
                     outputs=[a_q, a_scale, a_zero]),
             gs.Node("DequantizeLinear", names.new(f"{base}_dequantize_a"), inputs=[a_q, a_scale, a_zero],
                     outputs=[a_float]),
             gs.Node("DequantizeLinear", names.new(f"{base}_dequantize_weight"), per_column,
                     inputs=[weight, scale, zero_point], outputs=[w_float])]
    output = node.outputs[0]
    if bias is None:
        nodes.append(gs.Node("MatMul", names.new(f"{base}_matmul"), inputs=[a_float, w_float], outputs=[output]))
        return nodes
    product = gs.Variable(names.new(f"{base}_product"), dtype=np.float32)
    nodes.append(gs.Node("MatMul", names.new(f"{base}_matmul"), inputs=[a_float, w_float], outputs=[product]))
    nodes.append(gs.Node("Add", names.new(f"{base}_bias"), inputs=[product, bias], outputs=[output]))
    return nodes
