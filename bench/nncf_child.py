"""Child process run in bench/.venv-nncf: nncf.quantize with its defaults on a folder of .npz feeds.

Usage: python bench/nncf_child.py MODEL OUT CALIB_DIR [--model-type transformer | --weights int4|int4-awq]
Stand-alone on purpose (only numpy, onnx, nncf): it runs in its own venv. ``--model-type
transformer`` passes NNCF's transformer preset (model_type=nncf.ModelType.TRANSFORMER);
everything else stays at NNCF's defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nncf
import numpy as np
import onnx


def compress(model: onnx.ModelProto, feeds: list[dict], kind: str) -> onnx.ModelProto:
    """nncf.compress_weights, int4 symmetric in groups of 32 for every layer NNCF puts in int4 (ratio 1);
    NNCF keeps embeddings and the last layer in its 8-bit backup precision. ``int4-awq`` adds AWQ and
    scale estimation on the calibration feeds."""
    options: dict = {"mode": nncf.CompressWeightsMode.INT4_SYM, "group_size": 32, "ratio": 1.0}
    if kind == "int4-awq":
        options.update(dataset=nncf.Dataset(feeds), awq=True, scale_estimation=True, subset_size=len(feeds))
    elif kind != "int4":
        raise SystemExit(f"unknown --weights {kind}")
    return nncf.compress_weights(model, **options)


def main(argv: list[str]) -> int:
    """Quantize argv[0] to argv[1] with the feeds in argv[2] (argv[3:]: ``--model-type transformer`` or
    ``--weights int4|int4-awq``)."""
    model_path, out, calib = Path(argv[0]), Path(argv[1]), Path(argv[2])
    feeds = []
    for f in sorted(calib.glob("*.npz")):
        with np.load(f) as data:
            feeds.append({k: data[k] for k in data.files})
    model = onnx.load(str(model_path))
    if argv[3:4] == ["--weights"] and len(argv) == 5:
        onnx.save(compress(model, feeds, argv[4]), str(out))
        return 0
    options = {"model_type": nncf.ModelType.TRANSFORMER} if argv[3:] == ["--model-type", "transformer"] else {}
    if argv[3:] and not options:
        raise SystemExit(f"unknown options {argv[3:]}")
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    onnx.save(quantized, str(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
