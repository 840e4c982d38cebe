"""Calibration and evaluation data in the forms people have, checked against the model.

Supported sources (detected from the path):
  a) a folder of .npz files, each one complete feed (input name -> array as the model takes it);
     a folder of .npy files works the same for single-input models;
  b) one .npz (arrays stacked along the batch axis, one per input) or one .npy (single input);
  c) a folder of images, with explicit preprocessing (ImagePreprocessing);
  d) ONNX's test-data layout: test_data_set_N/input_M.pb;
  e) feeds from the user's own code: a data loader script (FILE.py[:FUNCTION]) or, through the
     Python API, an iterable of feed dicts (onnxq.runtime.loaders; they open as a FeedLoader).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.errors import DataError, read_problem
from onnxq.runtime.input_shapes import check_input_shapes

Feed = dict[str, np.ndarray]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class InputSpec:
    """What the model expects on one input: dims are ints, or None where dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class ImagePreprocessing:
    size: tuple[int, int] | None = None  # (width, height); None: the model's static size
    layout: str | None = None  # "NCHW" or "NHWC"; None: from the model's input shape
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: str = "RGB"

    def describe(self) -> dict:
        return {"size": self.size, "layout": self.layout, "scale": self.scale, "mean": list(self.mean),
                "std": list(self.std), "channel_order": self.channel_order}


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else None
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(dtype) if dtype is not None else None, shape))
    return specs


class SampleSource:
    """An ordered, re-iterable collection of single samples (each a complete feed)."""

    def __init__(self, description: str, count: int, loader, kind: str,
                 preprocessing: ImagePreprocessing | None = None,
                 labels: Callable[[int], object] | None = None) -> None:
        self.description = description
        self.kind = kind
        self.preprocessing = preprocessing  # images only: how pixels became tensors (for the report)
        self.ignored: list[str] = []  # files in the folder that are not samples (labels, notes)
        self._count = count
        self._loader = loader  # index -> Feed
        self._labels = labels  # index -> the label a data loader yielded with the sample (for a --metric)

    def __len__(self) -> int:
        return self._count

    def sample(self, index: int) -> Feed:
        return self._loader(index)

    def label(self, index: int) -> object | None:
        """The label yielded with sample `index` as a (feeds, label) pair; None when there is none."""
        return self._labels(index) if self._labels is not None else None

    def subset(self, indices: Sequence[int], description: str) -> SampleSource:
        indices = list(indices)
        labels = self._labels
        subset = SampleSource(description, len(indices), lambda i: self._loader(indices[i]), self.kind,
                              self.preprocessing, None if labels is None else lambda i: labels(indices[i]))
        subset.ignored = self.ignored
        return subset

    def first(self, count: int | None, description: str | None = None) -> SampleSource:
        """The first `count` samples (--max-samples; all when None), described as `description` (default: as this
        source)."""
        if count is None:
            return self
        return self.subset(range(min(count, len(self))), self.description if description is None else description)

    def note(self, option: str) -> str | None:
        """What the report says about files the folder holds besides samples."""
        if not self.ignored:
            return None
        shown = ", ".join(self.ignored[:3]) + (f" and {len(self.ignored) - 3} more" if len(self.ignored) > 3 else "")
        return f"{option}: {len(self)} {self.kind} samples used; {len(self.ignored)} other files ignored ({shown})"


class FeedLoader:
    """Samples that come from code, not files: a data loader script or an iterable (onnxq.runtime.loaders)."""

    description = "feeds"
    script: Path | None = None  # the file a data loader script reads (checked against outputs)

    def open(self, specs: list[InputSpec], limit: int | None = None) -> SampleSource:
        """The samples, checked against `specs`; `limit`: read no more than that many."""
        raise NotImplementedError


DataArg = Path | FeedLoader  # what --calib, --eval-data and --target-data hold once parsed


