"""The `onnxq` command: thin wrappers over the library functions in onnxq.pipeline."""

from __future__ import annotations

import functools
import json
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from . import __version__, auto
from .checks import check_effective
from .command_options import CommandOptions
from .convert import ACTIVATION_TYPES, ConvertRequest, convert, convert_paths
from .data import DataArg, FeedLoader, ImagePreprocessing, model_input_specs, open_source
from .distributed import RayOptions
from .doctor import format_diagnosis, this_machine
from .dynamic import WeightOnlyOptions
from .enums import Format, Mode, SpeedGuard, WeightRange
from .errors import EXIT_GATE_MISSED, EXIT_INTERNAL, DataError, OnnxqError, UsageError, first_line, one_line
from .input_shapes import parse_input_shapes
from .inspect_model import format_inspection, inspect_model
from .interrupts import Interrupted
from .latency import all_threads, compare_fp32_int8, format_comparison
from .loaders import data_argument, script_argument
from .model_io import atomic_write_bytes, load_model
from .outputs import commit, interrupt_message, transaction
from .paths import INPUT, OUTPUT, PathArg, check_paths, quantize_paths
from .pipeline import DataOptions, QuantizeRequest, calibrate_only, quantize
from .pipeline import sensitivity as run_sensitivity
from .plan import QuantSettings
from .qat_prep import params_path_for, qat_prep
from .ranges import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from .recipe import Recipe
from .report import format_summary
from .sensitivity import SensitivityResult, Target
from .session import progress_factory
from .statistics import Statistics


