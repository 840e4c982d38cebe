"""A layer onnxq keeps in float runs in float; an int16 layer runs on 16-bit inputs (onnxq.quant.float_islands).

Each pattern puts the layer between int8 neighbours and reads onnxruntime's optimized graph at the
basic, extended and all levels (onnxq.runtime.precision). The conftest fixture already fails any test whose
written model disagrees with its plan; these tests also say which node runs how, and show that the
check catches onnxruntime's own re-quantization when onnxq's isolation is switched off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import bias, cosine, make_model, run, save, tensor, weight, write_npz_folder
from onnx import helper

from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.commands.recipe import parse_recipe
from onnxq.quant import rewrite_qdq
from onnxq.quant.plan import QuantSettings

C = 16
SHAPE = [1, C, 8, 8]


def conv_chain(middle: str) -> onnx.ModelProto:
    """int8 1x1 conv -> Relu -> middle (depthwise or dense 3x3 conv) -> Relu -> int8 1x1 conv."""
    rng = np.random.default_rng(3)
    group = C if middle == "depthwise" else 1
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pre"),
             helper.make_node("Relu", ["c1"], ["r1"], name="pre_relu"),
             helper.make_node("Conv", ["r1", "wm", "bm"], ["c2"], pads=[1, 1, 1, 1], group=group, name="mid"),
             helper.make_node("Relu", ["c2"], ["r2"], name="mid_relu"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="post")]
    inits = {"w1": weight(rng, (C, C, 1, 1)), "b1": bias(rng, C), "wm": weight(rng, (C, C // group, 3, 3)),
             "bm": bias(rng, C), "w3": weight(rng, (C, C, 1, 1)), "b3": bias(rng, C)}
    return make_model(nodes, [tensor("x", SHAPE)], [tensor("y", SHAPE)], inits)


def dense_chain(op: str) -> onnx.ModelProto:
    """int8 op -> Relu -> middle op -> Relu -> int8 op, for MatMul or Gemm (transB) layers."""
    rng = np.random.default_rng(4)
    shape = [1, 4, 32] if op == "MatMul" else [4, 32]
    nodes, inits, source = [], {}, "x"
    for index, name in enumerate(("pre", "mid", "post")):
        w = weight(rng, (32, 32))
        inits[f"w_{name}"] = w
        nodes.append(helper.make_node(op, [source, f"w_{name}"], [f"{name}_out" if index < 2 else "y"], name=name,
                                      **({"transB": 1} if op == "Gemm" else {})))
        if index < 2:
            nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
            source = f"{name}_relu"
    return make_model(nodes, [tensor("x", shape)], [tensor("y", shape)], inits)


def add_chain() -> onnx.ModelProto:
    """Two int8 convs whose outputs meet in an Add, then an int8 conv: the Add is what is kept float."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"),
             helper.make_node("Add", ["a", "b"], ["s"], name="mid"),
             helper.make_node("Conv", ["s", "wc"], ["y"], name="post")]
    inits = {k: weight(rng, (C, C, 1, 1)) for k in ("wa", "wb", "wc")}
    return make_model(nodes, [tensor("x", SHAPE)], [tensor("y", SHAPE)], inits)