def open_source(
    path: str | Path | FeedLoader, specs: list[InputSpec], images: ImagePreprocessing | None = None
) -> SampleSource:
    """Detect the form of `path` and return its samples (validated lazily, one by one)."""
    if isinstance(path, FeedLoader):
        return path.open(specs)
    path = Path(path)
    if not path.exists():
        raise DataError(f"calibration data not found: {path}")
    if path.is_file():
        if path.suffix == ".npz":
            return _stacked_npz(path, specs)
        if path.suffix == ".npy":
            return _stacked_npy(path, specs)
        raise DataError(f"{path}: expected a folder, a .npz or a .npy file")
    test_sets = sorted((p for p in path.iterdir() if p.is_dir() and p.name.startswith("test_data_set_")),
                       key=_natural_key)
    if test_sets:
        return _onnx_test_sets(test_sets, specs, path)
    files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")), key=_natural_key)
    npz = [p for p in files if p.suffix == ".npz"]
    npy = [p for p in files if p.suffix == ".npy"]
    pictures = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    kinds = {label: found for label, found in (("npz", npz), ("npy", npy), ("image", pictures)) if found}
    if len(kinds) > 1:
        counts = " and ".join(f"{len(found)} .{label} files ({found[0].name}, ...)" if label != "image"
                              else f"{len(found)} image files ({found[0].name}, ...)" for label, found in kinds.items())
        raise DataError(f"{path} holds {counts}: keep one kind of sample file per folder")
    ignored = [p.name for p in files if p not in npz and p not in npy and p not in pictures]
    if npz:
        source = _validated(SampleSource(str(path), len(npz), lambda i: _read_npz(npz[i]), "npz-folder"), specs)
    elif npy:
        name = _single_input(specs, path).name
        source = _validated(SampleSource(str(path), len(npy), lambda i: {name: _read_npy(npy[i])}, "npy-folder"),
                            specs)
    elif pictures:
        source = _image_folder(pictures, specs, images or ImagePreprocessing(), path)
    else:
        raise DataError(f"no calibration samples in {path} (expected .npz, .npy, images or test_data_set_*/)")
    source.ignored = ignored
    return source


def open_calibration(path: DataArg, specs: list[InputSpec], images: ImagePreprocessing | None = None,
                     max_samples: int | None = None) -> SampleSource:
    """--calib's samples: the first `max_samples` of them (--max-samples) when given."""
    return open_source(path, specs, images).first(max_samples)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _single_input(specs: list[InputSpec], path: Path) -> InputSpec:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise DataError(f"{path}: .npy data fits single-input models only; this model has inputs {names}")
    return specs[0]


def _read_npz(path: Path) -> Feed:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.array(data[key]) for key in data.files}
    except Exception as exc:
        raise DataError(f"cannot read {path}: {read_problem(exc)}") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read {path}: {read_problem(exc)}") from None


def _stacked_npz(path: Path, specs: list[InputSpec]) -> SampleSource:
    arrays = _read_npz(path)
    return _split_stacked(arrays, specs, path)


def _stacked_npy(path: Path, specs: list[InputSpec]) -> SampleSource:
    name = _single_input(specs, path).name
    return _split_stacked({name: _read_npy(path)}, specs, path)


def _split_stacked(arrays: Feed, specs: list[InputSpec], path: Path) -> SampleSource:
    if not arrays:
        raise DataError(f"{path} holds no arrays")
    scalars = [name for name, a in arrays.items() if a.ndim == 0]
    if scalars:
        raise DataError(f"{path}: {scalars[0]} is a single number; a stacked {path.suffix} holds samples along a "
                        "first (batch) axis (or put one sample per file in a folder)")
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: arrays differ in their batch (first) dimension: {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise DataError(f"{path}: no samples (batch dimension is 0)")

    def load(i: int) -> Feed:
        return {name: a[i : i + 1] for name, a in arrays.items()}

    return _validated(SampleSource(str(path), count, load, "stacked"), specs)


def _onnx_test_sets(folders: list[Path], specs: list[InputSpec], root: Path) -> SampleSource:
    def load(i: int) -> Feed:
        files = sorted(folders[i].glob("input_*.pb"), key=_natural_key)
        if not files:
            raise DataError(f"{folders[i]}: no input_*.pb files")
        feed: Feed = {}
        for position, file in enumerate(files):
            tensor = onnx.TensorProto()
            try:
                tensor.ParseFromString(file.read_bytes())
                array = numpy_helper.to_array(tensor)
            except Exception as exc:
                raise DataError(f"cannot read {file} as a TensorProto: {read_problem(exc)}") from None
            name = tensor.name or (specs[position].name if position < len(specs) else f"input_{position}")
            feed[name] = array
        return feed

    return _validated(SampleSource(str(root), len(folders), load, "onnx-test-data"), specs)


def _image_folder(files: list[Path], specs: list[InputSpec], prep: ImagePreprocessing, root: Path) -> SampleSource:
    spec = _single_input(specs, root)
    if spec.shape is None or len(spec.shape) != 4:
        raise DataError(f"{root}: image folders need a model with one 4-D image input; {spec.name} is not")
    layout = prep.layout or ("NHWC" if spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3) else "NCHW")
    h_dim, w_dim, c_dim = (2, 3, 1) if layout == "NCHW" else (1, 2, 3)
    size = prep.size or (spec.shape[w_dim], spec.shape[h_dim])
    if size[0] is None or size[1] is None:
        raise DataError(f"input {spec.name} has dynamic height/width; give the image size with --image-size WxH")
    channels = spec.shape[c_dim] or 3
    resolved = ImagePreprocessing(size, layout, prep.scale, prep.mean, prep.std, prep.channel_order)

    def load(i: int) -> Feed:
        return {spec.name: _load_image(files[i], resolved, channels, spec.dtype)}

    source = _validated(SampleSource(str(root), len(files), load, "images"), specs)
    source.preprocessing = resolved
    return source


