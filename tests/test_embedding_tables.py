"""Embedding tables in static and dynamic mode: 8-bit GatherBlockQuantized (onnxq.commands.weight_only's
int8_embedding_tables), what keeps one float, and that onnxruntime's kernel reads the codes as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from transformer_models import make_transformer, token_feeds, write_feeds

from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.commands.recipe import Recipe, Rule, Selector
from onnxq.commands.weight_only import _symmetric_rows
from onnxq.quant import weight_rounding as wr


def _setup(tmp_path: Path, model: onnx.ModelProto) -> Path:
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    write_feeds(tmp_path / "calib", token_feeds(16, vocab=96, seed=1))
    write_feeds(tmp_path / "eval", token_feeds(6, vocab=96, seed=2))
    return src


def _quantize(tmp_path: Path, src: Path, name: str, **extra) -> tuple[onnx.ModelProto, dict]:
    out = tmp_path / f"{name}.onnx"
    result = quantize(QuantizeRequest(model=src, output=out,
                                      data=DataOptions(calib=tmp_path / "calib", eval_data=tmp_path / "eval"), **extra))
    return onnx.load(out), result.report


def _gbq(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in model.graph.node if n.op_type == "GatherBlockQuantized"}


def _float_tables(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if t.name in ("tok_table", "pos_table")]


def _with_float_gathers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with each GatherBlockQuantized as a float Gather of its table decoded in numpy
    ((code - 128) * scale per block): what the kernel must compute."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
    for node in copy.graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        block = next(a.i for a in node.attribute if a.name == "block_size")
        codes, scales = inits[node.input[0]], inits[node.input[2]]
        rows, width = codes.shape
        table = ((codes.reshape(rows, -1, block).astype(np.float32) - 128) * scales[..., None]).reshape(rows, width)
        name = node.input[0] + "_decoded"
        copy.graph.initializer.append(numpy_helper.from_array(table.astype(np.float32), name))
        indices = node.input[1]
        node.CopyFrom(helper.make_node("Gather", [name, indices], list(node.output), name=node.name))
    return copy


def _run(model: onnx.ModelProto, feeds: list[dict]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_tables_become_8_bit_and_the_kernel_reads_them_as_written(tmp_path: Path, mode: str) -> None:
    model = make_transformer(vocab=256, dim=64)
    src = _setup(tmp_path, model)
    written, report = _quantize(tmp_path, src, mode, mode=mode)
    gathers = _gbq(written)
    assert sorted(gathers) == ["pos", "tok"] and not _float_tables(written)
    for node in gathers.values():
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == 8 and attrs["block_size"] == 32 and len(node.input) == 3  # symmetric: no zeros
    assert report["nodes"]["by_op_type"]["Gather"].get("int8") == 2
    assert written.ByteSize() < model.ByteSize() / 3
    feeds = token_feeds(4, vocab=256, seed=7)
    for want, have in zip(_run(_with_float_gathers(written), feeds), _run(written, feeds), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    fp32 = _run(model, feeds)
    quantized = _run(written, feeds)
    cosine = min(float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(fp32, quantized,
                                                                                               strict=True))
    assert cosine > 0.98


def test_exclude_and_recipe_keep_a_table_float(tmp_path: Path) -> None:
    src = _setup(tmp_path, make_transformer(vocab=256))
    every, _ = _quantize(tmp_path, src, "gather", exclude=("Gather",))
    assert not _gbq(every) and sorted(_float_tables(every)) == ["pos_table", "tok_table"]
    one, report = _quantize(tmp_path, src, "pos", exclude=("/pos/Gather",))
    assert sorted(_gbq(one)) == ["tok"] and _float_tables(one) == ["pos_table"]
    assert report["nodes"]["by_op_type"]["Gather"].get("int8") == 1
    rule = Recipe(rules=[Rule(Selector(op_type=("Gather",)), precision="float")])
    for mode in ("static", "dynamic"):
        recipe_float, _ = _quantize(tmp_path, src, f"recipe-{mode}", mode=mode, recipe=rule)
        assert not _gbq(recipe_float), mode


def test_a_table_two_nodes_read_stays_float(tmp_path: Path) -> None:
    model = make_transformer(vocab=256)
    last = np.array(255, np.int64)
    model.graph.initializer.append(numpy_helper.from_array(last, "last_id"))
    model.graph.node.extend([helper.make_node("Sub", ["last_id", "input_ids"], ["reversed_ids"], name="reverse"),
                             helper.make_node("Gather", ["tok_table", "reversed_ids"], ["tok2"], name="second")])
    model.graph.output.append(helper.make_tensor_value_info("tok2", onnx.TensorProto.FLOAT, [1, "seq", 64]))
    onnx.checker.check_model(model)
    src = _setup(tmp_path, model)
    written, report = _quantize(tmp_path, src, "shared", mode="dynamic")
    assert sorted(_gbq(written)) == ["pos"] and "tok_table" in _float_tables(written)
    reasons = {n["name"]: n["reason"] for n in report["float_nodes"]}
    assert reasons["/tok/Gather"] == reasons["second"] == "its table is also read by another node"


def test_rows_match_the_block_rounding_of_the_int4_path() -> None:
    rng = np.random.default_rng(3)
    table = (rng.standard_normal((300, 96)) * rng.exponential(1.0, (300, 1))).astype(np.float32)
    table[5] = 0.0  # an all-zero row: scale 1, codes 128
    codes, scales = _symmetric_rows(table, 32)
    reference = wr.rtn(np.ascontiguousarray(table.T), wr.BlockFormat(8, 32, True))
    np.testing.assert_array_equal(scales, reference.scales)
    differ = codes.astype(int) - reference.codes.reshape(300, 96)
    assert np.abs(differ).max() <= 1 and np.count_nonzero(differ) <= 3  # float32 vs float64 at exact halves
    decoded = (codes.reshape(300, 3, 32).astype(np.float32) - 128) * scales[..., None]
    step = np.abs(scales)[..., None]
    assert np.all(np.abs(decoded - table.reshape(300, 3, 32)) <= step * 1.0001)
    assert np.all(codes[5] == 128)
