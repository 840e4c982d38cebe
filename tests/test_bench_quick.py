"""bench-quick end to end (its Python entry point, not make), plus the child-process guard rails."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from bench import runners
from bench.run import run_quick

ROW_STATUSES = {"ok", "failed", "timeout", "oom", "runtime-error", "n/a", "skipped"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    results = tmp_path_factory.mktemp("bench-results")
    markdown = results / "BENCH.md"
    return run_quick(results, n=4, markdown=markdown, command="pytest"), markdown


def test_quick_result_file_matches_returned_result(quick: tuple[dict, Path]) -> None:
    res, markdown = quick
    on_disk = json.loads((markdown.parent / "ppocr-rec.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    assert "## ppocr-rec" in markdown.read_text()


def test_quick_has_machine_data_and_rows(quick: tuple[dict, Path]) -> None:
    res, _ = quick
    assert res["model"] == "ppocr-rec" and res["primary_metric"] == "char_accuracy"
    m = res["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["onnxruntime"] and isinstance(m["vnni"], bool)
    assert res["data"]["n_calib"] == 4 and res["data"]["n_eval"] == 4
    assert res["fp32_calib_pass_s"] > 0
    assert [r["id"] for r in res["rows"]] == ["fp32", "onnxq-default", "ort-qdq-minmax"]
    assert all(r["status"] in ROW_STATUSES for r in res["rows"])


def test_quick_fp32_row_is_the_reference(quick: tuple[dict, Path]) -> None:
    fp32 = quick[0]["rows"][0]
    assert fp32["status"] == "ok"
    assert fp32["fidelity"]["cosine"] == pytest.approx(1.0)
    assert fp32["speedup"]["1"] == pytest.approx(1.0) and fp32["size_ratio"] == pytest.approx(1.0)
    assert 0.8 <= fp32["task"]["char_accuracy"] <= 1.0


def test_quick_onnxq_row_is_measured_and_sane(quick: tuple[dict, Path]) -> None:
    res = quick[0]
    fp32, row = res["rows"][0], res["rows"][1]
    assert row["status"] == "ok", row.get("error")
    assert row["size_ratio"] > 2.5  # int8 weights
    assert 0.0 < row["quant_wall_excl_eval_s"] <= row["quant_wall_s"] < 300
    assert 50 < row["peak_rss_mb"] < 8000
    assert row["calib_ratio"] >= 1.0
    assert math.isfinite(row["fidelity"]["sqnr_db"]) and row["fidelity"]["sqnr_db"] > 3
    assert 0.8 < row["fidelity"]["cosine"] < 1.0
    assert row["task"]["char_accuracy"] >= fp32["task"]["char_accuracy"] - 0.2
    for threads in ("1", "all"):
        assert row["latency_ms"][threads] > 0 and 0.1 < row["speedup"][threads] < 20


def test_quick_peer_row_is_measured_like_the_others(quick: tuple[dict, Path]) -> None:
    """ORT's own quantizer handles ppocr-rec: a failed peer row is a broken harness, not a result."""
    fp32, peer = quick[0]["rows"][0], quick[0]["rows"][2]
    assert peer["tool"] == "ort" and peer["label"] and "bench.peers" in peer["command"]
    assert peer["status"] == "ok", peer.get("error")
    assert 0.0 < peer["quant_wall_s"] < 300 and 50 < peer["peak_rss_mb"] < 8000
    assert peer["size_ratio"] > 2.5  # int8 weights
    assert math.isfinite(peer["fidelity"]["sqnr_db"]) and 0.5 < peer["fidelity"]["cosine"] < 1.0
    assert 0.0 < peer["fidelity"]["worst_sample_cosine"] < 1.0
    assert set(peer["task"]) == set(fp32["task"]) and peer["task"]["lines"] == fp32["task"]["lines"] == 4
    assert 0.0 <= peer["task"]["char_accuracy"] <= 1.0
    assert peer["cpu_class"] == fp32["cpu_class"]
    for threads in ("1", "all"):
        assert peer["latency_ms"][threads] > 0 and 0.1 < peer["speedup"][threads] < 20


def test_child_over_timeout_is_a_timeout_row(tmp_path: Path) -> None:
    res = runners.run_child([sys.executable, "-c", "import time; time.sleep(30)"], log=tmp_path / "log",
                            timeout_s=1, rss_limit_mb=4000)
    assert res.status == "timeout" and res.wall_s < 10


def test_child_over_rss_limit_is_an_oom_row(tmp_path: Path) -> None:
    code = "import time; b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    res = runners.run_child([sys.executable, "-c", code], log=tmp_path / "log", timeout_s=20, rss_limit_mb=200)
    assert res.status == "oom" and res.peak_rss_mb > 200


def test_crashing_child_is_a_failed_row(tmp_path: Path) -> None:
    res = runners.run_child([sys.executable, "-c", "raise SystemExit('boom')"], log=tmp_path / "log",
                            timeout_s=20, rss_limit_mb=4000)
    assert res.status == "failed" and res.returncode == 1 and "boom" in res.log_tail
