"""Reading, preparing and writing ONNX models, with user-facing errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx import numpy_helper

from .errors import ModelError, OutputError, first_line
from .outputs import staged

# protobuf cannot serialise a single message over 2 GiB; above this we use external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the .onnx file when data goes external.
EXTERNAL_TENSOR_MIN_BYTES = 1024
NAME_MAX = 255  # bytes in one file name on common file systems


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model is too large to be one protobuf message (over 2 GiB)."""
    return model.ByteSize() >= EXTERNAL_DATA_THRESHOLD


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load a model (and its external data), or raise ModelError with the reason in one line."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a folder, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ModelError(f"model is not readable: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        reason = first_line(exc)
        raise ModelError(f"cannot read {path} as an ONNX model (truncated or not ONNX?): {reason}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path} does not contain an ONNX graph (empty or not an ONNX file)")
    try:
        # The checker cannot take a proto over 2 GiB in memory; it reads such a model from its path.
        onnx.checker.check_model(str(path) if needs_external_data(model) else model, full_check=False)
    except Exception as exc:
        reason = first_line(exc)
        raise ModelError(f"{path} is not a valid ONNX model: {reason}") from None
    return model


def model_digest(model: onnx.ModelProto) -> str:
    """Stable identity of a model's graph and weights, used to check that statistics fit a model.

    Nodes (with their attributes) and initializers are hashed whole: a model with the same
    topology but other weights, strides or pads has other activations, so other statistics.
    """
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for initializer in model.graph.initializer:
        digest.update(initializer.SerializeToString(deterministic=True))
    for tensor in (*model.graph.input, *model.graph.output):
        digest.update(tensor.name.encode())
    return digest.hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file beside `path`, renamed when complete (see onnxq.outputs)."""
    with staged(Path(path)) as temporary:
        temporary.write_bytes(data)


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic serialisation (fields in order, no maps with random order)."""
    return model.SerializeToString(deterministic=True)


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Save atomically; models over 2 GiB get their tensors in `<name>.data` beside them. `model` is not changed."""
    path = Path(path)
    if not needs_external_data(model):
        atomic_write_bytes(path, serialize(model))
        return
    data_name = f"{path.name}.data"
    if len(os.fsencode(data_name)) > NAME_MAX:
        raise OutputError(f"cannot write {path}: the model is over 2 GiB and its weights file name "
                          f"{data_name} would be longer than {NAME_MAX} bytes; choose a shorter name")
    with staged(path.parent / data_name) as data_file:
        skeleton = externalize(model, data_file, data_name)
    atomic_write_bytes(path, serialize(skeleton))


def save_for_onnxruntime(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Write a copy of `model` into a scratch `folder` for onnxruntime to load; `model` is not changed.

    `onnx.save_model(..., save_as_external_data=True)` would turn the caller's tensors into
    references to a file in the scratch folder, which is deleted afterwards.
    """
    path = Path(folder) / name
    if needs_external_data(model):
        data_name = f"{name}.data"
        path.write_bytes(serialize(externalize(model, Path(folder) / data_name, data_name)))
    else:
        path.write_bytes(serialize(model))
    return path


EXTERNAL_ALIGNMENT = 4096  # tensor offsets in the .data file: page-aligned, so onnxruntime can map them


def externalize(model: onnx.ModelProto, data_path: Path | None, location: str) -> onnx.ModelProto:
    """The model with its main-graph initializers of at least EXTERNAL_TENSOR_MIN_BYTES written to `data_path`.

    Returns a new proto that refers to them by `location`; `model` is read, never changed, and
    no copy of the large tensors is made (they are written one at a time). With `data_path` None
    nothing is written: a skeleton for passes that need shapes and types only.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    with open(data_path if data_path is not None else os.devnull, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.ByteSize() < EXTERNAL_TENSOR_MIN_BYTES:
                skeleton.graph.initializer.append(tensor)
                continue
            data.write(b"\0" * (-data.tell() % EXTERNAL_ALIGNMENT))
            offset = data.tell()
            if data_path is not None:
                raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                data.write(raw)
                del raw
            else:
                data.seek(offset + _tensor_bytes(tensor))
            entry = skeleton.graph.initializer.add()
            entry.name, entry.data_type, entry.data_location = tensor.name, tensor.data_type, onnx.TensorProto.EXTERNAL
            entry.dims.extend(tensor.dims)
            if tensor.doc_string:
                entry.doc_string = tensor.doc_string
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                entry.external_data.add(key=key, value=value)
    return skeleton


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of a protobuf message except `skip` (which stays empty in `target`)."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        repeated = getattr(descriptor, "is_repeated", None)  # protobuf >= 6; older ones have `label`
        if repeated if repeated is not None else descriptor.label == descriptor.LABEL_REPEATED:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


