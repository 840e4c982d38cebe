"""Bad input through the real `onnxq` command: documented exit code, one error line, nothing left behind.

Most cases run the CLI in a subprocess, as a shell or CI step would, so stderr holds
everything the process prints (warnings included). Write failures that cannot be
produced for real when the tests run as root are simulated in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import (
    CHANNELS,
    conv_relu_model,
    dynamic_model,
    image_batch,
    make_model,
    save,
    tensor,
    two_input_model,
    weight,
    write_npz_folder,
)
from onnx import helper

import onnxq.model_io
import onnxq.outputs
from onnxq.cli import main
from onnxq.errors import EXIT_BAD_DATA, EXIT_BAD_MODEL, EXIT_OUTPUT, EXIT_USAGE

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo" / "ppocr_v4_rec.onnx"


@dataclass
class Workspace:
    root: Path
    model: Path  # a good fp32 model (input x: [1, 3, 16, 16] float32)
    calib: Path  # good calibration data for it
    out: Path  # empty output folder

    def data(self, name: str, feed: dict[str, np.ndarray], count: int = 3) -> Path:
        folder = self.root / name
        folder.mkdir()
        for i in range(count):
            np.savez(folder / f"{i}.npz", **feed)
        return folder

    def file(self, name: str, content: bytes) -> Path:
        path = self.root / name
        path.write_bytes(content)
        return path


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    model = save(conv_relu_model(), tmp_path / "model.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    out = tmp_path / "out"
    out.mkdir()
    return Workspace(tmp_path, model, calib, out)


def run_cli(*args) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (default warning filters: whatever a user would see, we see)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_clean_failure(code: int, stdout: str, stderr: str, expected_code: int, words: list[str]) -> str:
    assert code == expected_code, (code, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxq: error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "onnxq-prepare-" not in lines[0], "names of onnxq's temporary files mean nothing to the user"
    return lines[0]


def truncated(ws: Workspace) -> Path:
    data = ws.model.read_bytes()
    return ws.file("truncated.onnx", data[: len(data) // 2])


def truncated_demo(ws: Workspace) -> Path:
    with DEMO_MODEL.open("rb") as handle:
        half = handle.read(DEMO_MODEL.stat().st_size // 2)
    return ws.file("demo_truncated.onnx", half)


def invalid_graph(ws: Workspace) -> Path:
    """Parses as ONNX but a node reads a tensor nothing defines: onnx.checker refuses it."""
    model = conv_relu_model()
    model.graph.node[1].input[0] = "nowhere"
    return ws.file("invalid.onnx", model.SerializeToString())


def unknown_op(ws: Workspace) -> Path:
    """Valid ONNX with an op from a domain onnxruntime does not know."""
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="frob")
    graph = helper.make_graph([node], "g", [tensor("x", [1, 3, 16, 16])], [tensor("y", [1, 3, 16, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.example", 1)])
    return ws.file("unknown_op.onnx", model.SerializeToString())


# (name, model path, extra arguments, exit code, words the message must contain)
Case = tuple[str, Callable[[Workspace], Path], Callable[[Workspace], list], int, list[str]]
GOOD_DATA: Callable[[Workspace], list] = lambda ws: ["--calib", ws.calib]  # noqa: E731
CASES: list[Case] = [
    # the model
    ("missing model", lambda ws: ws.root / "nope.onnx", GOOD_DATA, EXIT_BAD_MODEL, ["not found", "nope.onnx"]),
    ("folder as model", lambda ws: ws.calib, GOOD_DATA, EXIT_BAD_MODEL, ["folder"]),
    ("empty model file", lambda ws: ws.file("empty.onnx", b""), GOOD_DATA, EXIT_BAD_MODEL, ["empty"]),
    ("truncated model", truncated, GOOD_DATA, EXIT_BAD_MODEL, ["truncated.onnx"]),
    ("truncated demo model", truncated_demo, GOOD_DATA, EXIT_BAD_MODEL, ["demo_truncated.onnx"]),
    ("text file", lambda ws: ws.file("notes.onnx", b"These are my notes, not a model.\n"), GOOD_DATA,
     EXIT_BAD_MODEL, ["notes.onnx"]),
    # "2\n" + 10 bytes happens to be a valid protobuf (doc_string field): parses, but holds no graph
    ("text that parses", lambda ws: ws.file("readme.onnx", b"2\nhello you!"), GOOD_DATA, EXIT_BAD_MODEL,
     ["readme.onnx", "graph"]),
    ("invalid graph", invalid_graph, GOOD_DATA, EXIT_BAD_MODEL, ["not a valid ONNX model"]),
    ("unknown op", unknown_op, GOOD_DATA, EXIT_BAD_MODEL, ["onnxruntime cannot load"]),
    # the data
    ("wrong input name", lambda ws: ws.model, lambda ws: ["--calib", ws.data("d", {"image": image_batch(
        np.random.default_rng(0))})], EXIT_BAD_DATA, ["missing input(s) x", "unknown name(s) image"]),
    ("wrong shape", lambda ws: ws.model, lambda ws: ["--calib", ws.data("d", {"x": np.zeros((1, 3, 8, 8),
                                                                                         np.float32)})],
     EXIT_BAD_DATA, ["input x", "[1, 3, 8, 8]", "expects [1, 3, 16, 16]"]),
    ("wrong rank", lambda ws: ws.model, lambda ws: ["--calib", ws.data("d", {"x": np.zeros((3, 16, 16),
                                                                                        np.float32)})],
     EXIT_BAD_DATA, ["input x", "rank 4"]),
    ("wrong dtype", lambda ws: ws.model, lambda ws: ["--calib", ws.data("d", {"x": np.zeros((1, 3, 16, 16))})],
     EXIT_BAD_DATA, ["input x", "float64", "expects float32"]),
    ("NaN", lambda ws: ws.model, lambda ws: ["--calib", ws.data("d", {"x": np.full((1, 3, 16, 16), np.nan,
                                                                                     np.float32)})],
     EXIT_BAD_DATA, ["input x", "NaN"]),
    ("Inf in eval data", lambda ws: ws.model, lambda ws: [
        "--calib", ws.calib, "--eval-data", ws.data("d", {"x": np.full((1, 3, 16, 16), np.inf, np.float32)})],
     EXIT_BAD_DATA, ["input x", "Inf"]),
    ("empty data folder", lambda ws: ws.model, lambda ws: ["--calib", ws.data("d", {}, count=0)], EXIT_BAD_DATA,
     ["no calibration samples"]),
    ("missing data folder", lambda ws: ws.model, lambda ws: ["--calib", ws.root / "nothere"], EXIT_BAD_DATA,
     ["not found", "nothere"]),
    ("corrupt npz", lambda ws: ws.model, lambda ws: ["--calib", _corrupt_npz(ws)], EXIT_BAD_DATA,
     ["cannot read", "0.npz"]),
    ("corrupt image", lambda ws: ws.model, lambda ws: ["--calib", _corrupt_image(ws)], EXIT_BAD_DATA,
     ["cannot read image"]),
    ("stacked npz, mixed counts", lambda ws: two(ws), lambda ws: ["--calib", _mixed_stack(ws)], EXIT_BAD_DATA,
     ["batch"]),
    ("npy for two inputs", lambda ws: two(ws), lambda ws: ["--calib", _npy(ws)], EXIT_BAD_DATA,
     ["single-input", "image, offset"]),
    ("random data, dynamic shape", lambda ws: save(dynamic_model(), ws.root / "dyn.onnx"),
     lambda _ws: ["--allow-random"], EXIT_BAD_DATA, ["--allow-random", "input x"]),
    ("missing stats file", lambda ws: ws.model, lambda ws: ["--load-stats", ws.root / "none.npz"], EXIT_BAD_DATA,
     ["none.npz"]),
    ("corrupt stats file", lambda ws: ws.model, lambda ws: ["--load-stats", ws.file("s.npz", b"PK junk")],
     EXIT_BAD_DATA, ["s.npz"]),
    # options
    ("no data at all", lambda ws: ws.model, lambda _ws: [], EXIT_USAGE, ["--calib", "--allow-random"]),
    ("batch size on a static batch", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "--batch-size", 4],
     EXIT_USAGE, ["--batch-size 4", "input x"]),
    ("two mean values", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "--mean", "0.5,0.5"], EXIT_USAGE,
     ["--mean"]),
    ("bad percentile", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "--method", "percentile",
                                                        "--percentile", "20"], EXIT_USAGE, ["--percentile"]),
    # the output
    ("missing output folder", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "-o", ws.out / "sub" / "q.onnx"],
     EXIT_OUTPUT, ["does not exist"]),
    ("output folder is a file", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "-o",
                                                                 ws.file("plain", b"x") / "q.onnx"],
     EXIT_OUTPUT, ["is a file"]),
    ("output is a folder", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "-o", ws.out], EXIT_OUTPUT,
     ["is a folder"]),
    ("stats into a missing folder", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "--save-stats",
                                                                     ws.out / "sub" / "s.npz"],
     EXIT_OUTPUT, ["does not exist"]),
    ("report over the model", lambda ws: ws.model, lambda ws: ["--calib", ws.calib, "--report", ws.model],
     EXIT_USAGE, ["--report", "MODEL", "same file"]),
]


def two(ws: Workspace) -> Path:
    return save(two_input_model(), ws.root / "two.onnx")


def _corrupt_npz(ws: Workspace) -> Path:
    folder = ws.root / "d"
    folder.mkdir()
    (folder / "0.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return folder


def _corrupt_image(ws: Workspace) -> Path:
    folder = ws.root / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def _mixed_stack(ws: Workspace) -> Path:
    path = ws.root / "stack.npz"
    np.savez(path, image=np.zeros((4, 3, 16, 16), np.float32), offset=np.zeros((3, CHANNELS, 1, 1), np.float32))
    return path


def _npy(ws: Workspace) -> Path:
    path = ws.root / "stack.npy"
    np.save(path, np.zeros((4, 3, 16, 16), np.float32))
    return path


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(case: Case, ws: Workspace) -> None:
    _, model, extra, code, words = case
    model_path = model(ws)
    args = extra(ws)
    if "-o" not in args:
        args = [*args, "-o", ws.out / "q.onnx"]
    before = model_path.read_bytes() if model_path.is_file() else None
    result = run_cli("quantize", model_path, *args)
    assert_clean_failure(result.returncode, result.stdout, result.stderr, code, words)
    assert os.listdir(ws.out) == [], "no output and no temporary files may remain"
    if before is not None:
        assert model_path.read_bytes() == before


@pytest.mark.parametrize("spelling", ["same", "dotted"])
def test_output_equal_to_input(ws: Workspace, spelling: str) -> None:
    output = ws.model if spelling == "same" else ws.out / ".." / ws.model.name
    before = ws.model.read_bytes()
    listing = sorted(os.listdir(ws.root))
    result = run_cli("quantize", ws.model, "-o", output, "--calib", ws.calib)
    assert_clean_failure(result.returncode, result.stdout, result.stderr, EXIT_USAGE, ["-o", "MODEL", "same file"])
    assert ws.model.read_bytes() == before
    assert sorted(os.listdir(ws.root)) == listing


def test_calibrate_and_merge_errors(ws: Workspace) -> None:
    result = run_cli("calibrate", ws.model, "-o", ws.out / "s.npz", "--calib", ws.data("d", {"x": np.zeros(
        (1, 3, 16, 16), np.float64)}))
    assert_clean_failure(result.returncode, result.stdout, result.stderr, EXIT_BAD_DATA, ["input x", "float64"])
    assert os.listdir(ws.out) == []
    result = run_cli("calibrate", ws.model, "-o", ws.out / "s.npz")
    assert_clean_failure(result.returncode, result.stdout, result.stderr, EXIT_USAGE, ["--calib"])
    # statistics of two different models cannot be merged
    assert run_cli("calibrate", ws.model, "--calib", ws.calib, "-o", ws.root / "a.npz", "-q").returncode == 0
    other = save(dynamic_model(seed=1), ws.root / "other.onnx")
    assert run_cli("calibrate", other, "--calib", ws.calib, "-o", ws.root / "b.npz", "-q").returncode == 0
    result = run_cli("merge-stats", ws.root / "a.npz", ws.root / "b.npz", "-o", ws.out / "m.npz")
    assert_clean_failure(result.returncode, result.stdout, result.stderr, EXIT_BAD_DATA, ["different models"])
    result = run_cli("merge-stats", ws.root / "a.npz", "-o", ws.out / "m.npz")
    assert_clean_failure(result.returncode, result.stdout, result.stderr, EXIT_USAGE, ["at least two"])
    assert os.listdir(ws.out) == []


def in_process(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_unwritable_output_folder(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root may write anywhere, so the read-only folder is simulated where onnxq asks the OS."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == ws.out.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(onnxq.model_io.os, "access", access)
    code, out, err = in_process("quantize", ws.model, "-o", ws.out / "q.onnx", "--calib", ws.calib)
    assert_clean_failure(code, out, err, EXIT_OUTPUT, ["not writable", str(ws.out.resolve())])
    assert os.listdir(ws.out) == []


def test_write_failure_leaves_no_temporary_file(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure at the final rename (disk full, permissions changed mid-run) removes the temporary file."""
    real_replace = os.replace
    target = ws.out / "q.onnx"

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == target:
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(onnxq.outputs.os, "replace", replace)
    code, out, err = in_process("quantize", ws.model, "-o", target, "--calib", ws.calib)
    assert_clean_failure(code, out, err, EXIT_OUTPUT, ["cannot write", "Permission denied"])
    assert os.listdir(ws.out) == []


