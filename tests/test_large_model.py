"""bench/robustness/large_model.py scaled down: the same generated MatMul stack, onnxq's 2 GiB threshold lowered."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest

import onnxq.model_io
from bench.robustness.large_model import agreement, generate, outputs, write_feeds
from onnxq.commands.dynamic import WeightOnlyOptions
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize

MODES = {"static": {"speed_guard": "off"}, "dynamic": {"mode": "dynamic"},
         "weight-only int4": {"mode": "weight-only", "weight_only": WeightOnlyOptions(bits=4, block_size=32)}}


@pytest.mark.parametrize("mode", list(MODES))
def test_generated_large_model_quantizes_and_runs(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxq.model_io, "EXTERNAL_DATA_THRESHOLD", 20_000)  # "over 2 GiB" from 20 kB
    model = generate(tmp_path / "fp32", hidden=96, layers=4)
    calib, held = write_feeds(tmp_path / "calib", 96, 6, 1), write_feeds(tmp_path / "held", 96, 3, 2)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.parent.iterdir()}
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    quantize(QuantizeRequest(model=model, output=out, data=DataOptions(calib=calib if mode == "static" else None),
                             **MODES[mode]))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.parent.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]
    stored = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    assert agreement(outputs(model, held), outputs(out, held))["cosine"] > (0.98 if "int4" in mode else 0.995)