def handle_errors(func):
    """Turn expected failures into one line on stderr and a documented exit code; outputs appear only when the
    command succeeds (onnxq.outputs)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        verbose = kwargs.pop("verbose", False)  # -v is this wrapper's option, not the command's
        try:
            check_finite_options(kwargs)
            with transaction():
                return func(*args, **kwargs)
        except OnnxqError as exc:
            _fail(f"onnxq: error: {exc.message}", exc.exit_code)
        except Interrupted as exc:
            _fail(interrupt_message(exc.verb), exc.exit_code)
        except KeyboardInterrupt:  # the default handler (the library called without onnxq.entry)
            _fail(interrupt_message("interrupted"), 130)
        except MemoryError:
            _fail("onnxq: error: out of memory (try --batch-size 1 or a smaller --memory-budget)", EXIT_INTERNAL)
        except Exception as exc:  # a bug: still one line unless -v
            if verbose:
                traceback.print_exc()
            _fail(f"onnxq: internal error: {type(exc).__name__}: {first_line(exc)} (rerun with -v for details)",
                  EXIT_INTERNAL)

    return wrapper


def _fail(line: str, code: int) -> None:
    click.echo(one_line(line), err=True)
    sys.exit(code)


def check_finite_options(values: dict) -> None:
    """NaN or infinity in a number option is a usage error naming the option (click lets them through)."""
    context = click.get_current_context(silent=True)
    options = {p.name: p.opts[-1] for p in context.command.params} if context is not None else {}
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{options.get(name, name)} must be a finite number, got {value}")


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size must look like 224x224 (width x height), got {value!r}") from None
    if width <= 0 or height <= 0:
        raise UsageError(f"--image-size must be positive, got {value!r}")
    return width, height


def _parse_floats(value: str, option: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {value!r}") from None
    if not all(math.isfinite(n) for n in numbers):
        raise UsageError(f"{option} takes finite numbers, got {value!r}")
    if len(numbers) == 1:
        numbers = numbers * 3
    if len(numbers) != 3:
        raise UsageError(f"{option} takes one value or three (R,G,B), got {len(numbers)}: {value!r}")
    return numbers


def data_options(func):
    """Options shared by every command that reads calibration data."""
    decorators = [
        click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: folder of .npz/.npy, "
                     "one stacked .npz/.npy, a folder of images, or ONNX test_data_set_N/ folders."),
        click.option("--data-loader-script", metavar="FILE[:FUNCTION]", help="Calibration data from your own "
                     "code: FUNCTION (default load_data) in FILE yields feed dicts, input name -> numpy array (or "
                     "(feeds, label) pairs for a --metric); the same as --calib FILE.py[:FUNCTION]. --eval-data and "
                     "--target-data take FILE.py[:FUNCTION] too (README: 'Data from your own code')."),
        click.option("--allow-random", is_flag=True, help="Calibrate on random normal data when no --calib is "
                     "given (the report says so)."),
        input_shapes_option("--allow-random: the shapes of inputs with open dimensions"),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Samples per inference run (same-shaped samples are stacked on axis 0)."),
        click.option("--max-samples", type=click.IntRange(min=1), help="Use at most this many calibration samples."),
        click.option("--memory-budget", type=click.IntRange(min=16), default=2048, show_default=True,
                     help="MB of exposed activations per inference run; above it calibration runs in several passes."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return image_options(func)


def input_shapes_option(what: str):
    return click.option("--input-shapes", multiple=True, metavar="NAME:DIMS[,...]",
                        help=f"{what}, as Polygraphy and onnxslim take them: x:1x3x48x320 (several: comma-separated "
                             "or the option repeated).")


def image_options(func):
    """How a folder of images becomes tensors (every command that reads data)."""
    decorators = [
        click.option("--image-size", help="Images: resize to WIDTHxHEIGHT (default: the model's input size)."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Images: tensor layout "
                     "(default: from the model's input shape)."),
        click.option("--scale", "pixel_scale", type=float, default=1 / 255, show_default="1/255",
                     help="Images: multiply pixel values (0..255) by this."),
        click.option("--mean", default="0", show_default=True, help="Images: subtract per channel after scaling "
                     "(one value or R,G,B)."),
        click.option("--std", default="1", show_default=True, help="Images: then divide per channel."),
        click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True,
                     help="Images: channel order the model expects."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def method_options(func):
    """--method and --percentile, as quantize, convert and qat-prep share them."""
    func = click.option("--percentile", type=float, default=DEFAULT_PERCENTILE, show_default=True,
                        help="Percentile for --method percentile.")(func)
    return click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
                        help="Calibration method (see README).")(func)


def settings_options(func):
    """How activations and weights are quantized: quantize's options, shared by sensitivity so that it ranks layers
    under the settings quantize will use (request fields: settings_fields)."""
    decorators = [
        method_options,
        click.option("--symmetric", is_flag=True, help="Activations as int8 with zero point 0 (default uint8 "
                     "asymmetric)."),
        click.option("--per-tensor", is_flag=True, help="One weight scale per tensor (default: per output channel)."),
        click.option("--weight-range", type=click.Choice(WeightRange.values()), default="auto", show_default=True,
                     help="'reduced' keeps weights within 7 bits, needed on x86 CPUs without VNNI; 'auto' checks "
                          "this CPU."),
        click.option("--exclude", multiple=True, help="Keep this node name or op type in float (repeatable)."),
        click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), help="YAML recipe: per-node "
                     "precision (float, int8, int16 activations, int4 weights), per-channel and method by node name, "
                     "regex or op type, and settings used as defaults for these options (see README)."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


SETTINGS_OPTIONS = ("method", "percentile", "symmetric", "per_tensor", "weight_range")  # recipe settings may set


def load_recipe(o: CommandOptions) -> Recipe:
    return Recipe.load(o["recipe_path"]) if o["recipe_path"] is not None else Recipe()


def settings_fields(o: CommandOptions, recipe: Recipe, v: dict) -> dict:
    """The request fields settings_options give (`v`: SETTINGS_OPTIONS' values, the recipe's settings applied)."""
    return {"settings": QuantSettings(method=v["method"], percentile=v["percentile"], symmetric=v["symmetric"],
                                      per_channel=not v["per_tensor"]),
            "weight_range": v["weight_range"], "exclude": tuple(o["exclude"]), "recipe": recipe}


def report_options(func):
    """--report FILE and --json."""
    func = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")(func)
    return click.option("--report", "report_path", type=click.Path(path_type=Path),
                        help="Write the full report as JSON.")(func)


def verbosity_options(func):
    func = click.option("-v", "--verbose", is_flag=True, help="On an internal error (a bug), print its Python "
                        "traceback before the one-line message.")(func)
    return click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors: no summary, progress bar "
                        "or notes.")(func)


def ray_options(func):
    """--ray [ADDRESS] and --workers N (calibrate, quantize)."""
    func = click.option("--workers", type=click.IntRange(min=1), help="--ray: tasks at once: calibration shards "
                        "and accuracy-search candidates (default: one per CPU of the cluster).")(func)
    return click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                        help="Calibrate (and run the accuracy search) as Ray tasks: on the cluster at ADDRESS, else "
                             "RAY_ADDRESS, else a local Ray; same statistics and model as without "
                             "(pip install 'onnxq[ray]'; see README).")(func)


def _ray_options(ray_address: str | None, workers: int | None) -> RayOptions | None:
    if ray_address is None:
        if workers is not None:
            raise UsageError("--workers applies to --ray only")
        return None
    return RayOptions(address=ray_address or None, workers=workers)


def _images(o: CommandOptions) -> ImagePreprocessing:
    images = ImagePreprocessing(size=_parse_size(o["image_size"]), layout=o["layout"], scale=o["pixel_scale"],
                                mean=_parse_floats(o["mean"], "--mean"), std=_parse_floats(o["std"], "--std"),
                                channel_order=o["channel_order"])
    if any(s == 0 for s in images.std):
        raise UsageError("--std values must be non-zero")
    return images


def _data(o: CommandOptions) -> DataOptions:
    """The data options every command that reads data shares (data_options)."""
    shapes = parse_input_shapes(o["input_shapes"])
    if shapes and not o["allow_random"]:
        raise UsageError("--input-shapes shapes the random data of --allow-random; real data has its own shapes")
    return DataOptions(calib=_calibration_data(o, "calib"), eval_data=data_argument(o.values.get("eval_data"),
                                                                                    "--eval-data"),
                       allow_random=o["allow_random"], batch_size=o["batch_size"], max_samples=o["max_samples"],
                       images=_images(o), memory_budget=o["memory_budget"] * 1024**2, input_shapes=shapes)


def _calibration_data(o: CommandOptions, name: str) -> DataArg | None:
    """--calib PATH (or FILE.py[:FUNCTION]) or --data-loader-script FILE[:FUNCTION], not both."""
    script = script_argument(o["data_loader_script"])
    option = f"--{name.replace('_', '-')}"
    if script is not None and o[name] is not None:
        raise UsageError(f"{option} and --data-loader-script both give the data; give one")
    return script or data_argument(o[name], option)


EPILOG_QUANTIZE = """\b
Examples:
  onnxq quantize model.onnx -o model.int8.onnx --calib calibration_data/
  onnxq quantize model.onnx -o model.int8.onnx --calib data/ --save-recipe m.recipe.yaml  # pin the choice
  onnxq quantize model.onnx -o model.int8.onnx --calib data/ --fast          # one pass, no search
  onnxq quantize model.onnx -o model.int8.onnx --calib imgs/ --image-size 224x224 \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
  onnxq quantize model.onnx -o m.int8.onnx --calib data/ --save-stats m.stats.npz
  onnxq quantize model.onnx -o m.kl.onnx --load-stats m.stats.npz --method kl --eval-data eval/
  onnxq quantize model.onnx -o m.int8.onnx --calib data/ --min-cosine 0.99 --json > report.json
  onnxq quantize encoder.onnx -o encoder.dyn.onnx --mode dynamic --eval-data sentences/
  onnxq quantize llm.onnx -o llm.int4.onnx --mode weight-only --weight-bits 4 --block-size 32
  onnxq quantize llm.onnx -o llm.int4.onnx --mode weight-only --weight-bits 4 --weight-method gptq --calib tokens/
  onnxq quantize m.onnx -o m.int8.onnx --calib data/ --target-sqnr 20 --save-recipe m.recipe.yaml
  onnxq quantize m.onnx -o m.int8.onnx --calib data/ --recipe m.recipe.yaml     # same model, no search

