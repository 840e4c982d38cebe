"""No path onnxq writes is a path it reads or another path it writes (onnxq.paths), checked before any work."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli_in, conv_relu_model, image_batch, save, write_npz_folder

from onnxq.errors import EXIT_OUTPUT, EXIT_USAGE, OutputError, UsageError
from onnxq.paths import CACHE, DATA, INPUT, MODEL, MODEL_OUTPUT, OUTPUT, PathArg, check_paths


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    save(conv_relu_model(), tmp_path / "m.onnx")
    write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([image_batch(rng) for _ in range(4)]))
    (tmp_path / "out").mkdir()
    return tmp_path


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def cli(root: Path, *args: str) -> tuple[int, str]:
    code, _, stderr = cli_in(root, *args)
    return code, stderr


CLASHES = [  # (arguments, the two options the message names)
    (["quantize", "m.onnx", "-o", "calib.npz", "--calib", "calib.npz"], ["-o calib.npz", "--calib calib.npz"]),
    (["calibrate", "m.onnx", "-o", "calib.npz", "--calib", "calib.npz"], ["-o calib.npz", "--calib calib.npz"]),
    (["quantize", "m.onnx", "-o", "r.onnx", "--report", "r.onnx", "--calib", "calib"], ["-o r.onnx", "--report"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--save-plan", "q.onnx", "--calib", "calib"], ["-o", "--save-plan"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--save-stats", "q.onnx", "--calib", "calib"], ["-o", "--save-stats"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--save-recipe", "q.onnx", "--calib", "calib"], ["-o", "--save-recipe"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--save-plan", "p.json", "--report", "p.json", "--calib", "calib"],
     ["--save-plan", "--report"]),
    (["quantize", "m.onnx", "-o", "calib/s001.npz", "--calib", "calib"], ["-o", "--calib"]),
    (["quantize", "m.onnx", "-o", "calib/new.onnx", "--calib", "calib"], ["-o", "--calib folder"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--eval-data", "calib.npz", "--report", "calib.npz"],
     ["--report", "--eval-data"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--load-stats", "s.npz", "--save-stats", "s.npz"],
     ["--save-stats", "--load-stats"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--speed-guard", "measure",
      "--speed-profile", "q.onnx"],
     ["-o", "--speed-profile"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--recipe", "r.yaml", "--save-recipe", "r.yaml"],
     ["--save-recipe", "--recipe"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--recipe", "r.yaml", "--report", "r.yaml"],
     ["--report", "--recipe"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "calib", "--target-metric", "1", "--metric", "s.py",
      "--save-plan", "s.py"], ["--save-plan", "--metric"]),
    (["quantize", "m.onnx", "-o", "q.onnx", "--mode", "dynamic", "--report", "m.onnx"], ["--report", "MODEL"]),
    (["qat-prep", "m.onnx", "-o", "f.onnx", "--calib", "calib", "--params", "f.onnx"], ["-o", "--params"]),
    (["qat-prep", "m.onnx", "-o", "f.onnx", "--calib", "calib", "--report", "f.params.json"], ["--params", "--report"]),
    (["convert", "m.onnx", "-o", "c.onnx", "--report", "c.onnx"], ["-o", "--report"]),
    (["convert", "m.onnx", "-o", "calib.npz", "--calib", "calib.npz"], ["-o", "--calib"]),
    (["sensitivity", "m.onnx", "--calib", "calib", "-o", "s.json", "--plot", "s.json"], ["-o", "--plot"]),
    (["sensitivity", "m.onnx", "--calib", "calib", "-o", "m.onnx"], ["-o", "MODEL"]),
    (["merge-stats", "a.npz", "b.npz", "-o", "b.npz"], ["-o", "INPUTS"]),
]


@pytest.mark.parametrize(("args", "named"), CLASHES, ids=[" ".join(c[0]) for c in CLASHES])
def test_clash_is_a_usage_error_naming_both_options(ws: Path, args: list[str], named: list[str]) -> None:
    for name in ("s.npz", "s.py", "a.npz", "b.npz"):
        (ws / name).write_bytes(b"user's file")
    (ws / "r.yaml").write_text("rules: []\n")
    before = digest(ws)
    code, stderr = cli(ws, *args)
    assert code == EXIT_USAGE, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("onnxq: error: ")
    assert all(word in stderr for word in named), stderr
    assert digest(ws) == before  # nothing read was changed and nothing was written


def test_links_are_the_same_file(ws: Path) -> None:
    os.symlink(ws / "m.onnx", ws / "sym.onnx")
    os.link(ws / "m.onnx", ws / "hard.onnx")
    os.symlink(ws / "calib", ws / "calib_link")
    for output in ("sym.onnx", "hard.onnx", "calib_link/s000.npz", "out/../m.onnx"):
        code, stderr = cli(ws, "quantize", "m.onnx", "-o", output, "--calib", "calib")
        assert code == EXIT_USAGE and "is the same file as" in stderr, (output, stderr)
    assert onnx.load(str(ws / "m.onnx")) == conv_relu_model()


def test_external_data_file_of_the_input_is_read(ws: Path) -> None:
    """-o equal to the input's external-data file, or writing its `<name>.data` over it, is refused."""
    folder = ws / "ext"
    folder.mkdir()
    onnx.save_model(conv_relu_model(), str(folder / "a.onnx"), save_as_external_data=True,
                    location="b.onnx.data", size_threshold=0)
    before = digest(folder)
    code, stderr = cli(ws, "quantize", "ext/a.onnx", "-o", "ext/b.onnx.data", "--calib", "calib")
    assert code == EXIT_USAGE and "external data file" in stderr and "MODEL" in stderr, stderr
    code, stderr = cli(ws, "quantize", "ext/a.onnx", "-o", "ext/b.onnx", "--calib", "calib")
    assert code == EXIT_USAGE and "-o ext/b.onnx (external data file ext/b.onnx.data)" in stderr, stderr
    assert digest(folder) == before


