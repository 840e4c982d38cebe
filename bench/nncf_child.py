"""Child process run in bench/.venv-nncf: nncf.quantize with its defaults on a folder of .npz feeds.

Usage: python bench/nncf_child.py MODEL OUT CALIB_DIR [--model-type transformer]
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


def main(argv: list[str]) -> int:
    """Quantize argv[0] to argv[1] with the feeds in argv[2] (argv[3:]: ``--model-type transformer``)."""
    model_path, out, calib = Path(argv[0]), Path(argv[1]), Path(argv[2])
    options = {"model_type": nncf.ModelType.TRANSFORMER} if argv[3:] == ["--model-type", "transformer"] else {}
    if argv[3:] and not options:
        raise SystemExit(f"unknown options {argv[3:]}")
    feeds = []
    for f in sorted(calib.glob("*.npz")):
        with np.load(f) as data:
            feeds.append({k: data[k] for k in data.files})
    model = onnx.load(str(model_path))
    quantized = nncf.quantize(model, nncf.Dataset(feeds), **options)
    onnx.save(quantized, str(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
