"""Calibration data in its four forms, batching, --max-samples, --allow-random, held-back split."""

from __future__ import annotations

import json
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
from onnx import helper, numpy_helper
from PIL import Image

from onnxq.cli import main
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, calibrate_only, quantize
from onnxq.errors import UsageError
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import ImagePreprocessing, batches, model_input_specs, open_source, split_holdout


def cli(*args, fast: bool = True) -> dict:
    """Run `onnxq quantize ... --json -q` (plain single pass unless `fast` is False) and return the report."""
    result = CliRunner().invoke(main, ["quantize", *map(str, args), "--json", "-q", *(["--fast"] if fast else [])])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def all_samples(source) -> list[dict[str, np.ndarray]]:
    return [source.sample(i) for i in range(len(source))]


def two_input_feed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"image": image_batch(rng), "offset": rng.standard_normal((1, CHANNELS, 1, 1)).astype(np.float32)}


# ---------------------------------------------------------------- (a) folder of .npz feeds


def test_npz_folder_in_natural_order(tmp_path: Path) -> None:
    model = two_input_model()
    rng = np.random.default_rng(0)
    feeds = {i: two_input_feed(rng) for i in (1, 2, 10)}
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, feed in feeds.items():
        np.savez(folder / f"s{i}.npz", **feed)
    (folder / ".hidden.npz").write_bytes(b"not a zip")  # dot files are ignored
    source = open_source(folder, model_input_specs(model))
    assert len(source) == 3 and source.kind == "npz-folder"
    for got, i in zip(all_samples(source), (1, 2, 10), strict=True):  # s2 before s10
        assert set(got) == {"image", "offset"}
        for name in got:
            np.testing.assert_array_equal(got[name], feeds[i][name])


def test_npz_folder_quantizes_two_input_model(tmp_path: Path) -> None:
    model_path = save(two_input_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", two_input_feed, 10)
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib)
    assert report["data"]["calibration"]["kind"] == "npz-folder"
    assert report["data"]["calibration"]["samples"] == 9
    assert report["fidelity"]["outputs"][0]["cosine"] >= 0.98


def test_npy_folder_for_single_input(tmp_path: Path) -> None:
    model = conv_relu_model()
    folder = tmp_path / "npy"
    folder.mkdir()
    rng = np.random.default_rng(1)
    arrays = [image_batch(rng) for _ in range(3)]
    for i, array in enumerate(arrays):
        np.save(folder / f"{i}.npy", array)
    source = open_source(folder, model_input_specs(model))
    assert source.kind == "npy-folder"
    for got, expected in zip(all_samples(source), arrays, strict=True):
        np.testing.assert_array_equal(got["x"], expected)


# ---------------------------------------------------------------- (b) one stacked .npz / .npy


def test_stacked_npz_splits_along_axis_0(tmp_path: Path) -> None:
    model_path = save(two_input_model(), tmp_path / "m.onnx")
    rng = np.random.default_rng(2)
    images = rng.standard_normal((10, 3, 16, 16)).astype(np.float32)
    offsets = rng.standard_normal((10, CHANNELS, 1, 1)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", image=images, offset=offsets)
    source = open_source(tmp_path / "stacked.npz", model_input_specs(onnx.load(str(model_path))))
    assert source.kind == "stacked" and len(source) == 10
    sample = source.sample(4)
    np.testing.assert_array_equal(sample["image"], images[4:5])
    np.testing.assert_array_equal(sample["offset"], offsets[4:5])
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "stacked.npz")
    assert report["data"]["calibration"]["kind"] == "stacked"
    assert (report["data"]["calibration"]["samples"], report["data"]["evaluation"]["samples"]) == (9, 1)


def test_stacked_npy(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    stacked = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "stacked.npy", stacked)
    source = open_source(tmp_path / "stacked.npy", model_input_specs(onnx.load(str(model_path))))
    assert len(source) == 8
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in all_samples(source)]), stacked)
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "stacked.npy",
                 "--save-stats", tmp_path / "s.npz")
    assert report["data"]["calibration"]["samples"] == 7
    stats = Statistics.load(tmp_path / "s.npz")
    assert stats.tensors["x"].min == float(stacked[:7].min()) and stats.tensors["x"].max == float(stacked[:7].max())


