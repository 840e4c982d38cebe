"""Models shaped like real exports: scalar inputs (silero-vad's sample rate), nothing quantizable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    CHANNELS,
    IMAGE,
    bias,
    conv_relu_model,
    cosine,
    image_batch,
    make_model,
    quantize_simple,
    run,
    save,
    tensor,
    weight,
    write_npz_folder,
)
from onnx import helper

from onnxq.errors import ModelError


def scalar_input_model(seed: int = 11) -> onnx.ModelProto:
    """Conv whose output is scaled by a scalar graph input (shape [])."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Mul", ["c", "gain"], ["y"], name="gain_mul"),
    ]
    inits = {"w": weight(rng, (CHANNELS, 3, 3, 3)), "b": bias(rng, CHANNELS)}
    return make_model(nodes, [tensor("x", IMAGE), tensor("gain", [])], [tensor("y", [1, CHANNELS, 16, 16])], inits)


def test_scalar_graph_input_is_fed_as_is(tmp_path: Path) -> None:
    model_path = save(scalar_input_model(), tmp_path / "scalar.onnx")
    calib = write_npz_folder(tmp_path / "calib",
                             lambda rng: {"x": image_batch(rng), "gain": np.array(1.5, np.float32)}, 8)
    out = tmp_path / "q.onnx"
    result = quantize_simple(model_path, out, calib)
    assert result.report["nodes"]["by_op_type"]["Conv"] == {"int8": 1}
    feed = {"x": image_batch(np.random.default_rng(5)), "gain": np.array(1.5, np.float32)}
    assert cosine(run(model_path, feed)[0], run(out, feed)[0]) > 0.98


def test_model_with_nothing_to_quantize_is_refused(tmp_path: Path) -> None:
    """Only float ops in the main graph: no output rather than a model that is larger and no faster."""
    inner = conv_relu_model().graph
    branch = helper.make_graph(list(inner.node), "branch", [], [tensor("y", [1, CHANNELS, 16, 16])],
                               list(inner.initializer))
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch, name="if"),
    ]
    model = make_model(nodes, [tensor("x", IMAGE)], [tensor("out", [1, CHANNELS, 16, 16])],
                       {"zero": np.array(0.0, np.float32)})
    model_path = save(model, tmp_path / "if_only.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    out = tmp_path / "q.onnx"
    with pytest.raises(ModelError, match=r"nothing to quantize.*If subgraph"):
        quantize_simple(model_path, out, calib)
    assert not out.exists()
