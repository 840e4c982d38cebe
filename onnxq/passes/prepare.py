"""Make an exported fp32 model ready to quantize, without changing what it computes.

- initializers also listed as graph inputs (older exporters) become plain constants;
- opsets below 13 are converted to 13 (per-channel QuantizeLinear needs it), before the
  initializer inputs go (the converter needs IR 3 models as they are);
- onnxruntime's provider-independent (basic) optimisations run (again, up to twice, while they
  fold more): Constant nodes become initializers, constants fold, BatchNormalization folds
  into Conv, no-ops go;
- constant per-channel Mul/Add right after a Conv, or read only by a Conv, fold into it (onnxq.passes.simplify);
- ReduceMean over all spatial axes becomes GlobalAveragePool, each Conv/Gemm gets its own bias (onnxq.passes.simplify);
- shapes and types are inferred so every later stage knows which tensors are float.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import version_converter

from onnxq.errors import ModelError, first_line
from onnxq.model_io import (
    externalize,
    load_weights,
    needs_external_data,
    save_for_onnxruntime,
    spill,
    spill_folder,
    weights_on_disk,
)
from onnxq.passes.simplify import (
    fold_affine_into_conv,
    fold_affine_into_next_conv,
    means_to_global_pool,
    unshare_biases,
)
from onnxq.quant.ir import all_proto_nodes
from onnxq.runtime.session import write_optimized

MIN_OPSET = 13
ORT_MIN_OPSET = 7  # onnxruntime has no kernels for older ai.onnx operators


@dataclass
class PreparedModel:
    model: onnx.ModelProto
    reference: onnx.ModelProto  # the fp32 model int8 is compared against: the user's, if onnxruntime runs it
    notes: list[str] = field(default_factory=list)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


def drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Remove graph inputs that are really weights; returns their names."""
    initializers = {t.name for t in model.graph.initializer}
    dropped = [i.name for i in model.graph.input if i.name in initializers]
    if dropped:
        kept = [i for i in model.graph.input if i.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return dropped


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        reason = first_line(exc)
        raise ModelError(
            f"model uses opset {default_opset(model)}; converting it to opset {MIN_OPSET} "
            f"(needed for per-channel quantization) failed: {reason}"
        ) from None
    # The converter keeps the old IR version; opset 13 needs IR 7 (IR 3 also demands initializers as inputs).
    minimum = onnx.helper.find_min_ir_version_for(list(upgraded.opset_import), ignore_unknown=True)
    upgraded.ir_version = max(upgraded.ir_version, minimum)
    return upgraded


def optimize_basic(model: onnx.ModelProto, source: Path | None = None) -> onnx.ModelProto:
    """Run onnxruntime's basic graph optimisations (again while they fold more) and read the result back.

    onnxruntime inlines function ops (CastLike, a model's local functions) after folding constants, so
    constants computed inside them (PyTorch's dynamo exporter with optimize=False writes every bias-less
    Conv's zero bias as Expand(CastLike(0, x), Shape(w))) only fold, and BatchNormalization only folds
    into that Conv, in a second pass. `source`: the file `model` was loaded from without its weights
    (onnxruntime reads them there: a model over 2 GiB is never in memory twice).
    """
    optimized = _optimize_once(model, source)
    for _ in range(MAX_EXTRA_PASSES):
        if not _has_foldable_nodes(optimized):
            break
        again = _optimize_once(optimized)
        if len(again.graph.node) >= len(optimized.graph.node):
            break
        optimized = again
    return optimized


MAX_EXTRA_PASSES = 2
UNFOLDED_OPS = {"Constant", "QuantizeLinear", "DequantizeLinear"}  # onnxruntime keeps these on purpose


def _has_foldable_nodes(model: onnx.ModelProto) -> bool:
    constants = {t.name for t in model.graph.initializer}
    return any(node.op_type not in UNFOLDED_OPS and any(node.input)
               and all(name in constants for name in node.input if name) for node in model.graph.node)


def _optimize_once(model: onnx.ModelProto, source: Path | None = None) -> onnx.ModelProto:
    """onnxruntime's basic optimisations; a result over 2 GiB keeps its weights in onnxruntime's file (spilled)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-prepare-") as tmp:
        large = needs_external_data(model)
        target = (spill_folder() if large else Path(tmp)) / "optimized.onnx"
        source = source or save_for_onnxruntime(model, Path(tmp), "source.onnx")
        write_optimized(source, target, "basic", external_data="optimized.data" if large else None)
        optimized = onnx.load(str(target), load_external_data=not large)
        if large:
            spill(optimized, target.parent)
    _keep_used_opsets(optimized)
    del optimized.metadata_props[:]
    optimized.metadata_props.extend(model.metadata_props)
    return optimized


def _keep_used_opsets(model: onnx.ModelProto) -> None:
    """onnxruntime lists every domain it knows; keep the ones the graph uses."""
    used = {"", "ai.onnx"} | {node.domain for node in all_proto_nodes(model.graph)}
    kept = [entry for entry in model.opset_import if entry.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes and types (value_info).

    Inference runs on the model without its large weights (it reads their types and dims only; handing it
    the weights would serialize and parse them). Up to 2 GiB the result is a new model, the inferred graph
    with the original initializers; over 2 GiB (one protobuf message cannot hold it) the value_info of
    `model` itself is replaced: copying the weights would double memory.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(externalize(model, None, "weights"), check_type=False,
                                                     strict_mode=False, data_prop=True)
    except Exception:
        return model  # inference is a help, not a requirement: unknown tensors simply stay float
    if not needs_external_data(model):
        del inferred.graph.initializer[:]  # the skeleton's, in the same order: the real ones go back
        inferred.graph.initializer.extend(model.graph.initializer)
        return inferred
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def prepare_model(model: onnx.ModelProto, source: Path | None = None) -> PreparedModel:
    """The fp32 model that statistics, plan and rewrite all refer to.

    `model` may come without its weights (model_io.load_model(path, lazy_weights=True), a model over
    2 GiB): `source` is then its file, onnxruntime's first pass reads the weights from there and the
    prepared model is also the fp32 reference (it computes the same), so the weights are in memory once.
    """
    work = model  # copied before the first step that changes it: `model` stays as it was
    lazy = on_disk = weights_on_disk(work)
    if on_disk and (source is None or default_opset(work) < MIN_OPSET or _initializer_inputs(work)):
        work = _with_weights(_copy(work), source)  # the steps before onnxruntime's need them in memory
        on_disk = False
    notes: list[str] = []
    # Upgrade first: the converter needs IR 3 models as they are, initializers listed as inputs.
    opset = default_opset(work)
    reference = model
    if opset < MIN_OPSET:
        work = upgrade_opset(work)
        notes.append(f"opset {opset} converted to {MIN_OPSET}")
        if opset < ORT_MIN_OPSET:
            reference = onnx.ModelProto()
            reference.CopyFrom(work)
            notes.append(f"onnxruntime does not run opset {opset}: the fp32 reference is the opset "
                         f"{MIN_OPSET} conversion")
    if work is model and _initializer_inputs(work):
        work = _copy(work)
    dropped = drop_initializer_inputs(work)
    if dropped:
        notes.append(f"{len(dropped)} initializers were also listed as graph inputs; treated as constants")
    # onnxruntime reads the file itself while the model is still all that file holds (no serialized copy)
    work = optimize_basic(work, source if on_disk or (work is model and _whole_file(work, source)) else None)
    work, folded = fold_affine_into_conv(work)
    if folded:
        notes.append(f"{folded} constant Mul/Add ops after Conv folded into its weights and bias")
    work, folded = fold_affine_into_next_conv(work)
    if folded:
        notes.append(f"{folded} constant Mul/Add ops before a Conv folded into its weights and bias")
    work, copies = unshare_biases(work)
    if copies:
        notes.append(f"{copies} Conv/Gemm biases shared with another node (or merged as equal by onnxruntime) "
                     f"copied: each is quantized with its node's input scale")
    work = infer_types(work)
    work, pooled = means_to_global_pool(work)  # needs the ranks inferred above
    if pooled:
        notes.append(f"{pooled} ReduceMean ops over all spatial axes written as GlobalAveragePool")
        work = infer_types(work)
    return PreparedModel(work, work if lazy else reference, notes)


def _whole_file(model: onnx.ModelProto, source: Path | None) -> bool:
    """`source` is `model` serialized, weights and all: a file whose weights are external data beside it is
    smaller than the model read with them (onnxruntime's optimized copy would refer to those files by name)."""
    return source is not None and source.is_file() and source.stat().st_size == model.ByteSize()


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)  # cheap when the weights are on disk
    return copied


def _initializer_inputs(model: onnx.ModelProto) -> bool:
    initializers = {t.name for t in model.graph.initializer}
    return any(i.name in initializers for i in model.graph.input)


def _with_weights(model: onnx.ModelProto, source: Path | None) -> onnx.ModelProto:
    if source is None:
        raise ModelError("the model's weights are not loaded and its file is not known")
    load_weights(model, source)
    return model