Exit codes: 0 ok, 2 usage, 3 bad model, 4 bad data, 5 cannot write output,
6 a --min-cosine/--min-sqnr gate or an accuracy target was missed (the model is still written),
1 internal error.
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxq")
def main() -> None:
    """Quantize fp32 ONNX models to int8 for onnxruntime's CPU kernels."""


@main.command(epilog=EPILOG_QUANTIZE)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the int8 model.")
@data_options
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-back data for the fidelity report "
              "(default: the last 10% of --calib, 25% when the automatic search runs, at most 32 samples, not used "
              "for calibration).")
@click.option("--mode", type=click.Choice(Mode.values()), default="static", show_default=True,
              help="static: activation ranges from calibration; dynamic: MatMul/Gemm/LSTM activations quantized "
                   "at run time (no calibration); weight-only: integer weights, float compute (no calibration).")
@click.option("--weight-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="--mode weight-only: 8 = int8 per channel; 4 = MatMul weights as block-wise int4 (MatMulNBits).")
@click.option("--block-size", type=int, default=32, show_default=True, help="--weight-bits 4: weights per block.")
@click.option("--weight-zero-points", is_flag=True, help="--weight-bits 4: a zero point per block (default: "
              "symmetric).")
@click.option("--weight-method", type=click.Choice(["rtn", "gptq", "awq", "hqq"]), default="rtn", show_default=True,
              help="--weight-bits 4 rounding: rtn (nearest), gptq and awq (need --calib), hqq (data-free); see README.")
@settings_options
@click.option("--format", "output_format", type=click.Choice(Format.values()), default="qdq", show_default=True,
              help="qdq: QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into int8 kernels; qoperator: "
                   "integer operators (QLinearConv, MatMulIntegerToFloat, QGemm, ...), same parameters.")
@click.option("--save-recipe", type=click.Path(path_type=Path), help="Write the effective recipe (settings as used, "
              "rules, the speed guard's and the accuracy target's choices): --recipe with it rebuilds this model.")
@click.option("--speed-guard", type=click.Choice(SpeedGuard.values()), default="table", show_default=True,
              help="Keep in float the layers whose int8 form does not make the model faster on the target CPU: "
                   "table decides from onnxq's measured table for the CPU class (same output on every machine); "
                   "measure times the model on this machine; off keeps every int8 layer.")
@click.option("--no-speed-guard", is_flag=True, hidden=True, help="Same as --speed-guard off.")
@click.option("--speed-profile", type=click.Path(path_type=Path), help="--speed-guard measure: timings to reuse and "
              "extend (default: a per-machine cache in ~/.cache/onnxq).")
@click.option("--target-cpu", help="Quantize for this CPU: a class (avx2, avx512-vnni, amx, arm64, host), a copy of "
              "its /proc/cpuinfo or its `onnxq doctor --json` output. Sets the weight range and the speed table "
              "row. Default: this machine's class (ONNXQ_HOST_CPU=<class> overrides what it reports).")
@click.option("--load-stats", type=click.Path(path_type=Path), help="Reuse statistics saved by --save-stats or "
              "`onnxq calibrate` (no inference pass).")
@click.option("--save-stats", type=click.Path(path_type=Path), help="Save the calibration statistics.")
@click.option("--save-plan", type=click.Path(path_type=Path), help="Save the per-tensor quantization plan (JSON).")
@report_options
@click.option("--target-sqnr", type=float, help="Accuracy target (dB, every output, held-back samples): keep the "
              "most sensitive layers in float, as few as possible, until it holds; exit 6 if it cannot.")
@click.option("--target-cosine", type=float, help="Accuracy target as a minimum cosine (as --target-sqnr).")
@click.option("--metric", type=click.Path(path_type=Path), help="Python file with score(references, candidates, "
              "feeds) -> float, higher is better (per sample: output name -> array): the task measure for "
              "--target-metric.")
@click.option("--target-metric", type=float, help="Accuracy target on --metric's score (as --target-sqnr).")
@click.option("--target-samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Samples the accuracy target is measured on.")
@click.option("--eval-samples", default="32", show_default=True, help="Held-back samples the fidelity report "
              "measures (the first N; 'all': every one).")
@click.option("--target-data", type=click.Path(path_type=Path), help="Samples for the accuracy target (default: "
              "the held-back ones; give others to keep --eval-data untouched by the search).")
@click.option("--fallback", type=click.Choice(["float", "int16", "int8"]), default=None,
              show_default="float; weight-only: int8",
              help="What the accuracy target turns sensitive layers into: float, int8 weights (--mode weight-only "
                   "--weight-bits 4), or int16 activations (W8A16; "
                   "runs in float on CPU, for accelerators that run it natively).")
@click.option("--max-fallbacks", type=click.IntRange(min=0), help="At most this many layers back to float for the "
              "target (default: as many as needed).")
@click.option("--min-cosine", type=float, help="Exit 6 if any output's cosine to fp32 is below this.")
@click.option("--min-sqnr", type=float, help="Exit 6 if any output's SQNR (dB) is below this.")
@click.option("--fast", is_flag=True, envvar="ONNXQ_FAST", help="No automatic search: one pass with the settings "
              "given (static int8, the speed table's decisions); also ONNXQ_FAST=1 in the environment. Default: "
              "measure candidates on held-back samples and keep the fastest that keeps the task answer (see README, "
              "'The automatic default').")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of --calib never calibrated on (its last samples in sorted order, at most 32): what the "
              "automatic search chooses by (default 0.25) or, with --fast and no --eval-data, what fidelity is "
              "measured on (default 0.1). --save-recipe records it, so a rebuild calibrates on the same samples.")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=auto.BUDGET_S, show_default=True,
              help="Seconds the automatic search may spend measuring candidates (a search cut short by it can "
              "choose differently on a slower machine: --save-recipe pins the choice).")
