"""Shared helpers and fixtures: tiny ONNX graphs built with onnx.helper, data writers, checks.

Graphs are small (1x3x16x16 images, 8 channels) so the whole suite stays fast; weights
are random with fan-in scaling so activations keep a sensible range through the layers.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxq.cli import main as cli_main
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, QuantizeResult, quantize

OPSET = 13
IMAGE = (1, 3, 16, 16)
CHANNELS = 8


# ---------------------------------------------------------------- building models


def weight(rng: np.random.Generator, shape: Sequence[int], fan_in: int | None = None) -> np.ndarray:
    fan_in = fan_in or int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)


def bias(rng: np.random.Generator, n: int) -> np.ndarray:
    return (0.1 * rng.standard_normal(n)).astype(np.float32)


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               initializers: dict[str, np.ndarray] | None = None, opset: int = OPSET,
               name: str = "test") -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxq-tests")
    model.ir_version = 7 if opset < 15 else 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, shape: Sequence[int | str | None] | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_relu_model(seed: int = 0) -> onnx.ModelProto:
    """(a) Conv(+bias) -> Relu -> Conv."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)), "b2": bias(rng, CHANNELS)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits)


def matmul_add_model(seed: int = 1) -> onnx.ModelProto:
    """(b) MatMul with a 2-D constant weight, then Add of a constant bias."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    inits = {"w": weight(rng, (32, 16), fan_in=32), "b": bias(rng, 16)}
    return make_model(nodes, [tensor("x", [1, 4, 32])], [tensor("y", [1, 4, 16])], inits)


def gemm_model(seed: int = 2) -> onnx.ModelProto:
    """(c) Gemm (transB) -> Relu -> Gemm."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], transB=1, name="gemm1"),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"], transB=1, name="gemm2"),
    ]
    inits = {"w1": weight(rng, (24, 32)), "b1": bias(rng, 24), "w2": weight(rng, (10, 24)), "b2": bias(rng, 10)}
    return make_model(nodes, [tensor("x", [1, 32])], [tensor("y", [1, 10])], inits)


def shared_weight_model(seed: int = 3) -> onnx.ModelProto:
    """(d) One weight initializer read by two Convs."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu_a"),
        helper.make_node("Conv", ["r1", "w"], ["y"], pads=[1, 1, 1, 1], name="conv_b"),
    ]
    inits = {"w": weight(rng, (CHANNELS, CHANNELS, 3, 3))}
    shape = [1, CHANNELS, 16, 16]
    return make_model(nodes, [tensor("x", shape)], [tensor("y", shape)], inits)


def constant_node_model(seed: int = 4) -> onnx.ModelProto:
    """(e) The conv_relu model with its weights held in Constant nodes, no initializers."""
    model = conv_relu_model(seed)
    constants = [helper.make_node("Constant", [], [init.name], value=init, name=f"const_{init.name}")
                 for init in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def initializer_inputs_model(seed: int = 5) -> onnx.ModelProto:
    """(f) The conv_relu model with every initializer also listed as a graph input (old exporters)."""
    model = conv_relu_model(seed)
    for init in model.graph.initializer:
        model.graph.input.append(tensor(init.name, list(init.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model(seed: int = 6) -> onnx.ModelProto:
    """(g) Conv -> Relu -> If(sum(x) > 0) whose branches compute on the outer tensor r1 -> Conv."""
    rng = np.random.default_rng(seed)
    shape = [1, CHANNELS, 16, 16]
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["r1", "two"], ["then_out"], name="then_mul")], "then_branch", [],
        [tensor("then_out", shape)], [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    else_branch = helper.make_graph(
        [helper.make_node("Sigmoid", ["r1"], ["else_sig"], name="else_sigmoid"),
         helper.make_node("Add", ["else_sig", "r1"], ["else_out"], name="else_add")], "else_branch", [],
        [tensor("else_out", shape)])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_branch, else_branch=else_branch, name="if"),
        helper.make_node("Conv", ["branch", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)), "b2": bias(rng, CHANNELS),
             "zero": np.array(0.0, np.float32)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", shape)], inits)


def dynamic_model(seed: int = 7) -> onnx.ModelProto:
    """(h) Conv -> Relu -> Conv with batch, height and width as dim_params."""
    model = conv_relu_model(seed)
    for value, channels in ((model.graph.input[0], 3), (model.graph.output[0], CHANNELS)):
        value.CopyFrom(tensor(value.name, ["N", channels, "H", "W"]))
    onnx.checker.check_model(model, full_check=True)
    return model


def opset11_model(seed: int = 8) -> onnx.ModelProto:
    """(i) Opset 11: Conv -> Relu -> Conv -> GlobalAveragePool -> Squeeze(axes attribute, an input since 13)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Squeeze", ["gap"], ["y"], axes=[2, 3], name="squeeze"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)), "b2": bias(rng, CHANNELS)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS])], inits, opset=11)


