"""Bad input is refused with a line a person can act on; no internal error on odd but valid input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    cli_in,
    image_batch,
    make_model,
    quantize_simple,
    save,
    tensor,
    weight,
    write_npz_folder,
)
from onnx import helper

from onnxq.commands.dynamic import WeightOnlyOptions
from onnxq.commands.report import format_summary
from onnxq.errors import EXIT_BAD_DATA, EXIT_BAD_MODEL, EXIT_USAGE, DataError, ModelError, first_line
from onnxq.model_io import size_change
from onnxq.quant.statistics import Statistics

cli = cli_in


def one_error_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.startswith("onnxq: error: "), stderr
    return stderr


# ---------------------------------------------------------------- no internal errors


def test_infinite_sqnr_summaries() -> None:
    """Reports write inf as the string "inf" (JSON has none); the text summaries used to format it as a float."""
    fidelity = {"samples": 3, "source": "calib", "outputs": [{"name": "y", "cosine": 1.0, "worst_sample_cosine": 1.0,
                                                             "sqnr_db": "inf", "top1_agreement": None}]}
    settings = {"method": "global", "percentile": 99.99, "symmetric": False, "per_channel": True,
                "weight_range": "full", "weight_range_reason": "set by --weight-range", "format": "qdq"}
    nodes = {"total": 1, "quantized": 1, "float": 0, "by_status": {"int8": 1}, "by_op_type": {"Conv": {"int8": 1}}}
    core = {"model": "a", "output": "b", "settings": settings, "fidelity": fidelity, "nodes": nodes, "float_nodes": [],
            "size": {"input_bytes": 2000, "output_bytes": 1000, "ratio": 2.0},
            "fusion": {"int8_kernels": {}, "avoidable": 0}}
    prep = {**core, "command": "qat-prep", "params": "p.json", "fake_quant": {"activations": 2, "weights": 2}}
    assert "SQNR inf dB" in format_summary(prep)
    origins = {"learned": [], "shared_learned": [], "calibrated": [], "computed": []}
    converted = {**core, "command": "convert", "settings": {**settings, "activations": "uint8"}, "converted_types": [],
                 "dropped": [], "tensor_origins": origins}
    assert "SQNR inf dB" in format_summary(converted)


def edit_stats(source: Path, target: Path, edit) -> Path:
    with np.load(source) as data:
        header = json.loads(bytes(data["header"]).decode())
        counts = np.array(data["counts"])
    counts = edit(header, counts) if edit(header, counts) is not None else counts
    np.savez(target, header=np.frombuffer(json.dumps(header).encode(), np.uint8), counts=counts)
    return target


def _entry(key, value):
    def edit(header, _counts):
        header["tensors"][0][key] = value
    return edit


def _negative_bin(_header, counts):
    counts[0, 10] = -4
    return counts


@pytest.mark.parametrize(("edit", "words"), [
    (_entry("width_exp", 10**9), "width_exp"), (_entry("width_exp", -(10**6)), "width_exp"),
    (_entry("width_exp", 1.5), "not an integer"), (_entry("min", 9.0), "is not <= max"),
    (_entry("min", float("nan")), "not a finite number"), (_entry("max", float("inf")), "not a finite number"),
    (_entry("count", -1), "not a count"), (_entry("zeros", 10**12), "zeros among"),
    (_entry("batches", "2"), "not a count"), (_negative_bin, "negative"), (_entry("count", 3), "histogram holds"),
])
def test_hand_edited_statistics_are_refused(ws: Path, edit, words: str) -> None:
    assert cli(ws, "calibrate", "m.onnx", "--calib", "calib", "-o", "s.npz", "-q")[0] == 0
    edited = edit_stats(ws / "s.npz", ws / "e.npz", edit)
    with pytest.raises(DataError, match="corrupt or hand-edited") as caught:
        Statistics.load(edited)
    assert words in str(caught.value)
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--load-stats", "e.npz")
    assert code == EXIT_BAD_DATA and words in one_error_line(stderr)
    assert os.listdir(ws / "out") == []


# ---------------------------------------------------------------- bad input refused


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only", "weight-only 4"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_in_every_mode(tmp_path: Path, mode: str, poison: float) -> None:
    rng = np.random.default_rng(0)
    w = weight(rng, (64, 32), fan_in=64)
    w[3, 4] = poison
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", [1, 4, 64])],
                       [tensor("y", [1, 4, 32])], {"w": w})
    path = save(model, tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda r: {"x": r.standard_normal((1, 4, 64)).astype(np.float32)}, 3)
    extra = {"weight-only 4": {"mode": "weight-only", "weight_only": WeightOnlyOptions(bits=4)}}.get(mode,
                                                                                                  {"mode": mode})
    with pytest.raises(ModelError, match=r"weight w of MatMul mm holds 1 NaN or Inf"):
        quantize_simple(path, tmp_path / "q.onnx", calib, **extra)
    assert not (tmp_path / "q.onnx").exists()


def test_mixed_sample_files_are_refused_and_other_files_named(ws: Path) -> None:
    (ws / "mix").mkdir()
    np.savez(ws / "mix" / "0.npz", x=image_batch(np.random.default_rng(0)))
    np.save(ws / "mix" / "1.npy", image_batch(np.random.default_rng(1)))
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", "mix")
    assert code == EXIT_BAD_DATA and "1 .npz files (0.npz, ...) and 1 .npy files" in one_error_line(stderr)
    (ws / "calib" / "labels.txt").write_text("a label file\n")
    code, stdout, _ = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", "calib", "--json", "-q")
    assert code == 0
    assert any("1 other files ignored (labels.txt)" in note for note in json.loads(stdout)["notes"])


@pytest.mark.parametrize("args", [
    ["--calib", "calib", "--weight-bits", "4"], ["--calib", "calib", "--block-size", "64"],
    ["--calib", "calib", "--weight-zero-points"], ["--calib", "calib", "--percentile", "99.9"],
    ["--mode", "dynamic", "--method", "mse"], ["--mode", "dynamic", "--symmetric"],
    ["--mode", "weight-only", "--block-size", "64"], ["--mode", "weight-only", "--weight-range", "reduced"],
    ["--mode", "dynamic", "--calib", "calib", "--target-cosine", "0.9"], ["--calib", "calib", "--fallback", "int16"],
    ["--calib", "calib", "--max-fallbacks", "2"], ["--calib", "calib", "--adaround-seconds", "3"],
    ["--calib", "calib", "--smooth-mul"], ["--calib", "calib", "--no-speed-guard", "--speed-profile", "p.json"],
    ["--mode", "dynamic", "--max-samples", "3"], ["--mode", "dynamic", "--allow-random"],
    ["--mode", "weight-only", "--target-cpu", "m.onnx"],
])
def test_options_that_would_do_nothing_are_refused(ws: Path, args: list[str]) -> None:
    model = "mm.onnx" if "--mode" in args else "m.onnx"
    code, _, stderr = cli(ws, "quantize", model, "-o", "out/q.onnx", *args)
    line = one_error_line(stderr)
    assert code == EXIT_USAGE and ("does nothing" in line or "applies" in line), stderr
    assert os.listdir(ws / "out") == []


@pytest.mark.parametrize(("option", "value"), [("--target-cosine", "nan"), ("--target-cosine", "2"),
                                               ("--target-cosine", "-1.5"), ("--target-sqnr", "inf"),
                                               ("--min-cosine", "nan"), ("--min-cosine", "3"),
                                               ("--min-sqnr", "-inf"), ("--mean", "nan"), ("--scale", "inf")])
def test_numbers_out_of_range_are_usage_errors(ws: Path, option: str, value: str) -> None:
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", "calib", option, value)
    assert code == EXIT_USAGE and option in one_error_line(stderr)


def test_exclude_that_matches_nothing_gets_a_note(ws: Path) -> None:
    for mode in (["--calib", "calib"], ["--mode", "dynamic"]):
        model = "m.onnx" if mode[0] == "--calib" else "mm.onnx"
        code, stdout, _ = cli(ws, "quantize", model, "-o", "out/q.onnx", *mode, "--exclude", "conv9", "--json", "-q")
        assert code == 0
        assert "--exclude conv9 matches no node name or op type in the model (after preparation); nothing excluded " \
               "by it" in json.loads(stdout)["notes"]


def test_already_quantized_qdq_model_points_to_convert(ws: Path) -> None:
    assert cli(ws, "qat-prep", "m.onnx", "-o", "fq.onnx", "--calib", "calib", "-q")[0] == 0
    for args in (["--calib", "calib"], ["--mode", "dynamic"], ["--mode", "weight-only"]):
        code, _, stderr = cli(ws, "quantize", "fq.onnx", "-o", "out/q.onnx", *args)
        assert code == EXIT_BAD_MODEL and "onnxq convert fq.onnx" in one_error_line(stderr)
    assert os.listdir(ws / "out") == []


# ---------------------------------------------------------------- messages a person can act on


def test_data_read_errors_say_what_is_wrong(ws: Path) -> None:
    (ws / "pk").mkdir()
    np.save(ws / "pk" / "0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (ws / "bad").mkdir()
    (ws / "bad" / "0.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.savez(ws / "scalar.npz", x=np.float32(1.0))
    for data, words in (("pk", "pickled"), ("bad", "not a valid .npz (zip) file"), ("scalar.npz", "single number")):
        code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", data)
        assert code == EXIT_BAD_DATA and words in one_error_line(stderr), stderr
        assert not one_error_line(stderr).rstrip().endswith(("Error", "BadZipFile"))


def test_newline_in_a_path_stays_on_one_line(ws: Path) -> None:
    code, _, stderr = cli(ws, "quantize", "m.onnx", "-o", "out/q.onnx", "--calib", "no\nsuch")
    assert code == EXIT_BAD_DATA and "no\\nsuch" in one_error_line(stderr)


def test_checker_messages_are_not_cut() -> None:
    message = ("Nodes in a graph must be topologically sorted, however input 'r1' of node: \nname: conv2 OpType: Conv"
               "\n is not output of any previous nodes.")
    joined = first_line(ValueError(message))
    assert joined.endswith("is not output of any previous nodes.") and "\n" not in joined
    assert first_line(KeyError("x")) == "KeyError: 'x'"


def test_size_change_words() -> None:
    assert size_change(1000, 250) == "4x smaller"
    assert size_change(843, 1000) == "1.19x larger"
