"""Reading, preparing and writing ONNX models, with user-facing errors."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx

from .errors import ModelError, OutputError, first_line

# protobuf cannot serialise a single message over 2 GiB; above this we use external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors smaller than this stay inside the .onnx file when data goes external.
EXTERNAL_TENSOR_MIN_BYTES = 1024


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
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
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


def check_output_path(output: Path, inputs: list[Path]) -> None:
    """Refuse to overwrite an input, or to write into a folder that is missing or read-only."""
    resolved = output.resolve()
    for path in inputs:
        if path.exists() and resolved == path.resolve():
            raise OutputError(f"output path {output} is the input model; choose another name")
    folder = resolved.parent
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder is a file, not a folder: {folder}")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    if output.exists() and output.is_dir():
        raise OutputError(f"output path is a folder: {output}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file next to `path`, then rename: no half-written files."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic serialisation (fields in order, no maps with random order)."""
    return model.SerializeToString(deterministic=True)


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Save atomically; models over 2 GiB get their tensors in `<name>.data` beside them."""
    path = Path(path)
    if not needs_external_data(model):
        atomic_write_bytes(path, serialize(model))
        return
    _save_with_external_data(model, path)


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
        staged = Path(staging) / path.name
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=EXTERNAL_TENSOR_MIN_BYTES)
        if (Path(staging) / data_name).exists():  # absent when every tensor is tiny
            os.replace(Path(staging) / data_name, path.parent / data_name)
        os.replace(staged, path)
