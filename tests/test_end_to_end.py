"""Quantize small graphs end to end and check the result the way a user would.

Every graph goes through the library API with calibration data on disk, then:
- the output passes onnx.checker, loads and runs in onnxruntime;
- it agrees with the fp32 model (cosine >= 0.98) in the report and on fresh data we run ourselves;
- weights are stored as int8 (no float copy remains) and dequantize to the fp32 weights;
- onnxruntime fuses the QDQ pattern into int8 kernels (no float Conv/MatMul/Gemm left).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import (
    IMAGE,
    cli_in,
    constant_node_model,
    conv_relu_model,
    cosine,
    dynamic_model,
    feeds_for,
    float_initializers,
    fused_op_types,
    gemm_model,
    hard_swish_model,
    if_model,
    image_batch,
    initializer_inputs_model,
    int8_initializers,
    matmul_add_model,
    opset6_ir3_model,
    opset11_model,
    pass_through_model,
    quantize_simple,
    run,
    save,
    shared_weight_model,
    write_npz_folder,
)
from onnx import numpy_helper

import onnxq.commands.pipeline
import onnxq.search.distributed
from onnxq.cli import main
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.errors import EXIT_GATE_MISSED
from onnxq.passes.prepare import prepare_model
from onnxq.quant.plan import QuantPlan
from onnxq.quant.statistics import Statistics

calibration = importlib.import_module("onnxq.runtime.calibrate")  # the module: onnxq.calibrate is the API function

MIN_COSINE = 0.98
CALIB_SAMPLES = 16
# Ops that would mean onnxruntime runs a heavy op in float.
FLOAT_HEAVY_OPS = {"Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


@dataclass
class Case:
    build: Callable[[], onnx.ModelProto]
    kernels: dict[str, int]  # int8 kernels onnxruntime must run (at least this many of each)
    feeds: Callable[[np.random.Generator], dict[str, np.ndarray]] | None = None  # None: from the input shapes


def _sized(rng: np.random.Generator, sizes=((16, 16), (12, 20), (24, 8), (10, 14))) -> dict[str, np.ndarray]:
    height, width = sizes[int(rng.integers(len(sizes)))]
    return {"x": rng.standard_normal((1, 3, height, width)).astype(np.float32)}


CASES = {
    "conv_relu": Case(conv_relu_model, {"QLinearConv": 2}),
    # onnxruntime's basic optimisations turn MatMul+Add into Gemm in prepare; either int8 kernel is fine
    "matmul_add": Case(matmul_add_model, {"QGemm|QLinearMatMul|MatMulIntegerToFloat": 1}),
    "gemm": Case(gemm_model, {"QGemm": 2}),
    "shared_weight": Case(shared_weight_model, {"QLinearConv": 2}),
    "constant_nodes": Case(constant_node_model, {"QLinearConv": 2}),
    "initializer_inputs": Case(initializer_inputs_model, {"QLinearConv": 2}),
    "if_subgraph": Case(if_model, {"QLinearConv": 2}),
    "dynamic_dims": Case(dynamic_model, {"QLinearConv": 2}, feeds=_sized),
    "opset11": Case(opset11_model, {"QLinearConv": 2}),
    "pass_through": Case(pass_through_model, {"QLinearConv": 3, "MatMulIntegerToFloat": 1}),
    "hard_swish": Case(hard_swish_model, {"QLinearConv": 2}),  # the gates in float unless --int8-gates
}


@dataclass
class Quantized:
    original: onnx.ModelProto
    model_path: Path
    output: Path
    model: onnx.ModelProto
    result: onnxq.commands.pipeline.QuantizeResult
    calib: Path


def quantize_case(case: Case, tmp_path: Path, **request) -> Quantized:
    original = case.build()
    model_path = save(original, tmp_path / "model.onnx")
    calib = write_npz_folder(tmp_path / "calib", case.feeds or feeds_for(original), CALIB_SAMPLES)
    output = tmp_path / "model.int8.onnx"
    result = quantize(QuantizeRequest(model=model_path, output=output, data=DataOptions(calib=calib), **request))
    return Quantized(original, model_path, output, onnx.load(str(output)), result, calib)


def fp32_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weights (float tensors of rank >= 2) of the fp32 model, from initializers or Constant nodes."""
    return {name: values for name, values in float_initializers(model).items() if values.ndim >= 2}


