"""`onnxq bench`: fp32 and int8 latency side by side (timings are not asserted, only their shape)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import dynamic_model, quantize_simple, save

from onnxq.cli import main


def bench(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["bench", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_bench_rows_for_batches_and_threads(tmp_path: Path, conv_calib: Path) -> None:
    fp32 = save(dynamic_model(), tmp_path / "dyn.onnx")
    int8 = tmp_path / "dyn.int8.onnx"
    quantize_simple(fp32, int8, conv_calib)
    code, out, err = bench(fp32, int8, "--data", conv_calib, "--batch", "3", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [(r["threads"], r["batch"]) for r in result["rows"]] == [(1, 1), (1, 3)]
    for row in result["rows"]:
        assert row["fp32_ms"] > 0 and row["int8_ms"] > 0
        assert row["fp32_p90_ms"] >= row["fp32_ms"] and row["int8_p90_ms"] >= row["int8_ms"]
        assert row["speedup"] == pytest.approx(row["fp32_ms"] / row["int8_ms"], rel=0.01)
        assert row["int8_samples_per_s"] == pytest.approx(1e3 * row["batch"] / row["int8_ms"], rel=0.01)
    assert result["size_ratio"] == round(fp32.stat().st_size / int8.stat().st_size, 3)
    code, text, _ = bench(fp32, int8, "--data", conv_calib, "--batch", "2", "--threads", "1")
    assert code == 0 and "int8 speedup" in text and "smaller" in text


def test_fixed_batch_model_skips_the_larger_batch(tmp_path: Path, conv_model_path: Path, conv_calib: Path) -> None:
    int8 = tmp_path / "q.onnx"
    quantize_simple(conv_model_path, int8, conv_calib)
    code, out, err = bench(conv_model_path, int8, "--threads", "1", "--json")  # static shapes: random input works
    assert code == 0, err
    result = json.loads(out)
    assert [(r["threads"], r["batch"]) for r in result["rows"]] == [(1, 1)]
    assert result["skipped"] == ["batch 8: the model's first input dimension is fixed"]
    assert result["input"] == "random values (no --data)"


def test_bench_errors_are_one_line(tmp_path: Path, conv_calib: Path) -> None:
    fp32 = save(dynamic_model(), tmp_path / "dyn.onnx")
    code, _, err = bench(fp32, fp32, "--threads", "1")
    assert code == 2 and "dynamic dimensions" in err and err.count("\n") == 1
    code, _, err = bench(fp32, tmp_path / "missing.onnx", "--data", conv_calib)
    assert code == 3 and "model not found" in err and err.count("\n") == 1