@click.option("--target-agreement", type=click.FloatRange(0, 1), default=auto.TARGET_AGREEMENT, show_default=True,
              help="Task agreement with fp32 the automatic search aims for (same class, same text, ...).")
@click.option("--smooth-alpha", type=float, help="SmoothQuant before calibrating: move activation outliers into "
              "the MatMul/Gemm weights after them (0..1; 0.7 on MiniLM; default off; static and dynamic modes, "
              "needs --calib). Float outputs do not change.")
@click.option("--smooth-mul", is_flag=True, help="--smooth-alpha: also smooth activations whose producer cannot "
              "absorb 1/s, with an inserted Mul (one more op each).")
@click.option("--equalize", is_flag=True, help="Cross-layer equalization of Conv -> [Relu] -> Conv pairs before "
              "calibration (same float function, more even per-channel weight ranges).")
@click.option("--bias-correction", is_flag=True, help="Remove the per-channel output mean shift weight rounding "
              "causes, measured on the calibration samples.")
@click.option("--adaround", is_flag=True, help="Learned rounding: pick floor or ceil per weight to minimise each "
              "layer's output error on the calibration samples.")
@click.option("--adaround-seconds", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="--adaround: approximate optimisation budget over all layers.")
@ray_options
@verbosity_options
@handle_errors
def quantize_command(**p) -> None:
    """Quantize MODEL to int8. By default it measures candidates (static methods, repairs, run-time
    quantization, float fallbacks) on held-back samples and keeps the fastest that gives fp32's answers;
    --fast runs one static pass."""
    request = quantize_request(CommandOptions.current(p))
    check_paths([*quantize_paths(request), PathArg("--report", p["report_path"], OUTPUT)])
    result = quantize(request, progress=progress_factory(p["quiet"]))
    text = json.dumps(result.report, indent=2, sort_keys=True)
    if p["report_path"] is not None:
        atomic_write_bytes(p["report_path"], text.encode())
    commit()
    if p["as_json"]:
        click.echo(text)
    if not p["quiet"]:
        click.echo(format_summary(result.report), err=True)
    if not result.gates_passed:
        click.echo("onnxq: a quality gate was missed (the model was written for inspection)", err=True)
        sys.exit(EXIT_GATE_MISSED)