def opset6_ir3_model(seed: int = 11) -> onnx.ModelProto:
    """(j) An old PyTorch export: IR 3, opset 6, weights listed as graph inputs, Gemm with `broadcast`.

    onnxruntime has no kernel for Gemm-6, so this model only runs after conversion to a newer opset.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["y"], transB=1, broadcast=1, name="fc"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "w2": weight(rng, (10, CHANNELS)), "b2": bias(rng, 10)}
    graph = helper.make_graph(nodes, "old_export", [tensor("x", IMAGE)] + [tensor(k, list(v.shape)) for k, v in
                                                                           inits.items()],
                              [tensor("y", [1, 10])], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], producer_name="pytorch")
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def pass_through_model(seed: int = 9) -> onnx.ModelProto:
    """(j) Conv -> Relu -> MaxPool -> two Convs -> Concat -> Transpose -> Reshape -> MatMul."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Conv", ["p1", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        helper.make_node("Concat", ["c2", "c3"], ["cat"], axis=1, name="concat"),
        helper.make_node("Transpose", ["cat"], ["t"], perm=[0, 2, 3, 1], name="transpose"),
        helper.make_node("Reshape", ["t", "shape"], ["rs"], name="reshape"),
        helper.make_node("MatMul", ["rs", "w4"], ["y"], name="matmul"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)), "b2": bias(rng, CHANNELS),
             "w3": weight(rng, (CHANNELS, CHANNELS, 3, 3)), "b3": bias(rng, CHANNELS),
             "shape": np.array([1, 64, 2 * CHANNELS], np.int64), "w4": weight(rng, (2 * CHANNELS, 10), fan_in=16)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, 64, 10])], inits)


def hard_swish_model(seed: int = 12) -> onnx.ModelProto:
    """Conv -> hard-swish as exporters write it (x * Clip(x + 3, 0, 6) / 6) -> Mul by a single value outside
    a gate -> Add of a constant tensor that varies along the width (neither folds into the next Conv) -> Conv."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Add", ["c1", "three"], ["a1"], name="add3"),
        helper.make_node("Clip", ["a1", "zero", "six"], ["h1"], name="clip"),
        helper.make_node("Mul", ["c1", "h1"], ["m1"], name="mul"),
        helper.make_node("Div", ["m1", "six"], ["d1"], name="div6"),
        helper.make_node("Mul", ["d1", "half"], ["h2"], name="scale_half"),
        helper.make_node("Add", ["h2", "offsets"], ["o1"], name="add_offsets"),
        helper.make_node("Conv", ["o1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    inits = {"w1": weight(rng, (CHANNELS, 3, 3, 3)), "b1": bias(rng, CHANNELS),
             "three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
             "offsets": (0.1 * rng.standard_normal(IMAGE[3])).astype(np.float32), "half": np.array(0.5, np.float32),
             "w2": weight(rng, (CHANNELS, CHANNELS, 3, 3)), "b2": bias(rng, CHANNELS)}
    return make_model(nodes, [tensor("x", IMAGE)], [tensor("y", [1, CHANNELS, 16, 16])], inits)


def two_input_model(seed: int = 10) -> onnx.ModelProto:
    """Two inputs (image and a per-sample offset) for feed-name checks."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Add", ["c", "offset"], ["y"], name="add"),
    ]
    return make_model(nodes, [tensor("image", IMAGE), tensor("offset", [1, CHANNELS, 1, 1])],
                      [tensor("y", [1, CHANNELS, 16, 16])], {"w": weight(rng, (CHANNELS, 3, 3, 3))})


# ---------------------------------------------------------------- data


def image_batch(rng: np.random.Generator, shape: Sequence[int] = IMAGE) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def write_npz_folder(folder: Path, feeds: Callable[[np.random.Generator], dict[str, np.ndarray]], count: int,
                     seed: int = 100) -> Path:
    """`count` files s000.npz ... each holding one complete feed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        np.savez(folder / f"s{i:03d}.npz", **feeds(rng))
    return folder


def feeds_for(model: onnx.ModelProto) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    """Random normal feeds matching a model's (static) input shapes."""
    inits = {t.name for t in model.graph.initializer}
    specs = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim])
             for v in model.graph.input if v.name not in inits]
    return lambda rng: {name: rng.standard_normal(shape).astype(np.float32) for name, shape in specs}


# ---------------------------------------------------------------- running and checking


