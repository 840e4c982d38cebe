"""Ctrl-C and SIGTERM: one line, exit 128 + signal, no temporary folder left, outputs complete or absent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import conv_relu_model, image_batch, save, write_npz_folder

import onnxq.commands.qat_prep
from onnxq.cli import main
from onnxq.errors import EXIT_OUTPUT, OutputError
from onnxq.interrupts import Interrupted


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    model = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 300)
    scratch, out = tmp_path / "tmp", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    return {"model": model, "calib": calib, "tmp": scratch, "out": out}


def start(job: dict[str, Path], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(job["tmp"])}
    args = [sys.executable, "-m", "onnxq", "quantize", str(job["model"]), "-o", str(job["out"] / "q.onnx"),
            "--calib", str(job["calib"]), "--no-speed-guard", "-q", "--report", str(job["out"] / "r.json"), *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                      (signal.SIGINT, 130, "interrupted")])
def test_signal_during_calibration_leaves_nothing(job: dict[str, Path], signum: int, code: int, word: str) -> None:
    process = start(job)
    wait_for(lambda: any(job["tmp"].glob("onnxq-run-*/onnxq-calib-*")) or process.poll() is not None)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stderr == f"onnxq: {word}; no output written\n"
    assert os.listdir(job["tmp"]) == [] and os.listdir(job["out"]) == []


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
def test_ctrl_c_at_start_up(job: dict[str, Path], delay: float) -> None:
    """While Python, numpy and onnxruntime load: one line, exit 130 (or, if too late to stop, a finished run)."""
    process = start(job)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == -signal.SIGINT or "init_import_site" in stderr:
        # Python itself was still starting (before any onnxq code): its default handling, nothing written
        assert os.listdir(job["out"]) == [] and os.listdir(job["tmp"]) == []
        return
    assert "Traceback" not in stderr
    if process.returncode == 0:  # the run finished before the signal: both outputs complete
        assert sorted(os.listdir(job["out"])) == ["q.onnx", "r.json"]
    else:
        assert process.returncode == 130 and stderr.count("\n") == 1 and stderr.startswith("onnxq: interrupted")
        written = sorted(os.listdir(job["out"]))
        assert written in ([], ["q.onnx", "r.json"])
        assert ("after the outputs were written" in stderr) == bool(written)
    assert os.listdir(job["tmp"]) == []


def test_failed_write_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qat-prep writes the model and its parameters together: when the second cannot be written, neither is."""
    model = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    out = tmp_path / "out"
    out.mkdir()

    def unwritable(_self, path) -> None:
        raise OutputError(f"cannot write {path}: Permission denied")

    monkeypatch.setattr(onnxq.commands.qat_prep.QuantPlan, "save", unwritable)
    result = CliRunner().invoke(main, ["qat-prep", str(model), "-o", str(out / "f.onnx"), "--calib", str(calib),
                                       "--params", str(out / "p.json")])
    assert result.exit_code == EXIT_OUTPUT and "Permission denied" in result.stderr
    assert os.listdir(out) == []
    result = CliRunner().invoke(main, ["qat-prep", str(model), "-o", str(out / "f.onnx"), "--calib", str(calib),
                                       "--params", str(tmp_path / "missing" / "p.json")])
    assert result.exit_code == EXIT_OUTPUT and "does not exist" in result.stderr
    assert os.listdir(out) == []


def test_interrupt_between_outputs_keeps_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt after the model is staged but before the report is: no output, and the line says so."""
    import onnxq.cli

    model = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    out = tmp_path / "out"
    out.mkdir()

    def interrupted(_report: dict) -> str:
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(onnxq.cli, "format_summary", interrupted)
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out / "q.onnx"), "--calib", str(calib),
                                       "--report", str(out / "r.json")])
    assert result.exit_code == 130
    assert result.stderr == f"onnxq: interrupted after the outputs were written: {out / 'q.onnx'}, {out / 'r.json'}\n"
    assert sorted(os.listdir(out)) == ["q.onnx", "r.json"]
    monkeypatch.setattr(onnxq.cli, "quantize", lambda *_a, **_k: interrupted({}))
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "q2.onnx"), "--calib",
                                       str(calib)])
    assert result.exit_code == 130 and result.stderr == "onnxq: interrupted; no output written\n"


def test_objects_an_interrupt_left_half_built_print_nothing_when_freed() -> None:
    """A Ctrl-C inside zipfile.ZipFile's constructor (np.load of an .npz) left an object whose __del__
    printed 'Exception ignored ... AttributeError' after the one line."""
    script = textwrap.dedent("""
        import onnxq.entry as entry, onnxq.cli as cli
        from onnxq.interrupts import Interrupted

        class HalfBuilt:
            def __del__(self):
                raise AttributeError("'ZipFile' object has no attribute '_writing'")

        kept = []

        def interrupted_mid_read():
            kept.append(HalfBuilt())
            raise Interrupted(2)

        cli.run_click = interrupted_mid_read
        entry.run()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["onnxq: interrupted; no output written"], done.stderr
