"""Child process: int4 weight-only with onnxruntime's matmul_nbits_quantizer (RTN, HQQ, GPTQ).

Usage: python -m bench.nbits_child rtn|hqq|gptq MODEL OUT [--calib DIR] [--block-size 32]
Runs in bench/.venv-export's interpreter (ORT's HQQ quantizer imports torch) with the project venv's
onnxruntime on the path (runners.nbits_cmd). rtn is ORT's DefaultWeightOnlyQuantConfig (block-wise
round to nearest, symmetric); hqq HQQWeightOnlyQuantConfig; gptq GPTQWeightOnlyQuantConfig with the same
.npz calibration feeds onnxq gets (its RTNWeightOnlyQuantConfig/GPTQ run through ORT's bundled
neural_compressor code). Every config quantizes MatMul only (ORT's defaults; embeddings stay float).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import onnx
from onnxruntime.quantization import matmul_nbits_quantizer as nbits
from onnxruntime.quantization.quant_utils import QuantFormat

from bench.peers import NpzReader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("algorithm", choices=["rtn", "hqq", "gptq"])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calib", type=Path)
    p.add_argument("--block-size", type=int, default=32)
    a = p.parse_args(argv)
    model = onnx.load(str(a.model))
    if a.algorithm == "rtn":
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=a.block_size, is_symmetric=True,
                                                    quant_format=QuantFormat.QOperator)
    elif a.algorithm == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=a.block_size, bits=4)
    else:
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=NpzReader(a.calib), block_size=128)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=a.block_size, is_symmetric=True,
                                           algo_config=config)
    quantizer.process()
    os.makedirs(a.out.parent, exist_ok=True)
    quantizer.model.save_model_to_file(str(a.out), use_external_data_format=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
