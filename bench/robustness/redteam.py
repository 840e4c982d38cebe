"""Red team: bad input, path clashes, signals and determinism against the real `onnxq` command.

    .venv/bin/python -m bench.robustness.redteam [--fast] [--jobs 2] [--keep DIR] [--only WORD]

Every case runs `python -m onnxq ...` in a fresh copy of a pool of small generated models and
data (seeded), with a private TMPDIR. Every file in the case folder is hashed before and after.
A case passes when: the exit code is the expected one; a failure is exactly one line on stderr
with no traceback; no file that existed before changed, unless it is an output of a successful
run; a failed run leaves no new file; no `.onnxq-*` temporary file and nothing in TMPDIR is
left; a signal gives 130/143 with its outputs complete (the message says so) or absent; a
determinism case gives byte-identical outputs when run again in another folder.
Prints the counts per kind of problem; exits 1 if any is non-zero. `--fast` runs the subset
`tests/test_redteam.py` runs in `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20240601
TIMEOUT = 300
PROBLEMS = ("tracebacks", "exit-1 internal errors", "inputs changed", "partial or stale outputs",
            "temporary files or folders left", "nondeterministic outputs", "wrong exit code", "not one line")


# ------------------------------------------------------------------ the pool of inputs


def _model(nodes, inputs, outputs, inits: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "redteam", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="redteam")
    model.ir_version = 8
    return model


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else shape[0])).astype(
        np.float32)


def conv_model(rng: np.random.Generator, poison: float | None = None) -> onnx.ModelProto:
    """x [1,3,16,16] -> Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm -> y [1,10]."""
    inits = {"w1": _w(rng, 8, 3, 3, 3), "b1": _w(rng, 8), "w2": _w(rng, 8, 8, 3, 3), "b2": _w(rng, 8),
             "fc": _w(rng, 10, 8), "fcb": _w(rng, 10)}
    if poison is not None:
        inits["fc"][0, 0] = poison
        inits["w2"][0, 0, 0, 0] = poison
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1, name="fc")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def matmul_model(rng: np.random.Generator, poison: float | None = None) -> onnx.ModelProto:
    """x [N,4,64] -> MatMul -> Add -> Relu -> MatMul -> y: dynamic and int4 weight-only have work here."""
    inits = {"w1": _w(rng, 64, 64), "b1": _w(rng, 64), "w2": _w(rng, 64, 32)}
    if poison is not None:
        inits["w1"][3, 5] = poison
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 32])], inits)


def two_input_model(rng: np.random.Generator) -> onnx.ModelProto:
    inits = {"w": _w(rng, 16, 8)}
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["y"], name="mm")]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16]) for n in ("a", "b")]
    return _model(nodes, value, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)


def unsorted_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Nodes out of topological order: onnx.checker's message runs over several lines."""
    model = conv_model(rng)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[1], nodes[0], *nodes[2:]])
    return model


def write_pool(pool: Path) -> None:
    """Models and data every case copies (seeded: the same bytes on every run)."""
    rng = np.random.default_rng(SEED)
    pool.mkdir(parents=True)
    for name, model in (("m.onnx", conv_model(rng)), ("mm.onnx", matmul_model(rng)),
                        ("two.onnx", two_input_model(rng)), ("nan.onnx", conv_model(rng, float("nan"))),
                        ("inf.onnx", conv_model(rng, float("inf"))), ("mmnan.onnx", matmul_model(rng, float("nan"))),
                        ("mminf.onnx", matmul_model(rng, float("-inf"))), ("unsorted.onnx", unsorted_model(rng))):
        (pool / name).write_bytes(model.SerializeToString(deterministic=True))
    ext = pool / "ext"
    ext.mkdir()
    onnx.save_model(conv_model(rng), str(ext / "a.onnx"), save_as_external_data=True, location="b.onnx.data",
                    size_threshold=0)
    images = lambda: rng.standard_normal((1, 3, 16, 16)).astype(np.float32)  # noqa: E731
    tokens = lambda: rng.standard_normal((1, 4, 64)).astype(np.float32)  # noqa: E731
    for folder, count, feed in (("calib", 12, lambda: {"x": images()}), ("eval", 4, lambda: {"x": images()}),
                                ("big", 200, lambda: {"x": images()}), ("mmcalib", 10, lambda: {"x": tokens()}),
                                ("mmbig", 300, lambda: {"x": tokens()})):
        (pool / folder).mkdir()
        for i in range(count):
            np.savez(pool / folder / f"s{i:03d}.npz", **feed())
    np.savez(pool / "calib.npz", x=np.concatenate([images() for _ in range(8)]))
    np.save(pool / "calib.npy", np.concatenate([images() for _ in range(8)]))
    (pool / "imgs").mkdir()
    from PIL import Image

    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(pool / "imgs" / f"{i}.png")
    (pool / "imgs" / "labels.txt").write_text("not an image\n")
    (pool / "recipe.yaml").write_text("rules:\n  - match: {name: conv2}\n    precision: float\n")
    (pool / "metric.py").write_text("def score(references, candidates, feeds):\n    return 1.0\n")
    (pool / "user.txt").write_text("a file the user cares about\n")


