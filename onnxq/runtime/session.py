"""Every onnxruntime session onnxq opens: creation, options, threads, optimization level, errors, progress.

Sessions run on the CPU provider only. Errors onnxruntime raises become onnxq's one-line errors: a
model it cannot load is a ModelError (exit 3), a run that fails on the data a DataError (exit 4).
onnxruntime's own log is off: the user sees onnxq's line, not its warnings. Progress bars and notes
go to stderr only through a ProgressFactory, so `-q` silences all of them.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import DataError, ModelError, first_line
from onnxq.model_io import add_outputs, needs_external_data, save_for_onnxruntime

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
PROVIDERS = ["CPUExecutionProvider"]
SILENT_LOG = 4  # onnxruntime log severity: fatal only (errors reach the user as onnxq's one line)


class Progress:
    """A progress bar that shows nothing (the library's default, and the CLI's under -q)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass

    def note(self, message: str) -> None:
        """A line for the user about this stage (dropped when quiet)."""


ProgressFactory = Callable[[int, str], Progress]  # (total, label) -> a bar


def no_progress(_total: int, _label: str) -> Progress:
    return Progress()


class NotesProgress(Progress):
    """No bar (stderr is not a terminal), but notes still reach stderr."""

    def note(self, message: str) -> None:
        print(f"onnxq: {message}", file=sys.stderr)


class TqdmProgress(NotesProgress):
    """A tqdm bar on stderr; notes printed above it."""

    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=label, unit="sample", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def note(self, message: str) -> None:
        self._bar.write(f"onnxq: {message}", file=sys.stderr)


def progress_factory(quiet: bool) -> ProgressFactory:
    """The CLI's progress: nothing under -q, notes only when stderr is not a terminal, else tqdm bars."""
    if quiet:
        return no_progress
    if not sys.stderr.isatty():
        return lambda _total, _label: NotesProgress()
    return TqdmProgress


def session_options(*, level: str = "all", threads: int = 0, spin: bool = False) -> ort.SessionOptions:
    """onnxq's session options: optimization `level` (a LEVELS key), `threads` intra-op threads (0: all cores),
    one inter-op thread.

    Idle onnxruntime threads sleep instead of spinning: onnxq's own work between runs (statistics, agreement,
    another model's session) then has the cores; a spinning pool made numpy's BLAS threads and a second
    session wait (minilm-l6's evaluation 6.9-7.7 s spinning, 3.7-3.9 s not). `spin=True` for timing: a
    deployment's sessions spin.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = SILENT_LOG
    return options


_saved = itertools.count()  # unique scratch names: a session may still map an earlier model's data file


def session_for(model: onnx.ModelProto | Path, workdir: Path, threads: int = 0, outputs: Iterable[str] | None = None,
                *, spin: bool = False, level: str = "all") -> ort.InferenceSession:
    """A CPU session for a model in memory (saved into `workdir`, also returning `outputs`) or on disk.

    `level="disabled"`: no graph optimization (Q/DQ pairs run as written; onnxq.runtime.emulation).
    """
    path = model if isinstance(model, Path) else save_for_onnxruntime(model, workdir, f"model_{next(_saved)}.onnx",
                                                                      outputs or ())
    return _open(path, session_options(level=level, threads=threads, spin=spin))


def write_optimized(source: Path, target: Path, level: str, *, external_data: str | None = None) -> None:
    """Let onnxruntime optimize the model at `source` at `level` and save the graph it runs to `target`
    (its large weights to the file `external_data` beside it, when given)."""
    options = session_options(level=level)
    options.optimized_model_filepath = str(target)
    if external_data is not None:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data)
    _open(source, options, hide=source)


def optimized_graphs(model: onnx.ModelProto, workdir: Path, levels: Iterable[str] = ("all",)
                     ) -> dict[str, onnx.ModelProto]:
    """The graphs onnxruntime's CPU provider runs after its optimizations at each of `levels` (the model is
    written once into the scratch folder `workdir`)."""
    source = save_for_onnxruntime(model, workdir)
    graphs = {}
    for level in levels:
        target = workdir / f"optimized-{level}.onnx"
        external = f"optimized-{level}.onnx.data" if needs_external_data(model) else None
        write_optimized(source, target, level, external_data=external)
        graphs[level] = onnx.load(str(target))
    return graphs


def _open(path: Path, options: ort.SessionOptions, hide: Path | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=PROVIDERS)
    except Exception as exc:
        reason = first_line(exc)
        if hide is not None:
            reason = reason.replace(f" from {hide}", "")  # our temporary copy means nothing to the user
        raise ModelError(f"onnxruntime cannot load the model: {reason}") from None


def run(session: ort.InferenceSession, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """The named outputs for one feed; a failure is the data's (a DataError naming onnxruntime's reason)."""
    try:
        return session.run(names, feed)
    except Exception as exc:
        reason = first_line(exc)
        raise DataError(f"the model failed on the calibration data: {reason}") from None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the named float tensors (session_for(outputs=...) avoids the copy)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    add_outputs(augmented, names)
    return augmented
