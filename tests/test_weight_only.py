"""Weight-only int4: the roundings against numpy references, the layer statistics, and whole models
(MatMulNBits, GatherBlockQuantized, tied embeddings, int4/int8 by sensitivity) on generated transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from transformer_models import make_transformer, token_feeds, write_feeds

from onnxq.commands.dynamic import WeightOnlyOptions
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, quantize
from onnxq.commands.recipe import Recipe, Rule, Selector
from onnxq.quant import weight_rounding as wr
from onnxq.runtime.data import model_input_specs, open_source
from onnxq.runtime.weight_stats import collect_input_stats, token_rows
from onnxq.search.sensitivity import Target

ONNXQ = [sys.executable, "-m", "onnxq"]


def correlated_inputs(rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.2 + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix * np.exp(0.5 * rng.standard_normal(k))
    x[:, 3] *= 8.0  # an outlier channel
    return x


def gptq_reference(weight: np.ndarray, hessian: np.ndarray, fmt: wr.BlockFormat) -> np.ndarray:
    """Textbook GPTQ, one column at a time with full updates (no lazy batches): the dequantized [K, N]."""
    k, _n = weight.shape
    w = weight.T.astype(np.float64).copy()
    h = hessian + wr.GPTQ_DAMP * np.mean(np.diag(hessian)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.zeros_like(w)
    for j in range(k):
        if j % fmt.block_size == 0:
            stop = j + fmt.block_size
            scale, zero = wr.best_range(w[:, j:stop], h[j:stop, j:stop], fmt)
        q = np.clip(np.round(w[:, j] / scale.astype(np.float32)) + zero, 0, fmt.qmax)
        out[:, j] = (q - zero) * scale.astype(np.float32)
        err = (w[:, j] - out[:, j]) / upper[j, j]
        w[:, j + 1 :] -= np.outer(err, upper[j, j + 1 :])
    return out.T


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_matches_the_column_by_column_reference(symmetric: bool) -> None:
    rng = np.random.default_rng(1)
    k, n = 160, 24  # two lazy batches (128 + 32) and five blocks
    x = correlated_inputs(400, k)
    weight = rng.standard_normal((k, n)) * 0.1
    fmt = wr.BlockFormat(4, 32, symmetric)
    got = wr.gptq(weight, x.T @ x, fmt).dequantize()
    want = gptq_reference(weight, x.T @ x, fmt)
    assert np.mean(np.isclose(got, want, atol=1e-6)) > 0.99  # the same codes up to a few ties


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_and_awq_lower_the_output_error_below_round_to_nearest(symmetric: bool) -> None:
    rng = np.random.default_rng(2)
    x = correlated_inputs(1000, 128, seed=3)
    hessian = x.T @ x
    weight = rng.standard_normal((128, 64)) * 0.05
    fmt = wr.BlockFormat(4, 32, symmetric)
    rtn_error = wr.output_error(weight, wr.rtn(weight, fmt).dequantize(), hessian)
    assert wr.output_error(weight, wr.gptq(weight, hessian, fmt).dequantize(), hessian) < 0.7 * rtn_error
    assert wr.output_error(weight, wr.clip_search(weight, hessian, fmt).dequantize(), hessian) <= rtn_error
    s, _ = wr.awq_scales([weight], hessian, np.abs(x).mean(axis=0), fmt)
    scaled = wr.rtn(weight * s[:, None], fmt).dequantize() / s[:, None]
    assert wr.output_error(weight, scaled, hessian) <= rtn_error * (1 + 1e-9)


def test_gptq_with_an_identity_hessian_is_the_clipping_search() -> None:
    weight = np.random.default_rng(4).standard_normal((64, 16))
    fmt = wr.BlockFormat(4, 32, True)
    eye = np.eye(64)
    np.testing.assert_array_equal(wr.gptq(weight, eye, fmt, damp=0.0).codes, wr.clip_search(weight, eye, fmt).codes)


def test_rtn_is_round_to_nearest_with_min_max_blocks() -> None:
    weight = np.random.default_rng(5).standard_normal((40, 3)).astype(np.float32)  # K not a multiple of 32
    for symmetric in (True, False):
        quant = wr.rtn(weight, wr.BlockFormat(4, 32, symmetric))
        cols = np.zeros((64, 3))
        cols[:40] = weight
        blocks = cols.T.reshape(3, 2, 32)
        if symmetric:  # the largest magnitude becomes code 0: -8 steps of a (possibly negative) scale
            extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
            scale, zero = -extreme / 8, np.full((3, 2), 8.0)
        else:
            lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
            scale = (hi - lo) / 15
            zero = np.clip(np.round(-lo / scale), 0, 15)
        codes = np.clip(np.round(blocks / scale.astype(np.float32)[..., None]) + zero[..., None], 0, 15)
        np.testing.assert_array_equal(quant.codes, codes)
        np.testing.assert_allclose(quant.scales, scale.astype(np.float32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_never_raises_a_block_l1_error_above_round_to_nearest(symmetric: bool) -> None:
    weight = np.random.default_rng(6).standard_t(3, (96, 32)) * 0.02  # heavy tails: outliers per block
    fmt = wr.BlockFormat(4, 32, symmetric)

    def block_error(quant: wr.BlockQuant) -> np.ndarray:
        return np.abs(wr.blocks_of(weight - quant.dequantize(), 32)).sum(axis=-1)

    hqq, rtn = wr.hqq(weight, fmt), wr.rtn(weight, fmt)
    assert np.all(block_error(hqq) <= block_error(rtn) + 1e-7)  # float32 dequantization
    assert block_error(hqq).sum() < block_error(rtn).sum()
    assert hqq.float_zeros == (not symmetric)
    assert not wr.hqq(weight, fmt, integer_zeros=True).float_zeros


def test_packing_layouts() -> None:
    weight = np.random.default_rng(7).standard_normal((96, 5)).astype(np.float32)  # 3 blocks: odd count
    packed, scales, zeros = wr.pack(wr.rtn(weight, wr.BlockFormat(4, 32, False)))
    assert packed.shape == (5, 3, 16) and scales.shape == (15,) and zeros.shape == (10,)
    packed, _, zeros = wr.pack(wr.rtn(weight, wr.BlockFormat(8, 32, False)))
    assert packed.shape == (5, 3, 32) and zeros.shape == (15,)
    _, _, zeros = wr.pack(wr.hqq(weight, wr.BlockFormat(4, 32, False)))
    assert zeros.dtype == np.float32 and zeros.shape == (5, 3)


def test_layer_statistics_are_x_transpose_x_without_padding(tmp_path: Path) -> None:
    model = make_transformer(vocab=64, dim=32, layers=1, ffn=64)
    feeds = token_feeds(6, vocab=64, pad_to=24)
    folder = write_feeds(tmp_path / "feeds", feeds)
    source = open_source(folder, model_input_specs(model))
    name = "l0.ln1"  # the Q/K/V input
    stats = collect_input_stats(model, [name], source, memory_budget=1)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.concatenate([token_rows(session.run([name], f)[0], f["attention_mask"]) for f in feeds])
    assert len(rows) == sum(int(f["attention_mask"].sum()) for f in feeds) < 6 * 24
    np.testing.assert_allclose(stats[name].gram, rows.T.astype(np.float64) @ rows, rtol=1e-6)
    np.testing.assert_allclose(stats[name].mean_abs(), np.abs(rows).mean(axis=0), rtol=1e-6)


def unpack_nbits(b: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, k: int, n: int, bits: int,
                 block: int) -> np.ndarray:
    """numpy reference of MatMulNBits' weight: [K, N]."""
    count = -(-k // block)
    if bits == 8:
        codes = b.reshape(n, count, block).astype(np.float64)
    else:
        codes = np.empty((n, count, block))
        b = b.reshape(n, count, block // 2)
        codes[..., 0::2], codes[..., 1::2] = b & 0x0F, b >> 4
    if zeros is None:
        zero = np.full((n, count), float(1 << (bits - 1)))
    elif zeros.dtype == np.float32 or bits == 8:
        zero = zeros.reshape(n, count).astype(np.float64)
    else:
        z = zeros.reshape(n, -1)
        zero = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :count].astype(np.float64)
    values = (codes - zero[..., None]) * scales.reshape(n, count)[..., None]
    return values.reshape(n, -1)[:, :k].T.astype(np.float32)


def numpy_reference(model: onnx.ModelProto, quantized: onnx.ModelProto) -> onnx.ModelProto:
    """The float model with every weight replaced by what the quantized model's kernels compute with."""
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    by_output = {n.output[0]: n for n in quantized.graph.node}
    weights: dict[str, np.ndarray] = {}
    for node in quantized.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            zeros = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
            weights[node.output[0]] = unpack_nbits(inits[node.input[1]], inits[node.input[2]], zeros, attrs["K"],
                                                   attrs["N"], attrs["bits"], attrs["block_size"])
        elif node.op_type == "GatherBlockQuantized":
            attrs = {a.name: a.i for a in node.attribute}

            def value(name: str) -> np.ndarray:
                return inits[name] if name in inits else inits[by_output[name].input[0]]

            data, scales = value(node.input[0]), value(node.input[2])
            zeros = value(node.input[3]) if len(node.input) > 3 else None
            v = data.shape[0]
            dim = data.size * 8 // attrs["bits"] // v
            weights[node.output[0]] = unpack_nbits(data.reshape(-1), scales.reshape(-1),
                                                   zeros.reshape(-1) if zeros is not None else None, dim, v,
                                                   attrs["bits"], attrs["block_size"]).T
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for node in reference.graph.node:
        if node.output[0] in weights:
            index = 0 if node.op_type == "Gather" else 1
            for init in reference.graph.initializer:
                if init.name == node.input[index]:
                    init.CopyFrom(numpy_helper.from_array(weights[node.output[0]], init.name))
    return reference


def run(model: onnx.ModelProto | Path, feeds: list[dict]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def quantize_int4(tmp_path: Path, model: onnx.ModelProto, method: str, symmetric: bool = True, **extra) -> Path:
    src = tmp_path / "model.onnx"
    if not src.exists():
        onnx.save(model, src)
        write_feeds(tmp_path / "calib", token_feeds(24, vocab=96, seed=1))
        write_feeds(tmp_path / "eval", token_feeds(8, vocab=96, seed=2))
    out = tmp_path / f"{method}-{symmetric}-{len(extra)}.onnx"
    quantize(QuantizeRequest(model=src, output=out, mode="weight-only",
                             weight_only=WeightOnlyOptions(bits=4, block_size=32, symmetric=symmetric, method=method),
                             data=DataOptions(calib=tmp_path / "calib", eval_data=tmp_path / "eval"), **extra))
    return out


@pytest.mark.parametrize(("method", "symmetric"), [("rtn", True), ("gptq", True), ("gptq", False), ("awq", True),
                                                   ("hqq", False), ("hqq", True)])
def test_int4_transformer_runs_as_its_numpy_reference(tmp_path: Path, method: str, symmetric: bool) -> None:
    model = make_transformer()
    out = quantize_int4(tmp_path, model, method, symmetric)
    written = onnx.load(out)
    ops = [n.op_type for n in written.graph.node]
    assert ops.count("MatMulNBits") == 13 and ops.count("GatherBlockQuantized") == 2  # + tied LM head, positions
    assert "MatMul" not in [n.op_type for n in written.graph.node if n.name.endswith(".mm/MatMul")]
    feeds = token_feeds(4, vocab=96, seed=9)
    reference = numpy_reference(model, written) if method != "awq" else None
    got = run(out, feeds)
    if reference is not None:  # awq changes the float graph (folded scales): compared with fp32 below
        for want, have in zip(run(reference, feeds), got, strict=True):
            np.testing.assert_allclose(have, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    fp32 = run(model, feeds)
    cosine = np.mean([np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(fp32, got, strict=True)])
    assert cosine > 0.8


def test_tied_embedding_is_stored_once(tmp_path: Path) -> None:
    model = make_transformer(vocab=256, dim=64)
    out = quantize_int4(tmp_path, model, "gptq")
    written = onnx.load(out)
    tables = [t for t in written.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and
              np.prod(t.dims) >= 256 * 64]
    assert not tables  # neither the float table nor the float LM head is left
    head = next(n for n in written.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    gather = next(n for n in written.graph.node if n.op_type == "GatherBlockQuantized" and n.output[0] == "tok")
    reshape = next(n for n in written.graph.node if n.output[0] == gather.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # the same bytes
    packed = next(t for t in written.graph.initializer if t.name == head.input[1])
    assert np.prod(packed.dims) == 256 * 64 // 2
    assert out.stat().st_size < (tmp_path / "model.onnx").stat().st_size / 5


def test_untied_head_and_8_bit_embeddings(tmp_path: Path) -> None:
    model = make_transformer(tied=False)
    out = quantize_int4(tmp_path, model, "rtn")
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("GatherBlockQuantized") == 2 and ops.count("Reshape") == 0
    src = tmp_path / "model.onnx"
    out8 = tmp_path / "int8.onnx"
    only_tables = Recipe(rules=[Rule(Selector(op_type=("MatMul",)), precision="float")])
    quantize(QuantizeRequest(model=src, output=out8, mode="weight-only", weight_only=WeightOnlyOptions(bits=8),
                             recipe=only_tables))
    written = onnx.load(out8)
    gathers = [n for n in written.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 2 and all(a.i == 8 for n in gathers for a in n.attribute if a.name == "bits")
    feeds = token_feeds(3, vocab=96, seed=4)
    for want, have in zip(run(numpy_reference(model, written), feeds), run(out8, feeds), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_mixed_int4_int8_by_sensitivity_and_its_recipe(tmp_path: Path) -> None:
    model = make_transformer()
    recipe = tmp_path / "mixed.yaml"
    first = quantize_int4(tmp_path, model, "gptq", target=Target(min_cosine=0.99), save_recipe=recipe,
                          fallback="int8")
    written = onnx.load(first)
    widths = sorted(a.i for n in written.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                    if a.name == "bits")
    assert 8 in widths and 4 in widths  # the most sensitive went to int8, the rest stayed int4
    text = recipe.read_text()
    assert "weights: int8" in text and "weight_method: gptq" in text
    again = tmp_path / "again.onnx"
    result = subprocess.run([*ONNXQ, "quantize", str(tmp_path / "model.onnx"), "-o", str(again), "--recipe",
                             str(recipe), "--calib", str(tmp_path / "calib"), "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == first.read_bytes()


def test_int4_is_reproducible_and_takes_varying_token_lengths_in_batches(tmp_path: Path) -> None:
    model = make_transformer(batch=None)
    onnx.save(model, tmp_path / "model.onnx")
    write_feeds(tmp_path / "calib", token_feeds(12, vocab=96, seed=1, min_len=8, max_len=9))  # some stack
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.onnx"
        cmd = [*ONNXQ, "quantize", str(tmp_path / "model.onnx"), "-o", str(out), "--mode", "weight-only",
               "--weight-bits", "4", "--weight-method", "awq", "--calib", str(tmp_path / "calib"), "--batch-size", "3",
               "-q"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "weight-only", "--weight-bits", "4", "--weight-method", "gptq"], "give --calib"),
    (["--mode", "weight-only", "--weight-method", "hqq"], "applies to --mode weight-only --weight-bits 4"),
    (["--allow-random", "--fallback", "int8", "--target-cosine", "0.9"], "--fallback int8"),
    (["--mode", "weight-only", "--weight-bits", "4", "--weight-method", "awq", "--calib", "CALIB", "--batch-size", "4"],
     "fixed first dimension"),
])
def test_int4_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    onnx.save(make_transformer(), tmp_path / "model.onnx")
    calib = str(write_feeds(tmp_path / "calib", token_feeds(4)))
    args = [calib if a == "CALIB" else a for a in args]
    result = subprocess.run([*ONNXQ, "quantize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "out.onnx"),
                             *args], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_padded_token_ids_in_one_stacked_npz_count_only_real_tokens(tmp_path: Path) -> None:
    model = make_transformer()
    onnx.save(model, tmp_path / "model.onnx")
    feeds = token_feeds(10, vocab=96, seed=3, pad_to=24)
    stacked = tmp_path / "tokens.npz"
    np.savez(stacked, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    result = quantize(QuantizeRequest(model=tmp_path / "model.onnx", output=tmp_path / "out.onnx", mode="weight-only",
                                      weight_only=WeightOnlyOptions(bits=4, method="gptq"),
                                      data=DataOptions(calib=stacked)))
    layers = result.report["weight_only"]["layers"]
    real = sum(int(f["attention_mask"].sum()) for f in feeds)
    assert layers["/l0.q.mm/MatMul"]["calibration_rows"] == real < 10 * 24
    assert layers["/l0.q.mm/MatMul"]["int4_error_vs_rtn"] < 1.0
    assert "/tok/Gather" not in layers and layers["/logits/MatMul"]["tied_with"] == ["/tok/Gather"]  # one layer
