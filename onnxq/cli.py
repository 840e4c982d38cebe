"""The `onnxq` command: thin wrappers over the library functions in onnxq.commands.pipeline."""

from __future__ import annotations

import functools
import json
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from onnxq import __version__
from onnxq.commands.command_options import CommandOptions
from onnxq.commands.convert import ConvertRequest, convert, convert_paths
from onnxq.commands.doctor import format_diagnosis, this_machine
from onnxq.commands.dynamic import WeightOnlyOptions
from onnxq.commands.inspect_model import format_inspection, inspect_model
from onnxq.commands.option_table import (
    BENCH,
    CALIBRATE,
    CONVERT,
    QAT_PREP,
    QUANTIZE,
    SENSITIVITY,
    check_effective,
    click_options,
    request_fields,
    with_recipe_settings,
)
from onnxq.commands.pipeline import DataOptions, QuantizeRequest, calibrate_only, quantize
from onnxq.commands.pipeline import sensitivity as run_sensitivity
from onnxq.commands.qat_prep import params_path_for, qat_prep
from onnxq.commands.recipe import Recipe
from onnxq.commands.report import format_summary
from onnxq.enums import Mode
from onnxq.errors import EXIT_GATE_MISSED, EXIT_INTERNAL, DataError, OnnxqError, UsageError, first_line, one_line
from onnxq.interrupts import Interrupted
from onnxq.model_io import atomic_write_bytes, load_model
from onnxq.outputs import commit, interrupt_message, transaction
from onnxq.paths import INPUT, OUTPUT, PathArg, check_paths, quantize_paths
from onnxq.quant.plan import QuantSettings
from onnxq.quant.statistics import Statistics
from onnxq.runtime.data import DataArg, FeedLoader, ImagePreprocessing, model_input_specs, open_source
from onnxq.runtime.input_shapes import parse_input_shapes
from onnxq.runtime.latency import all_threads, compare_fp32_int8, format_comparison
from onnxq.runtime.loaders import data_argument, script_argument
from onnxq.runtime.session import progress_factory
from onnxq.search.distributed import RayOptions
from onnxq.search.sensitivity import SensitivityResult, Target


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


def load_recipe(o: CommandOptions) -> Recipe:
    return Recipe.load(o["recipe_path"]) if o.values.get("recipe_path") is not None else Recipe()


def verbosity_options(func):
    func = click.option("-v", "--verbose", is_flag=True, help="On an internal error (a bug), print its Python "
                        "traceback before the one-line message.")(func)
    return click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors: no summary, progress bar "
                        "or notes.")(func)


def _ray_options(ray_address: str | None, workers: int | None) -> RayOptions | None:
    return None if ray_address is None else RayOptions(address=ray_address or None, workers=workers)


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
@click_options(QUANTIZE)
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
    values = dict(o.values)
    if o["no_speed_guard"]:
        if "speed_guard" in o.given:
            raise UsageError("--no-speed-guard and --speed-guard contradict each other; give one")
        values["speed_guard"] = "off"
    v = _with_recipe(QUANTIZE, recipe, values, o)
    check_effective(QUANTIZE, o.given, {**v, "adaround_rules": any(rule.adaround for rule in recipe.rules)})
    request = QuantizeRequest(
        model=o["model"], output=o["output"], data=data, **request_fields(QUANTIZE, v),
        settings=_settings(v), recipe=recipe,
        target=_target(v["target_sqnr"], v["target_cosine"], v["target_metric"]),
        target_data=data_argument(v["target_data"], "--target-data"),
        eval_samples=_count_or_all(v["eval_samples"], "--eval-samples"),
        fallback=v["fallback"] or ("int8" if v["mode"] == Mode.WEIGHT_ONLY else "float"),
        weight_only=WeightOnlyOptions(bits=int(v["weight_bits"]), block_size=v["block_size"],
                                      symmetric=not v["weight_zero_points"], method=v["weight_method"]),
        adaround_seconds=v["adaround_seconds"] if v["adaround"] else None, adaround_rules_seconds=v["adaround_seconds"],
        search=not v["fast"], auto_target=v["target_agreement"], budget_s=v["budget"],
        auto_dynamic="mode" not in o.given and "mode" not in recipe.settings,
        method_given="method" in o.given or "method" in recipe.settings,
    )
    check_paths(quantize_paths(request))
    return request


def _with_recipe(command: str, recipe: Recipe, values: dict, o: CommandOptions) -> dict:
    """The command's values with the recipe's settings as defaults (options the user gave win)."""
    return with_recipe_settings(command, recipe.settings, values,
                                lambda name: o.is_default(name) and not (name == "speed_guard" and
                                                                         o.values.get("no_speed_guard")))


def _settings(v: dict) -> QuantSettings:
    return QuantSettings(method=v["method"], percentile=v["percentile"], symmetric=v["symmetric"],
                         per_channel=not v["per_tensor"])


main.add_command(quantize_command, name="quantize")

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


@main.command(epilog="""\b
Example:
  onnxq calibrate model.onnx --calib data/ -o model.stats.npz
  onnxq quantize model.onnx -o model.int8.onnx --load-stats model.stats.npz --method mse
  onnxq calibrate model.onnx --calib /shared/data/ -o model.stats.npz --ray --workers 8   # on RAY_ADDRESS
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Statistics file to write (.npz).")
@click_options(CALIBRATE)
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
    check_effective(CALIBRATE, o.given, o.values)
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
@click_options(SENSITIVITY)
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
    v = _with_recipe(SENSITIVITY, recipe, o.values, o)
    check_effective(SENSITIVITY, o.given, v)
    mode = recipe.settings.get("mode", Mode.STATIC)
    if mode != Mode.STATIC:
        raise UsageError(f"sensitivity ranks the layers of static int8; the recipe sets mode {mode}")
    return QuantizeRequest(model=o["model"], data=_data(o), **request_fields(SENSITIVITY, v), settings=_settings(v),
                           recipe=recipe, sensitivity_samples=v["samples"], speed_guard="off")


@main.command("bench", epilog="""\b
Examples:
  onnxq bench model.onnx model.int8.onnx --data calib/
  onnxq bench model.onnx model.int8.onnx --data imgs/ --image-size 224x224 --batch 16 --json
""")
@click.argument("fp32", type=click.Path(path_type=Path))
@click.argument("int8", type=click.Path(path_type=Path))
@click_options(BENCH)
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
@click_options(CONVERT)
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
    check_effective(CONVERT, o.given, o.values)
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
@click_options(QAT_PREP)
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
    check_effective(QAT_PREP, o.given, o.values)
    return QuantizeRequest(model=o["model"], output=o["output"], data=_data(o), **request_fields(QAT_PREP, o.values),
                           settings=_settings(o.values), speed_guard="off")


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
