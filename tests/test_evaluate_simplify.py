"""onnxq.runtime.evaluate and onnxq.passes.simplify on their own: numbers recomputed in numpy, rewrites checked against
onnxruntime running the model before and after."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CHANNELS, IMAGE, bias, image_batch, make_model, tensor, weight, write_npz_folder
from onnx import helper, numpy_helper

from onnxq.passes.prepare import infer_types
from onnxq.passes.simplify import (
    fold_affine_into_conv,
    fold_affine_into_next_conv,
    means_to_global_pool,
    scale_gates_first,
    unshare_biases,
)
from onnxq.runtime.data import model_input_specs, open_source
from onnxq.runtime.evaluate import CachedReference, compare_models

SAMPLES, ROWS, K, N = 6, 3, 12, 5


# ---------------------------------------------------------------- evaluate


def linear(w: np.ndarray) -> onnx.ModelProto:
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], [tensor("x", [ROWS, K])],
                      [tensor("y", [ROWS, N])], {"w": w})


@pytest.fixture
def pair(tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray, np.ndarray, Path]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    noisy = (w + 0.2 * rng.standard_normal((K, N))).astype(np.float32)
    folder = write_npz_folder(tmp_path / "data", lambda r: {"x": r.standard_normal((ROWS, K)).astype(np.float32)},
                              SAMPLES)
    return linear(w), linear(noisy), w, noisy, folder


def expected_numbers(w: np.ndarray, noisy: np.ndarray, folder: Path, count: int) -> dict:
    xs = [np.load(path)["x"].astype(np.float64) for path in sorted(folder.iterdir())[:count]]
    ref = np.stack([x @ w.astype(np.float64) for x in xs])
    out = np.stack([x @ noisy.astype(np.float64) for x in xs])
    per_row = [float(np.vdot(r, t) / np.sqrt(np.vdot(r, r) * np.vdot(t, t)))
               for r, t in zip(ref.reshape(-1, N), out.reshape(-1, N), strict=True)]
    return {"cosine": float(np.vdot(ref, out) / np.sqrt(np.vdot(ref, ref) * np.vdot(out, out))),
            "sqnr_db": 10 * math.log10(float(np.sum(ref ** 2) / np.sum((ref - out) ** 2))),
            "max_abs_error": float(np.max(np.abs(ref - out))),
            "worst_sample_cosine": min(per_row),  # per row of a [rows, classes] output: each row is a sample
            "top1_agreement": float(np.mean(ref.argmax(-1) == out.argmax(-1)))}


def test_compare_models_reports_what_numpy_computes(pair) -> None:
    reference, candidate, w, noisy, folder = pair
    source = open_source(folder, model_input_specs(reference))
    fidelity = compare_models(reference, candidate, source)
    assert (fidelity.samples, fidelity.available) == (SAMPLES, None)
    [out] = fidelity.outputs
    expected = expected_numbers(w, noisy, folder, SAMPLES)
    assert out["name"] == "y"
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert fidelity.min_cosine == out["cosine"] and fidelity.min_sqnr == out["sqnr_db"]


def test_compare_models_measures_the_first_samples_and_says_how_many_there_are(pair) -> None:
    reference, candidate, w, noisy, folder = pair
    source = open_source(folder, model_input_specs(reference))
    fidelity = compare_models(reference, candidate, source, limit=2)
    assert (fidelity.samples, fidelity.available) == (2, SAMPLES)
    assert fidelity.outputs[0]["sqnr_db"] == pytest.approx(expected_numbers(w, noisy, folder, 2)["sqnr_db"],
                                                           rel=1e-4)


def test_an_identical_model_has_infinite_sqnr_and_cosine_one(pair) -> None:
    reference, _, _, _, folder = pair
    [out] = compare_models(reference, reference, open_source(folder, model_input_specs(reference))).outputs
    assert out["sqnr_db"] == math.inf and out["cosine"] == pytest.approx(1.0) and out["max_abs_error"] == 0.0


def test_cached_reference_scores_like_compare_models(pair) -> None:
    reference, candidate, _, _, folder = pair
    source = open_source(folder, model_input_specs(reference))
    cached = CachedReference(reference, source, SAMPLES).fidelity_of(candidate)
    direct = compare_models(reference, candidate, source)
    for key in ("cosine", "sqnr_db", "max_abs_error", "worst_sample_cosine", "top1_agreement"):
        assert cached.outputs[0][key] == pytest.approx(direct.outputs[0][key], rel=1e-6), key


# ---------------------------------------------------------------- simplify


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def per_channel(values: np.ndarray) -> np.ndarray:
    return values.reshape(1, -1, 1, 1).astype(np.float32)


def conv_affine_model(scale_shape: tuple[int, ...] = (1, CHANNELS, 1, 1)) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "t"], ["y"], name="shift")]
    inits = {"w": weight(rng, (CHANNELS, 3, 3, 3)), "b": bias(rng, CHANNELS),
             "s": (1 + rng.random(scale_shape)).astype(np.float32), "t": per_channel(bias(rng, CHANNELS))}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits)


def test_per_channel_mul_and_add_after_a_conv_fold_into_it() -> None:
    model = conv_affine_model()
    folded, count = fold_affine_into_conv(model)
    assert count == 2 and [n.op_type for n in folded.graph.node] == ["Conv"]
    feed = {"x": image_batch(np.random.default_rng(2))}
    np.testing.assert_allclose(run(folded, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_mul_that_varies_within_a_channel_stays() -> None:
    model = conv_affine_model(scale_shape=(1, CHANNELS, 16, 16))
    folded, count = fold_affine_into_conv(model)
    assert count == 0 and folded is model


def affine_conv_model(pads: int, scale: np.ndarray, shift: np.ndarray, also_read: bool = False) -> onnx.ModelProto:
    """x -> Relu -> * s -> + t -> Conv(pads) (PP-LCNetV3's learnable affine block before the next Conv); with
    also_read the shifted tensor is a graph output too."""
    rng = np.random.default_rng(6)
    kernel = 2 * pads + 1
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="act"),
             helper.make_node("Mul", ["s", "r"], ["m"], name="scale"),  # the constant first, as Paddle writes it
             helper.make_node("Add", ["m", "t"], ["a"], name="shift"),
             helper.make_node("Conv", ["a", "w", "b"], ["y"], pads=[pads] * 4, name="conv")]
    inits = {"w": weight(rng, (CHANNELS, 3, kernel, kernel)), "b": bias(rng, CHANNELS), "s": scale, "t": shift}
    outputs = [tensor("y", [1, CHANNELS, 16, 16])] + ([tensor("a", IMAGE)] if also_read else [])
    return make_model(nodes, [tensor("x", IMAGE)], outputs, inits)


@pytest.mark.parametrize("per_input_channel", [False, True])
def test_mul_and_add_before_an_unpadded_conv_fold_into_it(per_input_channel: bool) -> None:
    rng = np.random.default_rng(7)
    shape = (1, 3, 1, 1) if per_input_channel else (1,)
    model = affine_conv_model(0, (0.5 + rng.random(shape)).astype(np.float32), rng.standard_normal(shape).astype(
        np.float32))
    folded, count = fold_affine_into_next_conv(model)
    assert count == 2 and [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]
    feed = {"x": image_batch(np.random.default_rng(2))}
    np.testing.assert_allclose(run(folded, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_before_a_padded_conv_only_the_scale_folds() -> None:
    """Padding pads the shifted tensor with zeros: a shift folded into the bias would pad with -t instead."""
    model = affine_conv_model(1, np.array([0.7], np.float32), np.array([0.3], np.float32))
    folded, count = fold_affine_into_next_conv(model)
    assert count == 0 and folded is model  # the Add, next to the Conv, stops the walk
    scale_only = affine_conv_model(1, np.array([0.7], np.float32), np.array([0.0], np.float32))
    scale_only.graph.node.remove(scale_only.graph.node[2])
    scale_only.graph.node[2].input[0] = "m"
    folded, count = fold_affine_into_next_conv(scale_only)
    assert count == 1 and [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]
    feed = {"x": image_batch(np.random.default_rng(2))}
    np.testing.assert_allclose(run(folded, feed)[0], run(scale_only, feed)[0], rtol=1e-5, atol=1e-5)


def test_an_affine_result_read_elsewhere_stays() -> None:
    model = affine_conv_model(0, np.array([0.7], np.float32), np.array([0.3], np.float32), also_read=True)
    assert fold_affine_into_next_conv(model)[1] == 0


@pytest.mark.parametrize("keepdims", [1, 0])
def test_a_spatial_mean_becomes_global_average_pool(keepdims: int) -> None:
    shape = [1, CHANNELS] + ([1, 1] if keepdims else [])
    model = make_model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=keepdims, name="mean")],
                       [tensor("x", [1, CHANNELS, 5, 7])], [tensor("y", shape)], opset=13)
    pooled, count = means_to_global_pool(model)
    assert count == 1
    assert [n.op_type for n in pooled.graph.node] == ["GlobalAveragePool"] + ([] if keepdims else ["Flatten"])
    feed = {"x": np.random.default_rng(3).standard_normal((1, CHANNELS, 5, 7)).astype(np.float32)}
    np.testing.assert_allclose(run(pooled, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)


def test_a_mean_over_channels_is_no_pooling() -> None:
    model = make_model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], name="mean")],
                       [tensor("x", [1, CHANNELS, 5, 7])], [tensor("y", [1, 1, 5, 7])], opset=13)
    assert means_to_global_pool(model) == (model, 0)


def test_a_shared_bias_gets_one_copy_per_node() -> None:
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["c1"], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Conv", ["c1", "w2", "b"], ["y"], pads=[1, 1, 1, 1], name="conv_b")]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)),
             "b": bias(rng, CHANNELS)}
    model = make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits)
    unshared, copies = unshare_biases(model)
    assert copies == 1
    biases = [n.input[2] for n in unshared.graph.node]
    assert len(set(biases)) == 2
    values = {t.name: numpy_helper.to_array(t) for t in unshared.graph.initializer}
    np.testing.assert_array_equal(values[biases[0]], values[biases[1]])
    feed = {"x": image_batch(rng)}
    np.testing.assert_array_equal(run(unshared, feed)[0], run(model, feed)[0])


def hard_swish_chain(scale_op: str = "Div", scale: float = 6.0, gate_readers: int = 1) -> onnx.ModelProto:
    """x * Clip(x + 3, 0, 6) / 6 as Paddle writes it (Mul by 1/6 with scale_op='Mul'); with gate_readers=2
    the gate is also a graph output."""
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["gate"], name="clip"),
             helper.make_node("Mul", ["x", "gate"], ["m"], name="mul"),
             helper.make_node(scale_op, ["m", "scale"], ["y"], name="div6")]
    outputs = [tensor("y", [1, CHANNELS, 5, 7])] + ([tensor("gate", [1, CHANNELS, 5, 7])] if gate_readers > 1 else [])
    inits = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
             "scale": np.array(scale, np.float32)}
    return make_model(nodes, [tensor("x", [1, CHANNELS, 5, 7])], outputs, inits, opset=13)


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
def test_a_gated_product_scales_the_gate_instead(scale_op: str) -> None:
    scale = 6.0 if scale_op == "Div" else 1 / 6
    model = hard_swish_chain(scale_op, scale)
    moved, count = scale_gates_first(model)
    assert count == 1
    nodes = {n.name: n for n in moved.graph.node}
    factor = {t.name: numpy_helper.to_array(t) for t in moved.graph.initializer}[nodes["div6"].input[1]]
    assert nodes["div6"].op_type == "Mul" and nodes["div6"].input[0] == "gate"  # the scale moved onto the gate
    assert float(factor) == pytest.approx(1 / 6, rel=1e-7)
    assert list(nodes["mul"].input) == ["x", nodes["div6"].output[0]] and list(nodes["mul"].output) == ["y"]
    feed = {"x": 4 * np.random.default_rng(5).standard_normal((1, CHANNELS, 5, 7)).astype(np.float32)}
    np.testing.assert_allclose(run(moved, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)


def test_a_gate_read_elsewhere_or_a_zero_scale_is_left_alone() -> None:
    assert scale_gates_first(hard_swish_chain(gate_readers=2))[1] == 0
    assert scale_gates_first(hard_swish_chain("Mul", 0.0))[1] == 0


def test_type_inference_without_the_weights_is_onnx_own() -> None:
    """infer_types hands onnx a weightless skeleton (dims and types only); the result, weights put back,
    is what onnx infers on the whole model, byte for byte (a dynamic Reshape's shape computed from a
    constant included)."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Shape", ["c"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "first"], ["n"], axis=0, name="batch"),
             helper.make_node("Concat", ["n", "rest"], ["target"], axis=0, name="target_shape"),
             helper.make_node("Reshape", ["c", "target"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "m"], ["y"], name="fc")]
    inits = {"w": weight(rng, (CHANNELS, 3, 3, 3)), "b": bias(rng, CHANNELS), "first": np.array([0], np.int64),
             "rest": np.array([-1], np.int64), "m": weight(rng, (CHANNELS * 16 * 16, 10))}
    model = make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, 10])], inits)
    expected = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    inferred = infer_types(model)
    assert {v.name for v in inferred.graph.value_info} >= {"c", "flat"}
    assert inferred.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
