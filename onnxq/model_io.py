"""Reading, preparing and writing ONNX models, with user-facing errors."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.errors import ModelError, OnnxqError, OutputError, first_line
from onnxq.outputs import staged

# protobuf cannot serialise a single message over 2 GiB; above this we use external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the .onnx file when data goes external.
EXTERNAL_TENSOR_MIN_BYTES = 1024
NAME_MAX = 255  # bytes in one file name on common file systems


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model is too large to be one protobuf message (over 2 GiB).

    The part-by-part estimate decides: what it leaves out (names, opsets, metadata) is far below the
    threshold's margin, and sizing the whole message would serialize it (~40 ms a call on a 10 MB model).
    """
    return _estimated_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size, near enough, counted part by part: protobuf cannot size (it serializes) a
    message over 2 GiB, and tensors count without copying their data."""
    estimate = _estimated_bytes(model)
    return estimate if estimate >= PROTOBUF_LIMIT // 2 else model.ByteSize()  # exact where protobuf can tell


def _estimated_bytes(model: onnx.ModelProto) -> int:
    graph = model.graph
    return (sum(_tensor_bytes(t) for t in graph.initializer) + sum(n.ByteSize() for n in graph.node)
            + sum(v.ByteSize() for v in (*graph.input, *graph.output, *graph.value_info, *graph.sparse_initializer,
                                         *model.functions)))


PROTOBUF_LIMIT = 2**31


def load_model(path: str | Path, lazy_weights: bool = False) -> onnx.ModelProto:
    """Load a model (and its external data), or raise ModelError with the reason in one line.

    `lazy_weights`: a model whose external data makes it over 2 GiB comes without its weights (they
    stay on disk, checked to exist); onnxq.passes.prepare.prepare_model reads them through onnxruntime.
    """
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
        model = onnx.load(str(path), load_external_data=False)
        if weights_on_disk(model) and not (lazy_weights and needs_external_data(model)):
            load_weights(model, path)
    except OnnxqError:
        raise
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        reason = first_line(exc)
        raise ModelError(f"cannot read {path} as an ONNX model (truncated or not ONNX?): {reason}") from None
    missing = _missing_data_files(model, path)
    if missing:
        raise ModelError(f"{path}: its external data file {missing[0]} is missing (it must be next to the model)")
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path} does not contain an ONNX graph (empty or not an ONNX file)")
    try:
        # From the path: the checker's C++ reads the file itself (a proto in memory is serialized for it
        # first, a second copy of the weights and 0.1-0.3 s on a 100 MB model; over 2 GiB it cannot be).
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:
        reason = first_line(exc)
        raise ModelError(f"{path} is not a valid ONNX model: {reason}") from None
    return model


# A prepared model over 2 GiB keeps its weights in onnxruntime's optimized copy on disk: its initializers are
# external references with an absolute location ("spilled"), read one at a time by read_tensor and copied
# by the writers below, so the weights are never in memory all at once. The folders go at exit.
_spill_folders: list[str] = []


def spill_folder() -> Path:
    """A new folder for weights a model refers to; removed when the process exits."""
    if not _spill_folders:
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _spill_folders])
    _spill_folders.append(tempfile.mkdtemp(prefix="onnxq-weights-"))
    return Path(_spill_folders[-1])


def spill(model: onnx.ModelProto, folder: Path) -> None:
    """Point `model`'s external references (relative to `folder`, where it was loaded from) at absolute paths."""
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and not os.path.isabs(entry.value):
                entry.value = str(Path(folder).resolve() / entry.value)


def is_spilled(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and os.path.isabs(e.value) for e in tensor.external_data)


