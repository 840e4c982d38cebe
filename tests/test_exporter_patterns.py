"""Graph patterns exporters write, on small synthetic graphs: today's PyTorch exporters (found by
bench/robustness) and pretrained models from other exporters (paddle2onnx, tf2onnx, old PyTorch, ORT-quantized)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import (
    CHANNELS,
    IMAGE,
    bias,
    cosine,
    fused_op_types,
    image_batch,
    make_model,
    matmul_add_model,
    quantize_simple,
    run,
    save,
    tensor,
    weight,
    write_npz_folder,
)
from onnx import helper

from onnxq.cli import main
from onnxq.passes.prepare import prepare_model


def spatial_mean_model(opset: int, keepdims: int, axes: list[int], seed: int = 20) -> onnx.ModelProto:
    """Conv -> Relu -> ReduceMean(spatial axes) [-> Reshape] -> Gemm: a dynamo-exported classifier head."""
    rng = np.random.default_rng(seed)
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "w2": weight(rng, (10, CHANNELS)), "b2": bias(rng, 10), "flat": np.array([-1, CHANNELS], np.int64)}
    if opset >= 18:
        inits["axes"] = np.array(axes, np.int64)
        mean = helper.make_node("ReduceMean", ["r1", "axes"], ["m"], keepdims=keepdims, name="mean")
    else:
        mean = helper.make_node("ReduceMean", ["r1"], ["m"], axes=axes, keepdims=keepdims, name="mean")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), mean]
    head = "m"
    if keepdims:
        nodes.append(helper.make_node("Reshape", ["m", "flat"], ["f"], name="reshape"))
        head = "f"
    nodes.append(helper.make_node("Gemm", [head, "w2", "b2"], ["y"], transB=1, name="fc"))
    return make_model(nodes, [tensor("x", ["N", 3, "H", "W"])], [tensor("y", ["N", 10])], inits, opset=opset)


@pytest.mark.parametrize(("opset", "keepdims", "axes"), [(18, 1, [-1, -2]), (13, 0, [2, 3]), (20, 1, [3, 2])])
def test_spatial_reduce_mean_runs_as_int8_global_pool(tmp_path: Path, opset: int, keepdims: int,
                                                      axes: list[int]) -> None:
    model_path = save(spatial_mean_model(opset, keepdims, axes), tmp_path / "mean.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 8)
    out = tmp_path / "q.onnx"
    result = quantize_simple(model_path, out, calib)

    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    assert "ReduceMean" not in {n.op_type for n in quantized.graph.node}
    assert "QLinearGlobalAveragePool" in fused_op_types(out)
    decisions = result.report["nodes"]["by_op_type"]
    assert decisions["GlobalAveragePool"] == {"int8": 1}
    feed = {"x": image_batch(np.random.default_rng(5), (2, 3, 20, 12))}  # dynamic batch and size still work
    expected, = run(model_path, feed)
    actual, = run(out, feed)
    assert actual.shape == expected.shape == (2, 10)
    assert cosine(expected, actual) > 0.99


@pytest.mark.parametrize("axes", [[2], [1, 2, 3], [0, 2, 3]])
def test_other_means_stay_reduce_mean(axes: list[int]) -> None:
    """A mean over H only, or one that includes channels or batch, is not a global pool."""
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, name="mean")]
    shape = [1 if axis in axes else size for axis, size in enumerate(IMAGE)]
    model = make_model(nodes, [tensor("x", IMAGE)], [tensor("y", shape)], {"axes": np.array(axes, np.int64)},
                       opset=18)
    assert [n.op_type for n in prepare_model(model).model.graph.node] == ["ReduceMean"]


def test_layer_norm_statistics_stay_reduce_mean() -> None:
    """A decomposed LayerNorm (TorchScript opset < 17) over [batch, tokens, features]: its means reduce the
    last axis of a rank-3 tensor like a 1-D pooling would, but they are statistics, not pooling."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1, name="mean"),
             helper.make_node("Sub", ["x", "mu"], ["d"], name="center"),
             helper.make_node("Mul", ["d", "d"], ["d2"], name="square"),
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], keepdims=1, name="variance"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
             helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
             helper.make_node("Div", ["d", "std"], ["y"], name="normalize")]
    model = make_model(nodes, [tensor("x", [1, 4, 8])], [tensor("y", [1, 4, 8])],
                       {"eps": np.array(1e-5, np.float32)})
    ops = [n.op_type for n in prepare_model(model).model.graph.node]
    assert ops.count("ReduceMean") == 2 and "GlobalAveragePool" not in ops