def _load_image(path: Path, prep: ImagePreprocessing, channels: int, dtype: np.dtype | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB").resize(prep.size, Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {read_problem(exc)}") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if prep.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(prep.mean[:channels], dtype=np.float32)
    std = np.asarray(prep.std[:channels], dtype=np.float32)
    pixels = (pixels * np.float32(prep.scale) - mean) / std
    if prep.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return pixels[None].astype(dtype or np.float32)


def _validated(source: SampleSource, specs: list[InputSpec]) -> SampleSource:
    if len(source) == 0:
        raise DataError(f"no calibration samples in {source.description}")
    raw = source._loader

    def checked(i: int) -> Feed:
        feed = raw(i)
        check_feed(feed, specs, f"{source.description} sample {i}")
        return feed

    source._loader = checked
    return source


def check_feed(feed: Feed, specs: list[InputSpec], where: str) -> None:
    """Raise DataError naming the input and what was expected when a feed does not fit."""
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(feed))
    extra = sorted(set(feed) - set(expected))
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            detail.append(f"unknown name(s) {', '.join(extra)}")
        raise DataError(f"{where}: {'; '.join(detail)} (model inputs: {', '.join(expected)})")
    for name, array in feed.items():
        spec = expected[name]
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise DataError(f"{where}: input {name} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise DataError(f"{where}: input {name} has shape {list(array.shape)}, "
                                f"the model expects rank {len(spec.shape)} {_shape_text(spec.shape)}")
            for got, want in zip(array.shape, spec.shape, strict=True):
                if want is not None and got != want:
                    raise DataError(f"{where}: input {name} has shape {list(array.shape)}, "
                                    f"the model expects {_shape_text(spec.shape)}")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise DataError(f"{where}: input {name} contains NaN or Inf")


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def random_source(specs: list[InputSpec], count: int, seed: int = 0,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> SampleSource:
    """Random normal data, only for --allow-random: the report says so. `shapes` (--input-shapes) gives the
    whole shape of inputs whose dimensions the model leaves open; other inputs take batch 1."""
    shapes = shapes or {}
    check_input_shapes(shapes, specs)
    for spec in specs:
        if spec.name not in shapes and (spec.shape is None or any(d is None for d in spec.shape[1:])):
            raise DataError(f"--allow-random needs static shapes; input {spec.name} is "
                            f"{_shape_text(spec.shape) if spec.shape is not None else 'of unknown shape'}: give "
                            f"its shape with --input-shapes {spec.name}:{example_dims(spec)}")

    def load(i: int) -> Feed:
        rng = np.random.default_rng(seed + i)
        feed = {}
        for spec in specs:
            shape = shapes.get(spec.name) or (1, *spec.shape[1:])
            dtype = spec.dtype or np.float32
            if np.issubdtype(dtype, np.floating):
                feed[spec.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feed[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        return feed

    return SampleSource(f"random normal data ({count} samples)", count, load, "random")


def example_dims(spec: InputSpec) -> str:
    """DIMS in the --input-shapes form for `spec`, with 1 for the batch and N for other open dimensions."""
    if spec.shape is None:
        return "1xN"
    return "x".join(str(d) if d is not None else ("1" if axis == 0 else "N") for axis, d in enumerate(spec.shape))


def split_holdout(
    source: SampleSource, fraction: float = 0.1, limit: int = 32
) -> tuple[SampleSource, SampleSource | None]:
    """Hold back the last samples (in sorted order) for evaluation; none if there are too few."""
    n = len(source)
    if n < 2:
        return source, None
    k = min(limit, max(1, math.floor(n * fraction)))
    calib = source.subset(range(n - k), f"{source.description} [first {n - k}]")
    held = source.subset(range(n - k, n), f"{source.description} [last {k}, held back]")
    return calib, held


def batches(source: SampleSource, batch_size: int, limit: int | None = None) -> Iterator[tuple[Feed, int]]:
    """Concatenate consecutive same-shaped samples along axis 0; yields (feed, samples in it)."""
    total = len(source) if limit is None else min(limit, len(source))
    pending: list[Feed] = []

    def flush() -> tuple[Feed, int]:
        if len(pending) == 1:  # nothing to stack (and scalars cannot be stacked)
            return pending.pop(), 1
        merged = {name: np.concatenate([f[name] for f in pending], axis=0) for name in pending[0]}
        count = len(pending)
        pending.clear()
        return merged, count

    for i in range(total):
        feed = source.sample(i)
        if pending and (len(pending) >= batch_size or _shapes(feed) != _shapes(pending[0])
                        or any(a.ndim == 0 for a in feed.values())):
            yield flush()
        pending.append(feed)
    if pending:
        yield flush()


def _shapes(feed: Feed) -> tuple:
    return tuple((name, feed[name].shape) for name in sorted(feed))
