"""bench.quantize_time's rows and its BENCHMARKS.md table, without running a child."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import quantize_time, report, runners
from bench.quantize_time import PEERS, Side, row_commands, summarise


def _rows(tmp_path: Path, before: Side | None = None, peers: bool = True
          ) -> dict[str, tuple[list[str], Path | None]]:
    return row_commands(tmp_path / "m.onnx", tmp_path / "calib", ["global", "kl"], tmp_path / "work",
                        before or Side(), peers)


def test_rows_run_floor_onnxq_and_peers_on_one_calibration_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    nncf_python = tmp_path / "nncf-python"
    nncf_python.touch()
    monkeypatch.setattr(runners, "NNCF_PYTHON", nncf_python)
    rows = _rows(tmp_path)
    assert list(rows) == ["floor", "calibrate", "quantize global", "quantize kl", *PEERS]
    assert all(str(tmp_path / "calib") in cmd for cmd, _ in rows.values())
    assert rows["quantize kl"][0][:3] == [sys.executable, "-m", "onnxq"]
    assert rows["quantize kl"][0][-4:] == ["--method", "kl", "--fast", "-q"]
    ort = rows["ort entropy"][0]
    assert ort[:3] == [sys.executable, "-m", "bench.peers"]
    assert ort[ort.index("--method") + 1] == "Entropy" and ort[ort.index("--format") + 1] == "QDQ"
    assert rows["ort minmax"][0][rows["ort minmax"][0].index("--method") + 1] == "MinMax"
    assert rows["nncf"][0][0] == str(nncf_python)
    assert all(source is None for _, source in rows.values())


def test_before_rows_run_their_checkout_in_their_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runners, "NNCF_PYTHON", tmp_path / "missing")
    old, python = tmp_path / "old", tmp_path / "oldvenv" / "python"
    rows = _rows(tmp_path, Side(old, python))
    assert "nncf" not in rows and "ort minmax" in rows  # no NNCF venv: no NNCF row
    assert rows["calibrate (before)"] == ([str(python), "-m", "onnxq", "calibrate", *rows["calibrate"][0][4:]], old)
    assert rows["quantize kl (before)"][0][0] == str(python) and rows["quantize kl"][0][0] == sys.executable
    assert quantize_time._env(old)["PYTHONPATH"] == str(old)
    only_python = _rows(tmp_path, Side(None, python), peers=False)
    assert only_python["calibrate (before)"] == ([str(python), *only_python["calibrate"][0][1:]], None)
    assert not set(PEERS) & set(only_python)


def _run(wall: float, status: str = "ok", rss: float = 100.0) -> dict:
    return {"status": status, "wall_s": wall, "peak_rss_mb": rss, "log_tail": "error: why"}


def test_ratios_are_taken_per_round_and_a_failure_keeps_its_status() -> None:
    rows = summarise({"floor": [_run(1.0), _run(2.0)], "nncf": [_run(3.0), _run(4.0, rss=300.0)],
                      "ort entropy": [_run(1.0), _run(1.0, "failed")]})
    assert rows["nncf"]["ratio_to_floor"] == 2.5  # median of 3/1 and 4/2
    assert rows["nncf"]["peak_rss_mb"] == 300.0
    assert rows["ort entropy"]["status"] == "failed" and rows["ort entropy"]["error"] == "error: why"


def test_table_has_peer_columns_before_and_now_and_failures(tmp_path: Path) -> None:
    def row(ratio: float, status: str = "ok", rss: float = 100.0) -> dict:
        return {"status": status, "ratio_to_floor": ratio, "median_s": ratio, "peak_rss_mb": rss}

    model = {"floor": row(1.0), "calibrate (before)": row(3.0), "quantize global (before)": row(4.0),
             "calibrate": row(2.0), "quantize global": row(1.5, rss=120.0), "ort minmax": row(1.8, rss=150.0),
             "ort entropy": row(1.1, "failed"), "nncf": row(6.0, rss=170.0)}
    result = {"machine": {"cpu": "cpu", "cores": 2, "vnni": True, "amx": False}, "rounds": 2,
              "before": "/old", "before_commit": "abc1234", "before_python": "/oldvenv/python",
              "pythons": {"nncf": {"python": "/nncf/python", "versions": "ml_dtypes 0.7.0"}},
              "models": {"m": model, "n": {k: v for k, v in model.items() if "before" not in k and k != "nncf"}}}
    (tmp_path / "quantize_time.json").write_text(json.dumps(result))
    lines = report.quantize_time_lines(tmp_path)
    header = next(line for line in lines if line.startswith("| model"))
    assert header.split(" | ")[3:7] == ["quantize global", "ORT MinMax", "ORT Entropy", "NNCF"]
    assert "| m | 1.00 | 3.00 → 2.00 | 4.00 → 1.50 | 1.80 | failed | 6.00 | 100 → 120 | 150 / 100 / 170 |" in lines
    assert "| n | 1.00 | 2.00 | 1.50 | 1.80 | failed | — | 120 | 150 / 100 / — |" in lines  # a model run without them
    assert "--before <abc1234> --before-python" in lines[2] and "/nncf/python` (ml_dtypes 0.7.0)" in lines[2]


def test_a_before_row_runs_the_onnxq_of_its_checkout(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "onnxq").mkdir(parents=True)
    (old / "onnxq" / "__init__.py").write_text("")
    (old / "onnxq" / "__main__.py").write_text("import onnxq\nprint('from', onnxq.__file__)\n")
    res = quantize_time.run_row(quantize_time._onnxq(sys.executable, "--version"), old, tmp_path / "row.log")
    assert res["status"] == "ok", res["log_tail"]
    assert f"from {old / 'onnxq' / '__init__.py'}" in (tmp_path / "row.log").read_text()
