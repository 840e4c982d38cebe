"""Models over 2 GiB keep their tensors in external data; the threshold is lowered to test that path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import (
    bias,
    conv_relu_model,
    cosine,
    image_batch,
    make_model,
    quantize_simple,
    run,
    tensor,
    weight,
    write_npz_folder,
)
from onnx import helper

import onnxq.model_io


def test_external_data_model_in_and_out(tmp_path: Path, conv_calib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "big.onnx"
    onnx.save_model(conv_relu_model(), str(source), save_as_external_data=True, location="big.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "big.onnx.data").stat().st_size > 0
    monkeypatch.setattr(onnxq.model_io, "EXTERNAL_DATA_THRESHOLD", 1024)  # everything counts as "over 2 GiB"
    monkeypatch.setattr(onnxq.model_io, "EXTERNAL_TENSOR_MIN_BYTES", 0)
    out = tmp_path / "out" / "big.int8.onnx"
    out.parent.mkdir()
    result = quantize_simple(source, out, conv_calib)
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.int8.onnx", "big.int8.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in written.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights should be stored in the .data file"
    feed = {"x": image_batch(np.random.default_rng(123))}
    assert cosine(run(source, feed)[0], run(out, feed)[0]) > 0.98
    assert result.report["fidelity"]["outputs"][0]["cosine"] > 0.98


def test_small_model_with_external_data_gives_the_inline_models_bytes(tmp_path: Path, conv_calib: Path) -> None:
    """Under 2 GiB the weights are read into memory; onnxruntime must not be pointed at a file whose weights
    live beside it (its optimized copy would name that data file), and the result is the inline model's."""
    inline, split = tmp_path / "inline.onnx", tmp_path / "split" / "m.onnx"
    split.parent.mkdir()
    onnx.save_model(conv_relu_model(), str(inline))
    onnx.save_model(conv_relu_model(), str(split), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    quantize_simple(inline, tmp_path / "a.onnx", conv_calib)
    quantize_simple(split, tmp_path / "b.onnx", conv_calib)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_memory_budget_splits_calibration_into_passes(conv_calib: Path, conv_model_path: Path) -> None:
    """A tiny budget forces one pass per tensor group; the statistics must equal the one-pass ones."""
    from onnxq.passes.prepare import prepare_model
    from onnxq.quant.ir import import_graph
    from onnxq.quant.placement import tensors_to_observe
    from onnxq.runtime.calibrate import collect_statistics
    from onnxq.runtime.data import model_input_specs, open_source
    from onnxq.runtime.session import Progress

    prepared = prepare_model(onnx.load(str(conv_model_path))).model
    tensors = [t for t in tensors_to_observe(import_graph(prepared)) if t != "x"]
    assert len(tensors) >= 2
    source = open_source(conv_calib, model_input_specs(prepared))
    runs: list[int] = []

    class Counting(Progress):
        def __init__(self, total: int, _label: str) -> None:
            runs.append(total)

    one_pass = collect_statistics(prepared, tensors, source, progress=Counting)
    split = collect_statistics(prepared, tensors, source, memory_budget=1, progress=Counting)
    assert runs == [len(source), len(source) * len(tensors)]  # one pass, then one pass per tensor
    for name in tensors:
        a, b = one_pass.tensors[name], split.tensors[name]
        assert (a.min, a.max, a.count, a.batches) == (b.min, b.max, b.count, b.batches)
        assert np.array_equal(a.counts, b.counts)


def deep_conv_model(layers: int = 6, channels: int = 32) -> onnx.ModelProto:
    """Conv -> Relu stacks whose int8 weights are over 1 kB each (the size where tensors go to external data)."""
    rng = np.random.default_rng(0)
    nodes, inits, previous = [], {}, "x"
    for i in range(layers):
        nodes += [helper.make_node("Conv", [previous, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        inits[f"w{i}"] = weight(rng, (channels, 3 if i == 0 else channels, 3, 3))
        inits[f"b{i}"] = bias(rng, channels)
        previous = f"r{i}"
    nodes.append(helper.make_node("MatMul", [previous, "proj"], ["y"], name="proj"))
    inits["proj"] = weight(rng, (16, 16))
    return make_model(nodes, [tensor("x", [1, 3, 16, 16])], [tensor("y", [1, channels, 16, 16])], inits)


@pytest.fixture
def external_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxq.model_io, "EXTERNAL_DATA_THRESHOLD", 1024)  # everything counts as "over 2 GiB"
    monkeypatch.setattr(onnxq.model_io, "EXTERNAL_TENSOR_MIN_BYTES", 0)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
@pytest.mark.usefixtures("external_everything")
def test_large_model_in_every_mode(tmp_path: Path, mode: str) -> None:
    """Each pass used to turn the model it was given into references to its own scratch folder, then deleted."""
    source_dir, out_dir = tmp_path / "in", tmp_path / "out"
    source_dir.mkdir()
    out_dir.mkdir()
    source = source_dir / "a.onnx"
    onnx.save_model(deep_conv_model(), str(source), save_as_external_data=True, location="b.onnx.data",
                    size_threshold=0)
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    before = digest(source_dir)
    out = out_dir / "b.onnx"  # its weights file is b.onnx.data, as the input's is, in another folder
    result = quantize_simple(source, out, calib, mode=mode)
    assert digest(source_dir) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["b.onnx", "b.onnx.data"]
    feed = {"x": image_batch(np.random.default_rng(5))}
    assert cosine(run(source, feed)[0], run(out, feed)[0]) > 0.98
    assert result.report["fidelity"]["outputs"][0]["cosine"] > 0.98


@pytest.mark.usefixtures("external_everything")
def test_no_pass_changes_the_model_it_is_given(tmp_path: Path) -> None:
    from onnxq.model_io import save_model
    from onnxq.passes.prepare import prepare_model
    from onnxq.runtime.fusion import check_fusion
    from onnxq.runtime.session import session_for

    model = deep_conv_model()
    before = model.SerializeToString(deterministic=True)
    prepare_model(model)
    check_fusion(model)
    session_for(model, tmp_path)
    save_model(model, tmp_path / "saved.onnx")
    assert model.SerializeToString(deterministic=True) == before
    assert cosine(run(tmp_path / "saved.onnx", {"x": image_batch(np.random.default_rng(1))})[0],
                  ort_run(model, {"x": image_batch(np.random.default_rng(1))})[0]) > 0.9999


def ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.usefixtures("external_everything")
def test_external_writer_is_deterministic_and_aligned(tmp_path: Path) -> None:
    from onnxq.model_io import EXTERNAL_ALIGNMENT, save_model

    model = deep_conv_model()
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        save_model(model, tmp_path / name / "m.onnx")
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    written = onnx.load(str(tmp_path / "one" / "m.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in written.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % EXTERNAL_ALIGNMENT == 0 for o in offsets)