def dequantized_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every int8 initializer read by a DequantizeLinear, dequantized with that node's scale and zero point.

    Returns (dequantized values, scale broadcastable to them) pairs.
    """
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    int8 = int8_initializers(model)
    restored = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in int8:
            continue
        values = inits[node.input[0]].astype(np.float64)
        scale = inits[node.input[1]].astype(np.float64)
        has_zero = len(node.input) > 2 and node.input[2]
        zero = inits[node.input[2]].astype(np.float64) if has_zero else np.zeros_like(scale)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        restored.append(((values - zero) * scale, scale))
    return restored


def assert_weights_stored_int8(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    weights = fp32_weights(original)
    assert weights, "test graph should have weights"
    floats = float_initializers(quantized)
    restored = dequantized_weights(quantized)
    for name, values in weights.items():
        copies = [n for n, v in floats.items() if v.shape == values.shape and np.array_equal(v, values)]
        assert not copies, f"float copy of weight {name} remains: {copies}"
        assert any(r.shape == values.shape and np.all(np.abs(r - values) <= s / 2 + 1e-7) for r, s in restored), \
            f"no int8 initializer dequantizes to weight {name}"
    assert not [n for n, v in floats.items() if v.ndim >= 2], "only scales (rank <= 1) may stay float"


def assert_fused(path: Path, kernels: dict[str, int]) -> list[str]:
    ops = fused_op_types(path)
    for alternatives, count in kernels.items():
        found = sum(1 for op in ops if op in alternatives.split("|"))
        assert found >= count, f"expected {count} x {alternatives} in onnxruntime's graph, got {ops}"
    assert not FLOAT_HEAVY_OPS & set(ops), f"a heavy op still runs in float: {ops}"
    return ops


def assert_agrees(original_path: Path, quantized_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[float]:
    cosines = []
    for feed in feeds:
        reference = run(original_path, feed)
        test = run(quantized_path, feed)
        assert len(reference) == len(test)
        for ref, out in zip(reference, test, strict=True):
            assert ref.shape == out.shape
            assert np.isfinite(out).all()
            cosines.append(cosine(ref, out))
    assert min(cosines) >= MIN_COSINE, cosines
    return cosines


def assert_report_fidelity(result: onnxq.commands.pipeline.QuantizeResult, held_back: int) -> None:
    fidelity = result.report["fidelity"]
    assert fidelity is not None
    assert fidelity["samples"] == held_back
    assert "held back" in fidelity["source"]
    assert fidelity["outputs"], "fidelity has one entry per float output"
    for output in fidelity["outputs"]:
        assert output["cosine"] >= MIN_COSINE, output
        assert output["worst_sample_cosine"] >= MIN_COSINE, output


@pytest.mark.parametrize("name", list(CASES))
def test_graph_quantizes_runs_agrees_and_fuses(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    q = quantize_case(case, tmp_path)
    onnx.checker.check_model(q.model, full_check=True)
    assert q.model.producer_name == "onnxq"
    assert [i.name for i in q.model.graph.input] == [i.name for i in q.original.graph.input
                                                     if i.name not in {t.name for t in q.original.graph.initializer}]
    assert_report_fidelity(q.result, held_back=1)  # 10% of 16, rounded down
    rng = np.random.default_rng(12345)  # fresh samples, never seen by calibration
    feeds = [(case.feeds or feeds_for(q.original))(rng) for _ in range(4)]
    assert_agrees(q.model_path, q.output, feeds)
    assert_weights_stored_int8(q.original, q.model)
    assert_fused(q.output, case.kernels)
    assert q.result.report["nodes"]["quantized"] >= sum(case.kernels.values())


def test_hard_swish_runs_in_int8_with_its_constants_stored_exactly(tmp_path: Path) -> None:
    """Hard-swish's gate x + 3 runs as QLinearAdd (the Clip folded into its output), its / 6 moves onto the
    gate as a QLinearMul by 1/6 (onnxq.passes.simplify), and x * gate is a QLinearMul; a constant tensor
    keeps its Add float, and so does a single-value Mul outside a gate (8 bits would round its result)."""
    q = quantize_case(CASES["hard_swish"], tmp_path, int8_gates=True)
    assert_fused(q.output, {"QLinearConv": 2, "QLinearAdd": 1, "QLinearMul": 2})
    assert_agrees(q.model_path, q.output, [feeds_for(q.original)(np.random.default_rng(7)) for _ in range(4)])
    status = {row["node"]: row["planned"] for row in q.result.report["fusion"]["precision"]}
    assert status["add3"] == status["mul"] == status["div6"] == "int8"
    assert status["add_offsets"] == status["scale_half"] == "float"
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.graph.initializer}
    nodes = {n.name: n for n in q.model.graph.node}
    assert nodes["div6"].op_type == "Mul"
    for name, value in (("add3", 3.0), ("div6", np.float32(1) / np.float32(6))):
        operand = next(n for n in q.model.graph.node
                       if n.op_type == "DequantizeLinear" and n.output[0] in nodes[name].input and n.input[0] in inits
                       and inits[n.input[0]].size == 1)
        stored, scale, zero = (inits[i] for i in operand.input)
        assert stored.dtype == np.uint8  # the activations' type: onnxruntime fuses QLinearAdd/Mul only then
        assert (stored.astype(np.float32) - zero.astype(np.float32)) * scale == pytest.approx(value, rel=1e-6)


def test_int8_gates_are_saved_in_the_recipe_and_rebuilt(tmp_path: Path) -> None:
    recipe = tmp_path / "gates.yaml"
    q = quantize_case(CASES["hard_swish"], tmp_path, int8_gates=True, save_recipe=recipe)
    assert "int8_gates: true" in recipe.read_text()
    code, _, err = cli_in(tmp_path, "quantize", "model.onnx", "-o", "again.onnx", "--calib", "calib",
                          "--recipe", "gates.yaml", "-q")
    assert code == 0, err
    assert (tmp_path / "again.onnx").read_bytes() == q.output.read_bytes()


def test_hard_swish_stays_float_without_int8_gates(tmp_path: Path) -> None:
    q = quantize_case(CASES["hard_swish"], tmp_path)
    assert {n.name: n.op_type for n in q.model.graph.node}["div6"] == "Div"  # the graph as exported
    ran = fused_op_types(q.output)
    assert ran.count("QLinearConv") == 2 and "QLinearAdd" not in ran and "QLinearMul" not in ran


def test_shared_weight_is_stored_once(tmp_path: Path) -> None:
    q = quantize_case(CASES["shared_weight"], tmp_path)
    weights = [v for v in int8_initializers(q.model).values() if v.ndim == 4]
    assert len(weights) == 1
    dq_of_weight = [n for n in q.model.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in int8_initializers(q.model) and int8_initializers(q.model)[n.input[0]].ndim == 4]
    assert len(dq_of_weight) == 1
    convs = [n for n in q.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and convs[0].input[1] == convs[1].input[1] == dq_of_weight[0].output[0]


def test_constant_node_weights_become_int8_initializers(tmp_path: Path) -> None:
    q = quantize_case(CASES["constant_nodes"], tmp_path)
    assert not q.original.graph.initializer
    assert not [n for n in q.model.graph.node if n.op_type == "Constant"
                and any(a.t.data_type == onnx.TensorProto.FLOAT and len(a.t.dims) >= 2 for a in n.attribute)]
    assert len([v for v in int8_initializers(q.model).values() if v.ndim == 4]) == 2


def test_initializers_listed_as_inputs_are_constants(tmp_path: Path) -> None:
    q = quantize_case(CASES["initializer_inputs"], tmp_path)
    assert len(q.original.graph.input) == 5
    assert [i.name for i in q.model.graph.input] == ["x"]
    assert any("initializers were also listed as graph inputs" in note for note in q.result.report["notes"])
    statuses = {n.name: n.status for n in q.result.plan.nodes}
    assert statuses == {"conv1": "int8", "relu1": "folded", "conv2": "int8"}


def test_if_subgraph_stays_float_and_correct(tmp_path: Path) -> None:
    q = quantize_case(CASES["if_subgraph"], tmp_path)
    reasons = {row["name"]: row["reason"] for row in q.result.report["float_nodes"]}
    for inner in ("then_mul", "else_sigmoid", "else_add"):
        assert inner in reasons and "If subgraph" in reasons[inner], reasons
    # the subgraphs still read the outer tensor by its original name
    branch_inputs = {i for n in q.model.graph.node if n.op_type == "If"
                     for a in n.attribute for sub in [a.g] for inner in sub.node for i in inner.input}
    assert "r1" in branch_inputs
    assert "r1" in {o for n in q.model.graph.node for o in n.output}
    # both branches: a clearly positive and a clearly negative input sum
    rng = np.random.default_rng(7)
    positive = {"x": (image_batch(rng) + 0.3).astype(np.float32)}
    negative = {"x": (image_batch(rng) - 0.3).astype(np.float32)}
    assert_agrees(q.model_path, q.output, [positive, negative])
    then_out, else_out = run(q.output, positive)[0], run(q.output, negative)[0]
    assert not np.allclose(then_out, else_out)


def test_dynamic_dims_calibrate_on_mixed_sizes(tmp_path: Path) -> None:
    q = quantize_case(CASES["dynamic_dims"], tmp_path, save_stats=tmp_path / "stats.npz")
    dims = [d.dim_param or d.dim_value for d in q.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    sizes = {np.load(p)["x"].shape for p in sorted(q.calib.iterdir())[:-1]}
    assert len(sizes) > 1, "calibration should have mixed spatial sizes"
    stats = Statistics.load(tmp_path / "stats.npz")
    assert stats.tensors["x"].count == sum(int(np.prod(s)) for p in sorted(q.calib.iterdir())[:-1]
                                           for s in [np.load(p)["x"].shape])
    # sizes and a batch size never seen in calibration
    rng = np.random.default_rng(3)
    feeds = [{"x": image_batch(rng, (2, 3, 20, 12))}, {"x": image_batch(rng, (1, 3, 8, 8))}]
    assert_agrees(q.model_path, q.output, feeds)


def test_opset11_is_converted(tmp_path: Path) -> None:
    q = quantize_case(CASES["opset11"], tmp_path)
    assert q.original.opset_import[0].version == 11
    opset = {o.domain: o.version for o in q.model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) >= 13
    assert "opset 11 converted to 13" in q.result.report["notes"]
    squeeze = next(n for n in q.model.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2 and not squeeze.attribute  # axes moved to an input in opset 13


def test_opset6_ir3_export_quantizes_against_its_converted_reference(tmp_path: Path) -> None:
    original = opset6_ir3_model()
    model_path = save(original, tmp_path / "model.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, CALIB_SAMPLES)
    output = tmp_path / "model.int8.onnx"
    result = quantize(QuantizeRequest(model=model_path, output=output, data=DataOptions(calib=calib)))
    notes = result.report["notes"]
    assert "opset 6 converted to 13" in notes
    assert any("fp32 reference is the opset 13 conversion" in note for note in notes)
    quantized = onnx.load(str(output))
    onnx.checker.check_model(quantized, full_check=True)
    assert quantized.ir_version >= 7
    assert {n.name: n.status for n in result.plan.nodes if n.op_type in ("Conv", "Gemm")} == {
        "conv1": "int8", "fc": "int8"}
    converted = save(prepare_model(original).reference, tmp_path / "converted.onnx")
    assert_agrees(converted, output, [{"x": image_batch(np.random.default_rng(5))}])
    assert_report_fidelity(result, held_back=1)


def test_pass_through_ops_share_their_input_scale(tmp_path: Path) -> None:
    q = quantize_case(CASES["pass_through"], tmp_path)
    plan = q.result.plan.tensors
    statuses = {n.name: n.status for n in q.result.plan.nodes}
    for node in ("pool", "transpose", "reshape"):
        assert statuses[node] == "shared-scale"
    for output, source in (("p1", "r1"), ("t", "cat"), ("rs", "cat")):
        assert plan[output].source == source
        assert plan[output].scale == plan[source].scale
        assert plan[output].zero_point == plan[source].zero_point
    # Concat is an int8 op with its own output scale, not a pass-through of one of its inputs
    assert plan["cat"].source == "cat"
    rows = {r["name"]: r for r in q.result.report["tensors"]}
    assert rows["p1"]["shares_scale_with"] == "r1" and rows["p1"]["scale"] == rows["r1"]["scale"]
    # the written Q/DQ pairs carry the shared scale
    inits = {t.name: numpy_helper.to_array(t) for t in q.model.graph.initializer}
    quantize_of = {n.input[0]: n for n in q.model.graph.node if n.op_type == "QuantizeLinear"}
    producer = {o: n for n in q.model.graph.node for o in n.output}
    pool = next(n for n in q.model.graph.node if n.op_type == "MaxPool")
    before, after = producer[pool.input[0]], quantize_of[pool.output[0]]
    assert before.op_type == "DequantizeLinear"
    assert inits[before.input[1]] == inits[after.input[1]] == np.float32(plan["r1"].scale[0])
    assert inits[before.input[2]] == inits[after.input[2]] == plan["r1"].zero_point[0]


def test_output_is_byte_identical_for_same_inputs(tmp_path: Path) -> None:
    original = pass_through_model()
    model_path = save(original, tmp_path / "model.onnx")
    calib = write_npz_folder(tmp_path / "calib", feeds_for(original), 10)
    first = quantize_simple(model_path, tmp_path / "a.onnx", calib)
    second = quantize_simple(model_path, tmp_path / "b.onnx", calib)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first.plan.to_json() == second.plan.to_json()


def _cli(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.stderr + result.stdout
    return result.exit_code, result.stdout, result.stderr


def test_load_stats_needs_no_inference(tmp_path: Path, conv_model_path: Path, conv_calib: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stats = tmp_path / "stats.npz"
    code, _, err = _cli(["quantize", conv_model_path, "-o", tmp_path / "a.onnx", "--calib", conv_calib,
                         "--save-stats", stats, "-q"])
    assert code == 0, err
    saved = Statistics.load(stats)
    assert saved.samples == 9  # 10 minus the held-back one
    assert {"x", "c1", "r1", "y"} <= set(saved.tensors)

    def no_inference(*_args, **_kwargs):
        raise AssertionError("an inference pass ran although statistics were loaded")

    # onnxq.search.distributed (pipeline's way in) imported the function by name: patch both bindings, and the runner
    monkeypatch.setattr(calibration, "collect_statistics", no_inference)
    monkeypatch.setattr(onnxq.search.distributed, "collect_statistics", no_inference)
    monkeypatch.setattr(calibration, "run", no_inference)
    report = tmp_path / "report.json"
    code, _, err = _cli(["quantize", conv_model_path, "-o", tmp_path / "b.onnx", "--load-stats", stats,
                         "--method", "percentile", "--symmetric", "--report", report, "-q"])
    assert code == 0, err
    monkeypatch.undo()

    data = json.loads(report.read_text())
    assert data["settings"]["method"] == "percentile" and data["settings"]["symmetric"] is True
    assert data["data"]["statistics_file"] == str(stats)
    assert data["data"]["calibration"] == {"samples": 9}
    activations = [r for r in data["tensors"] if r["role"] == "activation"]
    # symmetric ranges as uint8 around 128: the values of int8 with zero point 0, in the type onnxruntime fuses
    assert activations and all(r["qtype"] == "uint8" and r["zero_point"] == 128 for r in activations)
    quantized = onnx.load(str(tmp_path / "b.onnx"))
    onnx.checker.check_model(quantized, full_check=True)
    assert (tmp_path / "a.onnx").read_bytes() != (tmp_path / "b.onnx").read_bytes()
    rng = np.random.default_rng(11)
    assert_agrees(conv_model_path, tmp_path / "b.onnx", [{"x": image_batch(rng)} for _ in range(3)])


@pytest.mark.parametrize("other", ["other graph", "same graph, other weights"])
def test_load_stats_of_another_model_is_refused(tmp_path: Path, conv_model_path: Path, conv_calib: Path,
                                                other: str) -> None:
    stats = tmp_path / "stats.npz"
    assert _cli(["calibrate", conv_model_path, "--calib", conv_calib, "-o", stats, "-q"])[0] == 0
    model = pass_through_model() if other == "other graph" else conv_relu_model(seed=99)
    other_path = save(model, tmp_path / "other.onnx")
    code, _, err = _cli(["quantize", other_path, "-o", tmp_path / "q.onnx", "--load-stats", stats])
    assert code == 4
    assert err.startswith("onnxq: error:") and "different model" in err
    assert not (tmp_path / "q.onnx").exists()


def test_save_plan_round_trips(tmp_path: Path) -> None:
    original = pass_through_model()
    model_path = save(original, tmp_path / "model.onnx")
    calib = write_npz_folder(tmp_path / "calib", feeds_for(original), 10)
    plan_path = tmp_path / "plan.json"
    result = quantize_simple(model_path, tmp_path / "q.onnx", calib, save_plan=plan_path)
    loaded = QuantPlan.load(plan_path)
    assert json.loads(plan_path.read_text())["format"] == "onnxq-plan/1"
    assert loaded.settings == result.plan.settings
    assert loaded.model_digest == result.plan.model_digest != ""
    assert set(loaded.tensors) == set(result.plan.tensors)
    for name, entry in result.plan.tensors.items():
        assert loaded.tensors[name].scale == entry.scale, name
        assert loaded.tensors[name].zero_point == entry.zero_point, name
        assert loaded.tensors[name] == entry
    # the plan's activation scales are the ones written into the model's QuantizeLinear nodes
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    written = {float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    planned = {float(np.float32(e.scale[0])) for e in loaded.by_role("activation")}
    assert written == planned
    # the same through the CLI: --save-plan agrees with the report of that run
    cli_plan = tmp_path / "cli_plan.json"
    code, out, err = _cli(["quantize", model_path, "-o", tmp_path / "q2.onnx", "--calib", calib, "--save-plan",
                           cli_plan, "--json", "-q"])
    assert code == 0, err
    from_cli = QuantPlan.load(cli_plan)
    rows = {r["name"]: r for r in json.loads(out)["tensors"]}
    assert set(rows) == set(from_cli.tensors)
    for name, entry in from_cli.tensors.items():
        assert entry == loaded.tensors[name], name  # same inputs, same plan
        if entry.role == "activation":
            assert (entry.scale[0], entry.zero_point[0], entry.range) == \
                (rows[name]["scale"], rows[name]["zero_point"], rows[name]["range"])
        elif entry.role == "weight":
            assert len(entry.scale) == rows[name]["channels"]


def test_report_json(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    output, report_path = tmp_path / "q.onnx", tmp_path / "report.json"
    code, out, err = _cli(["quantize", conv_model_path, "-o", output, "--calib", conv_calib, "--report",
                           report_path, "--json", "--method", "global", "-q"])
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert json.loads(out) == report

    nodes = report["nodes"]
    assert nodes["total"] == 3 and nodes["quantized"] + nodes["float"] == nodes["total"]
    assert nodes["by_op_type"] == {"Conv": {"int8": 2}, "Relu": {"folded": 1}}

    size = report["size"]
    assert size["input_bytes"] == conv_model_path.stat().st_size
    assert size["output_bytes"] == output.stat().st_size
    assert size["ratio"] == round(size["input_bytes"] / size["output_bytes"], 3)
    assert size["ratio"] > 1.0

    assert {"load", "prepare", "place", "calibrate", "plan", "rewrite", "check", "evaluate", "write"} \
        <= set(report["timings_s"])
    assert all(isinstance(v, float) and v >= 0 for v in report["timings_s"].values())

    rows = {r["name"]: r for r in report["tensors"]}
    activations = {n: r for n, r in rows.items() if r["role"] == "activation"}
    assert set(activations) == {"x", "r1", "y"}
    assert {r["role"] for r in rows.values()} == {"activation", "weight", "bias"}
    for row in activations.values():
        lo, hi = row["range"]
        assert lo <= 0.0 <= hi and lo < hi
        assert 0.0 <= row["clipped_fraction"] <= 1.0
        assert row["qtype"] == "uint8"
    # x is the model input: check its range and clipped fraction against the calibration data itself
    values = np.concatenate([np.load(p)["x"].ravel() for p in sorted(conv_calib.iterdir())[:-1]])
    lo, hi = activations["x"]["range"]
    # global: [min, max] of the data, rounded outward to 1/64 of its power-of-two magnitude (ranges.stable_range)
    step = 2.0 ** (np.floor(np.log2(np.abs(values).max())) - 6)
    assert lo <= float(values.min()) < lo + step and hi - step < float(values.max()) <= hi
    # "max" averages per-sample extremes: it clips, and the report says how much (to one histogram bin)
    code, out, err = _cli(["quantize", conv_model_path, "-o", output, "--calib", conv_calib, "--json", "-q",
                           "--method", "max"])
    assert code == 0, err
    row = next(r for r in json.loads(out)["tensors"] if r["name"] == "x")
    lo, hi = row["range"]
    width = 2.0 ** np.ceil(np.log2(np.abs(values).max() / 4096))
    outside = np.mean((values < lo) | (values > hi))
    near_edge = np.mean((np.abs(values - lo) <= width) | (np.abs(values - hi) <= width))
    assert outside > 0
    assert abs(row["clipped_fraction"] - outside) <= near_edge
    for weight_row in (r for r in rows.values() if r["role"] == "weight"):
        assert weight_row["channels"] == 8 and weight_row["axis"] == 0 and weight_row["max_abs_error"] > 0


def test_missed_gate_exits_6_and_keeps_model(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    output = tmp_path / "q.onnx"
    code, _, err = _cli(["quantize", conv_model_path, "-o", output, "--calib", conv_calib, "--min-cosine", "1.0",
                         "--report", tmp_path / "r.json"])  # a cosine of exactly 1 is out of int8's reach
    assert code == EXIT_GATE_MISSED == 6
    assert "gate" in err and "MISSED" in err
    assert output.exists()
    onnx.checker.check_model(onnx.load(str(output)))
    gates = json.loads((tmp_path / "r.json").read_text())["gates"]
    assert len(gates) == 1 and gates[0]["gate"] == "min_cosine" and gates[0]["passed"] is False
    assert MIN_COSINE <= gates[0]["measured"] < 1.0
    # the same gate below the measured cosine passes
    code, _, err = _cli(["quantize", conv_model_path, "-o", output, "--calib", conv_calib, "--min-cosine", "0.9",
                         "-q"])
    assert code == 0, err


def test_merge_stats_equals_one_pass_over_union(tmp_path: Path, conv_model_path: Path) -> None:
    rng = np.random.default_rng(5)
    samples = [{"x": image_batch(rng) * (1 + i)} for i in range(8)]  # growing ranges: grids must re-bin
    for folder, part in (("part1", samples[:3]), ("part2", samples[3:]), ("all", samples)):
        (tmp_path / folder).mkdir()
        for i, feed in enumerate(part):
            np.savez(tmp_path / folder / f"s{i + (0 if folder != 'part2' else 3):02d}.npz", **feed)
    for name in ("part1", "part2", "all"):
        code, _, err = _cli(["calibrate", conv_model_path, "--calib", tmp_path / name, "-o",
                             tmp_path / f"{name}.npz", "-q"])
        assert code == 0, err
    code, _, err = _cli(["merge-stats", tmp_path / "part1.npz", tmp_path / "part2.npz", "-o",
                         tmp_path / "merged.npz"])
    assert code == 0, err
    assert "merged 2 files" in err
    merged, union = Statistics.load(tmp_path / "merged.npz"), Statistics.load(tmp_path / "all.npz")
    assert merged.samples == union.samples == 8
    assert set(merged.tensors) == set(union.tensors)
    for name, expected in union.tensors.items():
        got = merged.tensors[name]
        assert (got.min, got.max, got.count, got.batches, got.width_exp) == \
            (expected.min, expected.max, expected.count, expected.batches, expected.width_exp), name
        np.testing.assert_array_equal(got.counts, expected.counts)
    # the merged statistics quantize the model like any other
    code, _, err = _cli(["quantize", conv_model_path, "-o", tmp_path / "q.onnx", "--load-stats",
                         tmp_path / "merged.npz", "-q"])
    assert code == 0, err
    assert_agrees(conv_model_path, tmp_path / "q.onnx", [{"x": image_batch(rng) * 3} for _ in range(2)])


def test_random_calibration_quantizes(tmp_path: Path, conv_model_path: Path) -> None:
    result = quantize_simple(conv_model_path, tmp_path / "q.onnx")
    assert result.report["data"]["calibration"]["kind"] == "random"
    rng = np.random.default_rng(2)
    assert_agrees(conv_model_path, tmp_path / "q.onnx", [{"x": image_batch(rng, IMAGE)} for _ in range(2)])
