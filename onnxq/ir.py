"""The in-memory view every pass uses: onnx-graphsurgeon's Graph, plus small helpers.

Passes ask questions of tensors and nodes here instead of walking protobuf.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

Tensor = gs.Tensor
Node = gs.Node
Graph = gs.Graph


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export back to ONNX, keeping the model-level fields graphsurgeon does not carry."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    model.doc_string = like.doc_string
    model.model_version = like.model_version
    model.domain = like.domain
    return model


def is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def is_float32(tensor: gs.Tensor) -> bool:
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:  # onnx enum values for types numpy lacks
        return dtype == onnx.TensorProto.FLOAT


def constant_values(tensor: gs.Tensor) -> np.ndarray:
    return np.asarray(tensor.values)


def is_empty(tensor: gs.Tensor) -> bool:
    """graphsurgeon's stand-in for an omitted optional input."""
    return isinstance(tensor, gs.Variable) and tensor.name == ""


def node_label(node: gs.Node) -> str:
    return node.name or f"{node.op}({', '.join(t.name for t in node.outputs)})"


class NameAllocator:
    """Fresh, deterministic names that do not clash with anything in the model."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used: set[str] = set()
        for sub in _graphs(graph):
            self.used.update(sub.tensors().keys())
            self.used.update(n.name for n in sub.nodes if n.name)

    def new(self, base: str) -> str:
        name, index = base, 1
        while name in self.used:
            name = f"{base}_{index}"
            index += 1
        self.used.add(name)
        return name


def _graphs(graph: gs.Graph):
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from _graphs(value)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from _graphs(item)