def tied_weight_model(seed: int = 21) -> onnx.ModelProto:
    """One weight read by Gemm(transB=1) (scales per row) and by MatMul (scales per column): a tied Linear."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, name="encode"),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="decode")]
    # Rows and columns of very different magnitude: scales along the wrong axis are far off.
    w = weight(rng, (16, 16)) * np.geomspace(0.05, 4.0, 16, dtype=np.float32)[:, None]
    return make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 16])], {"w": w, "b": bias(rng, 16)})


def test_weight_shared_along_different_axes_stays_accurate(tmp_path: Path) -> None:
    model_path = save(tied_weight_model(), tmp_path / "tied.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": rng.standard_normal((4, 16)).astype(np.float32)}, 8)
    out = tmp_path / "q.onnx"
    result = quantize_simple(model_path, out, calib)
    assert result.report["nodes"]["by_op_type"]["Gemm"] == {"int8": 1}
    assert result.report["nodes"]["by_op_type"]["MatMul"] == {"int8": 1}
    feed = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    expected, = run(model_path, feed)
    actual, = run(out, feed)
    assert cosine(expected, actual) > 0.99


def unoptimized_dynamo_model(seed: int = 22) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True, optimize=False): a bias-less Conv gets the zero bias
    Expand(CastLike(0, x), Shape(w)[0:1]), then BatchNormalization."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0])),
        helper.make_node("CastLike", ["zero", "x"], ["zero_like"], name="cast_like"),
        helper.make_node("Shape", ["w1"], ["channels"], start=0, end=1, name="shape"),
        helper.make_node("Expand", ["zero_like", "channels"], ["b1"], name="expand"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)),
             "b2": bias(rng, CHANNELS), "gamma": (1 + 0.2 * rng.standard_normal(CHANNELS)).astype(np.float32),
             "beta": bias(rng, CHANNELS), "mean": bias(rng, CHANNELS),
             "var": (0.5 + rng.random(CHANNELS)).astype(np.float32)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits, opset=20)


def test_constants_from_inlined_functions_fold(tmp_path: Path) -> None:
    """The zero bias folds although onnxruntime only inlines CastLike after its first folding pass:
    both Convs run in int8 and the BatchNormalization is folded away."""
    model_path = save(unoptimized_dynamo_model(), tmp_path / "noopt.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 8)
    out = tmp_path / "q.onnx"
    result = quantize_simple(model_path, out, calib)
    assert result.report["nodes"]["by_op_type"]["Conv"] == {"int8": 2}
    quantized = onnx.load(str(out))
    assert not {"BatchNormalization", "Expand", "CastLike"} & {n.op_type for n in quantized.graph.node}
    feed = {"x": image_batch(np.random.default_rng(4))}
    assert cosine(run(model_path, feed)[0], run(out, feed)[0]) > 0.99


def shared_bias_model(op: str, seed: int = 23) -> onnx.ModelProto:
    """One layer applied twice (same weight and bias) to inputs of different ranges: x and 8 * relu(layer(x))."""
    rng = np.random.default_rng(seed)
    if op == "Gemm":
        shape, w, attrs = [1, 16], weight(rng, (16, 16)), {"transB": 1}
    else:
        shape, w, attrs = [1, CHANNELS, 8, 8], weight(rng, (CHANNELS, CHANNELS, 3, 3)), {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node(op, ["x", "w", "b"], ["a"], name="first", **attrs),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "k"], ["r8"], name="scale"),
             helper.make_node(op, ["r8", "w", "b"], ["y"], name="second", **attrs)]
    inits = {"w": w, "b": rng.standard_normal(w.shape[0]).astype(np.float32), "k": np.array(8.0, np.float32)}
    return make_model(nodes, [tensor("x", shape)], [tensor("y", shape)], inits)


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
@pytest.mark.parametrize("output_format", ["qdq", "qoperator"])
def test_bias_shared_by_two_nodes_is_quantized_for_each(tmp_path: Path, op: str, output_format: str) -> None:
    """An int32 bias carries its node's input scale: one shared tensor was right for one node only."""
    model = shared_bias_model(op)
    model_path = save(model, tmp_path / "shared_bias.onnx")
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": rng.standard_normal(shape).astype(np.float32)}, 8)
    out = tmp_path / "q.onnx"
    result = quantize_simple(model_path, out, calib, output_format=output_format)
    assert result.report["nodes"]["by_op_type"][op] == {"int8": 2}
    rng = np.random.default_rng(6)
    for _ in range(4):
        feed = {"x": rng.standard_normal(shape).astype(np.float32)}
        assert cosine(run(model_path, feed)[0], run(out, feed)[0]) > 0.99


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_already_quantized_model_is_refused_as_such(tmp_path: Path, mode: str) -> None:
    """An int8 model shipped next to its fp32 original (ddddocr's common_old.onnx): say it is already quantized."""
    fp32 = save(matmul_add_model(), tmp_path / "m.onnx")
    first = CliRunner().invoke(main, ["quantize", str(fp32), "-o", str(tmp_path / "dyn.onnx"), "--mode", "dynamic",
                                      "-q"])
    assert first.exit_code == 0, first.output
    args = ["quantize", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "again.onnx"), "--mode", mode]
    result = CliRunner().invoke(main, args + (["--allow-random"] if mode == "static" else []))
    assert result.exit_code == 3
    assert "the model is already quantized (" in result.stderr and "fp32 original" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "again.onnx").exists()