def test_success_for_contrast(ws: Workspace) -> None:
    """The same command with good input succeeds: the failures above come from the bad input."""
    # Without the speed guard: on this tiny model float may well be faster, which it reports as an error.
    result = run_cli("quantize", ws.model, "-o", ws.out / "q.onnx", "--calib", ws.calib, "-q", "--no-speed-guard")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and os.listdir(ws.out) == ["q.onnx"]
    onnx.checker.check_model(onnx.load(str(ws.out / "q.onnx")))


@pytest.mark.parametrize("cause", ["samples too small", "weight does not fit"])
def test_runtime_failure_in_onnxruntime_is_one_line(ws: Workspace, cause: str) -> None:
    """Failures only onnxruntime can see (dynamic shapes, inconsistent weights): still one line, no crash."""
    rng = np.random.default_rng(0)
    if cause == "samples too small":  # a 3x3 Conv without padding cannot run on 2x2 inputs
        model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                           [tensor("x", ["N", 3, "H", "W"])], [tensor("y", ["N", CHANNELS, "h", "w"])],
                           {"w": weight(rng, (CHANNELS, 3, 3, 3))})
        calib = ws.data("tiny", {"x": np.ones((1, 3, 2, 2), np.float32)})
        expected = EXIT_BAD_DATA
    else:  # passes onnx.checker (no shape inference) but the weight has 5 input channels for 3
        model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                           [tensor("x", [1, 3, 16, 16])], [tensor("y", [1, CHANNELS, 14, 14])],
                           {"w": weight(rng, (CHANNELS, 3, 3, 3))})
        model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weight(rng, (CHANNELS, 5, 3, 3)), "w"))
        calib = ws.calib
        expected = None  # a bad model (3) or the model failing on the data (4)
    path = ws.file("model2.onnx", model.SerializeToString())
    result = run_cli("quantize", path, "-o", ws.out / "q.onnx", "--calib", calib)
    assert os.listdir(ws.out) == []
    code = expected or (result.returncode if result.returncode in (EXIT_BAD_MODEL, EXIT_BAD_DATA) else -1)
    assert_clean_failure(result.returncode, result.stdout, result.stderr, code, [])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["quantize", "MODEL"], ["Missing option", "--output", "onnxq quantize --help"]),
        (["quantize", "MODEL", "-o", "OUT", "--method", "best"], ["--method", "'best'"]),
        (["quantize", "MODEL", "-o", "OUT", "--batch-size", "0"], ["--batch-size"]),
        (["frobnicate"], ["No such command", "onnxq --help"]),
    ],
)
def test_usage_errors_are_one_line(ws: Workspace, args: list[str], words: list[str]) -> None:
    """click's own usage errors follow the same one-line convention, exit code 2."""
    args = [str(ws.model) if a == "MODEL" else str(ws.out / "q.onnx") if a == "OUT" else a for a in args]
    result = run_cli(*args)
    assert_clean_failure(result.returncode, result.stdout, result.stderr, 2, words)
    assert os.listdir(ws.out) == []
