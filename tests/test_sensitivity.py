"""Sensitivity ranking and the accuracy-target search, on a graph built with one fragile layer.

The fragile layer is a MatMul whose weight columns sum to zero while its input is close to
a constant: the output is a small difference of large products, so rounding the weights to
int8 swamps it. Every other layer is ordinary. Keeping that one layer float must be both
the top of the ranking and the whole of the fallback list.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_model, save, tensor, weight, write_npz_folder
from onnx import helper

from onnxq import cli
from onnxq.cli import main
from onnxq.commands.command_options import CommandOptions
from onnxq.commands.option_table import options_of
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize, sensitivity
from onnxq.errors import EXIT_USAGE, UsageError
from onnxq.quant.plan import QuantSettings
from onnxq.search.sensitivity import Target

D = 32


def fragile_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((D, D)).astype(np.float32) * 4.0
    cancelling = (big - big.mean(axis=0, keepdims=True)).astype(np.float32)  # columns sum to 0
    nodes = [
        helper.make_node("MatMul", ["x", "w_fragile"], ["h"], name="fragile"),
        helper.make_node("MatMul", ["h", "w_a"], ["a"], name="ordinary_a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w_b"], ["y"], name="ordinary_b"),
    ]
    inits = {"w_fragile": cancelling, "w_a": weight(rng, (D, D)), "w_b": weight(rng, (D, 8))}
    return make_model(nodes, [tensor("x", [1, D])], [tensor("y", [1, 8])], inits)


def near_constant(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": (1.0 + 0.02 * rng.standard_normal((1, D))).astype(np.float32)}


@pytest.fixture
def fragile(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = save(fragile_model(), tmp_path / "fragile.onnx")
    calib = write_npz_folder(tmp_path / "calib", near_constant, 24)
    held = write_npz_folder(tmp_path / "held", near_constant, 12, seed=7)
    return model, calib, held


def request(model: Path, calib: Path, held: Path, output: Path, **kwargs) -> QuantizeRequest:
    return QuantizeRequest(model=model, output=output, data=DataOptions(calib=calib, eval_data=held), **kwargs)


def test_fragile_layer_ranks_first(tmp_path: Path, fragile) -> None:
    model, calib, held = fragile
    result = sensitivity(request(model, calib, held, tmp_path / "unused.onnx", speed_guard="off"))
    assert result.ranked_nodes()[0] == "fragile"
    top = result.layers[0]
    assert top.all_but_this_sqnr_db > result.all_int8_sqnr_db + 10  # keeping it float recovers a lot
    assert top.only_this_sqnr_db < min(layer.only_this_sqnr_db for layer in result.layers[1:])
    assert {layer.node for layer in result.layers} == {"fragile", "ordinary_a", "ordinary_b"}
    assert not (tmp_path / "unused.onnx").exists()


def test_target_search_keeps_only_the_fragile_layer_float(tmp_path: Path, fragile) -> None:
    model, calib, held = fragile
    output = tmp_path / "q.onnx"
    result = quantize(request(model, calib, held, output, target=Target(min_sqnr_db=25.0)))
    target = result.report["accuracy_target"]
    assert target["met"] is True and target["float_nodes"] == ["fragile"]
    assert target["start"]["min_sqnr_db"] < 25.0 <= target["final"]["min_sqnr_db"]
    assert result.gates_passed
    decisions = {n.name: (n.status, n.reason) for n in result.plan.nodes}
    assert decisions["fragile"][0] == "float" and decisions["fragile"][1].startswith("accuracy target")
    assert decisions["ordinary_a"][0] == decisions["ordinary_b"][0] == "int8"
    assert result.report["fidelity"]["outputs"][0]["sqnr_db"] >= 25.0 - 3  # all held samples, not just 12


def test_target_already_met_changes_nothing(tmp_path: Path, fragile) -> None:
    model, calib, held = fragile
    result = quantize(request(model, calib, held, tmp_path / "q.onnx", target=Target(min_cosine=0.0)))
    assert result.report["accuracy_target"]["float_nodes"] == [] and result.report["accuracy_target"]["met"]
    assert {n.name for n in result.plan.nodes if n.status == "int8"} == {"fragile", "ordinary_a", "ordinary_b"}


def test_unreachable_target_writes_best_model_and_exits_6(tmp_path: Path, fragile) -> None:
    model, calib, held = fragile
    output = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(output), "--calib", str(calib),
                                       "--eval-data", str(held), "--target-sqnr", "200", "--max-fallbacks", "1",
                                       "--json", "-q"])
    assert result.exit_code == 6, result.stderr
    report = json.loads(result.stdout)
    target = report["accuracy_target"]
    assert target["met"] is False and target["float_nodes"] == ["fragile"]  # the best of what was tried
    assert [g["gate"] for g in report["gates"] if not g["passed"]] == ["target_sqnr_db"]
    assert output.exists()


def test_sensitivity_cli_writes_json_and_png(tmp_path: Path, fragile) -> None:
    model, calib, held = fragile
    stats = tmp_path / "stats.npz"
    assert CliRunner().invoke(main, ["calibrate", str(model), "--calib", str(calib), "-o", str(stats)]).exit_code == 0
    result = CliRunner().invoke(main, ["sensitivity", str(model), "--load-stats", str(stats), "--eval-data",
                                       str(held), "-o", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[2].split()[-2] == "fragile"  # rank 1 row of the table
    ranking = json.loads((tmp_path / "s.json").read_text())
    assert ranking["layers"][0]["node"] == "fragile" and ranking["samples"] == 12
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_needs_samples(tmp_path: Path, fragile) -> None:
    model, _, _ = fragile
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--allow-random",
                                       "--target-sqnr", "20"])
    assert result.exit_code == 2 and "needs samples" in result.stderr


def _request_of(command: str, args: list[str]) -> QuantizeRequest:
    """The request `onnxq COMMAND ARGS` builds, without running it."""
    built = {}
    builders = {"quantize": cli.quantize_request, "sensitivity": cli.sensitivity_request}
    context = cli.main.commands[command].make_context(command, args)
    with context:
        built["request"] = builders[command](CommandOptions.current(context.params))
    return built["request"]


def test_sensitivity_measures_under_quantizes_settings(tmp_path: Path, fragile) -> None:
    model, calib, _ = fragile
    recipe = tmp_path / "r.yaml"
    recipe.write_text("settings: {method: percentile, per_channel: false}\nrules:\n"
                      "  - {match: {name: ordinary_b}, precision: float}\n")
    shared = ["--calib", str(calib), "--percentile", "99.9", "--symmetric", "--weight-range", "reduced",
              "--exclude", "ordinary_a", "--recipe", str(recipe), "--target-cpu", "avx2", "--exclude-regex", "^nothing"]
    quantized = _request_of("quantize", [str(model), "-o", str(tmp_path / "q.onnx"), *shared])
    measured = _request_of("sensitivity", [str(model), *shared])
    assert measured.output is None
    assert measured.settings == quantized.settings == QuantSettings(method="percentile", percentile=99.9,
                                                                    symmetric=True, per_channel=False)
    shared_fields = [row.name for row in options_of("sensitivity") if row.request and "quantize" in row.commands]
    assert {"weight_range", "exclude", "exclude_regex", "target_cpu", "equalize", "smooth_alpha"} <= set(shared_fields)
    assert [getattr(measured, f) for f in shared_fields] == [getattr(quantized, f) for f in shared_fields]
    assert measured.recipe == quantized.recipe and measured.target_cpu == "avx2"
    ranked = sensitivity(measured).ranked_nodes()
    assert ranked == ["fragile"]  # ordinary_a excluded, ordinary_b float by the recipe: not int8, not ranked


def test_sensitivity_refuses_a_recipe_for_another_mode(tmp_path: Path, fragile) -> None:
    model, calib, _ = fragile
    recipe = tmp_path / "r.yaml"
    recipe.write_text("settings: {mode: dynamic}\n")
    result = CliRunner().invoke(main, ["sensitivity", str(model), "--calib", str(calib), "--recipe", str(recipe)])
    assert result.exit_code == EXIT_USAGE and "mode dynamic" in result.stderr


def test_quantize_needs_an_output_path(fragile) -> None:
    model, calib, _ = fragile
    with pytest.raises(UsageError, match="-o"):
        quantize(QuantizeRequest(model=model, data=DataOptions(calib=calib)))


def test_sensitivity_notes_the_repairs_a_recipe_turns_on(tmp_path: Path, fragile) -> None:
    """A recipe saved by quantize may turn on bias correction; the ranking measures plain int8 layers and says so."""
    model, calib, _ = fragile
    recipe = tmp_path / "r.yaml"
    recipe.write_text("settings: {bias_correction: true, speed_guard: 'off', auto: false}\n")
    result = CliRunner().invoke(main, ["sensitivity", str(model), "--calib", str(calib), "--recipe", str(recipe),
                                       "--json"])
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert [n for n in notes if "bias_correction: true is not applied" in n]
    assert not [n for n in notes if "adaround" in n]
