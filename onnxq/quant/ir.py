"""The in-memory view every pass uses: onnx-graphsurgeon's Graph, plus small helpers.

Passes ask questions of tensors and nodes here instead of walking protobuf.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxq.model_io import externalize, is_spilled, read_tensor

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
    dtype = tensor.dtype  # a Constant's dtype is known without loading its values
    if dtype is None:
        return False
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:  # onnx enum values for types numpy lacks
        return dtype == onnx.TensorProto.FLOAT


UNCACHED_BYTES = 2**26  # constants this large are read from the model each time, not kept on the graph


def constant_values(tensor: gs.Tensor) -> np.ndarray:
    """A constant's values. graphsurgeon keeps what it loads on the graph: for a large weight (a model over
    2 GiB holds many) that is a second copy for as long as the graph lives, so those are read without it."""
    lazy = getattr(tensor, "_values", None)
    if isinstance(lazy, gs.ir.tensor.LazyValues) and (is_spilled(lazy.tensor) or lazy.nbytes >= UNCACHED_BYTES):
        return read_tensor(lazy.tensor)  # a spilled weight (onnxq.model_io) is read from its file
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
        for sub in all_graphs(graph):
            self.used.update(sub.tensors().keys())
            self.used.update(n.name for n in sub.nodes if n.name)

    @classmethod
    def for_proto(cls, graph: onnx.GraphProto) -> NameAllocator:
        """The same, for a protobuf graph (and its bodies) edited without importing it."""
        allocator = cls.__new__(cls)
        allocator.used = {v.name for v in [*graph.input, *graph.output]}
        for sub in all_proto_graphs(graph):
            allocator.used.update(t.name for t in sub.initializer)
            allocator.used.update(v.name for v in sub.value_info)
            for node in sub.node:
                allocator.used.update([*node.input, *node.output, node.name])
        return allocator

    def new(self, base: str) -> str:
        name, index = base, 1
        while name in self.used:
            name = f"{base}_{index}"
            index += 1
        self.used.add(name)
        return name


def all_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every If/Loop/Scan body inside it, depth first."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from all_graphs(sub)


def replace_nodes(graph: gs.Graph, removed: list[gs.Node], new: gs.Node) -> None:
    """Put `new` in place of `removed` (which `new` already took its tensors from); cleanup drops them."""
    for old in removed:
        old.inputs.clear()
        old.outputs.clear()
    graph.nodes.append(new)


def import_domain(model: onnx.ModelProto, domain: str, version: int = 1) -> None:
    """Declare `domain` in the model's opset imports when any node (also in a subgraph) uses it."""
    if any(o.domain == domain for o in model.opset_import):
        return
    if any(node.domain == domain for node in all_proto_nodes(model.graph)):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def all_proto_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of a protobuf graph and of its If/Loop/Scan bodies (graph by graph)."""
    for sub in all_proto_graphs(graph):
        yield from sub.node


def all_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A protobuf graph and its If/Loop/Scan bodies, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from all_proto_graphs(body)


def concrete_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                    ) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's inferred shape (None for unknown dims), with the graph inputs fixed to `input_shapes`
    (a real sample's shapes, so dynamic models get concrete sizes too). The model is not changed; its
    large weights are not copied (inference reads their types and dims only)."""
    work = externalize(model, None, "shapes-only")
    for value in work.graph.input:
        shape = (input_shapes or {}).get(value.name)
        if shape is not None and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shape:
                dims.add().dim_value = int(size)
    del work.graph.value_info[:]
    try:
        work = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return {}  # inference is a help: unknown shapes make later stages fall back, not fail
    shapes: dict[str, tuple[int | None, ...]] = {}
    for value in (*work.graph.input, *work.graph.value_info, *work.graph.output):
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                       for d in tensor_type.shape.dim)
    return shapes
