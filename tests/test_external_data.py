"""Models over 2 GiB keep their tensors in external data; the threshold is lowered to test that path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conv_relu_model, cosine, image_batch, quantize_simple, run

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


def test_memory_budget_splits_calibration_into_passes(tmp_path: Path, conv_calib: Path, conv_model_path: Path) -> None:
    """A tiny budget forces one pass per tensor group; the statistics must equal the one-pass ones."""
    from onnxq.calibrate import collect_statistics
    from onnxq.data import model_input_specs, open_source
    from onnxq.ir import import_graph
    from onnxq.placement import tensors_to_observe
    from onnxq.prepare import prepare_model

    prepared = prepare_model(onnx.load(str(conv_model_path))).model
    tensors = [t for t in tensors_to_observe(import_graph(prepared)) if t != "x"]
    assert len(tensors) >= 2
    source = open_source(conv_calib, model_input_specs(prepared))
    runs: list[int] = []

    class Counting:
        def __init__(self, total: int, label: str) -> None:
            runs.append(total)

        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    one_pass = collect_statistics(prepared, tensors, source, progress=Counting)
    split = collect_statistics(prepared, tensors, source, memory_budget=1, progress=Counting)
    assert runs == [len(source), len(source) * len(tensors)]  # one pass, then one pass per tensor
    for name in tensors:
        a, b = one_pass.tensors[name], split.tensors[name]
        assert (a.min, a.max, a.count, a.batches) == (b.min, b.max, b.count, b.batches)
        assert np.array_equal(a.counts, b.counts)
