"""`quantize` end to end, and the `sensitivity` and `calibrate` commands beside it.

Static mode (onnxq.commands.static_flow) runs prepare -> place -> statistics (onnxq.commands.stages) ->
speed guard -> automatic search or accuracy target -> recovery -> plan -> rewrite -> check -> report;
--mode dynamic and weight-only (onnxq.commands.dynamic_flow) need no calibration. Each stage returns its
own result (onnxq.commands.stages says which), and each stage's result can be saved and reused:
statistics (--save-stats/--load-stats) and the plan (--save-plan) are files; the report says what every
stage did and how long it took.
"""

from __future__ import annotations

from pathlib import Path

from onnxq.commands.checks import check_targets
from onnxq.commands.dynamic_flow import quantize_without_calibration
from onnxq.commands.request import (
    RANDOM_SAMPLES,
    DataOptions,
    QuantizeRequest,
    QuantizeResult,
    check_batch_size,
)
from onnxq.commands.stages import calibrated, trial_builder
from onnxq.commands.static_flow import quantize_static
from onnxq.commands.written import check_written_model
from onnxq.enums import Mode
from onnxq.errors import UsageError
from onnxq.model_io import load_model, model_digest
from onnxq.outputs import transaction
from onnxq.passes.prepare import prepare_model
from onnxq.paths import DATA, MODEL, OUTPUT, PathArg, check_paths, quantize_paths
from onnxq.quant.ir import import_graph
from onnxq.quant.placement import tensors_to_observe, value_aliases
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import model_input_specs, open_calibration, random_source
from onnxq.runtime.evaluate import CachedReference
from onnxq.runtime.session import ProgressFactory, no_progress
from onnxq.search.distributed import collect
from onnxq.search.sensitivity import SensitivityResult, Target, measure_sensitivity

__all__ = ["DataOptions", "QuantizeRequest", "QuantizeResult", "calibrate_only", "calibrated", "check_batch_size",
           "check_written_model", "quantize", "quantize_static", "quantize_without_calibration", "sensitivity"]


def quantize(request: QuantizeRequest, progress: ProgressFactory = no_progress) -> QuantizeResult:
    """Quantize `request.model`; its outputs (model, statistics, plan, recipe) are all written at the end, or none."""
    if request.output is None:
        raise UsageError("quantize needs an output path for the int8 model (-o)")
    check_paths(quantize_paths(request))
    target = request.target or Target()
    check_targets(request.min_cosine, request.min_sqnr, target.min_cosine, target.min_sqnr_db, target.min_metric)
    with transaction():
        if request.mode != Mode.STATIC:
            return quantize_without_calibration(request, progress)
        return quantize_static(request, progress)


def sensitivity(request: QuantizeRequest, progress: ProgressFactory = no_progress) -> SensitivityResult:
    """Rank the int8 layers of `request.model` by measured sensitivity (no model is written)."""
    if request.data.eval_data is None and request.data.calib is None:
        raise UsageError("sensitivity needs samples to measure on: give --eval-data or --calib")
    c = calibrated(request, progress, writes_model=False)
    reference = CachedReference(c.prepared.reference, c.samples.held, request.sensitivity_samples)
    build = trial_builder(c.prepared, c.placed, c.stats, c.setup.settings, request.fallback)
    result = measure_sensitivity(build, c.placed.int8_layers(), reference, progress)
    result.notes = [*c.notes, *_unapplied_repairs(request)]
    return result


def _unapplied_repairs(request: QuantizeRequest) -> list[str]:
    """Repairs a recipe turns on that the ranking does not apply (it measures each layer as plain int8)."""
    return [f"the recipe's {key}: true is not applied: each layer is measured as plain int8, before any repair"
            for key in ("bias_correction", "adaround") if request.recipe.settings.get(key)]


def calibrate_only(model_path: Path, output: Path | None, data: DataOptions,
                   progress: ProgressFactory = no_progress) -> Statistics:
    """Collect (and save, unless `output` is None) statistics for every tensor quantize may need (for
    --load-stats later)."""
    check_paths([PathArg("MODEL", model_path, MODEL), PathArg("--calib", data.calib, DATA),
                 PathArg("-o", output, OUTPUT)])
    original = load_model(model_path, lazy_weights=True)
    prepared = prepare_model(original, model_path)
    graph = import_graph(prepared.model)
    tensors = tensors_to_observe(graph)
    specs = model_input_specs(original)
    check_batch_size(data.batch_size, specs)
    if data.calib is None:
        if not data.allow_random:
            raise UsageError("no calibration data: give --calib DATA (or --allow-random)")
        source = random_source(specs, RANDOM_SAMPLES, shapes=data.input_shapes).first(data.max_samples)
    else:
        source = open_calibration(data.calib, specs, data.images, data.max_samples)
    stats = collect(prepared.model, tensors, source, data.ray, batch_size=data.batch_size,
                    memory_budget=data.memory_budget, progress=progress, aliases=value_aliases(graph, tensors))
    stats.model_digest = model_digest(prepared.model)
    if output is not None:
        stats.save(output)
    return stats
