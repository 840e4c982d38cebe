"""Recipes: selectors, validation, what each rule does to the written model, and --save-recipe round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import conv_relu_model, image_batch, make_model, run, save, tensor, weight, write_npz_folder
from onnx import helper, numpy_helper
from test_sensitivity import D, fragile_model, near_constant

from onnxq.cli import main
from onnxq.commands.dynamic import rewrite_dynamic
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, calibrated, quantize
from onnxq.commands.recipe import Recipe, Rule, Selector, layer_options, node_list, parse_recipe
from onnxq.errors import UsageError
from onnxq.quant import qmath
from onnxq.quant.ir import import_graph
from onnxq.search.sensitivity import Target


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def conv_request(model: Path, calib: Path, output: Path, recipe: Recipe, **kwargs) -> QuantizeRequest:
    return QuantizeRequest(model=model, output=output, data=DataOptions(calib=calib), recipe=recipe, **kwargs)


def ops_by_name(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node}


def sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - approx) ** 2)))


# ---------------------------------------------------------------- selectors and validation


def test_selectors_match_by_name_regex_and_op_type() -> None:
    assert Selector(name="conv1").matches("conv1", "Conv")
    assert not Selector(name="conv1").matches("conv10", "Conv")
    assert Selector(name_regex=r"^/encoder/layer\.5/").matches("/encoder/layer.5/attn/MatMul", "MatMul")
    assert not Selector(name_regex=r"^/encoder/layer\.5/").matches("/encoder/layer.50/MatMul", "MatMul")
    assert Selector(op_type=("MatMul", "Gemm")).matches("x", "Gemm")
    assert not Selector(op_type=("MatMul",), name="a").matches("b", "MatMul")  # every field must match


def test_later_rules_override_earlier_ones_field_by_field() -> None:
    recipe = parse_recipe({"rules": [
        {"match": {"op_type": "Conv"}, "precision": "int16", "method": "mse"},
        {"match": {"name": "conv2"}, "precision": "float"},
    ]}, "r.yaml")
    assert recipe.choice_for("conv1", "Conv").precision == "int16"
    conv2 = recipe.choice_for("conv2", "Conv")
    assert (conv2.precision, conv2.method, conv2.rules) == ("float", "mse", (1, 2))
    assert recipe.choice_for("relu", "Relu").rules == ()
    assert recipe.unmatched_rules([("conv1", "Conv")]) == [2]


@pytest.mark.parametrize("data, message", [
    ([], "must be a mapping"),
    ({"rulez": []}, "unknown key 'rulez'"),
    ({"version": 2}, "version 2 is not supported"),
    ({"settings": {"method": "best"}}, "settings: method must be one of"),
    ({"settings": {"symmetric": "yes"}}, "symmetric must be a bool"),
    ({"rules": [{"precision": "float"}]}, "rule 1: needs 'match'"),
    ({"rules": [{"match": {"name_regex": "(("}, "precision": "float"}]}, "rule 1: match.name_regex '((' is not"),
    ({"rules": [{"match": {"op": "Conv"}, "precision": "float"}]}, "rule 1: match: unknown key 'op'"),
    ({"rules": [{"match": {"name": "a"}, "precision": "int4"}]}, "rule 1: precision must be one of"),
    ({"rules": [{"match": {"name": "a"}}]}, "rule 1: says nothing to do"),
    ({"rules": [{"match": {"name": "a"}, "percentile": 10}]}, "percentile must be a number in (50, 100]"),
])
def test_bad_recipes_name_the_file_and_rule(data, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_recipe(data, "r.yaml")
    assert caught.value.message.startswith("r.yaml") and message in caught.value.message


def test_recipe_file_round_trips_through_yaml(tmp_path: Path) -> None:
    recipe = Recipe({"method": "mse", "per_channel": False},
                    [Rule(Selector(op_type=("MatMul", "Gemm")), precision="float", reason="why"),
                     Rule(Selector(name_regex="^conv"), per_channel=True, percentile=99.9)])
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == recipe


def test_cli_rejects_a_bad_recipe_in_one_line(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    bad = write_recipe(tmp_path / "bad.yaml", "rules:\n  - match: {name: conv1}\n    precision: half\n")
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["quantize", str(conv_model_path), "-o", str(out), "--calib", str(conv_calib),
                                       "--recipe", str(bad)])
    assert result.exit_code == 2
    assert "rule 1: precision must be one of float, int8, int16" in result.output
    assert "Traceback" not in result.output and not out.exists()
    broken = write_recipe(tmp_path / "broken.yaml", "rules: [\n")
    result = CliRunner().invoke(main, ["quantize", str(conv_model_path), "-o", str(out), "--calib", str(conv_calib),
                                       "--recipe", str(broken)])
    assert result.exit_code == 2 and "not readable YAML" in result.output and not out.exists()


# ---------------------------------------------------------------- what rules do (static)


def test_float_rule_by_regex_keeps_that_layer_float(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    recipe = parse_recipe({"rules": [{"match": {"name_regex": "2$"}, "precision": "float"}]}, "r")
    result = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "o.onnx", recipe))
    status = {n.name: n.status for n in result.plan.nodes}
    assert status["conv1"] == "int8" and status["conv2"] == "float"
    written = onnx.load(tmp_path / "o.onnx")
    conv2 = ops_by_name(written)["conv2"]
    assert "w2" in conv2.input  # still the float initializer
    assert any("recipe rule 1" in n["reason"] or "excluded" in n["reason"] for n in result.report["float_nodes"]
               if n["name"] == "conv2")


def test_int16_rule_writes_16_bit_pairs_and_is_more_accurate(tmp_path: Path, conv_model_path: Path,
                                                             conv_calib: Path, cpu_class: str) -> None:
    plain = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "int8.onnx", Recipe()))
    recipe = parse_recipe({"rules": [{"match": {"op_type": "Conv"}, "precision": "int16"}]}, "r")
    wide = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "int16.onnx", recipe,
                                 weight_range="reduced"))
    assert {wide.plan.tensors[w].qtype for w in ("w1", "w2")} == {"int8"}
    assert max(np.abs(wide.plan.tensors["w1"].zero_point)) == 0
    activations = [t for t in wide.plan.tensors.values() if t.role == "activation"]
    assert activations and all(t.qtype == "uint16" for t in activations)
    assert not any(t.role == "bias" for t in wide.plan.tensors.values())  # float compute keeps the bias float
    model = onnx.load(tmp_path / "int16.onnx")
    pairs = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
             and n.domain == "com.microsoft"]
    assert len(pairs) >= 2 and any(o.domain == "com.microsoft" for o in model.opset_import)
    assert {n.status for n in wide.plan.nodes if n.op_type == "Conv"} == {"int16"}
    feed = {"x": image_batch(np.random.default_rng(99))}
    reference = run(conv_model_path, feed)[0]
    # int16 activations leave only the weights' rounding: well above int8, more so where int8 weights are
    # limited to 7 bits (CPU classes without VNNI).
    margin = 6 if plain.report["settings"]["weight_range"] == "reduced" else 3
    assert sqnr(reference, run(tmp_path / "int16.onnx", feed)[0]) > sqnr(reference, run(tmp_path / "int8.onnx",
                                                                                       feed)[0]) + margin
    assert plain.report["settings"]["weight_range"] == ("reduced" if cpu_class == "avx2" else "full")
    assert plain.report["recipe"]["int16_nodes"] == [] and set(wide.report["recipe"]["int16_nodes"]) == {"conv1",
                                                                                                       "conv2"}


def test_int16_needs_qdq_and_int4_needs_weight_only(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    int16 = parse_recipe({"rules": [{"match": {"op_type": "Conv"}, "precision": "int16"}]}, "r")
    with pytest.raises(UsageError, match="--format qdq"):
        quantize(conv_request(conv_model_path, conv_calib, tmp_path / "o.onnx", int16, output_format="qoperator"))
    int4 = parse_recipe({"rules": [{"match": {"op_type": "Conv"}, "weights": "int4"}]}, "r")
    with pytest.raises(UsageError, match="--mode weight-only"):
        quantize(conv_request(conv_model_path, conv_calib, tmp_path / "o.onnx", int4))
    assert not (tmp_path / "o.onnx").exists()


def test_per_channel_and_method_rules_apply_to_their_nodes_only(tmp_path: Path, conv_model_path: Path,
                                                                conv_calib: Path) -> None:
    stats = tmp_path / "s.npz"
    base = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "a.onnx", Recipe(), save_stats=stats))
    recipe = parse_recipe({"rules": [{"match": {"name": "conv2"}, "per_channel": False, "method": "percentile",
                                      "percentile": 99.0}]}, "r")
    changed = quantize(QuantizeRequest(model=conv_model_path, output=tmp_path / "b.onnx", load_stats=stats,
                                       data=DataOptions(), recipe=recipe))
    assert changed.plan.tensors["w2"].axis is None and len(changed.plan.tensors["w2"].scale) == 1
    assert changed.plan.tensors["w1"].axis == 0
    # conv2's input is relu1's output: its range shrinks to the 99th percentile, conv1's input does not change
    assert changed.plan.tensors["r1"].range[1] < base.plan.tensors["r1"].range[1]
    assert changed.plan.tensors["x"].range == base.plan.tensors["x"].range


def test_pinned_int8_layers_are_not_offered_to_the_guard_or_the_target(tmp_path: Path, conv_model_path: Path,
                                                                        conv_calib: Path) -> None:
    recipe = parse_recipe({"rules": [{"match": {"name": "conv1"}, "precision": "int8"}]}, "r")
    c = calibrated(conv_request(conv_model_path, conv_calib, tmp_path / "o.onnx", recipe))
    assert set(c.placed.int8_layers()) == {"conv2"}


# ---------------------------------------------------------------- weight-only and dynamic


def test_weight_only_mixes_int4_int8_and_float_by_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = save(fragile_model(), tmp_path / "m.onnx")  # three MatMuls with 2-D weights
    recipe = parse_recipe({"rules": [{"match": {"name": "ordinary_a"}, "weights": "int4"},
                                     {"match": {"name": "fragile"}, "precision": "float"}]}, "r")
    result = quantize(QuantizeRequest(model=path, output=tmp_path / "o.onnx", mode="weight-only", recipe=recipe,
                                      data=DataOptions()))
    status = {n.name: (n.status, n.reason) for n in result.plan.nodes}
    assert status["fragile"] == ("float", "recipe rule 2")
    assert status["ordinary_a"][0] == "int4" and status["ordinary_b"][0] == "int8"
    ops = [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("DequantizeLinear") == 1
    feed = {"x": (1 + 0.02 * rng.standard_normal((1, D))).astype(np.float32)}
    assert np.allclose(run(path, feed)[0], run(tmp_path / "o.onnx", feed)[0], atol=0.2)


def test_dynamic_skips_float_rules_and_honours_exclude(tmp_path: Path) -> None:
    path = save(fragile_model(), tmp_path / "m.onnx")
    recipe = parse_recipe({"rules": [{"match": {"name": "fragile"}, "precision": "float"}]}, "r")
    result = quantize(QuantizeRequest(model=path, output=tmp_path / "o.onnx", mode="dynamic", recipe=recipe,
                                      exclude=("ordinary_b",), data=DataOptions()))
    status = {n.name: n.status for n in result.plan.nodes}
    assert status == {"fragile": "float", "ordinary_a": "int8", "ordinary_b": "float"}
    ops = [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("MatMul") == 2


def test_layer_options_hand_the_rules_to_dynamic_mode_as_data() -> None:
    model = fragile_model()
    recipe = parse_recipe({"rules": [{"match": {"op_type": "MatMul"}, "weights": "int4"},
                                     {"match": {"name": "fragile"}, "precision": "float", "reason": "too fragile"},
                                     {"match": {"name": "ordinary_a"}, "per_channel": False, "weights": "int8"}]}, "r")
    layers = layer_options(recipe.choices(node_list(import_graph(model))))
    assert layers.keep_float == {"fragile": "too fragile"}
    assert layers.per_channel == {"ordinary_a": False}
    assert layers.weight_bits == {"fragile": 4, "ordinary_a": 8, "ordinary_b": 4}
    written, decisions = rewrite_dynamic(model, qmath.INT8, True, layers)
    assert {d.name: (d.status, d.reason) for d in decisions} == {
        "fragile": ("float", "too fragile"), "ordinary_a": ("int8", "DynamicQuantizeMatMul"),
        "ordinary_b": ("int8", "DynamicQuantizeMatMul")}
    inits = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    scales = {n.name: inits[n.input[2]].size for n in written.graph.node if n.op_type == "DynamicQuantizeMatMul"}
    assert scales == {"ordinary_a": 1, "ordinary_b": 8}  # per tensor by the rule, per column by default


# ---------------------------------------------------------------- effective recipe


def test_saved_recipe_rebuilds_the_target_search_result_byte_for_byte(tmp_path: Path) -> None:
    model = save(fragile_model(), tmp_path / "fragile.onnx")
    calib = write_npz_folder(tmp_path / "calib", near_constant, 24)
    held = write_npz_folder(tmp_path / "held", near_constant, 12, seed=7)
    data = DataOptions(calib=calib, eval_data=held)
    searched = quantize(QuantizeRequest(model=model, output=tmp_path / "a.onnx", data=data, speed_guard="off",
                                        target=Target(min_sqnr_db=20.0), save_recipe=tmp_path / "r.yaml"))
    assert searched.report["accuracy_target"]["float_nodes"] == ["fragile"]
    saved = Recipe.load(tmp_path / "r.yaml")
    assert saved.settings["speed_guard"] == "off" and saved.settings["method"] == "global"
    assert [(r.match.name, r.precision) for r in saved.rules] == [("fragile", "float")]
    rebuilt = quantize(QuantizeRequest(model=model, output=tmp_path / "b.onnx", data=data, recipe=saved,
                                       speed_guard=saved.settings["speed_guard"]))
    assert "accuracy_target" not in rebuilt.report
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def outlier_model(seed: int = 0) -> onnx.ModelProto:
    """The first layer's input has one huge, ignored channel: 8-bit steps swamp the small ones, 16-bit do not.

    1x1 convolutions, not MatMuls: onnxruntime rewrites DequantizeLinear -> MatMul on a float input into
    MatMulNBits, which quantizes that input to 8 bits at run time and would undo the 16-bit input.
    """
    rng = np.random.default_rng(seed)
    first = weight(rng, (D, D, 1, 1))
    first[:, 0] = 0.0  # the outlier channel does not reach the output
    nodes = [helper.make_node("Conv", ["x", "w_first"], ["h"], name="first"),
             helper.make_node("Conv", ["h", "w_next"], ["y"], name="next")]
    return make_model(nodes, [tensor("x", [1, D, 1, 1])], [tensor("y", [1, 8, 1, 1])],
                      {"w_first": first, "w_next": weight(rng, (8, D, 1, 1))})


def with_outlier(rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = (0.05 * rng.standard_normal((1, D, 1, 1))).astype(np.float32)
    x[0, 0] = 50.0
    return {"x": x}


def test_int16_fallback_for_the_accuracy_target(tmp_path: Path) -> None:
    model = save(outlier_model(), tmp_path / "outlier.onnx")
    calib = write_npz_folder(tmp_path / "calib", with_outlier, 24)
    held = write_npz_folder(tmp_path / "held", with_outlier, 12, seed=7)
    result = quantize(QuantizeRequest(model=model, output=tmp_path / "a.onnx", speed_guard="off",
                                      data=DataOptions(calib=calib, eval_data=held), target=Target(min_sqnr_db=20.0),
                                      fallback="int16", save_recipe=tmp_path / "r.yaml"))
    target = result.report["accuracy_target"]
    assert target["start"]["min_sqnr_db"] < 20.0
    assert target["met"] and target["fallback"] == "int16" and target["float_nodes"] == ["first"]
    # `next` reads the 16-bit output of `first`: no int8 kernel takes it, so it computes in float too
    assert {n.name: n.status for n in result.plan.nodes} == {"first": "int16", "next": "int16"}
    assert result.plan.tensors["x"].qtype == "uint16"
    saved = Recipe.load(tmp_path / "r.yaml")
    assert [(r.match.name, r.precision) for r in saved.rules] == [("first", "int16")]


def test_cli_recipe_settings_are_defaults_and_flags_win(tmp_path: Path, conv_model_path: Path,
                                                        conv_calib: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "settings: {method: percentile, percentile: 99.5, per_channel: false}\n")
    runner = CliRunner()
    args = ["quantize", str(conv_model_path), "--calib", str(conv_calib), "--recipe", str(recipe), "--json", "-q"]
    from_recipe = runner.invoke(main, [*args, "-o", str(tmp_path / "a.onnx")])
    assert from_recipe.exit_code == 0, from_recipe.output
    settings = json.loads(from_recipe.output)["settings"]
    assert (settings["method"], settings["percentile"], settings["per_channel"]) == ("percentile", 99.5, False)
    overridden = runner.invoke(main, [*args, "-o", str(tmp_path / "b.onnx"), "--method", "mse"])
    assert overridden.exit_code == 0, overridden.output
    assert json.loads(overridden.output)["settings"]["method"] == "mse"


def test_unmatched_rules_are_reported(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    recipe = parse_recipe({"rules": [{"match": {"name": "conv9"}, "precision": "float"}]}, "r")
    result = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "o.onnx", recipe))
    assert any("recipe rule 1" in note and "selects no node" in note for note in result.report["notes"])


def test_weights_of_a_float_rule_stay_float_initializers(tmp_path: Path, conv_calib: Path) -> None:
    path = save(conv_relu_model(), tmp_path / "c.onnx")
    recipe = parse_recipe({"rules": [{"match": {"op_type": "Conv"}, "precision": "float"},
                                     {"match": {"name": "conv1"}, "precision": "int8"}]}, "r")
    quantize(conv_request(path, conv_calib, tmp_path / "o.onnx", recipe))
    inits = {t.name: numpy_helper.to_array(t).dtype for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    assert inits["w2"] == np.float32 and np.int8 in inits.values()


# ---------------------------------------------------------------- a user metric for the accuracy target

AGREEMENT_METRIC = """
import numpy as np