def reshape_chain() -> onnx.ModelProto:
    """int8 conv -> Reshape (kept float) -> Gemm (kept float) -> Relu -> int8 Gemm: onnxruntime's QDQ
    propagation would move the conv's DequantizeLinear through the Reshape onto the float Gemm."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="pre"),
             helper.make_node("Reshape", ["c1", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wg"], ["g"], transB=1, name="mid"),
             helper.make_node("Relu", ["g"], ["gr"], name="mid_relu"),
             helper.make_node("Gemm", ["gr", "wp"], ["y"], transB=1, name="post")]
    inits = {"w1": weight(rng, (C, C, 1, 1)), "shape": np.array([1, C * 64], np.int64),
             "wg": weight(rng, (32, C * 64)), "wp": weight(rng, (10, 32))}
    return make_model(nodes, [tensor("x", SHAPE)], [tensor("y", [1, 10])], inits)


def calib_for(model: onnx.ModelProto, folder: Path) -> Path:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return write_npz_folder(folder, lambda rng: {"x": rng.standard_normal(dims).astype(np.float32)}, 12)


def quantize_with(model: onnx.ModelProto, tmp_path: Path, **kwargs):
    path = save(model, tmp_path / "fp32.onnx")
    result = quantize(QuantizeRequest(model=path, output=tmp_path / "q.onnx",
                                      data=DataOptions(calib=calib_for(model, tmp_path / "calib")), **kwargs))
    return path, result


def precision_of(result, node: str) -> dict:
    return next(row for row in result.report["fusion"]["precision"] if row["node"] == node)


PATTERNS = {
    "depthwise conv": (lambda: conv_chain("depthwise"), ("mid",)),
    "dense conv": (lambda: conv_chain("dense"), ("mid",)),
    "MatMul": (lambda: dense_chain("MatMul"), ("mid",)),
    "Gemm": (lambda: dense_chain("Gemm"), ("mid",)),
    "Add": (add_chain, ("mid",)),
    "Gemm behind a float Reshape": (reshape_chain, ("mid", "flatten")),
}


@pytest.mark.parametrize(("output_format", "symmetric"), [("qdq", False), ("qoperator", False), ("qdq", True)])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_kept_float_runs_float_between_int8_neighbours(tmp_path: Path, pattern: str, output_format: str,
                                                        symmetric: bool) -> None:
    build, exclude = PATTERNS[pattern]
    path, result = quantize_with(build(), tmp_path, exclude=exclude, output_format=output_format,
                                 settings=QuantSettings(symmetric=symmetric))
    mid = precision_of(result, "mid")
    assert mid["planned"] == "float"
    # at "all" onnxruntime may fuse a float conv with its Relu into a renamed NCHWc conv ("fused", still float)
    assert mid["executed"]["basic"] == mid["executed"]["extended"] == "float", mid
    assert mid["executed"]["all"] in ("float", "fused"), mid
    post = precision_of(result, "post")
    assert post["planned"] == "int8" and post["executed"]["extended"] == post["executed"]["all"] == "int8"
    if post["planned_weights"] is not None:
        assert post["executed_weights"] == post["planned_weights"]
    assert result.report["fusion"]["disagreements"] == []
    feed = {"x": np.random.default_rng(7).standard_normal(
        [d.dim_value for d in build().graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)}
    assert cosine(run(path, feed)[0], run(tmp_path / "q.onnx", feed)[0]) > 0.99


@pytest.mark.parametrize("pattern", ["depthwise conv", "dense conv", "Gemm"])
def test_without_isolation_onnxruntime_requantizes_and_the_check_says_so(
        tmp_path: Path, pattern: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: with the writer's isolation off, onnxruntime quantizes the float
    layer's weight itself (per tensor), and the precision check names the node."""
    from onnxq.commands import written
    from onnxq.runtime.fusion import check_fusion

    monkeypatch.setattr(rewrite_qdq, "isolate_float_layers", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(written, "check_fusion", check_fusion)  # no conftest assertion: we look ourselves
    build, exclude = PATTERNS[pattern]
    _, result = quantize_with(build(), tmp_path, exclude=exclude)
    problems = {d["node"]: d["problems"] for d in result.report["fusion"]["disagreements"]}
    assert "mid" in problems and any(p.startswith("extended: runs int8") for p in problems["mid"])


def test_float_layer_reads_the_raw_value_where_it_exists(tmp_path: Path) -> None:
    """A float layer whose input comes from a float producer reads that value itself, not its
    quantized copy: `r1` is quantized for the int8 `post`, the float `mid` reads it unrounded."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Sigmoid", ["x"], ["r1"], name="float_producer"),
             helper.make_node("Conv", ["r1", "wm"], ["m"], pads=[1, 1, 1, 1], name="mid"),
             helper.make_node("Conv", ["r1", "wp"], ["p"], name="post"),
             helper.make_node("Add", ["m", "p"], ["y"], name="join")]
    model = make_model(nodes, [tensor("x", SHAPE)], [tensor("y", SHAPE)],
                       {"wm": weight(rng, (C, C, 3, 3)), "wp": weight(rng, (C, C, 1, 1))})
    _, result = quantize_with(model, tmp_path, exclude=("mid",))
    written = onnx.load(str(tmp_path / "q.onnx"))
    by_name = {n.name: n for n in written.graph.node}
    producer_of = {out: n for n in written.graph.node for out in n.output}
    assert producer_of[by_name["mid"].input[0]].op_type == "Sigmoid"
    assert producer_of[by_name["post"].input[0]].op_type == "DequantizeLinear"
    assert precision_of(result, "mid")["executed"]["all"] == "float"


@pytest.mark.parametrize("build", [lambda: conv_chain("dense"), lambda: dense_chain("MatMul"),
                                   lambda: dense_chain("Gemm")], ids=["Conv", "MatMul", "Gemm"])
def test_int16_layer_between_int8_neighbours_runs_on_16_bit_inputs(tmp_path: Path, build) -> None:
    """The int16 layer's activations are 16-bit, so its neighbours, which write or read them, have no
    int8 kernel either: the plan says they compute in float (int16), and that is what runs. (MatMul
    and Gemm: onnxruntime would make MatMulNBits of an int8 weight, quantizing the 16-bit input.)"""
    recipe = parse_recipe({"rules": [{"match": {"name": "mid"}, "precision": "int16"}]}, "r")
    _, result = quantize_with(build(), tmp_path, recipe=recipe)
    every_level = {"basic": "int16", "extended": "int16", "all": "int16"}
    mid = precision_of(result, "mid")
    assert mid["planned"] == "int16" and mid["executed"] == every_level, mid
    for neighbour in ("pre", "post"):
        row = precision_of(result, neighbour)
        assert row["planned"] == "int16" and row["executed"] == every_level, row
        reason = next(n.reason for n in result.plan.nodes if n.name == neighbour)
        assert "16-bit activation of an int16 neighbour" in reason
    assert result.report["fusion"]["disagreements"] == []



def shift_chain() -> onnx.ModelProto:
    """conv -> Add(+3) -> Clip -> Mul (hardswish, as PP-OCR writes it) -> conv: the Add and Mul are light
    ops the plan keeps float."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pre"),
             helper.make_node("Add", ["c1", "three"], ["s"], name="shift"),
             helper.make_node("Clip", ["s", "zero", "six"], ["k"], name="clip"),
             helper.make_node("Mul", ["c1", "k"], ["h"], name="swish"),
             helper.make_node("Conv", ["h", "w3", "b3"], ["y"], name="post")]
    inits = {"w1": weight(rng, (C, C, 1, 1)), "b1": bias(rng, C), "w3": weight(rng, (C, C, 1, 1)),
             "b3": bias(rng, C), "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32),
             "six": np.array(6.0, np.float32)}
    return make_model(nodes, [tensor("x", SHAPE)], [tensor("y", SHAPE)], inits)


def test_float_op_at_the_border_of_an_int16_layer_is_float_and_its_pairs_are_not_avoidable(tmp_path: Path) -> None:
    """Float ops reading an int16 conv's 16-bit output compute in float, as planned; the int16 layer's
    8-bit weight and its 16-bit pairs are the W8A16 form, not leftovers (the demo's hardswish Add/Mul
    next to int16 convs were reported as disagreements and 15 avoidable pairs)."""
    recipe = parse_recipe({"rules": [{"match": {"name": "pre"}, "precision": "int16"}]}, "r")
    _, result = quantize_with(shift_chain(), tmp_path, recipe=recipe, speed_guard="off")
    fusion = result.report["fusion"]
    assert precision_of(result, "pre")["planned"] == "int16"
    for light in ("shift", "swish"):
        row = precision_of(result, light)
        assert row["planned"] == "float" and "int16" in row["executed"].values(), row
    assert fusion["disagreements"] == [], fusion["disagreements"]
    assert fusion["avoidable"] == 0, (fusion["dequantized_weights"], fusion["unfused_pairs"])
    assert fusion["w8a16"]["weights"] >= 1 and fusion["w8a16"]["pairs"] >= 1
