"""The reports of quantize, convert and qat-prep: JSON-ready dicts built on one core (report_core: the same
keys, with the same meaning and shape, in every command's report) plus each command's own keys, and the
one text summary (format_summary) that reads any of them."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import onnx

from onnxq.enums import QUANTIZED_STATUSES, Mode, NodeStatus, SpeedGuard
from onnxq.model_io import model_bytes, size_change

if TYPE_CHECKING:
    from onnxq.commands.request import QuantizeRequest
    from onnxq.quant.plan import QuantPlan, QuantSettings
    from onnxq.quant.statistics import Statistics
    from onnxq.runtime.data import SampleSource
    from onnxq.runtime.evaluate import Fidelity

FP32_REFERENCE = "the fp32 model"
TIMINGS = "timings_s"  # stage -> seconds, in every report
# How a float node's reason starts when convert keeps it float because the input model leaves its tensors float.
LEFT_FLOAT_BY_INPUT = "the input model leaves"


def build_report(*, request: QuantizeRequest, version: str, original: onnx.ModelProto, quantized_bytes: int,
                 plan: QuantPlan, stats: Statistics, calib: SampleSource | None, held: SampleSource | None,
                 fidelity: Fidelity | None, notes: list[str], weight_range_reason: str,
                 timings: dict[str, float], speed_guard: dict, fusion: dict, recovery: dict | None = None,
                 target: dict | None = None) -> dict:
    """quantize's report: the keys every report has (report_core), then quantize's own."""
    report = {
        **report_core(command="quantize", model=request.model, output=request.output, version=version, plan=plan,
                      settings=settings_section(plan.settings, weight_range_reason, request.output_format,
                                                exclude=list(request.exclude), mode=request.mode),
                      data=quantize_data(request, stats, calib, held),
                      sizes=(model_bytes(original), quantized_bytes),
                      fidelity=fidelity_section(fidelity, FP32_REFERENCE), fusion=fusion, notes=notes,
                      timings=timings),
        "target_cpu": None if target is None else {**target, "speed_decisions": _speed_decisions(speed_guard)},
        "recipe": {"rules": [rule.to_dict() for rule in request.recipe.rules],
                   "int16_nodes": [n.name for n in plan.nodes if n.status == NodeStatus.INT16],
                   "saved_to": str(request.save_recipe) if request.save_recipe else None},
        "speed_guard": speed_guard,
        "recovery": recovery,
        "gates": _gates(request, fidelity),
    }
    return json_safe(report)


def report_core(*, command: str, model: object, output: object, version: str, plan: QuantPlan, settings: dict,
                data: dict, sizes: tuple[int, int], fidelity: dict | None, fusion: dict, notes: list[str],
                timings: dict[str, float]) -> dict:
    """The keys every command's report has, with the same meaning and shape in each: what ran on what, with
    which settings and data; what the plan made of each node and tensor; the written model's size, how
    closely it follows its reference, what onnxruntime fuses in it; notes and the seconds per stage.
    `sizes`: the input and the written model's bytes."""
    return {
        **report_header(command, model, output, version),
        "settings": settings,
        "data": data,
        "nodes": _node_summary(plan),
        "quantized_nodes": [{"name": n.name, "op_type": n.op_type, "status": n.status}
                            for n in plan.nodes if n.status in QUANTIZED_STATUSES],
        "float_nodes": [{"name": n.name, "op_type": n.op_type, "reason": n.reason}
                        for n in plan.nodes if n.status == NodeStatus.FLOAT],
        "tensors": [_tensor_row(t) for t in plan.tensors.values()],
        "size": size_section(*sizes),
        "fidelity": fidelity,
        "fusion": fusion,
        "notes": notes,
        TIMINGS: timings,
    }


def settings_section(settings: QuantSettings, weight_range_reason: str, output_format: str, **extra) -> dict:
    """The plan's settings, why that weight range, the written format, and a command's own settings."""
    return {**settings.__dict__, "weight_range_reason": weight_range_reason, "format": output_format, **extra}