def read_tensor(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, also for a spilled one (read from its file: onnx refuses absolute locations)."""
    if not is_spilled(tensor):
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    values = np.fromfile(info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return values.reshape(tuple(tensor.dims))


def _inlined(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A spilled tensor as it would be in memory (its values in raw_data)."""
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = read_tensor(tensor).tobytes()
    return inline


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself, or a copy with its spilled tensors read back in (for a model small enough for one file)."""
    if not any(is_spilled(t) for t in model.graph.initializer):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if is_spilled(tensor):
            tensor.CopyFrom(_inlined(tensor))
    return copy


def weights_on_disk(model: onnx.ModelProto) -> bool:
    """True when initializers of the main graph refer to external data not loaded into the proto."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def load_weights(model: onnx.ModelProto, path: Path) -> None:
    """Read the external data of `model`, loaded from `path` without it, into the proto."""
    onnx.external_data_helper.load_external_data_for_model(model, str(Path(path).parent))


def _missing_data_files(model: onnx.ModelProto, path: Path) -> list[str]:
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return sorted(name for name in locations if not (path.parent / name).is_file())


def model_digest(model: onnx.ModelProto) -> str:
    """Stable identity of a model's graph and weights, used to check that statistics fit a model.

    Nodes (with their attributes) and initializers are hashed whole: a model with the same
    topology but other weights, strides or pads has other activations, so other statistics.
    """
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for initializer in model.graph.initializer:
        tensor = _inlined(initializer) if is_spilled(initializer) else initializer
        digest.update(tensor.SerializeToString(deterministic=True))
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
        atomic_write_bytes(path, serialize(materialized(model)))
        return
    data_name = f"{path.name}.data"
    if len(os.fsencode(data_name)) > NAME_MAX:
        raise OutputError(f"cannot write {path}: the model is over 2 GiB and its weights file name "
                          f"{data_name} would be longer than {NAME_MAX} bytes; choose a shorter name")
    with staged(path.parent / data_name) as data_file:
        skeleton = externalize(model, data_file, data_name)
    atomic_write_bytes(path, serialize(skeleton))


def save_for_onnxruntime(model: onnx.ModelProto, folder: Path, name: str = "model.onnx",
                         outputs: Iterable[str] = ()) -> Path:
    """Write a copy of `model` into a scratch `folder` for onnxruntime to load; `model` is not changed.

    `outputs`: tensors the copy also returns (float; graph inputs and existing outputs are skipped),
    added without a second copy of the weights in memory. `onnx.save_model(..., save_as_external_data=
    True)` would have turned the caller's tensors into references to the scratch folder, deleted afterwards.
    """
    path, outputs = Path(folder) / name, list(outputs)
    if needs_external_data(model):
        data_name = f"{name}.data"
        written = externalize(model, Path(folder) / data_name, data_name)
    else:
        written = materialized(model)
        if outputs and written is model:
            written = onnx.ModelProto()
            written.CopyFrom(model)
    add_outputs(written, outputs)
    path.write_bytes(serialize(written))
    return path


def add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Make the named float tensors graph outputs of `model` (in place; inputs and outputs already there skip)."""
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)


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
            spilled = is_spilled(tensor)
            if (tensor.data_location == onnx.TensorProto.EXTERNAL and not spilled) or (
                    not spilled and _tensor_bytes(tensor) < EXTERNAL_TENSOR_MIN_BYTES):
                skeleton.graph.initializer.append(tensor)
                continue
            data.write(b"\0" * (-data.tell() % EXTERNAL_ALIGNMENT))
            offset = data.tell()
            if data_path is None:
                data.seek(offset + _tensor_bytes(tensor))
            elif spilled:
                data.write(read_tensor(tensor).tobytes())
            else:
                raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                data.write(raw)
                del raw
            entry = skeleton.graph.initializer.add()
            entry.name, entry.data_type, entry.data_location = tensor.name, tensor.data_type, onnx.TensorProto.EXTERNAL
            entry.dims.extend(tensor.dims)
            if tensor.doc_string:
                entry.doc_string = tensor.doc_string
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                entry.external_data.add(key=key, value=value)
    return skeleton


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values: from its shape for raw data (reading `raw_data` would copy it), else its size."""
    if not tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor.ByteSize()
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # a type numpy lacks (4-bit, float8): protobuf can tell
        return tensor.ByteSize()


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


def size_change(before: int, after: int) -> str:
    """'3.4x smaller' or '1.19x larger' (never '0.84x smaller')."""
    if after <= 0 or before <= 0:
        return "size unknown"
    return f"{before / after:.3g}x smaller" if after <= before else f"{after / before:.3g}x larger"
