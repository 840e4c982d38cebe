"""The Python API (onnxq.quantize/calibrate/convert/inspect): the same options, defaults, errors and bytes as
the CLI; iterables of feeds read once; the README's *Python API* and *Data from your own code* examples run."""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import (
    conv_relu_model,
    image_batch,
    matmul_add_model,
    run,
    save,
    write_npz_folder,
)

import onnxq
from onnxq.cli import main, quantize_command
from onnxq.commands.command_options import keywords, resolve
from onnxq.quant.plan import QuantPlan
from onnxq.quant.ranges import DEFAULT_METHOD
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import ImagePreprocessing, model_input_specs, open_source

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO = ROOT / "demo" / "ppocr_v4_rec.onnx"
DEMO_IMAGES = ROOT / "calibration_data" / "ocr_lines" / "calib"
DEMO_PREP = ["--image-size", "320x48", "--mean", "0.5", "--std", "0.5"]


def cli(*args: object) -> click.testing.Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.stdout + result.stderr
    return result


def feeds(folder: Path) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(path)) for path in sorted(folder.glob("*.npz"))]


@pytest.fixture
def conv(tmp_path: Path) -> tuple[Path, Path]:
    return save(conv_relu_model(), tmp_path / "conv.onnx"), write_npz_folder(
        tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 12)


# ---------------------------------------------------------------- the README's examples