# ---------------------------------------------------------------- (c) folder of images


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 4, mode: str = "RGB") -> list[np.ndarray]:
    """PNG files 0.png ... with random pixels; returns the pixel arrays (H, W, C) as written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = []
    for i in range(count):
        array = rng.integers(0, 256, (height, width, 3 if mode == "RGB" else 1), dtype=np.uint8)
        Image.fromarray(array if mode == "RGB" else array[:, :, 0], mode).save(folder / f"{i}.png")
        pixels.append(array)
    return pixels


MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255


def expected_tensor(pixels: np.ndarray, bgr: bool, nchw: bool) -> np.ndarray:
    """The preprocessing the README states, in numpy: ((pixel * scale) - mean) / std per channel."""
    values = pixels.astype(np.float32)
    if bgr:
        values = values[:, :, ::-1]
    values = (values * np.float32(SCALE) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    if nchw:
        values = values.transpose(2, 0, 1)
    return values[None]


def nhwc_model(height: int = 12, width: int = 20) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="to_nchw"),
             helper.make_node("Conv", ["t", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    return make_model(nodes, [tensor("x", [1, height, width, 3])], [tensor("y", [1, CHANNELS, height, width])],
                      {"w": weight(rng, (CHANNELS, 3, 3, 3))})


@pytest.mark.parametrize("bgr", [False, True])
def test_image_tensor_matches_numpy(tmp_path: Path, bgr: bool) -> None:
    pixels = write_images(tmp_path / "imgs", 2, (16, 16))
    prep = ImagePreprocessing(size=(16, 16), layout="NCHW", scale=SCALE, mean=MEAN, std=STD,
                              channel_order="BGR" if bgr else "RGB")
    source = open_source(tmp_path / "imgs", model_input_specs(conv_relu_model()), prep)
    assert source.kind == "images" and len(source) == 2
    got = source.sample(1)["x"]
    assert got.dtype == np.float32 and got.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(got, expected_tensor(pixels[1], bgr=bgr, nchw=True), rtol=1e-6, atol=1e-6)


def test_image_nhwc_layout_and_resize(tmp_path: Path) -> None:
    # non-square on purpose: --image-size is WIDTHxHEIGHT, so a swap would give the wrong shape
    pixels = write_images(tmp_path / "imgs", 1, (40, 24))
    prep = ImagePreprocessing(size=(20, 12), layout="NHWC", scale=SCALE, mean=MEAN, std=STD, channel_order="BGR")
    got = open_source(tmp_path / "imgs", model_input_specs(nhwc_model()), prep).sample(0)["x"]
    assert got.shape == (1, 12, 20, 3)
    resized = np.asarray(Image.fromarray(pixels[0]).resize((20, 12), Image.BILINEAR))
    np.testing.assert_allclose(got, expected_tensor(resized, bgr=True, nchw=False), rtol=1e-6, atol=1e-6)
    # the layout is read from the model's input shape when not given
    auto = ImagePreprocessing(size=(20, 12), mean=MEAN, std=STD, channel_order="BGR")
    np.testing.assert_array_equal(open_source(tmp_path / "imgs", model_input_specs(nhwc_model()), auto).sample(0)["x"],
                                  got)


def test_grayscale_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [tensor("x", [1, 1, 8, 8])],
                       [tensor("y", [1, CHANNELS, 6, 6])], {"w": weight(rng, (CHANNELS, 1, 3, 3))})
    pixels = write_images(tmp_path / "imgs", 1, (8, 8), mode="L")
    got = open_source(tmp_path / "imgs", model_input_specs(model), ImagePreprocessing(mean=(0.5,), std=(0.25,)))
    expected = ((pixels[0].astype(np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.25))
    np.testing.assert_allclose(got.sample(0)["x"], expected.transpose(2, 0, 1)[None], rtol=1e-6, atol=1e-6)


def test_image_folder_through_cli(tmp_path: Path) -> None:
    model_path = save(nhwc_model(), tmp_path / "m.onnx")
    pixels = write_images(tmp_path / "imgs", 10, (30, 18))
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "imgs", "--image-size", "20x12",
                 "--layout", "NHWC", "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
                 "--channel-order", "BGR", "--save-stats", tmp_path / "s.npz")
    calib = report["data"]["calibration"]
    assert calib["kind"] == "images" and calib["samples"] == 9
    prep = calib["preprocessing"]
    assert prep["size"] == [20, 12] and prep["layout"] == "NHWC" and prep["channel_order"] == "BGR"
    assert prep["mean"] == list(MEAN) and prep["std"] == list(STD)
    # the input statistics are exactly those of our own preprocessing of the first 9 images
    expected = np.concatenate([
        expected_tensor(np.asarray(Image.fromarray(p).resize((20, 12), Image.BILINEAR)), bgr=True, nchw=False)
        for p in pixels[:9]])
    stats = Statistics.load(tmp_path / "s.npz").tensors["x"]
    assert stats.count == expected.size
    assert stats.min == pytest.approx(float(expected.min()), abs=1e-5)
    assert stats.max == pytest.approx(float(expected.max()), abs=1e-5)
    assert report["fidelity"]["outputs"][0]["cosine"] >= 0.98


def test_image_options_that_do_not_fit(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    write_images(tmp_path / "imgs", 3, (16, 16))
    for extra, code, words in ((["--mean", "0.5,0.5"], 2, "--mean"), (["--std", "1,2,3,4"], 2, "--std"),
                               (["--std", "0"], 2, "--std"), (["--image-size", "16"], 2, "--image-size"),
                               (["--image-size", "8x8"], 4, "[1, 3, 16, 16]")):
        result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--calib",
                                           str(tmp_path / "imgs"), *extra])
        assert result.exit_code == code, (extra, result.stderr)
        assert result.stderr.startswith("onnxq: error:") and words in result.stderr, result.stderr
        assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- (d) ONNX test-data layout


def write_test_sets(root: Path, feeds: list[dict[str, np.ndarray]], named: bool) -> Path:
    for i, feed in enumerate(feeds):
        folder = root / f"test_data_set_{i}"
        folder.mkdir(parents=True)
        for position, (name, array) in enumerate(feed.items()):
            (folder / f"input_{position}.pb").write_bytes(
                numpy_helper.from_array(array, name if named else "").SerializeToString())
    return root


@pytest.mark.parametrize("named", [True, False])
def test_onnx_test_data_sets(tmp_path: Path, named: bool) -> None:
    rng = np.random.default_rng(7)
    feeds = [two_input_feed(rng) for _ in range(11)]
    root = write_test_sets(tmp_path / "data", feeds, named)
    model_path = save(two_input_model(), tmp_path / "m.onnx")
    source = open_source(root, model_input_specs(onnx.load(str(model_path))))
    assert source.kind == "onnx-test-data" and len(source) == 11
    got = source.sample(10)  # test_data_set_10 sorts after test_data_set_9
    for name in ("image", "offset"):  # unnamed tensors are matched to the inputs by position
        np.testing.assert_array_equal(got[name], feeds[10][name])
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", root)
    assert (report["data"]["calibration"]["samples"], report["data"]["evaluation"]["samples"]) == (10, 1)


# ---------------------------------------------------------------- batching, max samples, random, held back


def test_batches_stack_same_shaped_samples(tmp_path: Path) -> None:
    shapes = [(16, 16)] * 5 + [(12, 20)] * 2 + [(16, 16)]
    rng = np.random.default_rng(8)
    folder = tmp_path / "calib"
    folder.mkdir()
    arrays = [image_batch(rng, (1, 3, *s)) for s in shapes]
    for i, array in enumerate(arrays):
        np.savez(folder / f"{i}.npz", x=array)
    source = open_source(folder, model_input_specs(dynamic_model()))
    got = list(batches(source, 3))
    assert [(feed["x"].shape[0], count) for feed, count in got] == [(3, 3), (2, 2), (2, 2), (1, 1)]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f, _ in got[:2]]), np.concatenate(arrays[:5]))
    assert [c for _, c in batches(source, 3, limit=4)] == [3, 1]


def test_batch_size_through_cli(tmp_path: Path) -> None:
    model_path = save(dynamic_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 10)
    for batch_size, expected_batches in ((1, 9), (4, 3)):
        stats_path = tmp_path / f"s{batch_size}.npz"
        report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--batch-size", batch_size,
                     "--save-stats", stats_path)
        assert report["data"]["batch_size"] == batch_size
        stats = Statistics.load(stats_path).tensors["x"]
        assert stats.batches == expected_batches
        assert stats.count == 9 * 3 * 16 * 16
        assert report["fidelity"]["outputs"][0]["cosine"] >= 0.98
    one, four = Statistics.load(tmp_path / "s1.npz").tensors, Statistics.load(tmp_path / "s4.npz").tensors
    np.testing.assert_array_equal(one["y"].counts, four["y"].counts)  # batching changes nothing but the batches


def test_batch_size_above_a_static_batch_is_a_usage_error(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")  # batch dimension fixed at 1
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    with pytest.raises(UsageError, match=r"--batch-size 2.*input x"):
        quantize(QuantizeRequest(model=model_path, output=tmp_path / "q.onnx",
                                 data=DataOptions(calib=calib, batch_size=2)))
    with pytest.raises(UsageError, match="--batch-size"):
        calibrate_only(model_path, tmp_path / "s.npz", DataOptions(calib=calib, batch_size=2))
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "s.npz").exists()


def test_max_samples(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 10)
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--max-samples", 4,
                 "--save-stats", tmp_path / "s.npz")
    assert report["data"]["calibration"]["samples"] == 4
    assert report["data"]["evaluation"]["samples"] == 1  # held back from all 10, not from the 4
    stats = Statistics.load(tmp_path / "s.npz")
    assert stats.samples == 4 and stats.tensors["x"].count == 4 * 3 * 16 * 16
    first4 = np.concatenate([np.load(p)["x"] for p in sorted(calib.iterdir())[:4]])
    assert stats.tensors["x"].max == float(first4.max())
    # the same through `onnxq calibrate`
    result = CliRunner().invoke(main, ["calibrate", str(model_path), "--calib", str(calib), "--max-samples", "3",
                                       "-o", str(tmp_path / "c.npz"), "-q"])
    assert result.exit_code == 0, result.stderr
    assert Statistics.load(tmp_path / "c.npz").samples == 3


def test_allow_random_is_stated_in_the_report(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--allow-random")
    assert report["data"]["calibration"]["kind"] == "random"
    assert any("RANDOM" in note for note in report["notes"])
    result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(tmp_path / "q2.onnx"),
                                       "--allow-random"])
    assert result.exit_code == 0 and "RANDOM" in result.stderr  # the summary repeats the note
    # with real data the note is absent
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 4)
    assert not any("RANDOM" in n for n in cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib)["notes"])


def test_held_back_split(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 20)
    # make the last two samples (the held-back 10%) stand out: calibration must not see them
    for path in sorted(calib.iterdir())[-2:]:
        np.savez(path, x=np.load(path)["x"] + np.float32(50.0))
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--save-stats", tmp_path / "s.npz")
    assert report["data"]["calibration"]["samples"] == 18
    assert report["data"]["evaluation"]["samples"] == 2 and "held back" in report["data"]["evaluation"]["source"]
    assert report["fidelity"]["samples"] == 2
    assert Statistics.load(tmp_path / "s.npz").tensors["x"].max < 10.0
    # with --eval-data nothing is held back
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--eval-data", calib)
    assert report["data"]["calibration"]["samples"] == 20 and report["data"]["evaluation"]["samples"] == 20


@pytest.mark.auto_search
def test_automatic_search_holds_back_a_quarter_and_never_chooses_on_eval_data(tmp_path: Path) -> None:
    model_path = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 20)
    for path in sorted(calib.iterdir())[-5:]:  # the held-back quarter stands out: calibration must not see it
        np.savez(path, x=np.load(path)["x"] + np.float32(50.0))
    report = cli(model_path, "-o", tmp_path / "q.onnx", "--calib", calib, "--save-stats", tmp_path / "s.npz",
                 fast=False)
    assert report["data"]["calibration"]["samples"] == 15 and report["fidelity"]["samples"] == 5
    assert report["auto"]["candidates"] and Statistics.load(tmp_path / "s.npz").tensors["x"].max < 10.0
    assert any("the automatic search chose by" in note for note in report["notes"])
    # --eval-data is for the report only: the search still measures on the held-back quarter of --calib
    evaluation = write_npz_folder(tmp_path / "eval", lambda rng: {"x": image_batch(rng)}, 7, seed=9)
    report = cli(model_path, "-o", tmp_path / "q2.onnx", "--calib", calib, "--eval-data", evaluation, fast=False)
    assert report["data"]["calibration"]["samples"] == 15 and report["fidelity"]["samples"] == 7


def test_split_holdout_limits() -> None:
    from onnxq.runtime.data import SampleSource

    def source(n: int) -> SampleSource:
        return SampleSource("s", n, lambda i: {"x": np.full((1,), i, np.float32)}, "test")

    calib, back = split_holdout(source(1))
    assert len(calib) == 1 and back is None
    for n, held in ((2, 1), (10, 1), (19, 1), (20, 2), (1000, 32)):
        calib, back = split_holdout(source(n))
        assert (len(calib), len(back)) == (n - held, held)
        assert back.sample(0)["x"][0] == n - held  # the last samples in order
