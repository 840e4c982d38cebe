"""The Python API: `onnxq.quantize`, `onnxq.calibrate`, `onnxq.convert`, `onnxq.inspect`.

Each function takes its command's options as keyword arguments, named as the long option with `_`
for `-` (`--weight-bits 4` is `weight_bits=4`, `--format qoperator` is `format="qoperator"`), with
the same defaults, checks and environment variables (ONNXQ_FAST=1 is `fast=True`): they are read
from the CLI's own declarations (onnxq.commands.command_options) and go through the same function that turns
options into the library's request (onnxq.cli), so a call and the command with the same inputs
and options write byte-identical models. None means "not given". Failures raise the typed errors
the CLI maps to exit codes (onnxq.errors: UsageError 2, ModelError 3, DataError 4, OutputError 5;
`.exit_code`). Nothing is printed.

Data arguments (`calib`, `eval_data`, `target_data`) take any form `--calib` reads, a data loader
script "FILE.py[:FUNCTION]", or an iterable of feed dicts (input name -> numpy array, or
(feeds, label) pairs), read once (onnxq.runtime.loaders: each sample is kept in a temporary folder for
the call, which calibration, evaluation and the search read more than once).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import onnx

from onnxq import cli
from onnxq.commands import pipeline
from onnxq.commands.command_options import CommandOptions, defaults, keywords, resolve
from onnxq.commands.convert import convert as run_convert
from onnxq.commands.inspect_model import inspect_model
from onnxq.model_io import load_model, save_for_onnxruntime, save_model
from onnxq.outputs import transaction
from onnxq.quant.plan import QuantPlan
from onnxq.quant.statistics import Statistics
from onnxq.runtime.loaders import close_all, data_argument, script_argument

__all__ = ["Result", "calibrate", "convert", "inspect", "options", "quantize"]

ModelArg = str | os.PathLike | onnx.ModelProto
DATA_PARAMS = ("calib", "eval_data", "target_data", "data")  # parameters that also take iterables of feeds
OBJECTS = frozenset((*DATA_PARAMS, "data_loader_script", "input_shapes"))  # passed to the request builders as given
IN_MEMORY = "<onnx.ModelProto>"  # the report's "model" for a model given as a ModelProto


@dataclass
class Result:
    """What `quantize` and `convert` return."""

    model: onnx.ModelProto  # the int8 model, as written
    plan: QuantPlan  # every tensor's scale, zero point and range, every node's precision and why
    report: dict  # the report `--report FILE` writes
    output: Path | None  # where the model was written; None: nowhere (output=None)

    @property
    def gates_passed(self) -> bool:
        """False when a gate (min_cosine, min_sqnr) or an accuracy target was missed (the CLI exits 6)."""
        return all(gate["passed"] for gate in self.report.get("gates", []))

    def save(self, path: str | os.PathLike) -> None:
        """Write the model (atomically; over 2 GiB with its weights in `<name>.data` beside it)."""
        with transaction():
            save_model(self.model, Path(path))


def options(command: str) -> dict[str, Any]:
    """The keyword options of `command` ("quantize", "calibrate", "convert") with their defaults."""
    return defaults(_command(command))


def quantize(model: ModelArg, output: str | os.PathLike | None = None, *, calib: Any = None,
             **options: Any) -> Result:
    """Quantize an fp32 model to int8, as `onnxq quantize MODEL -o OUTPUT`.

    `model`: a path or an onnx.ModelProto; `output`: where to write the int8 model (None: nowhere, only
    `Result.model`); `calib`: calibration data (see the module docstring). `options`: quantize's options
    (`onnxq quantize --help`, `onnxq.options("quantize")`), e.g. `fast=True`, `eval_data=...`,
    `mode="dynamic"`, `target_sqnr=30`. Without `fast=True` (or ONNXQ_FAST=1) the automatic search runs, as
    on the command line. A missed gate or accuracy target does not raise: `Result.gates_passed` is False.
    """
    with _call("quantize", model, output, {"calib": calib, **options}) as call:
        with transaction():
            result = pipeline.quantize(cli.quantize_request(call.options))
        return call.result(result.report, result.plan)


def calibrate(model: ModelArg, output: str | os.PathLike | None = None, *, calib: Any = None,
              **options: Any) -> Statistics:
    """Collect activation statistics, as `onnxq calibrate`; saved to `output` (.npz) unless None, for
    `quantize(..., load_stats=output)` later."""
    with _call("calibrate", model, output, {"calib": calib, **options}, keep_output=True) as call, transaction():
        return pipeline.calibrate_only(call.options["model"], call.output, cli.calibrate_data(call.options))


def convert(model: ModelArg, output: str | os.PathLike | None = None, *, calib: Any = None,
            **options: Any) -> Result:
    """Convert a model with QuantizeLinear/DequantizeLinear pairs (a QAT export) to onnxq's int8 form, keeping
    its learned parameters, as `onnxq convert` (options: `format`, `activations`, `calibrate_missing`, ...)."""
    with _call("convert", model, output, {"calib": calib, **options}) as call:
        with transaction():
            result = run_convert(cli.convert_request(call.options))
        return call.result(result.report, result.plan)


def inspect(model: ModelArg) -> dict:
    """A model's ops, inputs and outputs, what would run in int8 or (an int8 model) what onnxruntime fused, as
    `onnxq inspect --json`."""
    with tempfile.TemporaryDirectory(prefix="onnxq-api-") as tmp:
        info = inspect_model(_model_path(model, Path(tmp)))
    if isinstance(model, onnx.ModelProto):
        info["model"] = IN_MEMORY
    return info


class _Call:
    """One API call: its options (the model's path: a ModelProto is written to a scratch folder first) and
    where the output goes."""

    def __init__(self, model: ModelArg, options: CommandOptions, output: Path | None) -> None:
        self.given_model = model
        self.options = options
        self.output = output

    def result(self, report: dict, plan: QuantPlan) -> Result:
        """The Result, once the outputs are committed (the model is read back from where it was written)."""
        model = load_model(self.options["output"])
        if self.output is None:
            report["output"] = None
        if isinstance(self.given_model, onnx.ModelProto):
            report["model"] = IN_MEMORY
        return Result(model, plan, report, self.output)


@contextmanager
def _call(name: str, model: ModelArg, output: str | os.PathLike | None, given: dict[str, Any],
          keep_output: bool = False) -> Iterator[_Call]:
    """Options resolved, the model on disk, a scratch folder for an output nobody asked for; afterwards
    the scratch folder and the data loaders' samples go. `keep_output`: no output is None (calibrate)."""
    command = _command(name)
    given = _data_arguments(command, given)
    scratch = Path(tempfile.mkdtemp(prefix="onnxq-api-"))
    try:
        out = None if output is None else Path(output)
        fixed = {"model": _model_path(model, scratch),
                 "output": out if out is not None or keep_output else scratch / "model.onnx"}
        options, context = resolve(command, given, fixed, f"onnxq.{name}", OBJECTS)
        with context:
            cli.check_finite_options(options.values)
        yield _Call(model, options, out)
    finally:
        close_all(given.values())
        shutil.rmtree(scratch, ignore_errors=True)


def _data_arguments(command: click.Command, given: dict[str, Any]) -> dict[str, Any]:
    """Data options as onnxq.runtime.loaders reads them (created here, so the call can close them)."""
    names = keywords(command)
    converted = {}
    for keyword, value in given.items():
        name = names.get(keyword)
        if name in DATA_PARAMS:
            value = data_argument(value, keyword)
        elif name == "data_loader_script" and value is not None:
            value = script_argument(value)
        converted[keyword] = value
    return converted


def _model_path(model: ModelArg, scratch: Path) -> Path:
    if isinstance(model, onnx.ModelProto):
        return save_for_onnxruntime(model, scratch, "input.onnx")
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    raise TypeError(f"model must be a path or an onnx.ModelProto, not {type(model).__name__}")


def _command(name: str) -> click.Command:
    commands: Mapping[str, click.Command] = {"quantize": cli.quantize_command, "calibrate": cli.calibrate,
                                             "convert": cli.convert_command}
    if name not in commands:
        raise ValueError(f"no API for {name!r}; one of {', '.join(commands)}")
    return commands[name]