def data_section(*, calibration: dict | None, evaluation: SampleSource | None, batch_size: int,
                 statistics_file: object = None) -> dict:
    """Where the calibration and evaluation samples came from (None: not used)."""
    return {"calibration": calibration, "statistics_file": None if statistics_file is None else str(statistics_file),
            "evaluation": describe_source(evaluation), "batch_size": batch_size}


def quantize_data(request: QuantizeRequest, stats: Statistics, calib: SampleSource | None,
                  held: SampleSource | None) -> dict:
    """data_section for quantize and qat-prep: calibrated on `calib`, or on statistics loaded from a file."""
    samples = stats.samples if request.load_stats else None
    return data_section(calibration=describe_source(calib, samples), evaluation=held,
                        batch_size=request.data.batch_size, statistics_file=request.load_stats)


def size_section(input_bytes: int, output_bytes: int) -> dict:
    return {"input_bytes": input_bytes, "output_bytes": output_bytes,
            "ratio": round(input_bytes / output_bytes, 3) if output_bytes else None}


def report_header(command: str, model: object, output: object, version: str) -> dict:
    """The keys every report starts with."""
    return {"onnxq_version": version, "command": command, "model": str(model), "output": str(output)}


def fidelity_section(fidelity: Fidelity | None, reference: str) -> dict | None:
    """How closely the written model follows `reference` (None: not measured), alike in every report."""
    if fidelity is None:
        return None
    return {"reference": reference, "samples": fidelity.samples, "source": fidelity.source,
            "available_samples": fidelity.available or fidelity.samples, "outputs": fidelity.outputs}


def _speed_decisions(guard: dict) -> str:
    if not guard.get("enabled"):
        return "none (speed guard off)"
    return f"{guard['mode']}: {guard['source']}"


def _metric_change(target: dict) -> str:
    if target["target"].get("min_metric") is None:
        return ""
    return f", metric {number(target['start']['metric'], 4)} -> {number(target['final']['metric'], 4)}"


def describe_source(source: SampleSource | None, samples: int | None = None) -> dict | None:
    if source is None:
        return None if samples is None else {"samples": samples}
    info = {"source": source.description, "kind": source.kind, "samples": len(source)}
    prep = getattr(source, "preprocessing", None)
    if prep is not None:
        info["preprocessing"] = prep.describe()
    return info


def _node_summary(plan: QuantPlan) -> dict:
    by_op: dict[str, Counter] = {}
    for node in plan.nodes:
        by_op.setdefault(node.op_type, Counter())[node.status] += 1
    quantized = sum(1 for n in plan.nodes if n.status in QUANTIZED_STATUSES)
    return {
        "total": len(plan.nodes),
        "quantized": quantized,
        "float": len(plan.nodes) - quantized,
        "by_status": dict(sorted(Counter(n.status for n in plan.nodes).items())),
        "by_op_type": {op: dict(sorted(c.items())) for op, c in sorted(by_op.items())},
    }


def _tensor_row(entry) -> dict:
    row = {"name": entry.name, "role": entry.role, "qtype": entry.qtype, "axis": entry.axis}
    if entry.role == "activation":
        row.update(range=entry.range, scale=entry.scale[0], zero_point=entry.zero_point[0],
                   clipped_fraction=entry.clipped_fraction, shares_scale_with=entry.source)
    elif entry.role == "weight":
        row.update(channels=len(entry.scale), max_abs_error=entry.max_abs_error)
    return row


def _gates(request: QuantizeRequest, fidelity: Fidelity | None) -> list[dict]:
    gates = []
    for name, bound, value in (("min_cosine", request.min_cosine, fidelity and fidelity.min_cosine),
                               ("min_sqnr_db", request.min_sqnr, fidelity and fidelity.min_sqnr)):
        if bound is None:
            continue
        passed = value is not None and value >= bound
        gates.append({"gate": name, "required": bound, "measured": value, "passed": bool(passed)})
    return gates


