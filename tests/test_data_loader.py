"""--data-loader-script FILE[:FUNCTION] on every command that reads data, FILE.py[:FUNCTION] as a data path, labels
for a --metric, one-line errors naming the script and the sample; --input-shapes; bench's input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import conv_relu_model, dynamic_model, image_batch, save, write_npz_folder

from onnxq.cli import main
from onnxq.errors import DataError, UsageError
from onnxq.runtime import loaders
from onnxq.runtime.data import model_input_specs
from onnxq.runtime.input_shapes import parse_input_shapes
from onnxq.runtime.loaders import IterableLoader

LOADER = '''
import numpy as np


def load_data():
    rng = np.random.default_rng(100)
    for _ in range(10):
        yield {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}


def labelled():
    rng = np.random.default_rng(5)
    for i in range(6):
        yield {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}, i % 2
'''


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.startswith("onnxq: error: "), stderr
    return stderr


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with conv.onnx and loader.py, as the working directory."""
    save(conv_relu_model(), tmp_path / "conv.onnx")
    (tmp_path / "loader.py").write_text(LOADER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_loader_gives_the_same_model_as_the_same_samples_in_a_folder(ws: Path) -> None:
    write_npz_folder(ws / "calib", lambda rng: {"x": image_batch(rng)}, 10)  # the same generator, seed 100
    assert cli("quantize", "conv.onnx", "-o", "folder.onnx", "--calib", "calib", "-q")[0] == 0
    code, out, err = cli("quantize", "conv.onnx", "-o", "loader.onnx", "--data-loader-script", "loader.py", "--json",
                         "-q")
    assert code == 0, err
    assert (ws / "loader.onnx").read_bytes() == (ws / "folder.onnx").read_bytes()
    data = json.loads(out)["data"]
    assert data["calibration"]["source"] == "data loader loader.py:load_data [first 9]"
    assert data["evaluation"]["source"] == "data loader loader.py:load_data [last 1, held back]"
    assert cli("quantize", "conv.onnx", "-o", "path.onnx", "--calib", "loader.py:load_data", "-q")[0] == 0
    assert (ws / "path.onnx").read_bytes() == (ws / "folder.onnx").read_bytes()


@pytest.mark.usefixtures("ws")
def test_every_command_that_reads_data_takes_a_loader() -> None:
    script = ["--data-loader-script", "loader.py"]
    assert cli("calibrate", "conv.onnx", "-o", "s.npz", *script)[0] == 0
    code, out, err = cli("sensitivity", "conv.onnx", *script, "--samples", "1", "--json")
    assert code == 0, err
    assert {row["node"] for row in json.loads(out)["layers"]} == {"conv1", "conv2"}
    assert cli("qat-prep", "conv.onnx", "-o", "fq.onnx", *script, "--eval-data", "loader.py:labelled", "-q")[0] == 0
    code, out, err = cli("convert", "fq.onnx", "-o", "cv.onnx", "--eval-data", "loader.py", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["fidelity"]["source"] == "data loader loader.py:load_data"
    assert cli("convert", "fq.onnx", "-o", "cv2.onnx", *script, "-q")[0] == 0
    code, out, err = cli("bench", "conv.onnx", "cv.onnx", *script, "--threads", "1", "--batch", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["input"] == "data loader loader.py:load_data"


def test_labels_reach_a_metric_that_takes_them(ws: Path) -> None:
    (ws / "metric.py").write_text(textwrap.dedent('''
        def score(references, candidates, feeds, labels):
            assert labels == [0, 1, 0, 1, 0, 1][:len(feeds)]
            return 1.0 + len(labels)
    '''))
    target = ["--metric", "metric.py", "--target-metric", "2", "--json", "-q"]
    code, out, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", "loader.py",
                         "--target-data", "loader.py:labelled", *target)
    assert code == 0, err
    accuracy = json.loads(out)["accuracy_target"]
    assert accuracy["final"]["metric"] == 7.0 and accuracy["target"]["data"] == "data loader loader.py:labelled"
    code, _, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", "loader.py", *target)
    assert code == 4
    assert "metric script metric.py scores with labels, but sample 0 of data loader loader.py:load_data" in \
        one_line(err)
    (ws / "metric.py").write_text("def score(references, candidates, feeds, labels=None):\n"
                                  "    return 3.0 if labels == [None] * len(feeds) else 0.0\n")
    code, out, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", "loader.py", *target)
    assert code == 0, err  # labels optional: samples without them are scored
    assert json.loads(out)["accuracy_target"]["final"]["metric"] == 3.0


BROKEN = {
    "import": ("import no_such_module_here\n", "load_data", ["loader.py:load_data failed to import",
                                                            "ModuleNotFoundError", "no_such_module_here"]),
    "function": ("x = 1\n", "load_data", ["loader.py has no function load_data()"]),
    "raises": ("def load_data():\n    raise OSError('database unreachable')\n", "load_data",
               ["loader.py:load_data failed before its first sample: OSError: database unreachable"]),
    "midway": ("import numpy as np\ndef f():\n    yield {'x': np.zeros((1, 3, 16, 16), np.float32)}\n"
               "    raise ValueError('bad frame')\n", "f", ["loader.py:f failed at sample 1: ValueError: bad frame"]),
    "names": ("import numpy as np\ndef f():\n    yield {'image': np.zeros((1, 3, 16, 16), np.float32)}\n", "f",
              ["loader.py:f sample 0: missing input(s) x; unknown name(s) image"]),
    "shape": ("import numpy as np\ndef f():\n    yield {'x': np.zeros((1, 3, 16, 16), np.float32)}\n"
              "    yield {'x': np.zeros((1, 3, 8, 8), np.float32)}\n", "f",
              ["loader.py:f sample 1: input x has shape [1, 3, 8, 8], the model expects [1, 3, 16, 16]"]),
    "dtype": ("import numpy as np\ndef f():\n    yield {'x': np.zeros((1, 3, 16, 16))}\n", "f",
              ["loader.py:f sample 0: input x has dtype float64, the model expects float32"]),
    "nothing": ("def f():\n    return []\n", "f", ["loader.py:f yielded no samples"]),
    "not a dict": ("def f():\n    yield [1, 2]\n", "f", ["loader.py:f sample 0 is a list; yield a dict"]),
    "not an array": ("def f():\n    yield {'x': [1.0]}\n", "f", ["loader.py:f sample 0: input x is a list, not a "
                                                                "numpy array"]),
    "not iterable": ("def f():\n    return 3\n", "f", ["loader.py:f returned a int, not an iterable of feed dicts"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_loader_is_one_line_naming_the_script_and_sample(ws: Path, case: str) -> None:
    source, function, words = BROKEN[case]
    (ws / "loader.py").write_text(source)
    code, _, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", f"loader.py:{function}")
    assert code == 4, err
    line = one_line(err)
    assert all(w in line for w in words), line
    assert not (ws / "q.onnx").exists()


@pytest.mark.usefixtures("ws")
def test_loader_options_that_clash_or_are_missing() -> None:
    code, _, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", "loader.py", "--calib", "d")
    assert code == 2 and "--calib and --data-loader-script both give the data" in one_line(err)
    code, _, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", "missing.py")
    assert code == 4 and "data loader script not found: missing.py" in one_line(err)
    code, _, err = cli("quantize", "conv.onnx", "-o", "loader.py", "--data-loader-script", "loader.py")
    assert code == 2 and "which onnxq reads" in one_line(err)  # the script is an input: never overwritten


def test_a_loader_imports_helpers_beside_it_and_torch_like_tensors(ws: Path) -> None:
    (ws / "frames.py").write_text("import numpy as np\nclass Tensor:\n    def __init__(self, a):\n        self.a = a\n"
                                  "    def __array__(self, dtype=None, copy=None):\n        return self.a\n"
                                  "def frames():\n    return [Tensor(np.full((1, 3, 16, 16), i, np.float32))"
                                  " for i in range(4)]\n")
    (ws / "loader.py").write_text("from frames import frames\ndef load_data():\n    for t in frames():\n"
                                  "        yield {'x': t}\n")
    assert cli("calibrate", "conv.onnx", "-o", "s.npz", "--data-loader-script", "loader.py")[0] == 0


def test_too_many_samples_and_bench_reads_only_the_first(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loaders, "MAX_SAMPLES", 3)
    with pytest.raises(DataError, match="yields more than 3 samples"):
        IterableLoader(iter([{"x": np.zeros((1, 3, 16, 16), np.float32)}] * 5), "feeds").open(
            model_input_specs(conv_relu_model()))
    (ws / "loader.py").write_text("import numpy as np\ndef load_data():\n"
                                  "    yield {'x': np.zeros((1, 3, 16, 16), np.float32)}\n"
                                  "    raise RuntimeError('only one sample was asked for')\n")
    code, _, err = cli("bench", "conv.onnx", "conv.onnx", "--data-loader-script", "loader.py", "--threads", "1",
                       "--batch", "2")
    assert code == 0, err


# ---------------------------------------------------------------- --input-shapes and bench's input


def test_input_shapes_forms_and_errors() -> None:
    assert parse_input_shapes(("x:1x3x48x320",)) == {"x": (1, 3, 48, 320)}
    assert parse_input_shapes(("ids:1x128,mask:1x128", "input:0:[1,3,8,8]")) == {
        "ids": (1, 128), "mask": (1, 128), "input:0": (1, 3, 8, 8)}
    assert parse_input_shapes({"x": [1, 2]}) == {"x": (1, 2)}
    for bad, words in (("x", "NAME:DIMS"), ("x:1xa", "whole numbers"), ("x:0x3", "positive"),
                       ("x:1,x:2", "gives input x twice")):
        with pytest.raises(UsageError, match=words):
            parse_input_shapes((bad,))


def test_bench_on_a_dynamic_model_takes_input_shapes_or_the_calibration_sample(ws: Path) -> None:
    save(dynamic_model(), ws / "dyn.onnx")
    bench = ["bench", "dyn.onnx", "dyn.onnx", "--threads", "1", "--batch", "2"]
    code, _, err = cli(*bench)
    assert code == 2
    assert "input x has dynamic dimensions; give their sizes with --input-shapes x:1x3xNxN" in one_line(err)
    code, out, err = cli(*bench, "--input-shapes", "x:1x3x12x20", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["input"] == "random values (--input-shapes x:1x3x12x20)"
    assert {row["batch"] for row in report["rows"]} == {1, 2}
    write_npz_folder(ws / "calib", lambda rng: {"x": image_batch(rng, (1, 3, 8, 8))}, 2)
    code, out, err = cli(*bench, "--calib", "calib", "--json")
    assert code == 0, err
    assert json.loads(out)["input"] == "calib"
    for extra, words in ((["--input-shapes", "x:2x3x8"], "input x has rank 4, got 3 dimensions"),
                         (["--input-shapes", "y:1x3x8x8"], "the model has no input y (inputs: x)"),
                         (["--input-shapes", "x:1x4x8x8"], "input x has dimension 1 fixed at 3, got 4"),
                         (["--input-shapes", "x:1x3x8x8", "--calib", "calib"], "give one or the other")):
        code, _, err = cli(*bench, *extra)
        assert code == 2 and words in one_line(err), err


def test_allow_random_takes_input_shapes(ws: Path) -> None:
    save(dynamic_model(), ws / "dyn.onnx")
    code, _, err = cli("quantize", "dyn.onnx", "-o", "q.onnx", "--allow-random")
    assert code == 4 and "give its shape with --input-shapes x:1x3xNxN" in one_line(err)
    code, out, err = cli("quantize", "dyn.onnx", "-o", "q.onnx", "--allow-random", "--input-shapes", "x:1x3x8x8",
                         "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["data"]["calibration"]["kind"] == "random"
    code, _, err = cli("calibrate", "dyn.onnx", "-o", "s.npz", "--allow-random", "--input-shapes", "x:[2,3,8,8]")
    assert code == 0, err
    code, _, err = cli("quantize", "conv.onnx", "-o", "q.onnx", "--data-loader-script", "loader.py",
                       "--input-shapes", "x:1x3x16x16")
    assert code == 2 and "--input-shapes shapes the random data of --allow-random" in one_line(err)