def run_cli(args: list[str], cwd: Path, tmp: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp), "ONNXQ_CACHE_DIR": str(cwd / ".cache-outside")}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "onnxq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def finish_pool(pool: Path) -> None:
    """Files made by onnxq itself (statistics, a QDQ model) and hand-edited variants of them."""
    tmp = Path(tempfile.mkdtemp(prefix="redteam-pool-"))
    steps = [["calibrate", "m.onnx", "--calib", "calib", "-o", "stats.npz", "-q"],
             ["calibrate", "mm.onnx", "--calib", "mmcalib", "-o", "other-stats.npz", "-q"],
             ["qat-prep", "m.onnx", "--calib", "calib", "-o", "qdq.onnx", "-q", "--weight-range", "full"]]
    for args in steps:
        result = run_cli(args, pool, tmp)
        if result.returncode != 0:
            raise SystemExit(f"pool: onnxq {' '.join(args)} failed: {result.stderr}")
    shutil.rmtree(tmp, ignore_errors=True)
    (pool / ".cache-outside").exists() and shutil.rmtree(pool / ".cache-outside")
    for name, edit in STATS_EDITS.items():
        with np.load(pool / "stats.npz") as data:
            header = json.loads(bytes(data["header"]).decode())
            counts = np.array(data["counts"])
        counts = edit(header, counts)
        np.savez(pool / f"stats-{name}.npz", header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                 counts=counts)


def _set(key: str, value) -> Callable[[dict, np.ndarray], np.ndarray]:
    def edit(header: dict, counts: np.ndarray) -> np.ndarray:
        header["tensors"][0][key] = value
        return counts
    return edit


def _negative_counts(_header: dict, counts: np.ndarray) -> np.ndarray:
    counts[0, 100] = -5
    return counts


STATS_EDITS: dict[str, Callable[[dict, np.ndarray], np.ndarray]] = {
    "minmax": lambda h, c: (h["tensors"][0].update(min=5.0, max=-5.0), c)[1],
    "nanmin": _set("min", float("nan")), "infmax": _set("max", float("inf")), "negcount": _set("count", -3),
    "negbins": _negative_counts, "width": _set("width_exp", 10**9), "width-neg": _set("width_exp", -10**9),
    "batches": _set("batches", "three"), "samples": lambda h, c: (h.update(samples=-1), c)[1],
}


# ------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    args: list[str]
    expect: tuple[int, ...]  # acceptable exit codes
    outputs: tuple[str, ...] = ()  # files a successful run writes (relative to the case folder)
    setup: Callable[[Path], None] | None = None
    signal: tuple[int, str] | None = None  # (signal, what to wait for: a TMPDIR glob or "t+SECONDS")
    repeat: bool = False  # determinism: run again in another folder, compare outputs byte for byte
    fast: bool = False  # in the `make test` subset
    words: tuple[str, ...] = ()  # expected in the error line
    kind: str = "bad input"


Q = ["quantize", "m.onnx", "-o", "out.onnx", "--speed-guard", "off"]
QC = [*Q, "--calib", "calib"]
MM = ["quantize", "mm.onnx", "-o", "out.onnx", "--speed-guard", "off"]


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def _npz(name: str, **arrays) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
    return setup


