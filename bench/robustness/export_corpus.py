"""Export a corpus of "models we have never seen" with today's PyTorch exporters (robustness sweep).

Run in bench/.venv-export (torch CPU, torchvision installed with --no-deps, onnxscript):
    python bench/robustness/export_corpus.py [--out /tmp/robust] [--only NAME ...] [--exporters ts13 ts17 dynamo]
Writes OUT/models/<name>__<exporter>.onnx and OUT/calib/<name>__<exporter>/sNNN.npz (8 random feeds).
Random init (no pretrained weights offline); a few train-mode passes first so BatchNorm statistics are
not the identity. Failures to export are logged to OUT/export_log.json, not raised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.library
from torch import nn

warnings.filterwarnings("ignore")

# The PyPI torchvision wheel is the CUDA build; its C ops (nms, roi_align) cannot load against CPU torch.
# The classification/segmentation/video models do not need them: skip registering their fake kernels.
_register_fake = torch.library.register_fake


def _tolerant_register_fake(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith("torchvision::"):
        return None if args else (lambda fn: fn)
    return _register_fake(op, *args, **kwargs)


torch.library.register_fake = _tolerant_register_fake
import torchvision.models as tvm  # noqa: E402
import torchvision.models.segmentation as tvs  # noqa: E402
import torchvision.models.video as tvv  # noqa: E402

torch.library.register_fake = _register_fake

CALIB_SAMPLES = 8


@dataclass
class Spec:
    """One model: a factory, example inputs (batch 2) and which axes are dynamic."""

    build: Callable[[], nn.Module]
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]
    outputs: list[str] = field(default_factory=lambda: ["output"])
    warm: bool = True  # train-mode passes to move BatchNorm statistics


def image(size: int, channels: int = 3) -> dict[str, torch.Tensor]:
    return {"input": torch.randn(2, channels, size, size)}


TOKENS = {"input_ids": torch.randint(0, 200, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.int64)}
TOKEN_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
IMAGE_AXES = {"input": {0: "batch", 2: "height", 3: "width"}}
BATCH_AXES = {"input": {0: "batch"}}


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(input_size=32, hidden_size=64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class AudioConv(nn.Module):
    """1-D conv keyword spotter on raw waveform."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 1
        for out, k, s in [(32, 80, 4), (32, 3, 1), (64, 3, 1), (64, 3, 1)]:
            layers += [nn.Conv1d(ch, out, k, stride=s, padding=k // 2), nn.BatchNorm1d(out), nn.ReLU(), nn.MaxPool1d(4)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=-1))


class CondModel(nn.Module):
    """Data-dependent branch: torch.cond (dynamo) / scripted if (TorchScript) -> ONNX If."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = torch.cond(y.mean() > 0.3, lambda t: torch.relu(self.a(t)), lambda t: self.b(t) * 0.5, (y,))
        return self.head(y.mean(dim=(2, 3)))


class ScriptedCond(CondModel):
    """The same branch written for torch.jit.script."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if bool(y.mean() > 0.3):  # noqa: SIM108 - a statement, so TorchScript exports an ONNX If
            y = torch.relu(self.a(y))
        else:
            y = self.b(y) * 0.5
        return self.head(y.mean(dim=(2, 3)))


class HFEncoder(nn.Module):
    """A small randomly initialised Hugging Face model (no download): last hidden state or logits."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        import transformers

        if kind == "bert":
            config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128,
                                             attn_implementation="eager")
            self.model = transformers.BertModel(config)
        else:
            config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4,
                                             attn_implementation="eager")
            self.model = transformers.GPT2LMHeadModel(config)  # lm_head tied to the token embedding
        self.kind = kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False) \
            if self.kind == "gpt2" else self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if self.kind == "gpt2" else out.last_hidden_state


class TiedLM(nn.Module):
    """Embedding tied to the output projection, plus one Linear applied twice (shared weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(200, 64)
        self.mix = nn.Linear(64, 64)
        self.out = nn.Linear(64, 200, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = torch.relu(self.mix(h))
        h = torch.relu(self.mix(h))
        return self.out(h)


def specs() -> dict[str, Spec]:
    img = {name: Spec(lambda f=factory: f(weights=None), image(64), IMAGE_AXES) for name, factory in [
        ("resnet18", tvm.resnet18), ("mobilenet_v3_small", tvm.mobilenet_v3_small),
        ("efficientnet_b0", tvm.efficientnet_b0), ("shufflenet_v2_x0_5", tvm.shufflenet_v2_x0_5),
        ("densenet121", tvm.densenet121), ("regnet_y_400mf", tvm.regnet_y_400mf),
        ("mnasnet0_5", tvm.mnasnet0_5), ("convnext_tiny", tvm.convnext_tiny)]}
    out = {
        **img,
        "squeezenet1_1": Spec(lambda: tvm.squeezenet1_1(weights=None), image(96), IMAGE_AXES),
        "googlenet": Spec(lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=True), image(64),
                          IMAGE_AXES),
        "swin_t": Spec(lambda: tvm.swin_t(weights=None), image(64), BATCH_AXES),
        "vit_b_16": Spec(lambda: tvm.vit_b_16(weights=None), image(224), BATCH_AXES, warm=False),
        "lraspp_mobilenet_v3_large": Spec(lambda: tvs.lraspp_mobilenet_v3_large(weights=None,
                                                                                 weights_backbone=None),
                                          image(96), IMAGE_AXES),
        "deeplabv3_mobilenet_v3_large": Spec(lambda: tvs.deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, aux_loss=False), image(96), IMAGE_AXES),
        "r3d_18": Spec(lambda: tvv.r3d_18(weights=None), {"input": torch.randn(2, 3, 4, 32, 32)},
                       {"input": {0: "batch", 2: "time", 3: "height", 4: "width"}}),
        "transformer_encoder": Spec(TransformerClassifier, {"input": torch.randn(2, 16, 64)},
                                    {"input": {0: "batch", 1: "sequence"}}),
        "lstm": Spec(lambda: RNNClassifier(nn.LSTM), {"input": torch.randn(2, 20, 32)},
                     {"input": {0: "batch", 1: "sequence"}}),
        "gru": Spec(lambda: RNNClassifier(nn.GRU), {"input": torch.randn(2, 20, 32)},
                    {"input": {0: "batch", 1: "sequence"}}),
        "audio_conv1d": Spec(AudioConv, {"input": torch.randn(2, 1, 8000)}, {"input": {0: "batch", 2: "samples"}}),
        "cond": Spec(CondModel, image(32), BATCH_AXES),
        "bert_tiny": Spec(lambda: HFEncoder("bert"), TOKENS, TOKEN_AXES, warm=False),
        "gpt2_tiny": Spec(lambda: HFEncoder("gpt2"), TOKENS, TOKEN_AXES, warm=False),
        "tied_lm": Spec(TiedLM, {"ids": torch.randint(0, 200, (2, 12))}, {"ids": {0: "batch", 1: "sequence"}},
                        warm=False),
    }
    return out


def post(out: dict | tuple | torch.Tensor) -> torch.Tensor:
    """Segmentation models return {"out": ...}; export the main tensor only."""
    return out["out"] if isinstance(out, dict) else out


class Unwrap(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return post(self.inner(*args))


def prepared(spec: Spec) -> nn.Module:
    torch.manual_seed(0)
    model = spec.build()
    if spec.warm:
        model.train()
        with torch.no_grad():
            for _ in range(3):
                feeds = [torch.randn_like(t) * 1.5 + 0.2 if t.is_floating_point() else t for t in spec.inputs.values()]
                model(*feeds)
    return Unwrap(model.eval())


def _export_dynamo(model: nn.Module, args: tuple, names: list[str], dynamic: dict[str, dict[int, str]],
                   outputs: list[str], path: Path, optimize: bool = True) -> None:
    dims = {n: {axis: torch.export.Dim.AUTO for axis in dynamic.get(n, {})} for n in names}
    program = torch.onnx.export(model, args, dynamo=True, input_names=names, output_names=outputs,
                                dynamic_shapes=(tuple(dims[n] for n in names),), verbose=False, optimize=optimize)
    program.save(str(path))


def export_one(name: str, spec: Spec, exporter: str, path: Path) -> None:
    model = prepared(spec)
    args = tuple(spec.inputs.values())
    names = list(spec.inputs)
    if exporter.startswith("dynamo"):
        optimize = exporter != "dynamo_noopt"  # unoptimized: local functions, Constant nodes, no folding
        try:
            _export_dynamo(model, args, names, spec.dynamic, spec.outputs, path, optimize)
        except Exception:  # symbolic shapes the exporter cannot solve: dynamic batch only
            _export_dynamo(model, args, names, {n: {0: "batch"} for n in names}, spec.outputs, path, optimize)
        return
    functions = exporter.endswith("fn")  # TorchScript's export_modules_as_functions: ONNX local functions
    opset = int(exporter.removeprefix("ts").removesuffix("fn"))
    if name == "cond":
        torch.manual_seed(0)
        inner = ScriptedCond()
        inner.load_state_dict(model.inner.state_dict())
        model = torch.jit.script(inner.eval())
    axes = {**spec.dynamic, spec.outputs[0]: {0: "batch"}}
    torch.onnx.export(model, args, str(path), input_names=names, output_names=spec.outputs, dynamic_axes=axes,
                      opset_version=opset, do_constant_folding=True, dynamo=False,
                      export_modules_as_functions=_function_modules(model) if functions else False)


def _function_modules(model: nn.Module) -> set[type[nn.Module]]:
    """Block-level module classes (those holding a Conv or Linear and more) exported as ONNX functions."""
    kinds = set()
    for module in model.modules():
        children = list(module.children())
        if (len(children) > 1 and any(isinstance(c, (nn.Conv2d, nn.Linear)) for c in children)
                and type(module) not in (nn.Sequential, Unwrap)):
            kinds.add(type(module))
    return kinds


def calib_feeds(path: Path, spec: Spec, folder: Path) -> None:
    """8 feeds: batch 1 where the batch axis is dynamic, example sizes elsewhere."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    examples = dict(spec.inputs)
    graph_inputs = [v for v in model.graph.input if v.name not in inits]
    for i in range(CALIB_SAMPLES):
        feeds = {}
        for value, (_, example) in zip(graph_inputs, examples.items(), strict=True):
            shape = list(example.shape)
            dims = value.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                shape[0] = 1
            if example.is_floating_point():
                feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
            elif "mask" in value.name:
                feeds[value.name] = np.ones(shape, np.int64)
            else:
                feeds[value.name] = rng.integers(0, 200, shape).astype(np.int64)
        np.savez(folder / f"s{i:03d}.npz", **feeds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("/tmp/robust"))
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--log", default="export_log.json", help="log file name (one per parallel run)")
    parser.add_argument("--exporters", nargs="*", default=["ts13", "ts17", "dynamo"])
    args = parser.parse_args()
    (args.out / "models").mkdir(parents=True, exist_ok=True)
    log_path = args.out / args.log
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    for name, spec in specs().items():
        if args.only and name not in args.only:
            continue
        for exporter in args.exporters:
            key = f"{name}__{exporter}"
            path = args.out / "models" / f"{key}.onnx"
            start = time.time()
            try:
                export_one(name, spec, exporter, path)
                calib_feeds(path, spec, args.out / "calib" / key)
                log[key] = {"ok": True, "seconds": round(time.time() - start, 1)}
            except Exception as exc:
                path.unlink(missing_ok=True)
                log[key] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                            "trace": traceback.format_exc()[-2000:]}
            print(key, "ok" if log[key]["ok"] else log[key]["error"], f"{time.time() - start:.1f}s", flush=True)
            log_path.write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