def quantize_request(o: CommandOptions) -> QuantizeRequest:
    """quantize's options as a request: the CLI and onnxq.api both build it here."""
    data = _data(o)
    data.ray = _ray_options(o["ray_address"], o["workers"])
    recipe = load_recipe(o)
    speed_guard = o["speed_guard"]
    if o["no_speed_guard"]:
        if "speed_guard" in o.given:
            raise UsageError("--no-speed-guard and --speed-guard contradict each other; give one")
        speed_guard = "off"
    v = _recipe_defaults(recipe, {**{k: o[k] for k in (
        "mode", *SETTINGS_OPTIONS, "output_format", "weight_bits", "block_size", "weight_zero_points",
        "weight_method", "smooth_alpha", "smooth_mul", "equalize", "bias_correction", "adaround", "adaround_seconds",
        "fast", "holdout")}, "speed_guard": speed_guard}, o)
    check_effective(o.given, {**v, **{k: o[k] for k in ("target_sqnr", "target_cosine", "target_metric", "budget",
                                                         "target_agreement", "calib", "load_stats")},
                              "adaround_rules": any(rule.adaround for rule in recipe.rules)})
    request = QuantizeRequest(
        model=o["model"], output=o["output"], data=data, **settings_fields(o, recipe, v),
        speed_guard=v["speed_guard"], speed_profile=o["speed_profile"], target_cpu=o["target_cpu"],
        output_format=v["output_format"],
        target=_target(o["target_sqnr"], o["target_cosine"], o["target_metric"]), metric=o["metric"],
        target_samples=o["target_samples"], target_data=data_argument(o["target_data"], "--target-data"),
        eval_samples=_count_or_all(o["eval_samples"], "--eval-samples"), max_fallbacks=o["max_fallbacks"],
        fallback=o["fallback"] or ("int8" if v["mode"] == "weight-only" else "float"),
        mode=v["mode"], weight_only=WeightOnlyOptions(bits=int(v["weight_bits"]), block_size=v["block_size"],
                                                      symmetric=not v["weight_zero_points"],
                                                      method=v["weight_method"]),
        load_stats=o["load_stats"], save_stats=o["save_stats"], save_plan=o["save_plan"], min_cosine=o["min_cosine"],
        min_sqnr=o["min_sqnr"], save_recipe=o["save_recipe"],
        smooth_alpha=v["smooth_alpha"], smooth_insert_mul=v["smooth_mul"],
        equalize=v["equalize"], bias_correction=v["bias_correction"],
        adaround_seconds=v["adaround_seconds"] if v["adaround"] else None, adaround_rules_seconds=v["adaround_seconds"],
        search=not v["fast"], auto_target=o["target_agreement"], budget_s=o["budget"], holdout=v["holdout"],
        auto_dynamic="mode" not in o.given and "mode" not in recipe.settings,
        method_given="method" in o.given or "method" in recipe.settings, recipe_path=o["recipe_path"],
    )
    check_paths(quantize_paths(request))
    return request


main.add_command(quantize_command, name="quantize")

# recipe setting -> (quantize option's parameter name, how the recipe value maps onto it)
RECIPE_OPTIONS: dict[str, tuple[str, Callable]] = {
    "mode": ("mode", str), "method": ("method", str), "percentile": ("percentile", float),
    "symmetric": ("symmetric", bool), "per_channel": ("per_tensor", lambda v: not v),
    "weight_range": ("weight_range", str), "speed_guard": ("speed_guard", str), "format": ("output_format", str),
    "weight_bits": ("weight_bits", str), "block_size": ("block_size", int),
    "weight_zero_points": ("weight_zero_points", bool), "weight_method": ("weight_method", str),
    "smooth_alpha": ("smooth_alpha", float),
    "smooth_mul": ("smooth_mul", bool), "equalize": ("equalize", bool), "bias_correction": ("bias_correction", bool),
    "adaround": ("adaround", bool), "adaround_seconds": ("adaround_seconds", float),
    "auto": ("fast", lambda v: not v), "holdout": ("holdout", float),
}