def session(path: Path | str, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path: Path | str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(path).run(None, feed)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def fused_op_types(path: Path) -> list[str]:
    """Op types of the graph onnxruntime actually runs (ORT_ENABLE_ALL, dumped to a file)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-test-opt-") as tmp:
        dumped = Path(tmp) / "optimized.onnx"
        session(path, optimized=dumped)
        return [node.op_type for node in onnx.load(str(dumped)).graph.node]


def float_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float tensors stored in the model: initializers and Constant node values (all graphs)."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    found[node.output[0]] = numpy_helper.to_array(attr.t)
    return found


def int8_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8}


def quantize_simple(model_path: Path, output: Path, calib: Path | None = None, **kwargs) -> QuantizeResult:
    data = kwargs.pop("data", None) or DataOptions(calib=calib, allow_random=calib is None)
    return quantize(QuantizeRequest(model=model_path, output=output, data=data, **kwargs))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def conv_model_path(tmp_path: Path) -> Path:
    return save(conv_relu_model(), tmp_path / "conv.onnx")


@pytest.fixture
def conv_calib(tmp_path: Path) -> Path:
    return write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 10)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# Every test runs with a forced CPU class, never the host's: ONNXQ_TEST_CPU picks it for the whole suite
# (`ONNXQ_TEST_CPU=amx make test`), avx2 by default. Tests whose result depends on the class take
# `cpu_class`, which runs them under each class in CPU_CLASSES_TESTED.
SUITE_CPU_CLASS = os.environ.get("ONNXQ_TEST_CPU", "avx2")
CPU_CLASSES_TESTED = ("avx2", "amx")


@pytest.fixture(autouse=True)
def forced_cpu_class(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ONNXQ_HOST_CPU", SUITE_CPU_CLASS)
    return SUITE_CPU_CLASS


@pytest.fixture(params=CPU_CLASSES_TESTED)
def cpu_class(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test as if on each CPU class (onnxq reads the class; onnxruntime still runs on the host)."""
    monkeypatch.setenv("ONNXQ_HOST_CPU", request.param)
    return request.param


@pytest.fixture(autouse=True)
def speed_guard_off_unless_asked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests keep every int8 layer unless marked `speed_guard`: what the shipped table decides for
    these tiny models would change with every re-measured table. The per-machine timing cache goes
    to a temporary folder, never the user's home."""
    monkeypatch.setenv("ONNXQ_CACHE_DIR", str(tmp_path_factory.mktemp("onnxq-cache")))
    if request.node.get_closest_marker("speed_guard") is None:
        from onnxq.commands import static_flow
        from onnxq.search.speed_guard import GuardResult

        monkeypatch.setattr(static_flow, "run_speed_guard", lambda *_args, **_kwargs: GuardResult(source="(tests)"))
        monkeypatch.setattr(static_flow, "table_guard", lambda *_args, **_kwargs: GuardResult("table", "(tests)"))


@pytest.fixture(autouse=True)
def plain_pass_unless_asked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI tests of everything but the automatic search run `quantize` as a single pass (ONNXQ_FAST=1, the
    documented environment form of --fast): their assertions are about data, plans and files, and a
    search choosing another method or layer would change them. Tests marked `auto_search` (and any test
    passing --fast=... itself) see the real default."""
    if request.node.get_closest_marker("auto_search") is None:
        monkeypatch.setenv("ONNXQ_FAST", "1")
    else:
        monkeypatch.delenv("ONNXQ_FAST", raising=False)


@pytest.fixture(autouse=True)
def planned_precision_is_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model onnxq writes in a test must run, in onnxruntime's optimized graph at every level,
    at the precision its plan says (onnxq.runtime.precision): a disagreement fails the test that wrote it."""
    from onnxq.commands import written

    check = written.check_fusion

    def checked(model: onnx.ModelProto, planned: dict[str, str] | None = None):
        report = check(model, planned)
        assert planned is None or not report.disagreements, report.disagreements
        return report

    monkeypatch.setattr(written, "check_fusion", checked)


def cli_in(folder: Path, *args: str) -> tuple[int, str, str]:
    """The onnxq command in `folder` (relative paths as a user types them): exit code, stdout, stderr."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(cli_main, list(args))
    finally:
        os.chdir(previous)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A folder with m.onnx (Conv-Relu-Conv), mm.onnx (MatMul-Add), calib/ (6 samples for m.onnx) and out/."""
    save(conv_relu_model(), tmp_path / "m.onnx")
    save(matmul_add_model(), tmp_path / "mm.onnx")
    write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 6)
    (tmp_path / "out").mkdir()
    return tmp_path
