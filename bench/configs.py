"""The configurations benchmarked per model: fp32, onnxq (default and each method), the peers."""

from __future__ import annotations

from dataclasses import dataclass, field

ONNXQ_METHODS = ("global", "max", "percentile", "mse", "kl")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")


@dataclass(frozen=True)
class Config:
    """One row of a model's table."""

    id: str
    tool: str  # fp32 | onnxq | ort | ort4 (matmul_nbits_quantizer) | nncf
    label: str  # human-readable settings
    args: tuple[str, ...] = field(default_factory=tuple)


INT4 = ("--mode", "weight-only", "--weight-bits", "4")


def weight_only_rows() -> list[Config]:
    """Weight-only int4 (MatMulNBits): onnxq per --weight-method and mixed with int8 by sensitivity, ORT's
    matmul_nbits_quantizer (RTN, HQQ, GPTQ) and NNCF compress_weights (data-free, and AWQ + scale estimation);
    blocks of 32 everywhere, symmetric."""
    rows = [Config(f"onnxq-int4-{m}-asym", "onnxq", f"onnxq weight-only int4 --weight-method {m} --weight-zero-points",
                   (*INT4, "--weight-method", m, "--weight-zero-points")) for m in ("rtn", "hqq", "gptq", "awq")]
    rows += [Config(f"onnxq-int4-{m}", "onnxq", f"onnxq weight-only int4 --weight-method {m} (symmetric)",
                    (*INT4, "--weight-method", m)) for m in ("gptq", "awq")]
    rows.append(Config("onnxq-int4-gptq-asym-float-emb", "onnxq", "onnxq int4 gptq --weight-zero-points, "
                       "embedding tables float (--exclude Gather), as ORT's quantizer leaves them",
                       (*INT4, "--weight-method", "gptq", "--weight-zero-points", "--exclude", "Gather")))
    rows.append(Config("onnxq-int4-mixed", "onnxq", "onnxq int4 gptq asym, int8 by sensitivity until the task "
                       "measure (bench/metric_<task>.py on the calibration samples) reaches its target (at most 12)",
                       (*INT4, "--weight-method", "gptq", "--weight-zero-points", "--target-metric",
                        "--max-fallbacks", "12")))
    rows += [Config(f"ort-int4-{m}", "ort4", f"ORT matmul_nbits_quantizer {m.upper()} (MatMul, blocks of 32)", (m,))
             for m in ("rtn", "hqq", "gptq")]
    rows += [Config("nncf-int4", "nncf", "nncf.compress_weights INT4_SYM group 32 ratio 1", ("--weights", "int4")),
             Config("nncf-int4-awq", "nncf", "nncf.compress_weights INT4_SYM + AWQ + scale estimation (data)",
                    ("--weights", "int4-awq"))]
    return rows


def full(dynamic: bool, transformer: bool = False, weight_only: bool = False) -> list[Config]:
    """Every configuration of the full suite.

    ``dynamic``: quantize_dynamic applies to the model; ``transformer``: add NNCF's transformer preset.
    """
    cfgs = [Config("fp32", "fp32", "fp32 reference"),
            Config("onnxq-default", "onnxq", "onnxq defaults: the automatic search (mode, method, repairs and "
                   "float/dynamic layers chosen by task agreement on a held-back quarter of --calib)"),
            Config("onnxq-fast", "onnxq", "onnxq --fast: the old default, one pass (global, uint8 asym act, "
                   "per-channel, speed table), own calibration", ("--fast",))]
    cfgs += [Config(f"onnxq-{m}", "onnxq", f"onnxq --method {m} (--load-stats)", ("--method", m))
             for m in ONNXQ_METHODS]
    cfgs.append(Config("onnxq-max-sym", "onnxq", "onnxq --method max --symmetric (--load-stats)",
                       ("--method", "max", "--symmetric")))
    cfgs.append(Config("onnxq-qop", "onnxq", "onnxq defaults --format qoperator (--load-stats)",
                       ("--format", "qoperator")))
    cfgs.append(Config("onnxq-no-guard", "onnxq", "onnxq defaults --no-speed-guard: every layer int8 (--load-stats)",
                       ("--no-speed-guard",)))
    cfgs.append(Config("onnxq-target", "onnxq", "onnxq --target-cosine 0.99 --max-fallbacks 16 (--load-stats)",
                       ("--target-cosine", "0.99", "--max-fallbacks", "16")))
    cfgs += [Config("onnxq-bias-correction", "onnxq", "onnxq --bias-correction (--load-stats + --calib samples)",
                    ("--bias-correction",)),
             Config("onnxq-equalize", "onnxq", "onnxq --equalize (own calibration: it changes the float weights)",
                    ("--equalize",)),
             Config("onnxq-adaround", "onnxq", "onnxq --adaround (--load-stats + --calib samples)", ("--adaround",))]
    cfgs.append(Config("onnxq-weight-only", "onnxq", "onnxq --mode weight-only (int8 weights, float compute)",
                       ("--mode", "weight-only")))
    if dynamic:
        cfgs.append(Config("onnxq-dynamic", "onnxq", "onnxq --mode dynamic (MatMul/Gemm)", ("--mode", "dynamic")))
        cfgs.append(Config("onnxq-int4", "onnxq", "onnxq --mode weight-only --weight-bits 4 (rtn, MatMulNBits)",
                           ("--mode", "weight-only", "--weight-bits", "4")))
    for fmt, short in (("QDQ", "qdq"), ("QOperator", "qop")):
        cfgs += [Config(f"ort-{short}-{m.lower()}", "ort", f"ORT static {fmt} {m} per-channel",
                        ("static", "--format", fmt, "--method", m)) for m in ORT_METHODS]
    cfgs.append(Config("ort-qdq-minmax-rr", "ort", "ORT static QDQ MinMax per-channel reduce_range",
                       ("static", "--format", "QDQ", "--method", "MinMax", "--reduce-range")))
    cfgs.append(Config("ort-dynamic", "ort", "ORT quantize_dynamic per-channel" if dynamic
                       else "ORT quantize_dynamic: n/a (no MatMul/LSTM; Conv-only model)",
                       ("dynamic",) if dynamic else ()))
    cfgs.append(Config("nncf-default", "nncf", "nncf.quantize defaults"))
    if transformer:  # SmoothQuant is for transformer activations' outlier channels (onnxq.passes.smooth)
        cfgs.append(Config("onnxq-smooth", "onnxq", "onnxq --smooth-alpha 0.7 (SmoothQuant, calibrates again)",
                           ("--smooth-alpha", "0.7")))
        cfgs.append(Config("onnxq-dynamic-smooth", "onnxq", "onnxq --mode dynamic --smooth-alpha 0.7",
                           ("--mode", "dynamic", "--smooth-alpha", "0.7")))
        cfgs.append(Config("nncf-transformer", "nncf", "nncf.quantize model_type=TRANSFORMER",
                           ("--model-type", "transformer")))
    if weight_only:
        cfgs += weight_only_rows()
    return cfgs


def quick() -> list[Config]:
    """bench-quick: fp32, onnxq default and one onnxruntime peer."""
    by_id = {c.id: c for c in full(dynamic=False)}
    return [by_id["fp32"], by_id["onnxq-default"], by_id["ort-qdq-minmax"]]