def json_safe(value):
    """JSON has no inf/nan: write them as strings a reader can still parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def format_summary(report: dict) -> str:
    """A few human lines for stderr, for the report of any command."""
    body = {"convert": _convert_lines, "qat-prep": _prep_lines}.get(report.get("command", "quantize"), _quantize_lines)
    return "\n".join(body(report))


def _quantize_lines(report: dict) -> list[str]:
    lines = [f"onnxq {report['onnxq_version']}: {report['model']} -> {report['output']}"]
    target = report.get("target_cpu")
    if target:
        lines.append(f"  target CPU class {target['class']} ({target['source']}); speed decisions: "
                     f"{target['speed_decisions']}")
    settings = report["settings"]
    if settings.get("mode", "static") != "static":
        what = ("MatMul/Gemm/LSTM weights int8, activations quantized at run time" if settings["mode"] == Mode.DYNAMIC
                else "integer weights, float compute")
        lines.append(f"  mode {settings['mode']}: {what}")
    else:
        lines.append(_static_settings_line(settings))
    calib = report["data"]["calibration"]
    if calib:
        origin = calib.get("source", report["data"]["statistics_file"])
        lines.append(f"  calibration: {calib['samples']} samples from {origin}")
    lines += [*_node_lines(report["nodes"]), _size_line(report["size"])]
    lines.extend(_fidelity_lines(report["fidelity"]))
    lines.extend(_fusion_lines(report.get("fusion")))
    lines.extend(_search_lines(report.get("auto")))
    smoothing = report.get("smoothing")
    if smoothing:
        lines.append(f"  smoothing (alpha {smoothing['alpha']}): {smoothing['layers_smoothed']} activations, "
                     f"{smoothing['extra_ops']} extra ops; largest activation range "
                     f"{number(smoothing['max_range_before'], 2)} -> {number(smoothing['max_range_after'], 2)}")
    lines.extend(_speed_guard_lines(report.get("speed_guard") or {}))
    target = report.get("accuracy_target")
    if target:
        speed = target["speed"]
        cost = f", {speed['cost']:.2f}x the all-int8 latency" if speed else ""
        lines.append(f"  accuracy target {'met' if target['met'] else 'NOT met'}: {len(target['float_nodes'])} layers "
                     f"to {target['fallback']} (SQNR {number(target['start']['min_sqnr_db'], 1)} -> "
                     f"{number(target['final']['min_sqnr_db'], 1)} dB{_metric_change(target)} on {target['samples']} "
                     f"samples{cost})")
    lines.extend(_recovery_lines(report.get("recovery")))
    for gate in report["gates"]:
        verdict = "passed" if gate["passed"] else "MISSED"
        lines.append(f"  gate {gate['gate']} >= {gate['required']}: {verdict} (measured {number(gate['measured'], 4)})")
    return lines + _closing_lines(report)


def _convert_lines(report: dict) -> list[str]:
    origins = report["tensor_origins"]
    lines = [f"onnxq: converted {report['model']} -> {report['output']} ({report['settings']['format']}): "
             f"{len(origins['learned']) + len(origins['shared_learned'])} tensors keep learned parameters, "
             f"{len(origins['calibrated'])} calibrated, {len(origins['computed'])} weights/biases quantized by onnxq "
             "(biases: int32, input x weight scale)"]
    lines += [*_node_lines(report["nodes"]), _size_line(report["size"])]
    if report["converted_types"]:
        lines.append(f"  {len(report['converted_types'])} activations converted to "
                     f"{report['settings']['activations']}")
    if report["dropped"]:
        lines.append(f"  {len(report['dropped'])} learned parameters not used (see the report's 'dropped')")
    left = [n for n in report["float_nodes"] if n["reason"].startswith(LEFT_FLOAT_BY_INPUT)]
    if left:
        lines.append(f"  {len(left)} nodes kept float, as the input model leaves their tensors float "
                     "(see the report's 'float_nodes'; --calibrate-missing --calib DATA quantizes them)")
    return lines + _fusion_lines(report["fusion"]) + _fidelity_lines(report["fidelity"]) + _closing_lines(report)


def _prep_lines(report: dict) -> list[str]:
    counts = report["fake_quant"]
    lines = [f"onnxq: fake-quant model {report['output']}: {counts['activations']} activations and "
             f"{counts['weights']} weights behind QuantizeLinear->DequantizeLinear; parameters -> {report['params']}",
             _static_settings_line(report["settings"]), *_node_lines(report["nodes"]), _size_line(report["size"])]
    lines += _fidelity_lines(report["fidelity"]) + _closing_lines(report)
    return [*lines, f"  after training: onnxq convert {report['output']} -o MODEL.int8.onnx"]


def _node_lines(nodes: dict) -> list[str]:
    ops = []
    for op, counts in nodes["by_op_type"].items():
        quantized = sum(v for k, v in counts.items() if k in QUANTIZED_STATUSES)
        ops.append(f"{op} {quantized}/{sum(counts.values())}")
    return [f"  nodes: {nodes['quantized']} of {nodes['total']} quantized, {nodes['float']} kept float",
            "    " + ", ".join(ops)]


def _size_line(size: dict) -> str:
    return (f"  size: {size['input_bytes'] / 1e6:.2f} MB -> {size['output_bytes'] / 1e6:.2f} MB "
            f"({size_change(size['input_bytes'], size['output_bytes'])})")


def _fidelity_lines(fidelity: dict | None) -> list[str]:
    if not fidelity:
        return ["  fidelity: not measured (no evaluation data)"]
    measured = fidelity["samples"]
    available = fidelity.get("available_samples") or measured
    of, every = (f" of {available}", "; --eval-samples all for every one") if available > measured else ("", "")
    reference = fidelity.get("reference", FP32_REFERENCE)
    versus = "" if reference == FP32_REFERENCE else f" vs {reference}"
    lines = [f"  fidelity{versus} on {measured}{of} samples ({fidelity['source']}{every}):"]
    for out in fidelity["outputs"]:
        task = out.get("task") or {}
        same = (f"; task ({task['kind']}): agreement {number(task['agreement'], 4)}{_near_ties(task)}"
                if task.get("agreement") is not None else "")
        lines.append(f"    {out['name']}: cosine {number(out['cosine'], 5)} "
                     f"(worst sample {number(out['worst_sample_cosine'], 5)}), "
                     f"SQNR {number(out['sqnr_db'], 1)} dB{same}")
    return lines


def _fusion_lines(fusion: dict | None) -> list[str]:
    if not fusion:
        return []
    kernels = ", ".join(f"{op} {n}" for op, n in fusion["int8_kernels"].items()) or "none"
    return [f"  onnxruntime int8 kernels: {kernels}; avoidable unfused Q/DQ: {fusion['avoidable']}"]


def _closing_lines(report: dict) -> list[str]:
    """Notes, then the time each stage took."""
    lines = [f"  note: {note}" for note in report.get("notes", [])]
    timings = report.get(TIMINGS) or {}
    if timings:
        lines.append(f"  time: {sum(timings.values()):.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                     + ")")
    return lines


def _near_ties(task: dict) -> str:
    ties = task.get("near_ties") or 0
    if not ties:
        return ""
    return (f" ({ties} fp32 near tie{'s' if ties > 1 else ''}; {number(task['decided_agreement'], 4)} on the "
            f"{task['samples'] - ties} samples fp32 decides)")


def _search_lines(search: dict | None) -> list[str]:
    """The automatic search: what won and why, then one line per candidate measured."""
    if not search:
        return []
    candidates = search["candidates"]
    chosen = next((c for c in candidates if c["name"] == search["chosen"]), None)
    if chosen is None:
        return [f"  automatic: {search['chosen']} ({search['why']})"]
    where = f" (on {search['scored_on']})" if search.get("scored_on", "this process") != "this process" else ""
    lines = [f"  automatic: {search['chosen']}, chosen from {len(candidates)} candidates measured in "
             f"{search.get('seconds', sum(c['seconds'] for c in candidates)):.1f} s{where}: {search['why']}",
             "    (layers x: the speed table's expected speed-up of the Conv/MatMul/Gemm layers over fp32; the rest "
             "of the model runs alike in every candidate)"]
    measured = search.get("measured")
    if measured:
        lines.append(f"    measured here: the chosen model at {measured['speedup']:.2f}x fp32 (batch 1, one thread, "
                     f"{measured['runs']} interleaved runs)")
    for c in candidates:
        mark = "*" if c is chosen else " "
        result = (f"error: {c['error']}" if c["error"] else f"agreement {number(c['agreement'], 4)}, decided "
                  f"{number(c['decided_agreement'], 4)}")
        lines.append(f"   {mark} {c['name']}: {result}; layers {number(c['expected_speedup'], 2)}x; "
                     f"{c['seconds']:.1f} s")
    return lines


def _speed_guard_lines(guard: dict) -> list[str]:
    if not guard.get("enabled"):
        return []
    if guard["mode"] == SpeedGuard.TABLE:
        kept = Counter(layer["class"].split(" ")[0] for layer in guard["layers"]
                       if layer["decision"] == NodeStatus.FLOAT)
        if not kept:
            return [f"  speed guard (table): all {len(guard['layers'])} guarded layers are faster in int8"]
        return ["  speed guard (table): kept float " + ", ".join(f"{n} {kind}" for kind, n in sorted(kept.items()))
                + f" of {len(guard['layers'])} guarded layers"]
    kept = [t for t in guard["trials"] if t["decision"] == NodeStatus.FLOAT]
    return ["  speed guard (measured): " + ("; ".join(
        f"kept {t['layers']} {t['kind']} float (model {t['float_ms']:.2f} ms vs {t['int8_ms']:.2f} ms in int8)"
        for t in kept) if kept else f"all {len(guard['trials'])} kinds of layer are faster in int8")]


def _recovery_lines(recovery: dict | None) -> list[str]:
    if not recovery:
        return []
    lines = []
    eq = recovery.get("equalization")
    if eq is not None:
        lines.append(f"  equalization: {eq['pairs']} conv pairs rescaled ({eq['iterations']} iterations)"
                     + "".join(f"; skipped {n}: {why}" for why, n in eq["skipped"].items()))
    ada = recovery.get("adaround")
    if ada is not None:
        lines.append(f"  adaround: {ada['layers_improved']} of {len(ada['layers'])} layers re-rounded, mean output "
                     f"error {number(ada['mean_loss_ratio'], 3)}x of round-to-nearest ({ada['seconds']:.1f} s)")
    bias = recovery.get("bias_correction")
    if bias is not None:
        lines.append(f"  bias correction: {bias['layers_corrected']} layers"
                     + (f", {len(bias['no_bias_to_adjust'])} without a bias to adjust"
                        if bias["no_bias_to_adjust"] else ""))
    return lines


def _static_settings_line(settings: dict) -> str:
    return (f"  method {settings['method']}"
            + (f" (percentile {settings['percentile']})" if settings["method"] == "percentile" else "")
            + f", activations {'int8 symmetric' if settings['symmetric'] else 'uint8 asymmetric'}"
            + f", weights int8 {'per-channel' if settings['per_channel'] else 'per-tensor'}"
            + f" ({settings['weight_range']} range: {settings['weight_range_reason']})")


def number(value, digits: int) -> str:
    """A report number for humans: inf/nan (floats or the strings json_safe writes) and None as words."""
    if isinstance(value, str) or value is None:
        return str(value)
    return f"{value:.{digits}f}"
