"""Every option of every command, declared once.

A row says the option's flags, type, default and help, which commands take it, when it acts
(an option given where it would do nothing is refused with exit 2), the recipe setting that can
set it, and whether its value goes to the request field of the same name. From this table come
the click options (`click_options`), the recipe's settings (`RECIPE_SETTINGS`, read by
onnxq.commands.recipe), the request fields (`request_fields`), the check for options that would do
nothing (`check_effective`) and the Python API's keywords (onnxq.commands.command_options reads the
click options). Adding an option is a row here and the code that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from onnxq.enums import Format, Mode, SpeedGuard, WeightRange
from onnxq.errors import UsageError
from onnxq.quant.ranges import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from onnxq.search.auto import BUDGET_S, TARGET_AGREEMENT

QUANTIZE, CALIBRATE, SENSITIVITY, CONVERT, QAT_PREP, BENCH = (
    "quantize", "calibrate", "sensitivity", "convert", "qat-prep", "bench")
READS_DATA = (QUANTIZE, CALIBRATE, SENSITIVITY, CONVERT, QAT_PREP)
READS_IMAGES = (*READS_DATA, BENCH)
SETTINGS_COMMANDS = (QUANTIZE, SENSITIVITY, QAT_PREP)  # how weights and activations are quantized
METHOD_COMMANDS = (*SETTINGS_COMMANDS, CONVERT)
REPORTS = (QUANTIZE, CONVERT, QAT_PREP)
FALLBACKS = ("float", "int16", "int8")
WEIGHT_METHODS = ("rtn", "gptq", "awq", "hqq")


def _same(value: Any) -> Any:
    return value


def _negated(value: Any) -> bool:
    return not value


@dataclass(frozen=True)
class RecipeSetting:
    """A recipe `settings:` key that sets an option's default: its type and allowed values as YAML holds them."""

    key: str
    kind: type
    allowed: tuple | None = None
    to_option: Callable[[Any], Any] = _same  # recipe value -> the option's value


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    commands: tuple[str, ...]
    dest: str = ""  # the parameter (and API keyword's) name; default: the last long flag with _ for -
    type: Any = None
    default: Any = None
    is_flag: bool = False
    multiple: bool = False
    show_default: bool | str = False
    metavar: str | None = None
    envvar: str | None = None
    hidden: bool = False
    flag_value: Any = None
    recipe: RecipeSetting | None = None
    request: bool = False  # the value is the request field of the same name, as it is
    acts: Callable[[Mapping[str, Any]], bool] | None = None  # given the command's values: does it do something?
    acts_help: str = ""  # what it applies to, said when it would do nothing
    helps: Mapping[str, str] = field(default_factory=dict)  # per command, where its meaning differs

    @property
    def name(self) -> str:
        return self.dest or [f for f in self.flags if f.startswith("--")][-1][2:].replace("-", "_")

    @property
    def flag(self) -> str:
        return next(f for f in self.flags if f.startswith("--"))

    def click_option(self, command: str) -> Callable:
        extra: dict[str, Any] = {"help": self.helps.get(command, self.help), "hidden": self.hidden}
        for key in ("type", "metavar", "envvar"):
            if getattr(self, key) is not None:
                extra[key] = getattr(self, key)
        if self.is_flag:
            extra["is_flag"] = True
        elif self.flag_value is not None:
            extra.update(is_flag=False, flag_value=self.flag_value)
        if self.multiple:
            extra["multiple"] = True
        if self.default is not None:
            extra["default"] = self.default
        if self.show_default:
            extra["show_default"] = self.show_default
        return click.option(*self.flags, self.name, **extra)


def _mode(v: Mapping[str, Any]) -> str:
    return v.get("mode") or Mode.STATIC


def _static(v: Mapping[str, Any]) -> bool:
    return _mode(v) == Mode.STATIC


def _int4(v: Mapping[str, Any]) -> bool:
    return _mode(v) == Mode.WEIGHT_ONLY and v["weight_bits"] == "4"


