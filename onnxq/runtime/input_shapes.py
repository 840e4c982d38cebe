"""`--input-shapes NAME:DIMS[,...]`: the shapes of inputs whose dimensions the model leaves open, for
random data (`--allow-random`, `onnxq bench` without a sample).

The forms of Polygraphy and onnxslim: `x:1x3x48x320`, several joined by commas
(`ids:1x128,mask:1x128`) or the option repeated; `x:[1,3,48,320]` too. The name is everything
before the last colon, so names like `input:0` work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from onnxq.errors import UsageError

Shapes = dict[str, tuple[int, ...]]
OPTION = "--input-shapes"


def parse_input_shapes(values: str | Iterable[str] | Mapping[str, Sequence[int]] | None) -> Shapes:
    """NAME -> dims from the option's values (or, from Python, a dict NAME -> sequence of ints)."""
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {str(name): _dims(dims, f"{name}:{dims}") for name, dims in values.items()}
    shapes: Shapes = {}
    for value in [values] if isinstance(values, str) else values:
        for entry in _entries(value):
            name, _, dims = entry.rpartition(":")
            if not name or not dims:
                raise UsageError(f"{OPTION} takes NAME:DIMS such as x:1x3x224x224, got {entry!r}")
            if name in shapes:
                raise UsageError(f"{OPTION} gives input {name} twice")
            shapes[name] = _dims(re.split(r"[x,]", dims.strip("[]() ")), entry)
    return shapes


def _entries(value: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    return [e.strip() for e in re.split(r",(?![^\[(]*[\])])", value) if e.strip()]


def _dims(dims: Sequence, entry: str) -> tuple[int, ...]:
    try:
        parsed = tuple(int(d) for d in dims)
    except (TypeError, ValueError):
        raise UsageError(f"{OPTION}: the dimensions in {entry!r} must be whole numbers (1x3x224x224)") from None
    if not parsed or any(d < 1 for d in parsed):
        raise UsageError(f"{OPTION}: the dimensions in {entry!r} must be positive")
    return parsed


class ModelInput(Protocol):  # onnxq.runtime.data.InputSpec: what a model says of one input
    name: str
    shape: tuple[int | None, ...] | None


def check_input_shapes(shapes: Shapes, specs: Sequence[ModelInput]) -> None:
    """Every named input exists, and each shape fits the model's rank and fixed dimensions."""
    by_name = {spec.name: spec for spec in specs}
    for name, dims in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise UsageError(f"{OPTION}: the model has no input {name} (inputs: {', '.join(by_name)})")
        if spec.shape is None:
            continue
        if len(dims) != len(spec.shape):
            raise UsageError(f"{OPTION}: input {name} has rank {len(spec.shape)}, got {len(dims)} dimensions "
                             f"({'x'.join(map(str, dims))})")
        for axis, (given, fixed) in enumerate(zip(dims, spec.shape, strict=True)):
            if fixed is not None and given != fixed:
                raise UsageError(f"{OPTION}: input {name} has dimension {axis} fixed at {fixed}, got {given}")