def _count_or_all(value: str, option: str) -> int | None:
    """A positive count, or None for 'all'."""
    if value.strip().lower() == "all":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"{option} takes a positive number or 'all', got {value!r}")
    return count


def _target(sqnr: float | None, cosine: float | None, metric: float | None) -> Target | None:
    return Target(sqnr, cosine, metric) if (sqnr, cosine, metric) != (None, None, None) else None


def _recipe_defaults(recipe: Recipe, values: dict, o: CommandOptions) -> dict:
    """The recipe's settings replace option defaults; options given on the command line still win."""
    result = dict(values)
    for key, value in recipe.settings.items():
        param, convert = RECIPE_OPTIONS[key]
        if o.is_default(param):
            result[param] = convert(value)
    return result


@main.command(epilog="""\b
Example:
  onnxq calibrate model.onnx --calib data/ -o model.stats.npz
  onnxq quantize model.onnx -o model.int8.onnx --load-stats model.stats.npz --method mse
  onnxq calibrate model.onnx --calib /shared/data/ -o model.stats.npz --ray --workers 8   # on RAY_ADDRESS
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Statistics file to write (.npz).")
@data_options
@ray_options
@verbosity_options
@handle_errors
def calibrate(**p) -> None:
    """Collect activation statistics once; quantize later with any method via --load-stats."""
    stats = calibrate_only(p["model"], p["output"], calibrate_data(CommandOptions.current(p)),
                           progress=progress_factory(p["quiet"]))
    commit()
    if not p["quiet"]:
        click.echo(f"onnxq: statistics of {len(stats.tensors)} tensors over {stats.samples} samples -> "
                   f"{p['output']}", err=True)


def calibrate_data(o: CommandOptions) -> DataOptions:
    """calibrate's options as DataOptions (the CLI and onnxq.api)."""
    data = _data(o)
    data.ray = _ray_options(o["ray_address"], o["workers"])
    return data


@main.command("merge-stats", epilog="""\b
Example (calibration sharded over two machines):
  onnxq calibrate model.onnx --calib part1/ -o a.npz    # machine 1
  onnxq calibrate model.onnx --calib part2/ -o b.npz    # machine 2
  onnxq merge-stats a.npz b.npz -o all.npz
""")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Merged statistics file.")
@verbosity_options
@handle_errors
def merge_stats(inputs, output, quiet) -> None:
    """Merge statistics files into the statistics of the union of their data (exact; see README)."""
    if len(inputs) < 2:
        raise UsageError("merge-stats needs at least two statistics files")
    check_paths([*(PathArg("INPUTS", path, INPUT) for path in inputs), PathArg("-o", output, OUTPUT)])
    merged = Statistics.load(inputs[0])
    for path in inputs[1:]:
        merged = merged.merge(Statistics.load(path))
    merged.save(output)
    commit()
    if not quiet:
        click.echo(f"onnxq: merged {len(inputs)} files: {len(merged.tensors)} tensors, {merged.samples} samples "
                   f"-> {output}", err=True)


@main.command(epilog="""\b
Examples:
  onnxq inspect model.onnx              # ops, inputs, what would run in int8
  onnxq inspect model.int8.onnx --json  # ... and what onnxruntime fused into int8 kernels
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
@verbosity_options
@handle_errors
def inspect(model, as_json, quiet) -> None:
    """Show a model's ops; for an int8 model, which Q/DQ onnxruntime fused and which it did not."""
    info = inspect_model(model)
    _emit(info, as_json, quiet, format_inspection)


@main.command("sensitivity", epilog="""\b
Examples:
  onnxq sensitivity model.onnx --calib data/ -o sens.json --plot sens.png
  onnxq calibrate model.onnx --calib data/ -o m.stats.npz
  onnxq sensitivity model.onnx --load-stats m.stats.npz --eval-data holdout/ -o sens.json
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the ranking as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG bar chart of the ranking.")
@data_options
@click.option("--eval-data", type=click.Path(path_type=Path), help="Samples to measure on (default: the last 10% "
              "of --calib).")
@click.option("--load-stats", type=click.Path(path_type=Path), help="Reuse saved statistics (no calibration pass).")
@settings_options
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Held-back samples each variant is measured on.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Rows in the printed table.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON on stdout.")
@verbosity_options
@handle_errors
def sensitivity_command(**p) -> None:
    """Rank MODEL's int8 layers by measured sensitivity: output SQNR with only that layer int8 and with all
    but that layer int8."""
    output, plot = p["output"], p["plot"]
    request = sensitivity_request(CommandOptions.current(p))
    check_paths([*quantize_paths(request, writes_model=False), PathArg("--recipe", p["recipe_path"], INPUT),
                 PathArg("-o", output, OUTPUT), PathArg("--plot", plot, OUTPUT)])
    result: SensitivityResult = run_sensitivity(request, progress=progress_factory(p["quiet"]))
    if output is not None:
        result.save_json(output)
    if plot is not None:
        result.save_png(plot)
    commit()
    if p["as_json"]:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not p["quiet"]:
        click.echo(result.table(p["top"]))


def sensitivity_request(o: CommandOptions) -> QuantizeRequest:
    """sensitivity's options as a request (no model is written): quantize's settings, built as quantize builds them."""
    recipe = load_recipe(o)
    v = _recipe_defaults(recipe, {k: o[k] for k in SETTINGS_OPTIONS}, o)
    mode = recipe.settings.get("mode", Mode.STATIC)
    if mode != Mode.STATIC:
        raise UsageError(f"sensitivity ranks the layers of static int8; the recipe sets mode {mode}")
    return QuantizeRequest(model=o["model"], data=_data(o), load_stats=o["load_stats"],
                           sensitivity_samples=o["samples"], speed_guard="off", **settings_fields(o, recipe, v))


@main.command("bench", epilog="""\b
Examples:
  onnxq bench model.onnx model.int8.onnx --data calib/
  onnxq bench model.onnx model.int8.onnx --data imgs/ --image-size 224x224 --batch 16 --json
""")
@click.argument("fp32", type=click.Path(path_type=Path))
@click.argument("int8", type=click.Path(path_type=Path))
@click.option("--data", "--calib", "data", type=click.Path(path_type=Path), help="A real input: the first sample "
              "of any --calib form (--calib is the same option); default: random values, for models with static "
              "input shapes or --input-shapes.")
@click.option("--data-loader-script", metavar="FILE[:FUNCTION]", help="The first feed FUNCTION (default load_data) "
              "in FILE yields is the input (see README, 'Data from your own code').")
@input_shapes_option("Random input: the shapes of inputs with open dimensions")
@image_options
@click.option("--batch", "batch", type=click.IntRange(min=2), default=8, show_default=True,
              help="The larger batch timed besides batch 1 (the sample repeated on axis 0).")
@click.option("--threads", type=click.IntRange(min=1), multiple=True,
              help="Thread counts to time (repeatable; default: 1 and all this process may use).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
@verbosity_options
@handle_errors
def bench_command(**p) -> None:
    """Latency of FP32 and INT8 side by side: batch 1 and --batch, one thread and all, medians and p90."""
    _emit(bench(CommandOptions.current(p)), p["as_json"], p["quiet"], format_comparison)


def bench(o: CommandOptions) -> dict:
    """bench's options, run (the CLI and onnxq.api): the timing input is the first sample of --data/--calib or
    of the data loader, else random values (--input-shapes for open dimensions)."""
    data = _calibration_data(o, "data")
    source = None
    if isinstance(data, FeedLoader):
        source = data.open(model_input_specs(load_model(o["fp32"])), limit=1)  # the rest of it is never read
    elif data is not None:
        source = open_source(data, model_input_specs(load_model(o["fp32"])), _images(o))
        if not len(source):
            raise DataError(f"no samples in {data}")
    thread_counts = tuple(sorted(set(o["threads"]))) or tuple(sorted({1, all_threads()}))
    return compare_fp32_int8(o["fp32"], o["int8"], source, (1, o["batch"]), thread_counts,
                             parse_input_shapes(o["input_shapes"]))


@main.command(epilog="""\b
Examples:
  onnxq doctor                       # this machine
  onnxq doctor --json > target.json  # on the deployment machine, then on the CI machine:
  onnxq quantize model.onnx -o model.int8.onnx --calib data/ --target-cpu target.json
""")
@click.option("--cpuinfo", type=click.Path(path_type=Path), help="Describe the CPU in this /proc/cpuinfo copy "
              "(or `onnxq doctor --json` output) instead of this machine's.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON on stdout.")
@verbosity_options
@handle_errors
def doctor(cpuinfo, as_json, quiet) -> None:
    """This CPU's int8 features, the onnxruntime build, and what they mean for quantize's defaults."""
    _emit(this_machine(cpuinfo), as_json, quiet, format_diagnosis)


@main.command("convert", epilog="""\b
Examples:
  onnxq convert model.qat.onnx -o model.int8.onnx                 # keep the learned parameters
  onnxq convert model.qat.onnx -o model.int8.onnx --format qoperator --eval-data eval/
  onnxq convert model.qat.onnx -o model.int8.onnx --activations int8 --calib data/

Exit codes: 0 ok, 2 usage (e.g. tensors need --calib), 3 bad model (e.g. an invalid scale;
the message names the node), 4 bad data, 5 cannot write output, 1 internal error.
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the int8 model.")
@click.option("--format", "output_format", type=click.Choice(Format.values()), default="qdq", show_default=True,
              help="qdq: Q/DQ pairs placed for onnxruntime's int8 kernels; qoperator: integer operators.")
@click.option("--activations", type=click.Choice(ACTIVATION_TYPES), default="uint8", show_default=True,
              help="Activation type: uint8 (a learned int8 activation keeps its scale, its zero point moves by "
                   "128: the same values, in the type onnxruntime's x86 int8 kernels fuse), int8, or keep each "
                   "learned type as it is.")
@data_options
@click.option("--eval-data", type=click.Path(path_type=Path), help="Samples to compare the output with the input "
              "(fake-quant) model on (default: --calib, if given).")
@click.option("--calibrate-missing", is_flag=True, help="Calibrate the tensors the input model leaves float (needs "
              "--calib) and run their nodes in int8 too (default: those nodes stay float, as in the input).")
@method_options  # for tensors without learned parameters
@report_options
@verbosity_options
@handle_errors
def convert_command(**p) -> None:
    """Convert a model with QuantizeLinear/DequantizeLinear pairs (a QAT export) to onnxq's int8 form,
    keeping its learned scales and zero points."""
    request = convert_request(CommandOptions.current(p))
    check_paths([*convert_paths(request), PathArg("--report", p["report_path"], OUTPUT)])
    result = convert(request, progress=progress_factory(p["quiet"]))
    _write_report(result.report, p["report_path"])
    _emit(result.report, p["as_json"], p["quiet"], format_summary)


def convert_request(o: CommandOptions) -> ConvertRequest:
    """convert's options as a request (the CLI and onnxq.api)."""
    if o["allow_random"]:
        raise UsageError("convert calibrates only tensors without learned parameters; give real --calib data")
    return ConvertRequest(model=o["model"], output=o["output"], output_format=o["output_format"],
                          activations=o["activations"], data=_data(o), method=o["method"],
                          percentile=o["percentile"], calibrate_missing=o["calibrate_missing"])


@main.command("qat-prep", epilog="""\b
Example (train the fake-quant model, then convert it):
  onnxq qat-prep model.onnx -o model.fakequant.onnx --calib data/
  ... train model.fakequant.onnx (or use model.fakequant.params.json) ...
  onnxq convert model.trained.onnx -o model.int8.onnx
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write the fp32 model with fake-quant pairs.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), help="Where to write the parameters "
              "as JSON (default: OUTPUT with suffix .params.json).")
@data_options
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-back data to compare with fp32 on "
              "(default: the last 10% of --calib).")
@method_options
@click.option("--symmetric", is_flag=True, help="Activations as int8 with zero point 0 (default uint8 asymmetric).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor (default: per output channel).")
@click.option("--weight-range", type=click.Choice(WeightRange.values()), default="auto", show_default=True,
              help="'reduced' keeps weights within 7 bits, needed on x86 CPUs without VNNI; 'auto' checks this CPU.")
@click.option("--exclude", multiple=True, help="Keep this node name or op type in float (repeatable).")
@report_options
@verbosity_options
@handle_errors
def qat_prep_command(**p) -> None:
    """Write MODEL with fake-quant (QuantizeLinear->DequantizeLinear) pairs on weights and activations,
    initialised from calibration, for quantization-aware training."""
    request, params_path = qat_prep_request(CommandOptions.current(p)), p["params_path"]
    check_paths([*quantize_paths(request), PathArg("--params", params_path or params_path_for(request.output),
                                                   OUTPUT), PathArg("--report", p["report_path"], OUTPUT)])
    result = qat_prep(request, params_path, progress=progress_factory(p["quiet"]))
    _write_report(result.report, p["report_path"])
    _emit(result.report, p["as_json"], p["quiet"], format_summary)


def qat_prep_request(o: CommandOptions) -> QuantizeRequest:
    """qat-prep's options as a request (the CLI and onnxq.api)."""
    return QuantizeRequest(model=o["model"], output=o["output"], data=_data(o), weight_range=o["weight_range"],
                           exclude=tuple(o["exclude"]), speed_guard="off",
                           settings=QuantSettings(method=o["method"], percentile=o["percentile"],
                                                  symmetric=o["symmetric"], per_channel=not o["per_tensor"]))


def _write_report(report: dict, path: Path | None) -> None:
    """Write the report (if asked) and commit every output, before anything says they were written."""
    if path is not None:
        atomic_write_bytes(path, json.dumps(report, indent=2, sort_keys=True).encode())
    commit()


def _emit(result: dict, as_json: bool, quiet: bool, as_text: Callable[[dict], str]) -> None:
    """A command's result: JSON on stdout with --json, else text unless -q."""
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif not quiet:
        click.echo(as_text(result))


def run_click() -> int:
    """The command line (onnxq.entry sets up signals first): click's own usage errors become one line too."""
    try:
        result = main.main(prog_name="onnxq", standalone_mode=False)
    except click.ClickException as exc:
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "onnxq"
        click.echo(one_line(f"onnxq: error: {exc.format_message()} (see '{command} --help')"), err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo(interrupt_message("interrupted"), err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return result if isinstance(result, int) else 0


def run() -> None:
    from .entry import run as entry_run

    entry_run()


if __name__ == "__main__":
    run()
