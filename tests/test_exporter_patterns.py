"""Patterns seen in pretrained models from other exporters (paddle2onnx, tf2onnx, old PyTorch, ORT-quantized)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import matmul_add_model, save

from onnxq.cli import main


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
