"""Samples from the user's own code: a data loader script (`--data-loader-script FILE[:FUNCTION]`, or
FILE.py[:FUNCTION] wherever a data path goes) or, from Python, any iterable of feed dicts.

A loader yields feeds (input name -> numpy array, one sample each, as one .npz of a folder would hold)
or (feeds, label) pairs; labels go to a --metric whose score takes them. onnxq reads a loader once,
one sample at a time, checking each against the model as it arrives. Calibration, the held-back
evaluation and the automatic search read samples more than once and by position, so each sample is
written to a temporary folder as it is read (disk: the data's size; memory: one sample, plus the
labels) and read back from there; the folder goes when the loader is closed (the end of the API
call or of the command), or at the latest when the process exits. A loader may yield at most
MAX_SAMPLES samples: an endless stream has to be cut (itertools.islice).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onnxq.errors import DataError, UsageError, first_line
from onnxq.runtime.data import Feed, FeedLoader, InputSpec, SampleSource, check_feed

DEFAULT_FUNCTION = "load_data"  # Polygraphy's default name, so its loader scripts work unchanged
MAX_SAMPLES = 100_000
_SCRIPT = re.compile(r"^(?P<path>.+\.py)(?::(?P<function>[A-Za-z_][A-Za-z0-9_]*))?$")


def script_spec(value: str | Path) -> tuple[Path, str] | None:
    """(script, function) when `value` names a data loader script (FILE.py or FILE.py:FUNCTION), else None.

    A folder whose name ends in .py is data, not a script.
    """
    match = _SCRIPT.match(str(value))
    if match is None or Path(match["path"]).is_dir():
        return None
    return Path(match["path"]), match["function"] or DEFAULT_FUNCTION


def data_argument(value: object, option: str) -> Path | FeedLoader | None:
    """What a data option (--calib, --eval-data, ...) holds: a path, a data loader script, or (from Python)
    an iterable of feed dicts."""
    if value is None or isinstance(value, FeedLoader):
        return value
    if isinstance(value, (str, os.PathLike)):
        spec = script_spec(value)
        return ScriptLoader(*spec) if spec is not None else Path(value)
    if isinstance(value, Mapping):
        raise UsageError(f"{option} is one dict; give an iterable of feed dicts (a list, a generator), each "
                         "input name -> numpy array")
    if isinstance(value, (bytes, np.ndarray)) or not isinstance(value, Iterable):
        raise UsageError(f"{option} takes a path, a data loader script (FILE.py[:FUNCTION]) or an iterable of "
                         f"feed dicts, not {type(value).__name__}")
    return IterableLoader(value, f"the iterable given as {option}")


def script_argument(value: str | Path | FeedLoader | None, option: str = "--data-loader-script"
                    ) -> FeedLoader | None:
    """--data-loader-script FILE[:FUNCTION]: the .py suffix is not required here."""
    if value is None or isinstance(value, FeedLoader):
        return value
    text = str(value)
    path, _, function = text.rpartition(":") if re.search(r":[A-Za-z_]\w*$", text) else (text, "", "")
    if not path:
        raise UsageError(f"{option} takes FILE[:FUNCTION], got {text!r}")
    return ScriptLoader(Path(path), function or DEFAULT_FUNCTION)


class SpilledLoader(FeedLoader):
    """Reads its feeds once (see the module docstring); every later open returns the same samples."""

    def __init__(self) -> None:
        self._opened: tuple[list[InputSpec], SampleSource] | None = None
        self._folder: str | None = None
        self._cleanup: weakref.finalize | None = None

    def feeds(self) -> Iterable:
        raise NotImplementedError

    def open(self, specs: list[InputSpec], limit: int | None = None) -> SampleSource:
        if self._opened is not None:
            if self._opened[0] != specs:
                raise UsageError(f"{self.description} was read for a model with other inputs; give it to one "
                                 "model at a time")
            return self._opened[1]
        source = self._spill(specs, limit)
        self._opened = (specs, source)
        return source

    def close(self) -> None:
        """Remove the temporary folder of read samples (they cannot be read again)."""
        if self._cleanup is not None:
            self._cleanup()

    def _spill(self, specs: list[InputSpec], limit: int | None) -> SampleSource:
        self._folder = tempfile.mkdtemp(prefix="onnxq-feeds-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        files: list[list[tuple[str, Path]]] = []
        labels: list[object] = []
        for index, item in enumerate(self._items(limit)):
            if index >= MAX_SAMPLES:
                raise DataError(f"{self.description} yields more than {MAX_SAMPLES} samples; onnxq keeps every "
                                "sample it reads for the run: yield fewer (itertools.islice)")
            feed, label = self._unpack(item, index)
            check_feed(feed, specs, f"{self.description} sample {index}")
            files.append(self._write(feed, index))
            labels.append(label)
        if not files:
            raise DataError(f"{self.description} yielded no samples")
        has_labels = any(label is not None for label in labels)
        return SampleSource(self.description, len(files), lambda i: _read(files[i]), "loader",
                            labels=labels.__getitem__ if has_labels else None)

    def _items(self, limit: int | None = None) -> Iterator[object]:
        """The loader's items (the first `limit`); an exception in the user's code becomes one line naming
        the sample."""
        with self._user_code("before its first sample"):
            items = self.feeds()
        if isinstance(items, (Mapping, str, bytes)) or not isinstance(items, Iterable):
            raise DataError(f"{self.description} returned a {type(items).__name__}, not an iterable of feed dicts "
                            "(yield one dict per sample)")
        with self._user_code("before its first sample"):
            iterator = iter(items)
        index = 0
        while limit is None or index < limit:
            with self._user_code(f"at sample {index}"):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
            index += 1

    @contextmanager
    def _user_code(self, when: str) -> Iterator[None]:
        try:
            yield
        except (DataError, UsageError):
            raise
        except Exception as exc:
            raise DataError(f"{self.description} failed {when}: {type(exc).__name__}: {first_line(exc)}") from None

    def _unpack(self, item: object, index: int) -> tuple[Feed, object]:
        where = f"{self.description} sample {index}"
        label = None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Mapping):
            item, label = item
        if not isinstance(item, Mapping):
            raise DataError(f"{where} is a {type(item).__name__}; yield a dict of input name -> numpy array "
                            "(or a (feeds, label) pair)")
        feed: Feed = {}
        for name, value in item.items():
            if not isinstance(name, str):
                raise DataError(f"{where}: key {name!r} is not an input name (a str)")
            if not isinstance(value, np.ndarray) and hasattr(value, "__array__"):
                value = np.asarray(value)  # a torch/TensorFlow CPU tensor
            if not isinstance(value, np.ndarray):
                raise DataError(f"{where}: input {name} is a {type(value).__name__}, not a numpy array")
            feed[name] = value
        return feed, label

    def _write(self, feed: Feed, index: int) -> list[tuple[str, Path]]:
        assert self._folder is not None
        written = []
        for position, (name, array) in enumerate(feed.items()):
            path = Path(self._folder) / f"{index}-{position}.npy"
            try:
                np.save(path, array, allow_pickle=True)  # onnxq's own file: string (object) inputs too
            except OSError as exc:
                raise DataError(f"cannot keep {self.description} sample {index} in {self._folder}: "
                                f"{exc.strerror or first_line(exc)}") from None
            written.append((name, path))
        return written


def _read(files: list[tuple[str, Path]]) -> Feed:
    return {name: np.load(path, allow_pickle=True) for name, path in files}


class IterableLoader(SpilledLoader):
    """An iterable of feed dicts from Python (onnxq.quantize(..., calib=feeds))."""

    def __init__(self, iterable: Iterable, description: str) -> None:
        super().__init__()
        self._iterable = iterable
        self.description = description

    def feeds(self) -> Iterable:
        return self._iterable


class ScriptLoader(SpilledLoader):
    """FILE.py[:FUNCTION]: FUNCTION() (default load_data) returns an iterable of feeds, as Polygraphy's
    --data-loader-script does. The script's folder is on sys.path while it is imported."""

    def __init__(self, script: Path, function: str = DEFAULT_FUNCTION) -> None:
        super().__init__()
        self.script = script
        self.function = function
        self.description = f"data loader {script}:{function}"

    def feeds(self) -> Iterable:
        return self._function()()

    def _function(self) -> Callable[[], Iterable]:
        if not self.script.is_file():
            raise DataError(f"data loader script not found: {self.script}")
        module = _import(self.script, self.description)
        function = getattr(module, self.function, None)
        if not callable(function):
            raise DataError(f"data loader script {self.script} has no function {self.function}() (name another "
                            f"with {self.script}:FUNCTION)")
        return function


def _import(script: Path, description: str):
    name = "onnxq_data_loader_" + re.sub(r"\W", "_", script.stem)
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise DataError(f"{description}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(script.resolve().parent)
    sys.path.insert(0, folder)  # the script's own helper modules import as they do when it runs alone
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise DataError(f"{description} failed to import: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def close_all(values: Iterable[object]) -> None:
    """Remove the read samples of every loader among `values`."""
    for value in values:
        if isinstance(value, SpilledLoader):
            value.close()
