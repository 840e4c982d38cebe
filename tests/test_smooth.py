"""SmoothQuant (onnxq.passes.smooth): float-exact rewrites, where 1/s goes, the range it saves, int8 error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import make_model, quantize_simple, run, save, tensor, weight, write_npz_folder
from onnx import helper

from onnxq.cli import main
from onnxq.errors import UsageError
from onnxq.passes.prepare import prepare_model
from onnxq.passes.smooth import SmoothResult, channel_absmax, smooth_model, smoothing_factors
from onnxq.runtime.data import SampleSource, model_input_specs, open_source

TOKENS, K, N = 16, 32, 24
OUTLIER = 5  # the activation channel 20x larger than the rest


def ln_qkv_model(seed: int = 0, residual: bool = False) -> onnx.ModelProto:
    """x -> LayerNorm (one channel's scale 20x) -> three MatMuls (Q, K, V), summed; `residual` also adds
    the LayerNorm output to the result (as a post-norm transformer does)."""
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    gamma[OUTLIER] = 20.0
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln")]
    nodes += [helper.make_node("MatMul", ["ln", f"w{i}"], [f"m{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [helper.make_node("Add", ["m0", "m1"], ["s01"], name="add01"),
              helper.make_node("Add", ["s01", "m2"], ["y"], name="add2")]
    inits = {"gamma": gamma, "beta": (0.1 * rng.standard_normal(K)).astype(np.float32)}
    inits.update({f"w{i}": weight(rng, (K, N), fan_in=K) for i in range(3)})
    outputs = [tensor("y", [TOKENS, N])]
    if residual:
        nodes.append(helper.make_node("MatMul", ["y", "back"], ["yb"], name="back"))  # float: y @ back, K wide
        nodes.append(helper.make_node("Add", ["yb", "ln"], ["z"], name="residual"))
        inits["back"] = weight(rng, (N, K), fan_in=N)
        outputs = [tensor("z", [TOKENS, K])]
    return make_model(nodes, [tensor("x", [TOKENS, K])], outputs, inits, opset=17)


def relu_matmul_model(seed: int = 1) -> onnx.ModelProto:
    """x * (per-channel constant) -> Relu -> MatMul: the producer of the MatMul input (Relu) absorbs nothing."""
    rng = np.random.default_rng(seed)
    gain = np.ones(K, np.float32)
    gain[OUTLIER] = 20.0
    nodes = [helper.make_node("Mul", ["x", "gain"], ["g"], name="gain"),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    return make_model(nodes, [tensor("x", [TOKENS, K])], [tensor("y", [TOKENS, N])],
                      {"gain": gain, "w": weight(rng, (K, N), fan_in=K)})


def feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((TOKENS, K)).astype(np.float32)}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_npz_folder(tmp_path / "calib", feeds, 12)


def _source(model: onnx.ModelProto, data: Path) -> SampleSource:
    return open_source(data, model_input_specs(model), None)


def smoothed(model: onnx.ModelProto, data: Path, alpha: float = 0.5, **kwargs) -> tuple[onnx.ModelProto, SmoothResult]:
    prepared = prepare_model(model).model
    return prepared, smooth_model(prepared, alpha, _source(prepared, data), **kwargs)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def float_outputs_match(original: onnx.ModelProto, changed: onnx.ModelProto, tmp_path: Path) -> None:
    a, b = save(original, tmp_path / "a.onnx"), save(changed, tmp_path / "b.onnx")
    for seed in range(3):
        feed = feeds(np.random.default_rng(50 + seed))
        np.testing.assert_allclose(run(b, feed)[0], run(a, feed)[0], rtol=1e-5, atol=1e-5)


def test_layernorm_absorbs_one_s_shared_by_three_matmuls(tmp_path: Path, data: Path) -> None:
    prepared, result = smoothed(ln_qkv_model(), data)
    assert op_types(result.model) == op_types(prepared)  # folded: no Mul, no copy
    float_outputs_match(prepared, result.model, tmp_path)
    (layer,) = result.layers
    # (onnxruntime's basic optimizations may have made a MatMul + Add a Gemm: "mm1/MatMulAddFusion")
    assert layer.how == "layernorm" and sorted(c.split("/")[0] for c in layer.consumers) == ["mm0", "mm1", "mm2"]
    # one s for all three: every MatMul's weight rows were scaled by the same vector
    before = {t.name: onnx.numpy_helper.to_array(t) for t in prepared.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    weights = {n.name.split("/")[0]: n.input[1] for n in result.model.graph.node if n.op_type in ("MatMul", "Gemm")}
    ratios = [after[weights[f"mm{i}"]][:, 0] / before[f"w{i}"][:, 0] for i in range(3)]
    np.testing.assert_allclose(ratios[0], ratios[1], rtol=1e-5)
    np.testing.assert_allclose(ratios[0], ratios[2], rtol=1e-5)
    # ... and s is a^alpha / max|W|^(1-alpha) over the three weights, the LayerNorm scale divided by it
    a = channel_absmax(prepared, ["ln"], _source(prepared, data))["ln"]
    w = np.max([np.abs(before[f"w{i}"]).max(axis=1) for i in range(3)], axis=0)
    s = smoothing_factors(a, w, 0.5)
    np.testing.assert_allclose(ratios[0], s, rtol=1e-5)
    ln = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    np.testing.assert_allclose(after[ln.input[1]], before["gamma"] / s, rtol=1e-6)
    # the per-tensor range the int8 scale must cover shrinks by max(a) / max(a / s)
    smoothed_a = channel_absmax(result.model, [ln.output[0]], _source(prepared, data))[ln.output[0]]
    assert layer.range_before == pytest.approx(a.max(), rel=1e-6)
    assert smoothed_a.max() == pytest.approx(layer.range_after, rel=1e-5)
    assert layer.range_before / layer.range_after > 3


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


def test_smoothing_improves_int8_error(tmp_path: Path, data: Path) -> None:
    model_path = save(ln_qkv_model(), tmp_path / "m.onnx")
    results = {}
    for alpha in (None, 0.5):
        out = tmp_path / f"q{alpha}.onnx"
        quantize_simple(model_path, out, data, smooth_alpha=alpha)
        feed = feeds(np.random.default_rng(99))
        results[alpha] = sqnr_db(run(model_path, feed)[0], run(out, feed)[0])
    assert results[0.5] > results[None] + 3, results


def test_shared_layernorm_is_copied_and_residual_kept(tmp_path: Path, data: Path) -> None:
    prepared, result = smoothed(ln_qkv_model(residual=True), data)
    (layer,) = result.layers
    assert layer.how == "layernorm-copy" and layer.to_report()["extra_op"]
    assert op_types(result.model).count("LayerNormalization") == 2
    float_outputs_match(prepared, result.model, tmp_path)


def test_unfoldable_producer_needs_inserted_mul(tmp_path: Path, data: Path) -> None:
    prepared, result = smoothed(relu_matmul_model(), data)
    assert not result.layers and "produced by Relu" in result.skipped["r"]
    assert op_types(result.model) == op_types(prepared)
    prepared, result = smoothed(relu_matmul_model(), data, insert_mul=True)
    (layer,) = result.layers
    assert layer.how == "inserted-mul" and op_types(result.model).count("Mul") == 2
    assert layer.range_before / layer.range_after > 2
    float_outputs_match(prepared, result.model, tmp_path)


def chain_model(kind: str, shape: list[int], seed: int = 2) -> onnx.ModelProto:
    """x -> producer -> MatMul, the producer a MatMul + bias Add ("matmul"; onnxruntime makes it a Gemm
    with bias when x is 2-D) or a Mul by a constant."""
    rng = np.random.default_rng(seed)
    if kind == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"], name="mm0"),
                 helper.make_node("Add", ["m0", "b0"], ["h"], name="bias0")]
        inits = {"w0": weight(rng, (K, K), fan_in=K), "b0": (0.1 * rng.standard_normal(K)).astype(np.float32)}
    else:
        nodes = [helper.make_node("Mul", ["x", "half"], ["h"], name="half")]
        inits = {"half": np.array(0.5, np.float32)}
    nodes.append(helper.make_node("MatMul", ["h", "w1"], ["y"], name="mm1"))
    inits["w1"] = weight(rng, (K, N), fan_in=K)
    dims = ["batch", *shape[1:]] if len(shape) == 3 else shape  # 3-D static MatMul + Add would become a Gemm
    return make_model(nodes, [tensor("x", dims)], [tensor("y", [*dims[:-1], N])], inits)


@pytest.mark.parametrize("kind", ["matmul", "mul-constant"])
@pytest.mark.parametrize("shape", [[TOKENS, K], [2, TOKENS, K]])
def test_producer_absorbs_inverse_scale(tmp_path: Path, kind: str, shape: list[int]) -> None:
    data = write_npz_folder(tmp_path / "data", lambda rng: {"x": rng.standard_normal(shape).astype(np.float32)}, 6)
    prepared, result = smoothed(chain_model(kind, shape), data)
    assert [layer.how for layer in result.layers] == [kind]
    assert op_types(result.model) == op_types(prepared)
    for seed in range(3):
        feed = {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
        a, b = save(prepared, tmp_path / "a.onnx"), save(result.model, tmp_path / "b.onnx")
        np.testing.assert_allclose(run(b, feed)[0], run(a, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_validated(tmp_path: Path, data: Path, alpha: float) -> None:
    with pytest.raises(UsageError, match="between 0 and 1"):
        smoothed(ln_qkv_model(), data, alpha=alpha)
    model_path = save(ln_qkv_model(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--calib",
                                       str(data), "--smooth-alpha", str(alpha)])
    assert result.exit_code == 2 and "--smooth-alpha must be between 0 and 1" in result.stderr
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.usefixtures("data")
def test_smoothing_refuses_saved_statistics(tmp_path: Path) -> None:
    model_path = save(ln_qkv_model(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--load-stats",
                                       str(tmp_path / "s.npz"), "--smooth-alpha", "0.5"])
    assert result.exit_code == 2 and "--load-stats" in result.stderr


def test_cli_reports_smoothing(tmp_path: Path, data: Path) -> None:
    model_path = save(ln_qkv_model(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--calib",
                                       str(data), "--smooth-alpha", "0.5", "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    smoothing = report["smoothing"]
    assert smoothing["alpha"] == 0.5 and smoothing["layers_smoothed"] == 1 and smoothing["extra_ops"] == 0
    assert smoothing["max_range_after"] < smoothing["max_range_before"]
    assert report["fidelity"]["outputs"][0]["cosine"] > 0.99


def test_smoothing_helps_dynamic_mode_and_needs_calibration(tmp_path: Path, data: Path) -> None:
    """Run-time activation quantization is per tensor too: smoothing the outlier channel helps it as well."""
    model_path = save(ln_qkv_model(), tmp_path / "m.onnx")
    feed = feeds(np.random.default_rng(99))
    results = {}
    for alpha in (None, 0.5):
        out = tmp_path / f"d{alpha}.onnx"
        result = quantize_simple(model_path, out, data, mode="dynamic", smooth_alpha=alpha)
        assert op_types(onnx.load(out)).count("DynamicQuantizeMatMul") >= 1
        assert ("smoothing" in result.report) == (alpha is not None)
        results[alpha] = sqnr_db(run(model_path, feed)[0], run(out, feed)[0])
    assert results[0.5] > results[None] + 3, results
    refused = CliRunner().invoke(main, ["quantize", str(model_path), "-o", str(tmp_path / "x.onnx"), "--mode",
                                        "dynamic", "--smooth-alpha", "0.5"])
    assert refused.exit_code == 2 and "give --calib" in refused.stderr and not (tmp_path / "x.onnx").exists()


def decomposed_ln_model(seed: int = 3) -> onnx.ModelProto:
    """A LayerNorm exported as separate ops (as PaddlePaddle's exporter writes it), ending in x * gamma + beta,
    then three MatMuls."""
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    gamma[OUTLIER] = 20.0
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], name="mean"),
             helper.make_node("Sub", ["x", "mu"], ["centred"], name="centre"),
             helper.make_node("Mul", ["centred", "centred"], ["sq"], name="square"),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="var"),
             helper.make_node("Add", ["var", "eps"], ["var_eps"], name="eps_add"),
             helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
             helper.make_node("Div", ["centred", "std"], ["normed"], name="div"),
             helper.make_node("Mul", ["normed", "gamma"], ["scaled"], name="scale"),
             helper.make_node("Add", ["scaled", "beta"], ["ln"], name="shift")]
    nodes += [helper.make_node("MatMul", ["ln", f"w{i}"], [f"m{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [helper.make_node("Concat", ["m0", "m1", "m2"], ["y"], axis=-1, name="cat")]
    beta = (0.1 * rng.standard_normal(K)).astype(np.float32)
    inits = {"eps": np.array(1e-5, np.float32), "gamma": gamma, "beta": beta}
    inits.update({f"w{i}": weight(rng, (K, N), fan_in=K) for i in range(3)})
    return make_model(nodes, [tensor("x", [TOKENS, K])], [tensor("y", [TOKENS, 3 * N])], inits, opset=13)


def test_decomposed_layernorm_absorbs_s_in_its_scale_and_shift(tmp_path: Path, data: Path) -> None:
    prepared, result = smoothed(decomposed_ln_model(), data)
    assert op_types(result.model) == op_types(prepared)  # folded into the constants: no op added
    float_outputs_match(prepared, result.model, tmp_path)
    (layer,) = result.layers
    assert layer.how == "affine-constant" and layer.range_before / layer.range_after > 3
    before = {t.name: onnx.numpy_helper.to_array(t) for t in prepared.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    nodes = {n.name: n for n in result.model.graph.node}
    gamma, beta = after[nodes["scale"].input[1]], after[nodes["shift"].input[1]]
    np.testing.assert_allclose(before["gamma"] / gamma, before["beta"] / beta, rtol=1e-5)  # both divided by s


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_matmul_reading_a_graph_input_gets_an_inserted_mul(tmp_path: Path, data: Path, mode: str) -> None:
    """The graph input's channels come from the feeds (onnxruntime has no output by that name)."""
    rng = np.random.default_rng(3)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [tensor("x", [TOKENS, K])],
                       [tensor("y", [TOKENS, N])], {"w": weight(rng, (K, N), fan_in=K)})
    prepared, result = smoothed(model, data, insert_mul=True)
    (layer,) = result.layers
    assert layer.activation == "x" and layer.how == "inserted-mul"
    float_outputs_match(prepared, result.model, tmp_path)
    path = save(model, tmp_path / "in.onnx")
    report = quantize_simple(path, tmp_path / "q.onnx", data, mode=mode, smooth_alpha=0.5,
                             smooth_mul=True).report
    assert report["smoothing"]["layers_smoothed"] == 1 and report["fidelity"]["outputs"][0]["cosine"] > 0.99