STATIC_ONLY = "applies to --mode static only (dynamic and weight-only modes need no calibration)"


def _calibrates(v: Mapping[str, Any]) -> bool:
    """Calibration data is read: static mode, or int4 weights rounded by gptq/awq from --calib's statistics."""
    return _static(v) or (_int4(v) and v["weight_method"] in ("gptq", "awq") and v["calib"] is not None)


def _has_target(v: Mapping[str, Any]) -> bool:
    return any(v.get(p) is not None for p in ("target_sqnr", "target_cosine", "target_metric"))


def _searches(v: Mapping[str, Any]) -> bool:
    """The automatic search runs: static mode, no --fast, no accuracy target of the user's."""
    return _static(v) and not v["fast"] and not _has_target(v)


def _target_applies(v: Mapping[str, Any]) -> bool:
    return _mode(v) != Mode.DYNAMIC and _has_target(v)


TARGET_HELP = ("applies with an accuracy target (--target-sqnr, --target-cosine or --target-metric), in --mode static "
               "and weight-only")


def _path(**kwargs: Any) -> click.Path:
    return click.Path(path_type=Path, **kwargs)


# The order of the rows is the order of --help.
OPTIONS: tuple[Option, ...] = (
    # ---- data
    Option(("--calib",), "Calibration data: folder of .npz/.npy, one stacked .npz/.npy, a folder of images, or ONNX "
           "test_data_set_N/ folders.", READS_DATA, type=_path()),
    Option(("--data", "--calib"), "A real input: the first sample of any --calib form (--calib is the same option); "
           "default: random values, for models with static input shapes or --input-shapes.", (BENCH,),
           dest="data", type=_path()),
    Option(("--data-loader-script",), "Calibration data from your own code: FUNCTION (default load_data) in FILE "
           "yields feed dicts, input name -> numpy array (or (feeds, label) pairs for a --metric); the same as --calib "
           "FILE.py[:FUNCTION]. --eval-data and --target-data take FILE.py[:FUNCTION] too (README: 'Data from your own "
           "code').", (*READS_DATA, BENCH), metavar="FILE[:FUNCTION]",
           helps={BENCH: "The first feed FUNCTION (default load_data) in FILE yields is the input (see README, 'Data "
                         "from your own code')."}),
    Option(("--allow-random",), "Calibrate on random normal data when no --calib is given (the report says so).",
           READS_DATA, is_flag=True, acts=_static, acts_help="lets static mode calibrate on random data"),
    Option(("--input-shapes",), "--allow-random: the shapes of inputs with open dimensions, as Polygraphy and onnxslim "
           "take them: x:1x3x48x320 (several: comma-separated or the option repeated).", (*READS_DATA, BENCH),
           multiple=True, metavar="NAME:DIMS[,...]",
           helps={BENCH: "Random input: the shapes of inputs with open dimensions, as Polygraphy and onnxslim take "
                         "them: x:1x3x48x320 (several: comma-separated or the option repeated)."}),
    Option(("--batch-size",), "Samples per inference run (same-shaped samples are stacked on axis 0).", READS_DATA,
           type=click.IntRange(min=1), default=1, show_default=True),
    Option(("--max-samples",), "Use at most this many calibration samples.", READS_DATA, type=click.IntRange(min=1),
           acts=_calibrates, acts_help="limits the calibration samples of static mode (and of gptq/awq)"),
    Option(("--memory-budget",), "MB of exposed activations per inference run; above it calibration runs in several "
           "passes.", READS_DATA, type=click.IntRange(min=16), default=2048, show_default=True, acts=_calibrates,
           acts_help="bounds the calibration of static mode (and of gptq/awq)"),
    # ---- images
    Option(("--image-size",), "Images: resize to WIDTHxHEIGHT (default: the model's input size).", READS_IMAGES),
    Option(("--layout",), "Images: tensor layout (default: from the model's input shape).", READS_IMAGES,
           type=click.Choice(["NCHW", "NHWC"])),
    Option(("--scale",), "Images: multiply pixel values (0..255) by this.", READS_IMAGES, dest="pixel_scale",
           type=float, default=1 / 255, show_default="1/255"),
    Option(("--mean",), "Images: subtract per channel after scaling (one value or R,G,B).", READS_IMAGES,
           default="0", show_default=True),
    Option(("--std",), "Images: then divide per channel.", READS_IMAGES, default="1", show_default=True),
    Option(("--channel-order",), "Images: channel order the model expects.", READS_IMAGES,
           type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True),
    # ---- what to measure on
    Option(("--eval-data",), "Held-back data for the fidelity report (default: the last 10% of --calib, 25% when the "
           "automatic search runs, at most 32 samples, not used for calibration).",
           (QUANTIZE, SENSITIVITY, CONVERT, QAT_PREP), type=_path(),
           helps={SENSITIVITY: "Samples to measure on (default: the last 10% of --calib).",
                  CONVERT: "Samples to compare the output with the input (fake-quant) model on (default: --calib, "
                           "if given).",
                  QAT_PREP: "Held-back data to compare with fp32 on (default: the last 10% of --calib)."}),
    Option(("--load-stats",), "Reuse statistics saved by --save-stats or `onnxq calibrate` (no inference pass).",
           (QUANTIZE, SENSITIVITY), type=_path(), request=True, acts=_static, acts_help=STATIC_ONLY),
    # ---- mode
    Option(("--mode",), "static: activation ranges from calibration; dynamic: MatMul/Gemm/LSTM activations quantized "
           "at run time (no calibration); weight-only: integer weights, float compute (no calibration).", (QUANTIZE,),
           type=click.Choice(Mode.values()), default="static", show_default=True,
           recipe=RecipeSetting("mode", str, Mode.values()), request=True),
    Option(("--weight-bits",), "--mode weight-only: 8 = int8 per channel; 4 = MatMul weights as block-wise int4 "
           "(MatMulNBits).", (QUANTIZE,), type=click.Choice(["8", "4"]), default="8", show_default=True,
           recipe=RecipeSetting("weight_bits", int, (4, 8), str),
           acts=lambda v: _mode(v) == Mode.WEIGHT_ONLY, acts_help="applies to --mode weight-only"),
    Option(("--block-size",), "--weight-bits 4: weights per block.", (QUANTIZE,), type=int, default=32,
           show_default=True, recipe=RecipeSetting("block_size", int), acts=_int4,
           acts_help="applies to --mode weight-only --weight-bits 4"),
    Option(("--weight-zero-points",), "--weight-bits 4: a zero point per block (default: symmetric).", (QUANTIZE,),
           is_flag=True, recipe=RecipeSetting("weight_zero_points", bool), acts=_int4,
           acts_help="applies to --mode weight-only --weight-bits 4"),
    Option(("--weight-method",), "--weight-bits 4 rounding: rtn (nearest), gptq and awq (need --calib), hqq "
           "(data-free); see README.", (QUANTIZE,), type=click.Choice(WEIGHT_METHODS), default="rtn",
           show_default=True, recipe=RecipeSetting("weight_method", str, WEIGHT_METHODS), acts=_int4,
           acts_help="applies to --mode weight-only --weight-bits 4"),
    # ---- how weights and activations are quantized
    Option(("--method",), "Calibration method (see README).", METHOD_COMMANDS, type=click.Choice(METHODS),
           default=DEFAULT_METHOD, show_default=True, recipe=RecipeSetting("method", str, tuple(METHODS)),
           acts=_static, acts_help="sets how static mode calibrates activation ranges"),
    Option(("--percentile",), "Percentile for --method percentile.", METHOD_COMMANDS, type=float,
           default=DEFAULT_PERCENTILE, show_default=True, recipe=RecipeSetting("percentile", float),
           acts=lambda v: _static(v) and v["method"] == "percentile", acts_help="applies to --method percentile"),
    Option(("--symmetric",), "Activations as int8 with zero point 0 (default uint8 asymmetric).", SETTINGS_COMMANDS,
           is_flag=True, recipe=RecipeSetting("symmetric", bool), acts=_static,
           acts_help="sets static mode's activation type (dynamic mode quantizes activations to uint8 at run time, "
                     "weight-only not at all)"),
    Option(("--per-tensor",), "One weight scale per tensor (default: per output channel).", SETTINGS_COMMANDS,
           is_flag=True, recipe=RecipeSetting("per_channel", bool, None, _negated),
           acts=lambda v: _mode(v) != Mode.WEIGHT_ONLY,
           acts_help="does nothing in weight-only mode (int8 weights are per channel, int4 per block)"),
    Option(("--weight-range",), "'reduced' keeps weights within 7 bits, needed on x86 CPUs without VNNI; 'auto' checks "
           "this CPU.", SETTINGS_COMMANDS, type=click.Choice(WeightRange.values()), default="auto", show_default=True,
           recipe=RecipeSetting("weight_range", str, WeightRange.values()), request=True,
           acts=lambda v: _mode(v) != Mode.WEIGHT_ONLY,
           acts_help="does nothing in weight-only mode (float compute: full 8-bit weights)"),
    Option(("--exclude",), "Keep this node name or op type in float (repeatable).", SETTINGS_COMMANDS, multiple=True,
           request=True),
    Option(("--exclude-regex",), "Keep in float every node whose name this regular expression matches (repeatable; "
           "e.g. '^/encoder/layer\\.11/'); the saved recipe holds it as a rule.", SETTINGS_COMMANDS, multiple=True,
           metavar="REGEX", request=True),
    Option(("--recipe",), "YAML recipe: per-node precision (float, int8, int16 activations, int4 weights), per-channel "
           "and method by node name, regex or op type, and settings used as defaults for these options (see README).",
           (QUANTIZE, SENSITIVITY), dest="recipe_path", type=_path(), request=True),
    Option(("--format",), "qdq: QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels; "
           "qoperator: integer operators (QLinearConv, MatMulIntegerToFloat, QGemm, ...), same parameters.",
           (QUANTIZE, CONVERT), dest="output_format", type=click.Choice(Format.values()), default="qdq",
           show_default=True, recipe=RecipeSetting("format", str, Format.values()), request=True, acts=_static,
           acts_help=STATIC_ONLY,
           helps={CONVERT: "qdq: Q/DQ pairs placed for onnxruntime's int8 kernels; qoperator: integer operators."}),
    Option(("--save-recipe",), "Write the effective recipe (settings as used, rules, the speed guard's and the "
           "accuracy target's choices): --recipe with it rebuilds this model.", (QUANTIZE,), type=_path(),
           request=True),
    # ---- the speed guard
    Option(("--speed-guard",), "Keep in float the layers whose int8 form does not make the model faster on the target "
           "CPU: table decides from onnxq's measured table for the CPU class (same output on every machine); measure "
           "times the model on this machine; off keeps every int8 layer.", (QUANTIZE,),
           type=click.Choice(SpeedGuard.values()), default="table", show_default=True,
           recipe=RecipeSetting("speed_guard", str, SpeedGuard.values()), request=True,
           acts=lambda v: _static(v) or v["speed_guard"] == SpeedGuard.OFF,
           acts_help="decides static mode's int8 layers"),
    Option(("--no-speed-guard",), "Same as --speed-guard off.", (QUANTIZE,), is_flag=True, hidden=True),
    Option(("--speed-profile",), "--speed-guard measure: timings to reuse and extend (default: a per-machine cache in "
           "~/.cache/onnxq).", (QUANTIZE,), type=_path(), request=True,
           acts=lambda v: _static(v) and v["speed_guard"] == SpeedGuard.MEASURE,
           acts_help="holds the timings of --speed-guard measure (static mode)"),
    Option(("--target-cpu",), "Quantize for this CPU: a class (avx2, avx512-vnni, amx, arm64, host), a copy of its "
           "/proc/cpuinfo or its `onnxq doctor --json` output. Sets the weight range and the speed table row. Default: "
           "this machine's class (ONNXQ_HOST_CPU=<class> overrides what it reports).", SETTINGS_COMMANDS, request=True,
           acts=lambda v: _mode(v) != Mode.WEIGHT_ONLY,
           acts_help="sets the int8 weight range (static and dynamic modes; weight-only computes in float)"),
    # ---- saved stages
    Option(("--save-stats",), "Save the calibration statistics.", (QUANTIZE,), type=_path(), request=True,
           acts=_static, acts_help=STATIC_ONLY),
    Option(("--save-plan",), "Save the per-tensor quantization plan (JSON).", (QUANTIZE,), type=_path(), request=True,
           acts=_static, acts_help=STATIC_ONLY),
    Option(("--report",), "Write the full report as JSON.", REPORTS, dest="report_path", type=_path()),
    Option(("--json",), "Print the report as JSON on stdout.", (*REPORTS, SENSITIVITY, BENCH), dest="as_json",
           is_flag=True, helps={SENSITIVITY: "Print the ranking as JSON on stdout.",
                                BENCH: "Print everything as JSON on stdout."}),
    # ---- accuracy targets and gates
    Option(("--target-sqnr",), "Accuracy target (dB, every output, held-back samples): keep the most sensitive layers "
           "in float, as few as possible, until it holds; exit 6 if it cannot.", (QUANTIZE,), type=float,
           acts=_target_applies, acts_help=TARGET_HELP),
    Option(("--target-cosine",), "Accuracy target as a minimum cosine (as --target-sqnr).", (QUANTIZE,), type=float,
           acts=_target_applies, acts_help=TARGET_HELP),
    Option(("--metric",), "Python file with score(references, candidates, feeds) -> float, higher is better (per "
           "sample: output name -> array): the task measure for --target-metric.", (QUANTIZE,), type=_path(),
           request=True),
    Option(("--target-metric",), "Accuracy target on --metric's score (as --target-sqnr).", (QUANTIZE,), type=float,
           acts=_target_applies, acts_help=TARGET_HELP),
    Option(("--target-samples",), "Samples the accuracy target is measured on.", (QUANTIZE,),
           type=click.IntRange(min=1), default=32, show_default=True, request=True, acts=_target_applies,
           acts_help=TARGET_HELP),
    Option(("--eval-samples",), "Held-back samples the fidelity report measures (the first N; 'all': every one).",
           (QUANTIZE,), default="32", show_default=True),
    Option(("--target-data",), "Samples for the accuracy target (default: the held-back ones; give others to keep "
           "--eval-data untouched by the search).", (QUANTIZE,), type=_path(), acts=_target_applies,
           acts_help=TARGET_HELP),
    Option(("--fallback",), "What the accuracy target turns sensitive layers into: float, int8 weights (--mode "
           "weight-only --weight-bits 4), or int16 activations (W8A16; runs in float on CPU, for accelerators that run "
           "it natively).", (QUANTIZE,), type=click.Choice(FALLBACKS), show_default="float; weight-only: int8",
           acts=_target_applies, acts_help=TARGET_HELP),
    Option(("--max-fallbacks",), "At most this many layers back to float for the target (default: as many as needed).",
           (QUANTIZE,), type=click.IntRange(min=0), request=True, acts=_target_applies, acts_help=TARGET_HELP),
    Option(("--min-cosine",), "Exit 6 if any output's cosine to fp32 is below this.", (QUANTIZE,), type=float,
           request=True),
    Option(("--min-sqnr",), "Exit 6 if any output's SQNR (dB) is below this.", (QUANTIZE,), type=float, request=True),
    # ---- the automatic search
    Option(("--fast",), "No automatic search: one pass with the settings given (static int8, the speed table's "
           "decisions); also ONNXQ_FAST=1 in the environment. Default: measure candidates on held-back samples and "
           "keep the fastest that keeps the task answer (see README, 'The automatic default').", (QUANTIZE,),
           is_flag=True, envvar="ONNXQ_FAST", recipe=RecipeSetting("auto", bool, None, _negated)),
    Option(("--holdout",), "Share of --calib never calibrated on (its last samples in sorted order, at most 32): what "
           "the automatic search chooses by (default 0.25) or, with --fast and no --eval-data, what fidelity is "
           "measured on (default 0.1). --save-recipe records it, so a rebuild calibrates on the same samples.",
           (QUANTIZE,), type=click.FloatRange(0, 1, min_open=True, max_open=True),
           recipe=RecipeSetting("holdout", float), request=True,
           acts=lambda v: _static(v) and v["calib"] is not None and v["load_stats"] is None,
           acts_help="holds back part of --calib (static mode, calibrating on --calib)"),
    Option(("--budget",), "Seconds the automatic search may spend measuring candidates (a search cut short by it can "
           "choose differently on a slower machine: --save-recipe pins the choice).", (QUANTIZE,),
           type=click.FloatRange(min=0, min_open=True), default=BUDGET_S, show_default=True, acts=_searches,
           acts_help="limits the automatic search (static mode without --fast or an accuracy target)"),
    Option(("--target-agreement",), "Task agreement with fp32 the automatic search aims for (same class, same text, "
           "...).", (QUANTIZE,), type=click.FloatRange(0, 1), default=TARGET_AGREEMENT, show_default=True,
           acts=_searches, acts_help="is the automatic search's aim (static mode without --fast or an accuracy "
                                     "target)"),
    # ---- repairs
    Option(("--smooth-alpha",), "SmoothQuant before calibrating: move activation outliers into the MatMul/Gemm "
           "weights after them (0..1; 0.7 on MiniLM; default off; static and dynamic modes, needs --calib). Float "
           "outputs do not change.", (QUANTIZE, SENSITIVITY), type=float, recipe=RecipeSetting("smooth_alpha", float),
           request=True),
    Option(("--smooth-mul",), "--smooth-alpha: also smooth activations whose producer cannot absorb 1/s, with an "
           "inserted Mul (one more op each).", (QUANTIZE, SENSITIVITY), is_flag=True,
           recipe=RecipeSetting("smooth_mul", bool), request=True, acts=lambda v: v["smooth_alpha"] is not None,
           acts_help="applies with --smooth-alpha"),
    Option(("--int8-gates",), "Run hard-swish gates (x * clip(x + 3, 0, 6) / 6) in int8 between int8 layers: "
           "the / 6 moves onto the gate and its Add and Muls become QLinearAdd/QLinearMul. Faster (no float island "
           "per activation), one more 8-bit rounding per gate: see README, Performance.", (QUANTIZE, SENSITIVITY),
           is_flag=True, recipe=RecipeSetting("int8_gates", bool), request=True, acts=_static,
           acts_help="applies to static mode (dynamic and weight-only leave activations' ops in float)"),
    Option(("--equalize",), "Cross-layer equalization of Conv -> [Relu] -> Conv pairs before calibration (same float "
           "function, more even per-channel weight ranges).", (QUANTIZE, SENSITIVITY), is_flag=True,
           recipe=RecipeSetting("equalize", bool), request=True, acts=_static, acts_help=STATIC_ONLY),
    Option(("--bias-correction",), "Remove the per-channel output mean shift weight rounding causes, measured on the "
           "calibration samples.", (QUANTIZE,), is_flag=True, recipe=RecipeSetting("bias_correction", bool),
           request=True, acts=_static, acts_help=STATIC_ONLY),
    Option(("--adaround",), "Learned rounding: pick floor or ceil per weight to minimise each layer's output error on "
           "the calibration samples.", (QUANTIZE,), is_flag=True, recipe=RecipeSetting("adaround", bool),
           acts=_static, acts_help=STATIC_ONLY),
    Option(("--adaround-seconds",), "--adaround: approximate optimisation budget over all layers.", (QUANTIZE,),
           type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
           recipe=RecipeSetting("adaround_seconds", float),
           acts=lambda v: v["adaround"] or v["adaround_rules"],
           acts_help="applies with --adaround (or recipe rules with adaround: true)"),
    # ---- Ray
    Option(("--ray",), "Calibrate (and run the accuracy search) as Ray tasks: on the cluster at ADDRESS, else "
           "RAY_ADDRESS, else a local Ray; same statistics and model as without (pip install 'onnxq[ray]'; see "
           "README).", (QUANTIZE, CALIBRATE), dest="ray_address", flag_value="", metavar="[ADDRESS]"),
    Option(("--workers",), "--ray: tasks at once: calibration shards and accuracy-search candidates (default: one per "
           "CPU of the cluster).", (QUANTIZE, CALIBRATE), type=click.IntRange(min=1),
           acts=lambda v: v["ray_address"] is not None, acts_help="applies to --ray only"),
    # ---- one command's own
    Option(("--samples",), "Held-back samples each variant is measured on.", (SENSITIVITY,),
           type=click.IntRange(min=1), default=16, show_default=True),
    Option(("--top",), "Rows in the printed table.", (SENSITIVITY,), type=click.IntRange(min=1), default=20,
           show_default=True),
    Option(("--activations",), "Activation type: uint8 (a learned int8 activation keeps its scale, its zero point "
           "moves by 128: the same values, in the type onnxruntime's x86 int8 kernels fuse), int8, or keep each "
           "learned type as it is.", (CONVERT,), type=click.Choice(("keep", "uint8", "int8")), default="uint8",
           show_default=True),
    Option(("--calibrate-missing",), "Calibrate the tensors the input model leaves float (needs --calib) and run their "
           "nodes in int8 too (default: those nodes stay float, as in the input).", (CONVERT,), is_flag=True),
    Option(("--params",), "Where to write the parameters as JSON (default: OUTPUT with suffix .params.json).",
           (QAT_PREP,), dest="params_path", type=_path()),
    Option(("--batch",), "The larger batch timed besides batch 1 (the sample repeated on axis 0).", (BENCH,),
           type=click.IntRange(min=2), default=8, show_default=True),
    Option(("--threads",), "Thread counts to time (repeatable; default: 1 and all this process may use).", (BENCH,),
           type=click.IntRange(min=1), multiple=True),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
RECIPE_SETTINGS: dict[str, RecipeSetting] = {o.recipe.key: o.recipe for o in OPTIONS if o.recipe is not None}


def default_of(name: str) -> Any:
    """An option's default as its row declares it (the request's fields take theirs from here)."""
    return next(option.default for option in OPTIONS if option.name == name)


def options_of(command: str) -> list[Option]:
    return [option for option in OPTIONS if command in option.commands]


def click_options(command: str) -> Callable:
    """Decorator: the command's options from the table, in the table's order."""

    def decorate(func: Callable) -> Callable:
        for option in reversed(options_of(command)):
            func = option.click_option(command)(func)
        return func

    return decorate


def request_fields(command: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the command's options that are request fields as they are (Option.request)."""
    return {o.name: values[o.name] for o in options_of(command) if o.request}


def with_recipe_settings(command: str, settings: Mapping[str, Any], values: Mapping[str, Any],
                         is_default: Callable[[str], bool]) -> dict[str, Any]:
    """The recipe's settings replace the defaults of the options they set; options the user gave still win."""
    result = dict(values)
    by_key = {o.recipe.key: o for o in options_of(command) if o.recipe is not None}
    for key, value in settings.items():
        option = by_key.get(key)
        if option is not None and is_default(option.name):
            result[option.name] = option.recipe.to_option(value)
    return result


def check_effective(command: str, given: Iterable[str], values: Mapping[str, Any]) -> None:
    """UsageError for an option the user gave that the chosen settings would ignore (Option.acts)."""
    for option in options_of(command):
        if option.name in given and option.acts is not None and not option.acts(values):
            where = f" (--mode {_mode(values)})" if command == QUANTIZE else ""
            raise UsageError(f"{option.flag} {option.acts_help}; it does nothing here{where}: leave it out")
