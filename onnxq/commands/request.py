"""What `quantize` is asked to do (QuantizeRequest, DataOptions), what it answers (QuantizeResult), and the
questions every flow asks of a request: the settings for the target CPU, the held-back share, whether the
automatic search runs and what it may try."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from onnxq.commands.dynamic import WeightOnlyOptions
from onnxq.commands.option_table import default_of
from onnxq.commands.recipe import Recipe, Rule, Selector
from onnxq.cpu import TargetCpu, default_weight_range
from onnxq.enums import Format, Mode, SpeedGuard, WeightRange
from onnxq.errors import UsageError
from onnxq.quant.plan import QuantPlan, QuantSettings
from onnxq.runtime.calibrate import DEFAULT_MEMORY_BUDGET
from onnxq.runtime.data import DataArg, ImagePreprocessing, InputSpec
from onnxq.runtime.evaluate import Fidelity
from onnxq.search import auto
from onnxq.search.distributed import RayOptions
from onnxq.search.sensitivity import Target
from onnxq.search.speed_guard import MODES

RANDOM_SAMPLES = 16  # --allow-random: samples drawn
EVAL_SAMPLES = 32  # held-back samples the fidelity report measures on (default; None: all)
HOLDOUT = 0.1  # share of --calib held back for the fidelity report without the automatic search


@dataclass
class DataOptions:
    calib: DataArg | None = None  # a path, or feeds from code (onnxq.runtime.loaders)
    eval_data: DataArg | None = None
    allow_random: bool = False
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --allow-random: open dimensions
    batch_size: int = 1
    max_samples: int | None = None
    images: ImagePreprocessing | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    ray: RayOptions | None = None  # calibrate (and search) on Ray (onnxq.search.distributed)


@dataclass
class QuantizeRequest:
    model: Path
    output: Path | None = None  # where quantize writes the model (sensitivity and calibrate write none)
    settings: QuantSettings = field(default_factory=QuantSettings)
    data: DataOptions = field(default_factory=DataOptions)
    weight_range: str = default_of("weight_range")  # "auto" picks by this CPU (see onnxq.cpu)
    load_stats: Path | None = None
    save_stats: Path | None = None
    save_plan: Path | None = None
    exclude: tuple[str, ...] = ()
    exclude_regex: tuple[str, ...] = ()  # nodes whose name matches stay float (folded into the recipe's rules)
    speed_guard: str = default_of("speed_guard")  # table, measure (time this machine), off (onnxq.search.speed_guard)
    speed_profile: Path | None = None  # --speed-guard measure: None is the per-machine cache
    target_cpu: str | None = None  # a CPU class (avx2, avx512-vnni, amx, arm64, host) or a file describing it
    output_format: str = default_of("output_format")  # or "qoperator": integer operators (onnxq.quant.rewrite_qop)
    target: Target | None = None  # accuracy target: fall back to float until it holds (onnxq.search.sensitivity)
    metric: Path | None = None  # a Python file with score(references, candidates, feeds) for Target.min_metric
    target_samples: int = default_of("target_samples")
    eval_samples: int | None = EVAL_SAMPLES  # the fidelity report's first N held-back samples; None: all
    target_data: DataArg | None = None  # samples the target is measured on (default: the held-back ones)
    max_fallbacks: int | None = None
    sensitivity_samples: int = 16
    mode: str = default_of("mode")  # or "dynamic" / "weight-only" (onnxq.commands.dynamic; no calibration)
    weight_only: WeightOnlyOptions = field(default_factory=WeightOnlyOptions)
    min_cosine: float | None = None
    min_sqnr: float | None = None
    fallback: str = "float"  # what the accuracy target turns sensitive layers into: "float" or "int16"
    recipe: Recipe = field(default_factory=Recipe)  # per-node rules (its settings are applied by the caller)
    recipe_path: Path | None = None  # the file `recipe` was read from: no output may replace it
    search: bool = False  # the automatic search (onnxq.search.auto); the CLI's default, off with --fast
    auto_target: float = auto.TARGET_AGREEMENT  # task agreement the search aims for
    budget_s: float = auto.BUDGET_S  # seconds the search may spend on candidates
    auto_dynamic: bool = True  # the search may quantize MatMul/Gemm/LSTM dynamically (not with --mode given)
    method_given: bool = False  # the search keeps the method (--method was given)
    holdout: float | None = None  # share of --calib never calibrated on; None: holdout_fraction's default
    save_recipe: Path | None = None  # write the effective recipe: reruns give the same model without searching
    smooth_alpha: float | None = None  # SmoothQuant before calibration (onnxq.passes.smooth); None: off
    int8_gates: bool = False  # hard-swish gates in int8 (onnxq.passes.simplify.scale_gates_first, placement)
    smooth_mul: bool = False  # smoothing may insert a Mul where 1/s has nowhere to fold
    # accuracy recovery (onnxq.passes.recovery)
    equalize: bool = False
    bias_correction: bool = False
    adaround_seconds: float | None = None  # AdaRound on every layer it can, with this budget; None: not on all
    adaround_rules_seconds: float = 60.0  # the budget for the layers recipe rules (adaround: true) name

    def __post_init__(self) -> None:
        """--exclude-regex R becomes recipe rules after the user's (precision: float for every node whose name R
        matches), so placement, the saved recipe, the report and the notes on rules that select nothing all see
        them; the field is then empty, so a copy (dataclasses.replace) does not add them twice."""
        if self.exclude_regex:
            self.recipe = Recipe(self.recipe.settings, [*self.recipe.rules, *_exclude_regex_rules(self.exclude_regex)])
            self.exclude_regex = ()


@dataclass
class QuantizeResult:
    report: dict
    plan: QuantPlan
    fidelity: Fidelity | None

    @property
    def gates_passed(self) -> bool:
        return all(g["passed"] for g in self.report["gates"])


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def resolve_settings(request: QuantizeRequest, target: TargetCpu) -> tuple[QuantSettings, str]:
    """Fill in the CPU-dependent weight range; returns the settings and why that range."""
    settings = request.settings
    if request.weight_range == WeightRange.AUTO:
        chosen = default_weight_range(target.features)
        which = f"target CPU class {target.cpu_class} ({target.source})"
        why = (f"{which}: x86 without VNNI, uint8 x int8 products can saturate, weights limited to 7 bits"
               if chosen == "reduced" else f"{which}: accumulates int8 products without saturation")
    else:
        chosen, why = request.weight_range, "set by --weight-range"
    settings = QuantSettings(**{**settings.__dict__, "weight_range": chosen})
    settings.validate()
    return settings, why


def check_speed_guard_options(request: QuantizeRequest, target: TargetCpu) -> None:
    """Refuse speed-guard options that would do nothing, or decide for the wrong CPU."""
    if request.speed_guard not in MODES:
        raise UsageError(f"unknown --speed-guard {request.speed_guard!r}; choose one of {', '.join(MODES)}")
    if request.speed_profile is not None and request.speed_guard != SpeedGuard.MEASURE:
        raise UsageError("--speed-profile holds timings of --speed-guard measure; add --speed-guard measure "
                         "(the default table decides without timing)")
    if request.speed_guard == SpeedGuard.MEASURE and request.speed_profile is None and not target.is_host:
        raise UsageError(f"--speed-guard measure times this machine, which says nothing about {target.source}: "
                         "use the default --speed-guard table, or a --speed-profile made on the target")


def holdout_fraction(request: QuantizeRequest) -> float | None:
    """The share of --calib held back and never calibrated on: --holdout (or a recipe's) when given; else a
    quarter for the automatic search to choose by, or a tenth for the fidelity report without --eval-data."""
    if (request.data.calib is None and not request.data.allow_random) or request.load_stats is not None:
        return None
    if request.holdout is not None:
        return request.holdout
    if searches(request):
        return auto.SEARCH_HOLDOUT
    return HOLDOUT if request.data.eval_data is None else None


def search_methods(request: QuantizeRequest, method: str) -> tuple[str, ...]:
    """The calibration methods the automatic search measures: the given one, then `percentile` unless
    --method (or a recipe's) fixed it."""
    return (method,) if request.method_given else tuple(dict.fromkeys((method, "percentile")))


def search_may_go_dynamic(request: QuantizeRequest) -> bool:
    """Whether the automatic search may quantize layers at run time: not when --mode was given, nor when
    the user asked for what only static mode makes (QOperator, statistics to load or save, a plan)."""
    static_only = request.output_format != Format.QDQ or request.load_stats or request.save_stats or request.save_plan
    return request.search and request.auto_dynamic and not static_only


def searches(request: QuantizeRequest) -> bool:
    """Whether `quantize` runs the automatic search (onnxq.search.auto): static mode, no accuracy target of the
    user's."""
    return request.search and request.mode == Mode.STATIC and request.target is None


def check_batch_size(batch_size: int, specs: list[InputSpec]) -> None:
    """Stacking samples on axis 0 needs a dynamic first dimension: say so before any inference runs."""
    if batch_size <= 1 or any(spec.shape == () for spec in specs):  # scalar inputs: batches never stack
        return
    for spec in specs:
        if spec.shape and spec.shape[0] is not None:
            raise UsageError(f"--batch-size {batch_size} stacks samples on axis 0, but input {spec.name} has a "
                             f"fixed first dimension of {spec.shape[0]}; use --batch-size 1 for this model")



def recovery_needs_data(request: QuantizeRequest) -> bool:
    """Whether bias correction or AdaRound runs (asked for, or named by a recipe rule): both read calibration
    samples."""
    return request.bias_correction or request.adaround_seconds is not None or any(
        rule.adaround for rule in request.recipe.rules)


def _exclude_regex_rules(patterns: tuple[str, ...]) -> list[Rule]:
    rules = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"--exclude-regex {pattern!r} is not a regular expression: {exc}") from None
        rules.append(Rule(Selector(name_regex=pattern), precision="float", reason=f"--exclude-regex {pattern}"))
    return rules