def _all(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for one in setups:
            one(folder)
    return setup


def _link(target: str, name: str, hard: bool = False) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        (os.link if hard else os.symlink)(folder / target, folder / name)
    return setup


def _copy(source: str, target: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / source, folder / target)
    return setup


def _pickled(folder: Path) -> None:
    (folder / "pk").mkdir()
    np.save(folder / "pk" / "0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)


def _model_file(name: str, edit: Callable[[onnx.ModelProto], None]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        model = onnx.load(str(folder / "m.onnx"))
        edit(model)
        (folder / name).write_bytes(model.SerializeToString())
    return setup


def _no_float_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64


def _drop_graph(model: onnx.ModelProto) -> None:
    model.ClearField("graph")


def _unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[1].op_type = "NoSuchOp"


def _opset_99(model: onnx.ModelProto) -> None:
    model.opset_import[0].version = 99


def clash_cases() -> list[Case]:
    """Every output option against every input and every other output (exit 2, nothing touched)."""
    cases = []
    outputs = [("-o", MM[2:4]), ("--report", ["--report"]), ("--save-plan", ["--save-plan"]),
               ("--save-stats", ["--save-stats"]), ("--save-recipe", ["--save-recipe"])]
    inputs = [("MODEL", "m.onnx"), ("--calib", "calib.npz"), ("--calib folder file", "calib/s003.npz"),
              ("--eval-data", "eval/s000.npz"), ("--load-stats", "stats.npz"), ("--recipe", "recipe.yaml"),
              ("--metric", "metric.py"), ("--target-data", "calib.npz")]
    extra = {"--eval-data": ["--eval-data", "eval"], "--load-stats": ["--load-stats", "stats.npz"],
             "--recipe": ["--recipe", "recipe.yaml"], "--metric": ["--metric", "metric.py", "--target-metric", "0.5"],
             "--target-data": ["--target-data", "calib.npz", "--target-cosine", "0.5"]}
    for out_option, _ in outputs:
        for in_option, path in inputs:
            calib = path if in_option == "--calib" else "calib"
            args = ["quantize", "m.onnx", "--speed-guard", "off", "--calib", calib, *extra.get(in_option, [])]
            args += ["-o", path] if out_option == "-o" else ["-o", "out.onnx", out_option, path]
            cases.append(Case(f"clash {out_option} = {in_option}", args, (2,), kind="path clash",
                              words=(out_option.split()[0], in_option.split()[0])))
    names = [o for o, _ in outputs]
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            args = [*QC, first if first != "-o" else "--report", "same.json", second, "same.json"]
            if first == "-o":
                args = ["quantize", "m.onnx", "--speed-guard", "off", "--calib", "calib", "-o", "same.json", second,
                        "same.json"]
            cases.append(Case(f"clash {first} = {second}", args, (2,), kind="path clash", words=(first, second)))
    cases += [
        Case("clash symlink to model", [*QC[:2], "-o", "link.onnx", *QC[4:]], (2,), setup=_link("m.onnx", "link.onnx"),
             kind="path clash"),
        Case("clash hard link to model", [*QC[:2], "-o", "hard.onnx", *QC[4:]], (2,),
             setup=_link("m.onnx", "hard.onnx", hard=True), kind="path clash"),
        Case("clash -o in calib folder", [*QC[:2], "-o", "calib/new.onnx", *QC[4:]], (2,), kind="path clash"),
        Case("clash -o = input external data", ["quantize", "ext/a.onnx", "-o", "ext/b.onnx.data", "--calib",
                                                 "calib", "--speed-guard", "off"], (2,), kind="path clash"),
        Case("clash -o data file over input's", ["quantize", "ext/a.onnx", "-o", "ext/b.onnx", "--calib", "calib",
                                                  "--speed-guard", "off"], (2,), kind="path clash"),
        Case("calibrate -o = --calib", ["calibrate", "m.onnx", "-o", "calib.npz", "--calib", "calib.npz"], (2,),
             kind="path clash"),
        Case("qat-prep --params = -o", ["qat-prep", "m.onnx", "-o", "f.onnx", "--params", "f.onnx", "--calib",
                                        "calib"], (2,), kind="path clash"),
        Case("qat-prep --params = model", ["qat-prep", "m.onnx", "-o", "f.onnx", "--params", "m.onnx", "--calib",
                                           "calib"], (2,), kind="path clash"),
        Case("convert --report = -o", ["convert", "qdq.onnx", "-o", "c.onnx", "--report", "c.onnx"], (2,),
             kind="path clash"),
        Case("sensitivity --plot = --calib", ["sensitivity", "m.onnx", "--calib", "calib.npz", "--plot", "calib.npz"],
             (2,), kind="path clash"),
        Case("merge-stats -o = input", ["merge-stats", "stats.npz", "stats.npz", "-o", "stats.npz"], (2,),
             kind="path clash"),
        Case("dynamic --report = model", [*MM, "--mode", "dynamic", "--report", "mm.onnx"], (2,), kind="path clash"),
    ]
    return cases


def model_cases() -> list[Case]:
    return [
        Case("model missing", ["quantize", "nope.onnx", "-o", "out.onnx", "--calib", "calib"], (3,)),
        Case("model is a folder", ["quantize", "calib", "-o", "out.onnx", "--calib", "calib.npz"], (3,)),
        Case("model empty", ["quantize", "e.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=_write("e.onnx", b"")),
        Case("model garbage", ["quantize", "g.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=_write("g.onnx", os.urandom(0) + bytes(range(256)) * 4)),
        Case("model is text", ["quantize", "user.txt", "-o", "out.onnx", "--calib", "calib"], (3,)),
        Case("model truncated", ["quantize", "t.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=lambda f: (f / "t.onnx").write_bytes((f / "m.onnx").read_bytes()[:700])),
        Case("model without graph", ["quantize", "ng.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=_model_file("ng.onnx", _drop_graph)),
        Case("model unsorted (checker)", ["quantize", "unsorted.onnx", "-o", "out.onnx", "--calib", "calib",
                                          "--speed-guard", "off"], (0, 3)),
        Case("model unknown op", ["quantize", "u.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=_model_file("u.onnx", _unknown_op)),
        Case("model opset 99", ["quantize", "o.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=_model_file("o.onnx", _opset_99)),
        Case("model int64 input", ["quantize", "i.onnx", "-o", "out.onnx", "--calib", "calib"], (3, 4),
             setup=_model_file("i.onnx", _no_float_input)),
        Case("model external data missing", ["quantize", "x/a.onnx", "-o", "out.onnx", "--calib", "calib"], (3,),
             setup=_copy("ext/a.onnx", "x/a.onnx")),
        Case("NaN weights static", [*QC[:2], "-o", "out.onnx", "--calib", "calib", "--speed-guard", "off"], (3,),
             setup=_copy("nan.onnx", "m.onnx")),
        Case("NaN weights dynamic", ["quantize", "mmnan.onnx", "-o", "out.onnx", "--mode", "dynamic"], (3,),
             words=("NaN",)),
        Case("Inf weights dynamic", ["quantize", "mminf.onnx", "-o", "out.onnx", "--mode", "dynamic"], (3,)),
        Case("NaN weights weight-only", ["quantize", "nan.onnx", "-o", "out.onnx", "--mode", "weight-only"], (3,)),
        Case("Inf weights weight-only int4", ["quantize", "mminf.onnx", "-o", "out.onnx", "--mode", "weight-only",
                                              "--weight-bits", "4"], (3,)),
        Case("Inf weights static", ["quantize", "inf.onnx", "-o", "out.onnx", "--calib", "calib",
                                    "--speed-guard", "off"], (3,)),
        Case("already QDQ model", ["quantize", "qdq.onnx", "-o", "out.onnx", "--calib", "calib",
                                   "--speed-guard", "off"], (3,), words=("convert",)),
        Case("already QDQ dynamic", ["quantize", "qdq.onnx", "-o", "out.onnx", "--mode", "dynamic"], (3,),
             words=("convert",)),
        Case("convert a float model", ["convert", "m.onnx", "-o", "out.onnx"], (3,)),
        Case("inspect garbage", ["inspect", "user.txt"], (3,)),
        Case("bench missing int8", ["bench", "m.onnx", "nope.onnx"], (3,)),
    ]


def data_cases() -> list[Case]:
    img = lambda shape=(1, 3, 16, 16), dtype=np.float32: np.zeros(shape, dtype)  # noqa: E731
    return [
        Case("calib missing", [*Q, "--calib", "nope"], (4,)),
        Case("calib empty folder", [*Q, "--calib", "empty"], (4,), setup=lambda f: (f / "empty").mkdir()),
        Case("calib text file", [*Q, "--calib", "user.txt"], (4,)),
        Case("calib float64", [*Q, "--calib", "d"], (4,), setup=_npz("d/0.npz", x=img(dtype=np.float64))),
        Case("calib wrong shape", [*Q, "--calib", "d"], (4,), setup=_npz("d/0.npz", x=img((1, 3, 8, 8)))),
        Case("calib wrong rank", [*Q, "--calib", "d"], (4,),
             setup=_npz("d/0.npz", x=np.zeros((3, 16, 16), np.float32))),
        Case("calib NaN", [*Q, "--calib", "d"], (4,), setup=_npz("d/0.npz", x=img() * np.nan)),
        Case("calib Inf", [*Q, "--calib", "d.npz"], (4,), setup=_npz("d.npz", x=img() + np.inf)),
        Case("calib wrong name", [*Q, "--calib", "d"], (4,), setup=_npz("d/0.npz", y=img())),
        Case("calib extra name", [*Q, "--calib", "d"], (4,), setup=_npz("d/0.npz", x=img(), z=img())),
        Case("calib scalar npz", [*Q, "--calib", "s.npz"], (4,), setup=_npz("s.npz", x=np.float32(1)),
             words=("single number",)),
        Case("calib pickled npy", [*Q, "--calib", "pk"], (4,), setup=_pickled, words=("pickle",)),
        Case("calib corrupt npz", [*Q, "--calib", "d"], (4,), setup=_write("d/0.npz", b"PK\x03\x04 broken"),
             words=("zip",)),
        Case("calib corrupt npy", [*Q, "--calib", "c.npy"], (4,), setup=_write("c.npy", b"\x93NUMPY broken")),
        Case("calib corrupt png", [*Q, "--calib", "d"], (4,), setup=_write("d/0.png", b"\x89PNG\r\n\x1a\n cut")),
        Case("calib mixed npz and png", [*Q, "--calib", "mix"], (4,),
             setup=_all(_npz("mix/0.npz", x=img()), _copy("imgs/0.png", "mix/1.png")), words=(".npz", ".png")),
        Case("calib mixed npz and npy", [*Q, "--calib", "mix"], (4,),
             setup=_all(_npz("mix/0.npz", x=img()), lambda f: np.save(f / "mix" / "1.npy", img()))),
        Case("calib images with a labels file", [*Q, "--calib", "imgs", "-q"], (0,), outputs=("out.onnx",)),
        Case("calib batch mismatch", ["quantize", "two.onnx", "-o", "out.onnx", "--calib", "b.npz"], (4,),
             setup=_npz("b.npz", a=np.zeros((3, 16), np.float32), b=np.zeros((2, 16), np.float32))),
        Case("calib zero samples", [*Q, "--calib", "z.npz"], (4,), setup=_npz("z.npz", x=np.zeros((0, 3, 16, 16),
                                                                                                   np.float32))),
        Case("calib npy for two inputs", ["quantize", "two.onnx", "-o", "out.onnx", "--calib", "calib.npy"], (4,)),
        Case("calib images for token model", [*MM[:4], "--calib", "imgs"], (4,)),
        Case("calib ints for a float model", [*Q, "--calib", "d"], (4,),
             setup=_npz("d/0.npz", x=np.zeros((1, 3, 16, 16), np.int32))),
        Case("calib test_data_set corrupt", [*Q, "--calib", "t"], (4,), setup=_write("t/test_data_set_0/input_0.pb",
                                                                                      b"\xff\xff garbage")),
        Case("calib empty test_data_set", [*Q, "--calib", "t"], (4,), setup=lambda f: (f / "t" / "test_data_set_0")
             .mkdir(parents=True)),
        Case("eval-data wrong shape", [*QC, "--eval-data", "d"], (4,), setup=_npz("d/0.npz", x=img((1, 3, 4, 4)))),
        Case("target-data missing", [*QC, "--target-data", "nope", "--target-cosine", "0.9"], (4,)),
        Case("newline in data path", [*Q, "--calib", "a\nb"], (4,)),
        Case("no calibration data", Q, (2,)),
        Case("bench data wrong", ["bench", "m.onnx", "m.onnx", "--data", "d"], (4,),
             setup=_npz("d/0.npz", x=img((2, 2)))),
    ]


def stats_cases() -> list[Case]:
    cases = [Case(f"stats hand-edited {name}", [*Q, "--load-stats", f"stats-{name}.npz"], (4,))
             for name in STATS_EDITS]
    cases += [
        Case("stats corrupt", [*Q, "--load-stats", "user.txt"], (4,)),
        Case("stats of another model", [*Q, "--load-stats", "other-stats.npz"], (4,)),
        Case("stats missing", [*Q, "--load-stats", "nope.npz"], (4,)),
        Case("merge-stats different models", ["merge-stats", "stats.npz", "other-stats.npz", "-o", "all.npz"], (4,)),
        Case("merge-stats hand-edited", ["merge-stats", "stats.npz", "stats-negcount.npz", "-o", "all.npz"], (4,)),
        Case("merge-stats one input", ["merge-stats", "stats.npz", "-o", "all.npz"], (2,)),
    ]
    return cases


def option_cases() -> list[Case]:
    usage = [
        ("--target-cosine nan", [*QC, "--target-cosine", "nan"]), ("--target-cosine 2", [*QC, "--target-cosine", "2"]),
        ("--target-cosine -3", [*QC, "--target-cosine", "-3"]), ("--target-sqnr inf", [*QC, "--target-sqnr", "inf"]),
        ("--min-cosine nan", [*QC, "--min-cosine", "nan"]), ("--min-sqnr -inf", [*QC, "--min-sqnr", "-inf"]),
        ("--percentile 0", [*QC, "--method", "percentile", "--percentile", "0"]),
        ("--percentile 101", [*QC, "--method", "percentile", "--percentile", "101"]),
        ("--percentile nan", [*QC, "--method", "percentile", "--percentile", "nan"]),
        ("--smooth-alpha 2", [*MM, "--calib", "mmcalib", "--smooth-alpha", "2"]),
        ("--smooth-alpha nan", [*MM, "--calib", "mmcalib", "--smooth-alpha", "nan"]),
        ("--batch-size 0", [*QC, "--batch-size", "0"]), ("--memory-budget 0", [*QC, "--memory-budget", "0"]),
        ("--image-size 0x0", [*Q, "--calib", "imgs", "--image-size", "0x0"]),
        ("--image-size abc", [*Q, "--calib", "imgs", "--image-size", "abc"]),
        ("--mean a,b", [*Q, "--calib", "imgs", "--mean", "a,b"]), ("--std 0", [*Q, "--calib", "imgs", "--std", "0"]),
        ("--scale nan", [*Q, "--calib", "imgs", "--scale", "nan"]),
        ("--mean nan", [*Q, "--calib", "imgs", "--mean", "nan"]),
        ("--adaround-seconds nan", [*QC, "--adaround", "--adaround-seconds", "nan"]),
        ("--weight-bits 4 static", [*QC, "--weight-bits", "4"]), ("--block-size static", [*QC, "--block-size", "64"]),
        ("--weight-zero-points static", [*QC, "--weight-zero-points"]),
        ("--block-size with 8 bits", [*MM, "--mode", "weight-only", "--block-size", "64"]),
        ("--block-size 7", [*MM, "--mode", "weight-only", "--weight-bits", "4", "--block-size", "7"]),
        ("--method in dynamic", [*MM, "--mode", "dynamic", "--method", "mse"]),
        ("--symmetric in dynamic", [*MM, "--mode", "dynamic", "--symmetric"]),
        ("--target in dynamic", [*MM, "--mode", "dynamic", "--calib", "mmcalib", "--target-cosine", "0.9"]),
        ("--format qoperator dynamic", [*MM, "--mode", "dynamic", "--format", "qoperator"]),
        ("--percentile without percentile", [*QC, "--percentile", "99"]),
        ("--smooth-mul without alpha", [*MM, "--calib", "mmcalib", "--smooth-mul"]),
        ("--adaround-seconds without adaround", [*QC, "--adaround-seconds", "5"]),
        ("--fallback without target", [*QC, "--fallback", "int16"]),
        ("--max-fallbacks without target", [*QC, "--max-fallbacks", "3"]),
        ("--metric without target", [*QC, "--metric", "metric.py"]),
        ("--speed-profile with --no-speed-guard", [*QC, "--speed-profile", "p.json"]),
        ("--load-stats with --smooth-alpha", [*Q, "--load-stats", "stats.npz", "--smooth-alpha", "0.5"]),
        ("recipe missing", [*QC, "--recipe", "nope.yaml"]), ("recipe garbage", [*QC, "--recipe", "user.txt"]),
        ("recipe bad yaml", [*QC, "--recipe", "bad.yaml"]), ("metric missing", [*QC, "--metric", "nope.py",
                                                                                "--target-metric", "1"]),
        ("metric broken", [*QC, "--metric", "broken.py", "--target-metric", "1"]),
        ("unknown option", [*QC, "--no-such-option"]), ("missing -o", ["quantize", "m.onnx", "--calib", "calib"]),
        ("unknown command", ["frobnicate"]), ("sensitivity without data", ["sensitivity", "m.onnx"]),
        ("convert --allow-random", ["convert", "qdq.onnx", "-o", "c.onnx", "--allow-random"]),
    ]
    setup = _all(_write("bad.yaml", "rules: [unclosed\n"), _write("broken.py", "def score(:\n"))
    cases = [Case(name, args, (2,), setup=setup) for name, args in usage]
    cases += [
        Case("--exclude matches nothing", [*QC, "--exclude", "nothing_by_this_name", "--json", "-q"], (0,),
             outputs=("out.onnx",), words=("nothing_by_this_name",)),
        Case("target-cpu garbage", [*QC, "--target-cpu", "user.txt"], (4,)),
        Case("speed-profile garbage", [*QC[:-1], "calib", "--speed-guard", "measure", "--speed-profile", "user.txt"],
             (4,)),
        Case("metric raises", [*QC, "--metric", "raise.py", "--target-metric", "2"], (4,),
             setup=_write("raise.py", "def score(r, c, f):\n    raise RuntimeError('boom')\n")),
        Case("metric NaN", [*QC, "--metric", "nanm.py", "--target-metric", "2"], (4,),
             setup=_write("nanm.py", "def score(r, c, f):\n    return float('nan')\n")),
        Case("gate missed writes the model", [*QC, "--min-sqnr", "200", "--report", "r.json"], (6,),
             outputs=("out.onnx", "r.json")),
        Case("output folder missing", ["quantize", "m.onnx", "-o", "no/out.onnx", "--calib", "calib"], (5,)),
        Case("output is a folder", ["quantize", "m.onnx", "-o", "calib", "--calib", "calib.npz"], (5,)),
        Case("output name too long", ["quantize", "m.onnx", "-o", "n" * 300, "--calib", "calib"], (5,)),
        Case("output name 250 bytes", [*QC[:2], "-o", "n" * 245 + ".onnx", *QC[4:], "-q"], (0,),
             outputs=("n" * 245 + ".onnx",)),
        Case("qat-prep --params folder missing", ["qat-prep", "m.onnx", "-o", "f.onnx", "--calib", "calib",
                                                  "--params", "no/p.json"], (5,)),
        Case("convert respects the input's float tensors", ["convert", "qdq.onnx", "-o", "c.onnx", "-q"], (0,),
             outputs=("c.onnx",)),
        Case("doctor cpuinfo garbage", ["doctor", "--cpuinfo", "calib.npz"], (0, 4)),
        Case("smooth-mul on a graph input", [*MM, "--calib", "mmcalib", "--smooth-alpha", "0.5", "--smooth-mul",
                                             "-q"], (0,), outputs=("out.onnx",)),
        Case("smooth-mul dynamic", [*MM, "--mode", "dynamic", "--calib", "mmcalib", "--smooth-alpha", "0.5",
                                    "--smooth-mul", "-q"], (0,), outputs=("out.onnx",)),
        Case("qat-prep on zeros: infinite SQNR summary", ["qat-prep", "m.onnx", "-o", "f.onnx", "--calib", "calib",
                                                          "--eval-data", "zeros"], (0,),
             outputs=("f.onnx", "f.params.json"), setup=_npz("zeros/0.npz", x=np.zeros((1, 3, 16, 16), np.float32))),
        Case("convert: infinite SQNR summary", ["convert", "qdq.onnx", "-o", "c.onnx", "--eval-data", "zeros"], (0,),
             outputs=("c.onnx",), setup=_npz("zeros/0.npz", x=np.zeros((1, 3, 16, 16), np.float32))),
    ]
    for case in cases:
        case.kind = "bad input" if case.expect != (0,) else "good input"
    return cases


def signal_cases() -> list[Case]:
    big = ["quantize", "m.onnx", "-o", "out.onnx", "--calib", "big", "--speed-guard", "off", "--report", "r.json"]
    triggers = ["onnxq-run-*", "onnxq-run-*+0.1", "onnxq-run-*+0.25", "t+0.6", "onnxq-run-*/onnxq-prepare-*",
                "onnxq-run-*/onnxq-calib-*", "onnxq-run-*/onnxq-eval-*", "onnxq-run-*/onnxq-fusion-*"]
    cases = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        for trigger in triggers:
            cases.append(Case(f"{signum.name} at {trigger}", big, (128 + signum, 0), outputs=("out.onnx", "r.json"),
                              signal=(signum, trigger), kind="signal"))
    for args, outputs, stage in (
            (["calibrate", "m.onnx", "--calib", "big", "-o", "s.npz"], ("s.npz",), "calib"),
            (["quantize", "mm.onnx", "-o", "out.onnx", "--mode", "dynamic", "--eval-data", "mmbig"], ("out.onnx",),
             "eval"),
            (["qat-prep", "m.onnx", "-o", "f.onnx", "--calib", "big"], ("f.onnx", "f.params.json"), "calib"),
            (["convert", "qdq.onnx", "-o", "c.onnx", "--eval-data", "big"], ("c.onnx",), "eval")):
        for signum in (signal.SIGINT, signal.SIGTERM):
            cases.append(Case(f"{signum.name} {args[0]} {args[-1]}", args, (128 + signum, 0), outputs=outputs,
                              signal=(signum, f"onnxq-run-*/onnxq-{stage}-*"), kind="signal"))
    return cases


def determinism_cases() -> list[Case]:
    runs = [
        ("static", [*QC, "--save-plan", "p.json", "--save-stats", "s.npz", "--save-recipe", "r.yaml"],
         ("out.onnx", "p.json", "s.npz", "r.yaml")),
        ("static mse symmetric per-tensor", [*QC, "--method", "mse", "--symmetric", "--per-tensor"], ("out.onnx",)),
        ("static kl", [*QC, "--method", "kl"], ("out.onnx",)),
        ("static percentile", [*QC, "--method", "percentile", "--percentile", "99.9"], ("out.onnx",)),
        ("static qoperator", [*QC, "--format", "qoperator"], ("out.onnx",)),
        ("static images", [*Q, "--calib", "imgs"], ("out.onnx",)),
        ("static stacked npz + eval", [*Q, "--calib", "calib.npz", "--eval-data", "eval"], ("out.onnx",)),
        ("static from stats", [*Q, "--load-stats", "stats.npz", "--method", "percentile"], ("out.onnx",)),
        ("static external data", ["quantize", "ext/a.onnx", "-o", "out.onnx", "--calib", "calib",
                                  "--speed-guard", "off"], ("out.onnx",)),
        ("static recipe", [*QC, "--recipe", "recipe.yaml"], ("out.onnx",)),
        ("static target", [*QC, "--target-cosine", "0.9999", "--max-fallbacks", "2"], ("out.onnx",)),
        ("static equalize + bias correction", [*QC, "--equalize", "--bias-correction"], ("out.onnx",)),
        ("dynamic", [*MM, "--mode", "dynamic"], ("out.onnx",)),
        ("dynamic smooth", [*MM, "--mode", "dynamic", "--calib", "mmcalib", "--smooth-alpha", "0.6"], ("out.onnx",)),
        ("weight-only 8", [*Q, "--mode", "weight-only"], ("out.onnx",)),
        ("weight-only 4", [*MM, "--mode", "weight-only", "--weight-bits", "4", "--block-size", "32"], ("out.onnx",)),
        ("calibrate", ["calibrate", "m.onnx", "--calib", "calib", "-o", "s.npz"], ("s.npz",)),
        ("merge-stats", ["merge-stats", "stats.npz", "stats.npz", "-o", "all.npz"], ("all.npz",)),
        ("qat-prep", ["qat-prep", "m.onnx", "-o", "f.onnx", "--calib", "calib"], ("f.onnx", "f.params.json")),
        ("convert", ["convert", "qdq.onnx", "-o", "c.onnx"], ("c.onnx",)),
        ("convert qoperator", ["convert", "qdq.onnx", "-o", "c.onnx", "--format", "qoperator"], ("c.onnx",)),
        ("sensitivity", ["sensitivity", "m.onnx", "--calib", "calib", "-o", "s.json"], ("s.json",)),
    ]
    return [Case(f"deterministic {name}", [*args, "-q"], (0,), outputs=outputs, repeat=True, kind="determinism")
            for name, args, outputs in runs]


FAST = {"clash -o = MODEL", "clash hard link to model", "clash -o = input external data", "NaN weights dynamic",
        "already QDQ model", "calib pickled npy", "calib mixed npz and png", "stats hand-edited width",
        "--target-cosine 2", "--weight-bits 4 static", "qat-prep --params folder missing",
        "SIGINT at onnxq-run-*+0.1", "SIGTERM at onnxq-run-*/onnxq-calib-*", "deterministic static",
        "deterministic convert"}  # `make test`: every kind of case, about half a minute on two cores


def all_cases() -> list[Case]:
    cases = [*clash_cases(), *model_cases(), *data_cases(), *stats_cases(), *option_cases(), *signal_cases(),
             *determinism_cases()]
    for case in cases:
        case.fast = case.name in FAST
    return cases


# ------------------------------------------------------------------ running and judging


@dataclass
class Outcome:
    case: Case
    code: int
    stderr: str
    problems: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)


def digest(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and ".cache-outside" not in path.parts:
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_case(case: Case, pool: Path, work: Path) -> Outcome:
    folder, tmp = work / "case", work / "tmp"
    shutil.copytree(pool, folder, symlinks=True)
    tmp.mkdir()
    if case.setup is not None:
        case.setup(folder)
    before = digest(folder)
    code, stdout, stderr = _execute(case, folder, tmp)
    outcome = Outcome(case, code, stderr)
    after = digest(folder)
    _judge(outcome, stdout, before, after, folder, tmp)
    if case.repeat and code == 0:
        again = run_case(Case(case.name, case.args, case.expect, case.outputs, case.setup), pool, work / "again")
        if again.problems:
            outcome.problems += again.problems
            outcome.detail += again.detail
        changed = [o for o in case.outputs if (folder / o).read_bytes() != (work / "again" / "case" / o).read_bytes()]
        if changed:
            outcome.problems.append("nondeterministic outputs")
            outcome.detail.append(f"differ between two runs: {changed}")
    return outcome


def _execute(case: Case, folder: Path, tmp: Path) -> tuple[int, str, str]:
    if case.signal is None:
        result = run_cli(case.args, folder, tmp)
        return result.returncode, result.stdout, result.stderr
    signum, trigger = case.signal
    env = {**os.environ, "TMPDIR": str(tmp), "ONNXQ_CACHE_DIR": str(folder / ".cache-outside")}
    process = subprocess.Popen([sys.executable, "-m", "onnxq", *case.args], cwd=folder, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    pattern, _, delay = trigger.partition("+")  # "t+S": S seconds after start; "GLOB[+S]": S after GLOB appears
    while process.poll() is None and time.monotonic() - start < TIMEOUT:
        if pattern == "t" or any(tmp.glob(pattern)):
            break
        time.sleep(0.002)
    time.sleep(float(delay or 0))
    if process.poll() is None:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    return process.returncode, stdout, stderr


def _judge(outcome: Outcome, stdout: str, before: dict, after: dict, folder: Path, tmp: Path) -> None:
    case, code, stderr = outcome.case, outcome.code, outcome.stderr
    problems, detail = outcome.problems, outcome.detail
    if "Traceback" in stdout + stderr:
        problems.append("tracebacks")
    if code == 1 or "internal error" in stderr:
        problems.append("exit-1 internal errors")
    if code not in case.expect:
        problems.append("wrong exit code")
    succeeded = code in (0, 6)
    lines = stderr.splitlines()
    if not succeeded and (len(lines) != 1 or not lines[0].startswith("onnxq: ")):
        problems.append("not one line")
    if case.words and not succeeded and not all(w.lower() in stderr.lower() for w in case.words):
        detail.append(f"message lacks {case.words}")
        problems.append("wrong exit code")
    if case.words and succeeded and not all(w in stdout + stderr for w in case.words):
        detail.append(f"output lacks {case.words}")
        problems.append("wrong exit code")
    written = set(case.outputs) if succeeded or "after the outputs were written" in stderr else set()
    changed = sorted(p for p in before if p not in written and after.get(p) != before[p])
    if changed:
        problems.append("inputs changed")
        detail.append(f"changed or removed: {changed[:5]}")
    new = sorted(p for p in after if p not in before and p not in written)
    temporary = [p for p in after if Path(p).name.startswith(".onnxq-")]
    missing = [o for o in written if not (folder / o).is_file() or (folder / o).stat().st_size == 0]
    if new or temporary or missing:
        problems.append("partial or stale outputs")
        detail.append(f"new {new[:5]}, temporary {temporary[:5]}, missing {missing}")
    left = sorted(p.name for p in tmp.iterdir())
    if left:
        problems.append("temporary files or folders left")
        detail.append(f"in TMPDIR: {left[:5]}")
    for name in written:
        if name.endswith(".onnx") and (folder / name).is_file():
            try:
                onnx.checker.check_model(str(folder / name))
            except Exception as exc:
                problems.append("partial or stale outputs")
                detail.append(f"{name} does not load: {str(exc)[:100]}")


def run_all(cases: list[Case], jobs: int, keep: Path | None) -> list[Outcome]:
    root = Path(tempfile.mkdtemp(prefix="redteam-", dir=keep))
    pool = root / "pool"
    write_pool(pool)
    finish_pool(pool)

    def one(index_case: tuple[int, Case]) -> Outcome:
        index, case = index_case
        work = root / f"{index:03d}"
        work.mkdir()
        outcome = run_case(case, pool, work)
        if keep is None and not outcome.problems:
            shutil.rmtree(work, ignore_errors=True)
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool_executor:
        outcomes = list(pool_executor.map(one, enumerate(cases)))
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return outcomes


def summary(outcomes: list[Outcome]) -> tuple[str, Counter]:
    counts = Counter({p: 0 for p in PROBLEMS})
    for outcome in outcomes:
        counts.update(set(outcome.problems))
    kinds = Counter(o.case.kind for o in outcomes)
    signal_late = sum(1 for o in outcomes if o.case.signal and o.code == 0)
    lines = [f"{len(outcomes)} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
             + f" ({signal_late} signals arrived after the run had finished)"]
    lines += [f"  {name:34s} {counts[name]}" for name in PROBLEMS]
    for outcome in outcomes:
        if outcome.problems:
            stderr = outcome.stderr.strip()
            shown = stderr[-900:] if "Traceback" in stderr else stderr[:300]
            lines.append(f"FAIL {outcome.case.name}: exit {outcome.code}, {sorted(set(outcome.problems))}; "
                         f"{'; '.join(outcome.detail)}; stderr: {shown!r}")
    return "\n".join(lines), counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the subset `make test` runs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="cases whose name contains this")
    parser.add_argument("--keep", type=Path, help="keep failing cases' folders under this folder")
    args = parser.parse_args()
    cases = [c for c in all_cases() if (c.fast or not args.fast) and (args.only is None or args.only in c.name)]
    start = time.monotonic()
    outcomes = run_all(cases, args.jobs, args.keep)
    text, counts = summary(outcomes)
    print(text)
    print(f"{time.monotonic() - start:.0f} s")
    return 1 if sum(counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