def readme_blocks(section: str) -> list[tuple[str, str]]:
    """(what the marker says, code) of every fenced block after a `<!-- tested: ... -->` line in a section."""
    body = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"<!-- tested: ([^\n]*?) -->\n```[a-z]*\n(.*?)```", body, re.S)


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    [(marker, code)] = readme_blocks("Python API")
    assert marker.startswith("python")
    save(conv_relu_model(), tmp_path / "model.onnx")
    np.save(tmp_path / "features.npy", np.random.default_rng(0).standard_normal((12, 3, 16, 16)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"[\d.]+x smaller, cosine to fp32 0\.9\d+", printed[0]), printed
    assert printed[1].startswith("--method sets how static mode calibrates activation ranges"), printed
    written = onnx.load(str(tmp_path / "model.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in written.graph.node)


def test_readme_data_loader_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = dict(readme_blocks("Data from your own code"))
    [script] = [code for marker, code in blocks.items() if marker.startswith("file sensor_loader.py")]
    (tmp_path / "sensor_loader.py").write_text(script)
    rng = np.random.default_rng(3)
    with open(tmp_path / "readings.csv", "w", newline="") as file:
        for row in range(4 * 20):
            csv.writer(file).writerow([*np.round(rng.standard_normal(32), 4), row // 4 % 3])
    save(matmul_add_model(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line) for line in blocks["shell"].splitlines() if line.strip()]
    assert [c[1] for c in commands] == ["quantize", "quantize", "calibrate", "bench"]
    for command in commands:
        assert command[0] == "onnxq"
        result = cli(*command[1:], "-q") if command[1] != "bench" else cli(*command[1:], "--json")
        assert result.exit_code == 0, (command, result.stderr)
    assert Statistics.load(tmp_path / "model.stats.npz").samples == 12
    assert "data loader sensor_loader.py:load_data" in result.stdout  # bench's input: the first sample
    x = np.random.default_rng(0).standard_normal((1, 4, 32)).astype(np.float32)
    assert run(tmp_path / "model.int8.onnx", {"x": x})[0].shape == (1, 4, 16)


# ---------------------------------------------------------------- the same bytes as the CLI


def demo_images(tmp_path: Path, count: int = 6) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for image in sorted(DEMO_IMAGES.glob("*.png"))[:count]:
        shutil.copy(image, folder / image.name)
    return folder


def test_api_and_cli_write_the_same_bytes_on_the_demo_model(tmp_path: Path) -> None:
    images = demo_images(tmp_path)
    by_cli = tmp_path / "cli.onnx"
    assert cli("quantize", DEMO, "-o", by_cli, "--calib", images, *DEMO_PREP, "--fast", "-q").exit_code == 0
    by_api = onnxq.quantize(DEMO, tmp_path / "api.onnx", calib=images, image_size="320x48", mean="0.5", std="0.5",
                            fast=True)
    assert (tmp_path / "api.onnx").read_bytes() == by_cli.read_bytes()
    # a ModelProto and the same samples as an iterable of feeds (a generator, read once)
    prep = ImagePreprocessing(size=(320, 48), mean=(0.5,) * 3, std=(0.5,) * 3)
    source = open_source(images, model_input_specs(onnx.load(str(DEMO))), prep)
    in_memory = onnxq.quantize(onnx.load(str(DEMO)), calib=(source.sample(i) for i in range(len(source))),
                               fast=True)
    assert in_memory.model.SerializeToString(deterministic=True) == by_api.model.SerializeToString(deterministic=True)
    assert in_memory.output is None and in_memory.report["output"] is None
    assert in_memory.report["model"] == "<onnx.ModelProto>"
    assert in_memory.report["data"]["calibration"]["source"].startswith("the iterable given as calib")
    assert in_memory.report["fidelity"] == {**by_api.report["fidelity"], "source": in_memory.report["fidelity"]
                                            ["source"]}


@pytest.mark.auto_search
def test_api_and_cli_write_the_same_bytes_with_the_automatic_search(tmp_path: Path, conv: tuple[Path, Path]) -> None:
    model, calib = conv
    by_cli = tmp_path / "cli.onnx"
    result = cli("quantize", model, "-o", by_cli, "--calib", calib, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert '"auto"' in result.stdout
    by_api = onnxq.quantize(model, tmp_path / "api.onnx", calib=iter(feeds(calib)))
    assert by_api.report["auto"]["chosen"]  # the API's default is the search, as the command's
    assert (tmp_path / "api.onnx").read_bytes() == by_cli.read_bytes()


def test_convert_and_calibrate_match_the_cli(tmp_path: Path, conv: tuple[Path, Path]) -> None:
    model, calib = conv
    fake_quant = tmp_path / "fq.onnx"
    assert cli("qat-prep", model, "-o", fake_quant, "--calib", calib, "-q").exit_code == 0
    assert cli("convert", fake_quant, "-o", tmp_path / "cli.onnx", "-q").exit_code == 0
    converted = onnxq.convert(onnx.load(str(fake_quant)), format="qdq")
    assert converted.model.SerializeToString(deterministic=True) == onnx.load(
        str(tmp_path / "cli.onnx")).SerializeToString(deterministic=True)
    assert isinstance(converted.plan, QuantPlan) and converted.gates_passed
    assert cli("calibrate", model, "-o", tmp_path / "cli.npz", "--calib", calib).exit_code == 0
    stats = onnxq.calibrate(model, tmp_path / "api.npz", calib=feeds(calib))
    assert stats.samples == 12
    from_api = onnxq.quantize(model, load_stats=tmp_path / "api.npz", fast=True)
    from_cli = onnxq.quantize(model, load_stats=tmp_path / "cli.npz", fast=True)
    assert from_api.report["data"]["statistics_file"] == str(tmp_path / "api.npz")
    assert from_api.model == from_cli.model  # the same statistics (the files differ in their "source" only)


# ---------------------------------------------------------------- one table of options


def test_options_are_the_commands_declarations(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = {opt for param in quantize_command.params for opt in param.opts if opt.startswith("--")}
    shown = {opt for opt in flags if opt not in ("--json", "--quiet", "--verbose", "--report", "--output",
                                                 "--no-speed-guard")}
    assert {f"--{name.replace('_', '-')}" for name in onnxq.options("quantize")} == shown
    defaults = onnxq.options("quantize")
    assert (defaults["method"], defaults["batch_size"], defaults["format"], defaults["exclude"]) == (
        DEFAULT_METHOD, 1, "qdq", ())
    assert defaults["fast"] is True  # the suite runs with ONNXQ_FAST=1, as the command would read it
    monkeypatch.delenv("ONNXQ_FAST")
    assert onnxq.options("quantize")["fast"] is False
    monkeypatch.setenv("ONNXQ_FAST", "1")
    options, _ = resolve(quantize_command, {"fast": False}, {"model": None, "output": None}, "onnxq.quantize")
    assert options["fast"] is False  # fast=False overrides the environment
    assert set(onnxq.options("convert")) <= set(keywords(main.commands["convert"]))


@pytest.mark.parametrize("options, words", [
    ({"bogus": 1}, ["has no option 'bogus'", "weight_bits"]),
    ({"batch_size": 0}, ["batch_size=0", "--batch-size", "x>=1"]),
    ({"mode": "fastest"}, ["mode='fastest'", "'static'"]),
    ({"weight_bits": 4}, ["--weight-bits applies to --mode weight-only"]),
    ({"percentile": float("nan")}, ["--percentile must be a finite number"]),
    ({"input_shapes": {"x": (1, 3, 16, 16)}}, ["--input-shapes shapes the random data of --allow-random"]),
    ({"data_loader_script": "loader.py"}, ["--calib and --data-loader-script both give the data"]),
])
def test_bad_options_are_usage_errors(conv: tuple[Path, Path], options: dict, words: list[str]) -> None:
    model, calib = conv
    with pytest.raises(onnxq.UsageError) as error:
        onnxq.quantize(model, calib=calib, **options)
    assert error.value.exit_code == 2
    assert all(w in error.value.message for w in words), error.value.message


def test_failures_are_the_typed_errors_of_the_cli(tmp_path: Path, conv: tuple[Path, Path]) -> None:
    model, calib = conv
    with pytest.raises(onnxq.ModelError, match="model not found"):
        onnxq.quantize(tmp_path / "missing.onnx", calib=calib)
    with pytest.raises(onnxq.DataError, match=r"calib sample 1: input x has dtype float64, the model expects float32"):
        onnxq.quantize(model, calib=[feeds(calib)[0], {"x": np.zeros((1, 3, 16, 16))}])
    with pytest.raises(onnxq.OutputError, match="does not exist"):
        onnxq.quantize(model, tmp_path / "no" / "such" / "q.onnx", calib=calib)
    with pytest.raises(onnxq.UsageError, match="one dict"):
        onnxq.quantize(model, calib=feeds(calib)[0])
    with pytest.raises(onnxq.UsageError, match="same file"):
        onnxq.quantize(model, model, calib=calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "conv.onnx"]  # nothing written


def test_result_holds_the_model_plan_and_report(tmp_path: Path, conv: tuple[Path, Path]) -> None:
    model, calib = conv
    before = sorted(tmp_path.rglob("*"))
    in_memory = onnxq.quantize(onnx.load(str(model)), calib=calib, fast=True)
    assert sorted(tmp_path.rglob("*")) == before  # output=None writes nothing
    assert isinstance(in_memory.model, onnx.ModelProto) and isinstance(in_memory.plan, QuantPlan)
    assert {"x", "r1"} <= set(in_memory.plan.tensors)
    assert in_memory.report["fidelity"]["outputs"][0]["cosine"] > 0.99
    written = onnxq.quantize(model, tmp_path / "q.onnx", calib=calib, fast=True, eval_data=calib)
    assert written.output == tmp_path / "q.onnx" and written.report["output"] == str(tmp_path / "q.onnx")
    assert onnx.load(str(tmp_path / "q.onnx")) == written.model
    gated = onnxq.quantize(model, tmp_path / "gated.onnx", calib=calib, fast=True, min_cosine=1.0)
    assert not gated.gates_passed and (tmp_path / "gated.onnx").exists()  # as the CLI: exit 6, model kept
    gated.save(tmp_path / "copy.onnx")
    assert onnx.load(str(tmp_path / "copy.onnx")) == gated.model
    info = onnxq.inspect(onnx.load(str(model)))
    assert info["model"] == "<onnx.ModelProto>" and info["nodes"] == onnxq.inspect(model)["nodes"]


def test_an_iterable_is_read_once_and_its_samples_go_afterwards(tmp_path: Path, conv: tuple[Path, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, calib = conv
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    pulled = {"calib": 0, "eval": 0}

    def stream(which: str, samples: list[dict]):
        for sample in samples:
            pulled[which] += 1
            yield sample

    samples = feeds(calib)
    result = onnxq.quantize(model, calib=stream("calib", samples[:8]), eval_data=stream("eval", samples[8:]),
                            fast=True, method="percentile", max_samples=6, bias_correction=True)
    assert pulled == {"calib": 8, "eval": 4}  # one pass each, though calibration and recovery read twice
    assert result.report["data"]["calibration"]["samples"] == 6
    assert result.report["fidelity"]["samples"] == 4
    assert list(scratch.iterdir()) == []  # the kept samples and the scratch model are gone
    (tmp_path / "loader.py").write_text("import numpy as np\ndef frames():\n    for i in range(5):\n"
                                        "        yield {'x': np.full((1, 3, 16, 16), i, np.float32)}\n")
    scripted = onnxq.quantize(model, data_loader_script=f"{tmp_path / 'loader.py'}:frames", fast=True)
    assert scripted.report["data"]["calibration"]["source"] == f"data loader {tmp_path / 'loader.py'}:frames [first 4]"
    assert list(scratch.iterdir()) == []
    generator = stream("calib", samples)
    onnxq.quantize(model, calib=generator, fast=True)
    with pytest.raises(onnxq.DataError, match="yielded no samples"):  # a generator cannot be read twice
        onnxq.quantize(model, calib=generator, fast=True)


def test_import_is_light_and_the_api_names_win_over_modules() -> None:
    code = ("import sys, onnxq; assert 'numpy' not in sys.modules; "
            "import onnxq.runtime.calibrate, onnxq.commands.convert; "
            "assert callable(onnxq.calibrate) and onnxq.convert.__module__ == 'onnxq.api'; "
            "from onnxq.runtime.calibrate import collect_statistics; print(sorted(onnxq.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("quantize", "calibrate", "convert", "inspect", "Result", "UsageError"):
        assert name in done.stdout
        assert getattr(onnxq, name).__doc__