def score(references, candidates, feeds):
    assert len(references) == len(candidates) == len(feeds)
    close = [np.max(np.abs(c["y"] - r["y"])) <= 0.05 * np.max(np.abs(r["y"])) for r, c in zip(references, candidates)]
    return float(np.mean(close))
"""


def test_accuracy_target_on_a_user_metric(tmp_path: Path) -> None:
    model = save(fragile_model(), tmp_path / "fragile.onnx")
    calib = write_npz_folder(tmp_path / "calib", near_constant, 24)
    held = write_npz_folder(tmp_path / "held", near_constant, 12, seed=7)
    script = write_recipe(tmp_path / "metric.py", AGREEMENT_METRIC)
    result = quantize(QuantizeRequest(model=model, output=tmp_path / "a.onnx", speed_guard="off",
                                      data=DataOptions(calib=calib, eval_data=held), metric=script,
                                      target=Target(min_metric=1.0), target_samples=8, target_data=calib))
    target = result.report["accuracy_target"]
    assert target["start"]["metric"] < 1.0 and target["final"]["metric"] == 1.0
    assert target["float_nodes"] == ["fragile"] and target["samples"] == 8
    assert target["target"]["data"] == result.report["data"]["calibration"]["source"] != result.report["data"][
        "evaluation"]["source"]
    gate = next(g for g in result.report["gates"] if g["gate"] == "target_metric")
    assert gate["passed"] and gate["measured"] == 1.0


@pytest.mark.parametrize("text, error", [
    ("def other(): pass\n", "has no function score"),
    ("import nonexistent_module_xyz\n", "failed to load: ModuleNotFoundError"),
])
def test_bad_metric_scripts_fail_before_calibration(tmp_path: Path, conv_model_path: Path, conv_calib: Path,
                                                    text: str, error: str) -> None:
    script = write_recipe(tmp_path / "metric.py", text)
    args = ["quantize", str(conv_model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(conv_calib),
            "--metric", str(script), "--target-metric", "0.9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and error in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()
    alone = CliRunner().invoke(main, args[:-2])
    assert alone.exit_code == 2 and "go together" in alone.output


def test_metric_returning_nan_is_a_data_error(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    script = write_recipe(tmp_path / "metric.py", "def score(references, candidates, feeds):\n"
                                                  "    return float('nan')\n")
    result = CliRunner().invoke(main, ["quantize", str(conv_model_path), "-o", str(tmp_path / "o.onnx"), "--calib",
                                       str(conv_calib), "--metric", str(script), "--target-metric", "0.9"])
    assert result.exit_code == 4 and "returned nan" in result.output and not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------- what the automatic search writes as rules


def test_dynamic_rule_quantizes_that_layer_at_run_time_beside_static_ones(tmp_path: Path) -> None:
    from test_auto import outlier_calibration, outlier_classifier

    model = save(outlier_classifier(), tmp_path / "m.onnx")
    calib = outlier_calibration(tmp_path / "calib")
    recipe = parse_recipe({"rules": [{"match": {"name": "fc1"}, "precision": "dynamic"}]}, "r")
    result = quantize(conv_request(model, calib, tmp_path / "o.onnx", recipe))
    status = {n.name: n.status for n in result.plan.nodes}
    assert status["fc1"] == "dynamic" and status["fc2"] == "int8"
    kernels = result.report["fusion"]["int8_kernels"]
    assert kernels.get("DynamicQuantizeMatMul", 0) + kernels.get("MatMulInteger", 0) == 1
    assert result.report["nodes"]["by_op_type"]["MatMul"] == {"dynamic": 1, "int8": 1}
    written = onnx.load(tmp_path / "o.onnx")
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in written.graph.node)


def test_adaround_rule_rounds_only_the_layers_it_names(tmp_path: Path, conv_model_path: Path,
                                                      conv_calib: Path) -> None:
    recipe = parse_recipe({"rules": [{"match": {"name": "conv2"}, "adaround": True}]}, "r")
    result = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "o.onnx", recipe))
    assert [row["layer"] for row in result.report["recovery"]["adaround"]["layers"]] == ["conv2"]
    again = quantize(conv_request(conv_model_path, conv_calib, tmp_path / "again.onnx", recipe))
    assert again.report["recovery"]["adaround"] == result.report["recovery"]["adaround"] | {
        "seconds": again.report["recovery"]["adaround"]["seconds"]}
    assert (tmp_path / "o.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()
