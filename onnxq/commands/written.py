"""The check every written model passes (quantize in each mode, qat-prep, convert): onnx.checker, and
onnxruntime loading it, which is also the fusion check."""

from __future__ import annotations

import onnx

from onnxq.errors import ModelError, first_line
from onnxq.model_io import needs_external_data, weights_on_disk
from onnxq.runtime.fusion import FusionReport, check_fusion


def check_written_model(model: onnx.ModelProto, planned: dict[str, str] | None = None) -> FusionReport:
    """The written model must pass onnx.checker and load in onnxruntime (failures are onnxq bugs).

    Loading it is also the fusion check: what onnxruntime runs in int8 after optimizing it, and
    whether each compute node runs at the precision planned (`planned`: label -> plan status).
    """
    try:
        if not needs_external_data(model) and not weights_on_disk(model):  # else onnxruntime loading it checks it
            onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        reason = first_line(exc)
        raise ModelError(f"internal error: the quantized model fails onnx.checker: {reason}") from None
    try:
        return check_fusion(model, planned)
    except ModelError as exc:
        raise ModelError(f"internal error: the quantized model does not load: {exc.message}") from None

