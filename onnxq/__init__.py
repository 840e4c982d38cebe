"""onnxq: turn an fp32 ONNX model into an int8 ONNX model that runs fast on CPU.

    import onnxq
    result = onnxq.quantize("model.onnx", "model.int8.onnx", calib="calibration_data/")
    result.model, result.plan, result.report

`quantize`, `calibrate`, `convert` and `inspect` take the options of their CLI commands as keyword
arguments (onnxq.api); errors are the typed exceptions of onnxq.errors. They load on first use, so
`import onnxq` stays light (the command line sets up signal handling before any heavy import).
The modules are grouped by stage (README, 'How it works'): onnxq.quant (what a quantized model
is, no onnxruntime), onnxq.passes, onnxq.runtime, onnxq.search and onnxq.commands.
"""

__version__ = "0.1.0"

__all__ = ["DataError", "ModelError", "OnnxqError", "OutputError", "Result", "UsageError", "__version__",
           "calibrate", "convert", "inspect", "options", "quantize"]

_API = frozenset({"Result", "calibrate", "convert", "inspect", "options", "quantize"})
_ERRORS = frozenset({"DataError", "ModelError", "OnnxqError", "OutputError", "UsageError"})


def __getattr__(name: str):
    """The API's names, imported on first use (no submodule at the top shares their names)."""
    if name in _API:
        from onnxq import api

        return getattr(api, name)
    if name in _ERRORS:
        from onnxq import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