def test_check_paths_directly(tmp_path: Path) -> None:
    (tmp_path / "in.npz").write_bytes(b"x")
    check_paths([PathArg("--calib", tmp_path / "in.npz", DATA), PathArg("-o", tmp_path / "o.onnx", MODEL_OUTPUT),
                 PathArg("--report", None, OUTPUT), PathArg("--speed-profile", tmp_path / "new" / "p.json", CACHE)])
    with pytest.raises(UsageError, match=r"--a .* and --b .* are the same file"):
        check_paths([PathArg("--a", tmp_path / "x", OUTPUT), PathArg("--b", tmp_path / "." / "x", OUTPUT)])
    with pytest.raises(UsageError, match=r"--b .* is the same file as --a"):
        check_paths([PathArg("--a", tmp_path / "in.npz", INPUT), PathArg("--b", tmp_path / "in.npz", CACHE)])
    check_paths([PathArg("--p", tmp_path / "in.npz", CACHE)])  # read and updated in place: not a clash with itself
    with pytest.raises(OutputError, match="does not exist"):
        check_paths([PathArg("-o", tmp_path / "missing" / "o.onnx", OUTPUT)])
    with pytest.raises(OutputError, match="is a folder"):
        check_paths([PathArg("-o", tmp_path, OUTPUT)])
    with pytest.raises(OutputError, match="at most 255"):
        check_paths([PathArg("-o", tmp_path / ("x" * 256), OUTPUT)])
    check_paths([PathArg("MODEL", tmp_path / "not-a-model.onnx", MODEL), PathArg("-o", tmp_path / "o", OUTPUT)])


def test_long_output_names(ws: Path) -> None:
    """A name over 255 bytes is exit 5 before any work; one just under still works (its temporary name is short)."""
    code, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/" + "n" * 300 + ".onnx", "--calib", "calib")
    assert code == EXIT_OUTPUT and "at most 255" in stderr, stderr
    name = "n" * 250 + ".onnx"
    code, stderr = cli(ws, "quantize", "m.onnx", "-o", f"out/{name}", "--calib", "calib", "-q")
    assert code == 0, stderr
    assert os.listdir(ws / "out") == [name]
