"""One check, before any work, that no file onnxq writes is a file it reads or another file it writes.

Every command declares its paths as (option, path, role) and calls `check_paths`. Files are
compared by identity where they exist (device and inode: symlinks and hard links included) and
by resolved path where they do not yet; a model's external-data files and every file under a
data folder count as read, and a model output also writes `<name>.data` beside it (models over
2 GiB). A clash is a usage error (exit 2) naming both options; a folder that cannot take an
output is exit 5.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxq.errors import OutputError, UsageError

MODEL = "model"  # an ONNX model read, with its external-data files
DATA = "data"  # calibration/evaluation data: a file, or a folder whose files are read
INPUT = "input"  # any other file read
OUTPUT = "output"  # a file written
MODEL_OUTPUT = "model output"  # a model written (and its `<name>.data` for models over 2 GiB)
CACHE = "cache"  # read and updated in place (a speed profile): clashes with anything but itself
NAME_MAX = 255  # bytes in one file name on common file systems


@dataclass(frozen=True)
class PathArg:
    option: str  # as the user gave it: "MODEL", "-o", "--calib"
    path: Path | None
    role: str


@dataclass(frozen=True)
class _File:
    arg: PathArg
    path: Path
    what: str  # "" for the path itself, else e.g. "external data file"

    def named(self) -> str:
        own = f"{self.arg.option} {self.arg.path}"
        return f"{own} ({self.what} {self.path})" if self.what else own


def check_paths(args: Iterable[PathArg]) -> None:
    """Raise UsageError for an output that is an input or another output, OutputError for an unwritable one."""
    given = [a for a in map(_loader_script, args) if a.path is not None]
    reads: dict[tuple, _File] = {}
    for arg in given:
        if arg.role in (MODEL, DATA, INPUT, CACHE):
            for file in _read_files(arg):
                reads.setdefault(_identity(file.path), file)
    folders = [(a, _identity(Path(a.path))) for a in given if a.role == DATA and _is_dir(Path(a.path))]
    writes = [f for a in given if a.role in (OUTPUT, MODEL_OUTPUT, CACHE) for f in _written_files(a)]
    seen: dict[tuple, _File] = {}
    for out in writes:
        _check_writable(out)
        key = _identity(out.path)
        other = seen.setdefault(key, out)
        if other.arg is not out.arg:
            raise UsageError(f"{other.named()} and {out.named()} are the same file: give each output its own path")
        read = reads.get(key)
        if read is not None and read.arg is not out.arg:
            raise UsageError(f"{out.named()} is the same file as {read.named()}, which onnxq reads: writing it "
                             "would destroy it; choose another output path")
        for arg, folder in folders:
            if _inside(out.path, folder):
                raise UsageError(f"{out.named()} is inside the {arg.option} folder {arg.path}, which onnxq reads: "
                                 "write outputs elsewhere")


def _loader_script(arg: PathArg) -> PathArg:
    """Data from code (onnxq.runtime.loaders): the script it runs is read; an iterable from Python has no path."""
    if arg.path is None or isinstance(arg.path, (str, os.PathLike)):
        return arg
    return PathArg(arg.option, getattr(arg.path, "script", None), INPUT)


def _read_files(arg: PathArg) -> Iterator[_File]:
    path = Path(arg.path)
    yield _File(arg, path, "")
    if arg.role == MODEL:
        for location in _external_locations(path):
            yield _File(arg, path.parent / location, "external data file")
    elif arg.role == DATA and _is_dir(path):
        for folder, _, names in os.walk(path, followlinks=True):
            for name in names:
                yield _File(arg, Path(folder) / name, "data file")


def _written_files(arg: PathArg) -> Iterator[_File]:
    path = Path(arg.path)
    yield _File(arg, path, "")
    if arg.role == MODEL_OUTPUT:
        yield _File(arg, path.with_name(f"{path.name}.data"), "external data file")


def _external_locations(path: Path) -> list[str]:
    """Files a model's tensors point to (the model itself is not loaded: unreadable ones fail later, clearly).
    Parsed once per file version: a command checks its paths at several layers (CLI, request, stages)."""
    try:
        info = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISREG(info.st_mode):
        return []
    return list(_locations_in(str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _locations_in(path: str, *_version: int) -> tuple[str, ...]:
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        return ()
    return tuple(sorted({e.value for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                         for e in t.external_data if e.key == "location"}))


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def _identity(path: Path) -> tuple:
    """(device, inode) of an existing file, else its absolute path with symlinks resolved."""
    try:
        info = os.stat(path)
        return ("inode", info.st_dev, info.st_ino)
    except OSError:
        return ("path", str(_resolved(path)))


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.abspath(path))


def _inside(path: Path, folder: tuple) -> bool:
    parent = _resolved(path).parent
    return any(_identity(p) == folder for p in (parent, *parent.parents))


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _check_writable(out: _File) -> None:
    """The output's name fits and its folder exists and takes files (exit 5 otherwise)."""
    option, path = out.arg.option, out.path
    if out.what:  # a side file (`<name>.data`) is only written for models over 2 GiB: checked when written
        return
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise OutputError(f"{option}: the file name is {len(os.fsencode(path.name))} bytes long; file systems take "
                          f"at most {NAME_MAX}: {path}")
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"{option} {path} is a folder; give a file name")
    try:
        folder = _resolved(path).parent
        if path.is_dir():
            raise OutputError(f"{option} {path} is a folder; give a file name")
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{option}: {folder} is a file, not a folder")
        if out.arg.role == CACHE:  # made when first written
            return
        if not folder.is_dir():
            raise OutputError(f"{option}: the folder {folder} does not exist")
    except OSError as exc:
        raise OutputError(f"{option} {path}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option}: the folder {folder} is not writable")


def quantize_paths(request, writes_model: bool = True) -> list[PathArg]:
    """The paths of a QuantizeRequest (onnxq.commands.request) with the options they come from."""
    data = request.data
    return [PathArg("MODEL", request.model, MODEL), PathArg("--calib", data.calib, DATA),
            PathArg("--eval-data", data.eval_data, DATA), PathArg("--target-data", request.target_data, DATA),
            PathArg("--load-stats", request.load_stats, INPUT), PathArg("--metric", request.metric, INPUT),
            PathArg("--recipe", request.recipe_path, INPUT),
            PathArg("--target-cpu", request.target_cpu, INPUT),
            PathArg("--speed-profile", request.speed_profile, CACHE),
            PathArg("-o", request.output if writes_model else None, MODEL_OUTPUT),
            PathArg("--save-stats", request.save_stats, OUTPUT), PathArg("--save-plan", request.save_plan, OUTPUT),
            PathArg("--save-recipe", request.save_recipe, OUTPUT)]
