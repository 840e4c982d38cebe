"""The option table (onnxq.commands.option_table): the CLI, recipes and requests all come from it; and
--exclude-regex, the option added to show it (a row there, a request field and one function beside the recipe)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import yaml
from conftest import cli_in, write_npz_folder

from onnxq.cli import main
from onnxq.commands import option_table as options
from onnxq.commands import recipe
from onnxq.commands.pipeline import QuantizeRequest
from onnxq.errors import EXIT_USAGE

COMMANDS = (options.QUANTIZE, options.CALIBRATE, options.SENSITIVITY, options.CONVERT, options.QAT_PREP,
            options.BENCH)
NOT_IN_TABLE = {"model", "output", "fp32", "int8", "quiet", "verbose", "plot"}  # arguments, -o, display options


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_takes_exactly_its_rows_of_the_table(command: str) -> None:
    params = {p.name: p for p in main.commands[command].params if p.name not in NOT_IN_TABLE}
    rows = {row.name: row for row in options.options_of(command)}
    assert set(params) == set(rows)
    for name, row in rows.items():
        assert params[name].opts == list(row.flags) and params[name].help == row.helps.get(command, row.help)


def test_shared_options_are_the_same_declaration_in_every_command() -> None:
    """sensitivity ranks layers under quantize's settings: same choices, defaults and types."""
    for row in options.OPTIONS:
        params = [next(p for p in main.commands[c].params if p.name == row.name) for c in row.commands]
        described = {(repr(getattr(p.type, "choices", None)), p.default, p.multiple, getattr(p, "is_flag", None),
                      type(p.type).__name__) for p in params}
        assert len(described) == 1, row.name


def test_recipe_settings_are_the_rows_with_a_recipe_key() -> None:
    keyed = {row.recipe.key: row for row in options.OPTIONS if row.recipe is not None}
    assert recipe.SETTINGS.keys() == keyed.keys()
    assert all(options.QUANTIZE in row.commands for row in keyed.values())
    choices = next(p for p in main.commands["quantize"].params if p.name == "mode").type.choices
    assert tuple(choices) == recipe.SETTINGS["mode"].allowed


def test_request_rows_are_request_fields_of_the_same_name() -> None:
    fields = {f.name for f in dataclasses.fields(QuantizeRequest)}
    for command in (options.QUANTIZE, options.SENSITIVITY, options.QAT_PREP):
        missing = [row.name for row in options.options_of(command) if row.request and row.name not in fields]
        assert missing == [], command


cli = cli_in


@pytest.mark.parametrize("args", [
    ["convert", "m.onnx", "-o", "out/q.onnx", "--percentile", "99.9"],
    ["qat-prep", "m.onnx", "-o", "out/q.onnx", "--calib", "calib", "--percentile", "99.9"],
    ["sensitivity", "m.onnx", "--calib", "calib", "--percentile", "99.9"],
    ["calibrate", "m.onnx", "-o", "out/s.npz", "--calib", "calib", "--workers", "2"],
    ["quantize", "mm.onnx", "-o", "out/q.onnx", "--fast", "--weight-method", "gptq"],
    ["quantize", "mm.onnx", "-o", "out/q.onnx", "--mode", "weight-only", "--per-tensor"],
    ["quantize", "mm.onnx", "-o", "out/q.onnx", "--mode", "weight-only", "--weight-bits", "4", "--max-samples", "3"],
])
def test_every_command_refuses_an_option_that_would_do_nothing(ws: Path, args: list[str]) -> None:
    code, _, stderr = cli(ws, *args)
    assert code == EXIT_USAGE and "does nothing here" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert os.listdir(ws / "out") == []


@pytest.mark.parametrize("extra", [["--max-samples", "3"], ["--memory-budget", "64"]])
def test_gptq_takes_the_calibration_options_it_reads(ws: Path, extra: list[str]) -> None:
    """gptq/awq read --calib (its X^T X), so --max-samples and --memory-budget act there."""
    write_npz_folder(ws / "calib_mm", lambda rng: {"x": rng.standard_normal((1, 4, 32)).astype(np.float32)}, 6)
    code, _, stderr = cli(ws, "quantize", "mm.onnx", "-o", "out/q.onnx", "--mode", "weight-only", "--weight-bits", "4",
                          "--weight-method", "gptq", "--calib", "calib_mm", *extra, "-q")
    assert code == 0, stderr


def test_exclude_regex_keeps_matching_nodes_float_and_the_saved_recipe_rebuilds_the_model(ws: Path) -> None:
    code, stdout, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", "calib", "--fast", "--json",
                               "--exclude-regex", "^conv2$", "--save-recipe", "out/r.yaml")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert [n["name"] for n in report["float_nodes"]] == ["conv2"]
    saved = yaml.safe_load((ws / "out" / "r.yaml").read_text())
    assert {"match": {"name_regex": "^conv2$"}, "precision": "float", "reason": "--exclude-regex ^conv2$"} in (
        saved["rules"])
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/again.onnx", "--calib", "calib", "--recipe",
                          "out/r.yaml")
    assert code == 0, stderr
    assert (ws / "out" / "again.onnx").read_bytes() == (ws / "out" / "q.onnx").read_bytes()
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/plain.onnx", "--calib", "calib", "--fast")
    assert code == 0 and (ws / "out" / "plain.onnx").read_bytes() != (ws / "out" / "q.onnx").read_bytes()


def test_exclude_regex_that_matches_nothing_is_noted_and_a_bad_one_refused(ws: Path) -> None:
    code, stdout, _ = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", "calib", "--fast", "--json",
                          "--exclude-regex", "^encoder/")
    assert code == 0
    assert any("^encoder/" in note and "selects no node" in note for note in json.loads(stdout)["notes"])
    done = subprocess.run([sys.executable, "-m", "onnxq", "quantize", "m.onnx", "-o", "out/bad.onnx", "--calib",
                           "calib", "--exclude-regex", "conv("], cwd=ws, capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_USAGE and "is not a regular expression" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (ws / "out" / "bad.onnx").exists()


def test_exclude_regex_in_the_python_api_and_every_command_that_takes_exclude(ws: Path) -> None:
    import onnxq

    result = onnxq.quantize(ws / "m.onnx", calib=ws / "calib", fast=True, exclude_regex=["conv1"])
    float_nodes = [n["name"] for n in result.report["float_nodes"]]
    assert "conv1" in float_nodes and "conv2" not in float_nodes
    for command in (options.SENSITIVITY, options.QAT_PREP):
        assert isinstance(next(p for p in main.commands[command].params if p.name == "exclude_regex").type,
                          click.types.StringParamType)


def test_statistics_from_calibrate_with_a_rewriting_option_say_why_they_do_not_fit(ws: Path) -> None:
    """`calibrate` does not apply --equalize, so its statistics belong to another model: the one line says so."""
    code, _, stderr = cli(ws, "calibrate", "m.onnx", "-o", "out/s.npz", "--calib", "calib", "-q")
    assert code == 0, stderr
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--load-stats", "out/s.npz", "--equalize",
                          "--fast", "-q")
    assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert "--equalize changes the model before calibration" in stderr and "--save-stats" in stderr
    assert not (ws / "out" / "q.onnx").exists()


def test_request_fields_default_to_their_rows_defaults() -> None:
    """A request made in Python behaves as the command line with the option left out."""
    fields = {f.name: f for f in dataclasses.fields(QuantizeRequest)}
    for row in options.OPTIONS:
        if not row.request:
            continue
        field = fields[row.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        expected = False if row.is_flag else (() if row.multiple else row.default)
        assert default == expected, row.name
