"""`onnxq inspect`: what a model contains and, for an int8 model, what onnxruntime fuses.

For a float model: op histogram, inputs and outputs, what `quantize` would run in int8
(placement only; no data needed) and the task answer each output is judged by
(onnxq.runtime.agreement). For a quantized model (it has QuantizeLinear,
DequantizeLinear or integer ops): the same histogram plus the fusion check.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from onnxq.enums import NodeStatus
from onnxq.model_io import load_model
from onnxq.passes.prepare import prepare_model
from onnxq.quant.ir import import_graph
from onnxq.quant.ops import HEAVY_OPS, QUANTIZE_OPS, is_integer_kernel
from onnxq.quant.placement import PlacementOptions, place
from onnxq.runtime.agreement import infer_measures
from onnxq.runtime.fusion import check_fusion


def inspect_model(path: Path) -> dict:
    model = load_model(path)
    ops = Counter(_op_name(node) for node in model.graph.node)
    quantized = any(op in QUANTIZE_OPS or is_integer_kernel(op.split("::")[-1]) for op in ops)
    info = {
        "model": str(path),
        "bytes": path.stat().st_size,
        "opsets": {(entry.domain or "ai.onnx"): entry.version for entry in model.opset_import},
        "inputs": [_value(v) for v in _graph_inputs(model)],
        "outputs": [_value(v) for v in model.graph.output],
        "nodes": len(model.graph.node),
        "op_types": dict(sorted(ops.items())),
        "quantized": quantized,
    }
    if quantized:
        info["fusion"] = check_fusion(model).to_dict()
    else:
        info["quantizable"] = _quantizable(model)
        info["task_measures"] = [m.to_dict() for m in infer_measures(model)]
    return info


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    constants = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in constants]


def _value(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type) if tensor.elem_type else "?"
    return {"name": value.name, "type": dtype.lower(), "shape": dims if tensor.HasField("shape") else None}


def _quantizable(model: onnx.ModelProto) -> dict:
    """What `quantize` would do with default settings (no data: placement only)."""
    placement = place(import_graph(prepare_model(model).model), PlacementOptions())
    by_op: dict[str, Counter] = {}
    float_reasons = Counter()
    for node in placement.nodes:
        by_op.setdefault(node.op_type, Counter())[node.status] += 1
        if node.status == NodeStatus.FLOAT and node.op_type in HEAVY_OPS:
            float_reasons[f"{node.op_type}: {node.reason}"] += 1
    return {"by_op_type": {op: dict(sorted(c.items())) for op, c in sorted(by_op.items())},
            "heavy_ops_int8": sum(c.get("int8", 0) for op, c in by_op.items() if op in HEAVY_OPS),
            "heavy_ops_float": dict(float_reasons.most_common())}


def format_inspection(info: dict) -> str:
    lines = [f"{info['model']}: {info['nodes']} nodes, {info['bytes'] / 1e6:.2f} MB, opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items())]
    for kind in ("inputs", "outputs"):
        lines.append(f"  {kind}: " + "; ".join(f"{v['name']} {v['type']} {v['shape']}" for v in info[kind]))
    lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in info["op_types"].items()))
    if info["quantized"]:
        fusion = info["fusion"]
        kernels = ", ".join(f"{op} {n}" for op, n in fusion["int8_kernels"].items()) or "none"
        lines.append(f"  int8 kernels after onnxruntime's optimizations: {kernels}")
        lines.append(f"  avoidable unfused: {fusion['avoidable']} "
                     f"({len(fusion['dequantized_weights'])} layers with int8 weights running in float, "
                     f"{len(fusion['unfused_pairs'])} Q/DQ pairs between float ops)")
        for item in fusion["dequantized_weights"]:
            lines.append(f"    float {item['op']} {item['node']} reads int8 weight {item['weight']}")
        for item in fusion["unfused_pairs"]:
            lines.append(f"    Q/DQ on {item['tensor']}: {item['producer']} -> {', '.join(item['consumers'])}")
        borders = fusion["borders"]
        lines.append(f"  float-region borders (expected): {borders.get('dequantize', 0)} DequantizeLinear, "
                     f"{borders.get('quantize', 0)} QuantizeLinear")
        wide = fusion["w8a16"]
        if wide["weights"] or wide["pairs"]:
            lines.append(f"  int16 layers (W8A16, float compute on CPU, expected): {wide['weights']} 8-bit weights, "
                         f"{wide['pairs']} 16-bit Q/DQ pairs")
    else:
        q = info["quantizable"]
        lines.append(f"  quantizable: {q['heavy_ops_int8']} Conv/MatMul/Gemm would run in int8")
        for reason, count in q["heavy_ops_float"].items():
            lines.append(f"    {count} stay float: {reason}")
        lines.append("  the same answer, per output (onnxq.runtime.agreement; with data, quantize also reads a CTC "
                     "blank, and small [0, 1] outputs as decisions):")
        for measure in info["task_measures"]:
            lines.append(f"    {measure['name']}: {measure['kind']} ({measure['why']})")
    return "\n".join(lines)
