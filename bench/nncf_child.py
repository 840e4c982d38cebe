"""Child process run in bench/.venv-nncf: nncf.quantize with its defaults on a folder of .npz feeds.

Usage: python bench/nncf_child.py MODEL OUT CALIB_DIR
Stand-alone on purpose (only numpy, onnx, nncf): it runs in its own venv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nncf
import numpy as np
import onnx


def main(argv: list[str]) -> int:
    """Quantize argv[0] to argv[1] with the feeds in argv[2]."""
    model_path, out, calib = Path(argv[0]), Path(argv[1]), Path(argv[2])
    feeds = []
    for f in sorted(calib.glob("*.npz")):
        with np.load(f) as data:
            feeds.append({k: data[k] for k in data.files})
    model = onnx.load(str(model_path))
    quantized = nncf.quantize(model, nncf.Dataset(feeds))
    onnx.save(quantized, str(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
