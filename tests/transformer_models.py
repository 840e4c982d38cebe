"""Small generated transformers for the weight-only int4 tests: token ids in, logits (or hidden states) out.

A decoder-style model: token embedding (Gather) + position embedding, `layers` pre-norm blocks
(LayerNormalization, Q/K/V/output MatMuls with biases, softmax attention with the attention mask as an
additive bias, a GELU-free FFN with Relu), a final LayerNorm and an LM head. With `tied`, the LM head's
weight is the token table transposed, stored as its own initializer as exporters write it. A few
LayerNorm scales are large, so activations have the outlier channels real transformers have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_transformer(vocab: int = 96, dim: int = 64, layers: int = 2, ffn: int = 128, seq: int | None = None,
                     tied: bool = True, seed: int = 0, batch: int | None = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    table = (rng.standard_normal((vocab, dim)) * 0.5).astype(np.float32)
    const("tok_table", table)
    const("pos_table", (rng.standard_normal((64, dim)) * 0.1).astype(np.float32))
    tok = node("Gather", ["tok_table", "input_ids"], "tok")
    shape = node("Shape", ["input_ids"], "ids_shape")
    length = node("Gather", [shape, const("one", np.array(1, np.int64))], "length", axis=0)
    positions = node("Range", [const("zero", np.array(0, np.int64)), length, const("step", np.array(1, np.int64))],
                     "positions")
    pos = node("Gather", ["pos_table", positions], "pos")
    x = node("Add", [tok, pos], "x0")
    mask = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask = node("Unsqueeze", [mask, const("axis1", np.array([1], np.int64))], "mask_u")
    bias = node("Mul", [node("Sub", [const("onef", np.array(1.0, np.float32)), mask], "mask_inv"),
                        const("neg", np.array(-1e4, np.float32))], "mask_bias")

    def linear(inp: str, k: int, n: int, name: str, scale: float = 1.0) -> str:
        w = (rng.standard_normal((k, n)) * scale / np.sqrt(k)).astype(np.float32)
        y = node("MatMul", [inp, const(f"{name}.weight", w)], f"{name}.mm")
        return node("Add", [y, const(f"{name}.bias", (rng.standard_normal(n) * 0.02).astype(np.float32))], name)

    def norm(inp: str, name: str) -> str:
        gamma = np.ones(dim, np.float32) + 0.1 * rng.standard_normal(dim).astype(np.float32)
        gamma[rng.choice(dim, 3, replace=False)] = 6.0  # outlier channels
        beta = const(f"{name}.b", np.zeros(dim, np.float32))
        return node("LayerNormalization", [inp, const(f"{name}.g", gamma), beta], name, axis=-1, epsilon=1e-5)

    for i in range(layers):
        h = norm(x, f"l{i}.ln1")
        q, k, v = (linear(h, dim, dim, f"l{i}.{p}") for p in "qkv")
        kt = node("Transpose", [k], f"l{i}.kt", perm=[0, 2, 1])
        scores = node("Mul", [node("MatMul", [q, kt], f"l{i}.qk"), const(f"l{i}.scale",
                                                                         np.array(dim**-0.5, np.float32))], f"l{i}.s")
        probs = node("Softmax", [node("Add", [scores, bias], f"l{i}.masked")], f"l{i}.p", axis=-1)
        attn = node("MatMul", [probs, v], f"l{i}.attn")
        x = node("Add", [x, linear(attn, dim, dim, f"l{i}.o")], f"l{i}.res1")
        h = norm(x, f"l{i}.ln2")
        up = node("Relu", [linear(h, dim, ffn, f"l{i}.up")], f"l{i}.act")
        x = node("Add", [x, linear(up, ffn, dim, f"l{i}.down")], f"l{i}.res2")
    h = norm(x, "final_ln")
    head = np.ascontiguousarray(table.T) if tied else (rng.standard_normal((dim, vocab)) * 0.1).astype(np.float32)
    node("MatMul", [h, const("lm_head.weight", head)], "logits")
    seq_dim = seq if seq is not None else "seq"
    batch_dim = batch if batch is not None else "batch"
    tokens = [batch_dim, seq_dim]
    graph = helper.make_graph(nodes, "tiny_transformer",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, tokens),
                               helper.make_tensor_value_info("attention_mask", TensorProto.INT64, tokens)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, seq_dim, vocab])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def token_feeds(count: int, vocab: int = 96, seed: int = 1, min_len: int = 6, max_len: int = 24,
                pad_to: int | None = None) -> list[dict[str, np.ndarray]]:
    """Token-id feeds of varying lengths (a Zipf-like id distribution); padded with masks when `pad_to`."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        length = int(rng.integers(min_len, max_len + 1))
        ids = np.minimum(rng.zipf(1.3, length) - 1, vocab - 1).astype(np.int64)
        mask = np.ones(length, np.int64)
        if pad_to is not None:
            ids = np.concatenate([ids, np.zeros(pad_to - length, np.int64)])
            mask = np.concatenate([mask, np.zeros(pad_to - length, np.int64)])
        feeds.append({"input_ids": ids[None], "attention_mask": mask[None]})
    return feeds


def write_feeds(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **feed)
    return folder
