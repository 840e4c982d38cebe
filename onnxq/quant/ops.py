"""What onnxq knows about ONNX ops and onnxruntime's CPU kernels, in one place."""

from __future__ import annotations

from collections.abc import Mapping

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits, QGemm, QLinearAdd, 16-bit Q/DQ, ...)

# Ops onnxruntime's CPU provider runs as int8 kernels when wrapped in DQ -> op -> Q.
COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
                         "Sigmoid", "LeakyRelu"})
# Heavy ops are worth a quantize/dequantize of their inputs; light ops only when their
# inputs are quantized anyway (else they add error and conversions for little speed).
HEAVY_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# Matrix products: with a constant 2-D weight they run as a quantized matmul (static, dynamic, weight-only).
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
# Ops onnxruntime runs in int8 with a float output when no QuantizeLinear follows.
FLOAT_OUTPUT_OPS = MATMUL_OPS
# Ops with a bias input (index 2).
BIASED_OPS = frozenset({"Conv", "Gemm"})
# What onnxruntime runs with activations quantized at run time (--mode dynamic).
DYNAMIC_OPS = frozenset({"MatMul", "Gemm", "LSTM"})
# Ops with no dynamic int8 kernel onnxruntime's CPU provider runs (ConvInteger with int8 weights fails).
NO_DYNAMIC_KERNEL = frozenset({"Conv", "GRU"})
# Ops that move or select values without arithmetic: they share their input's scale.
PASS_THROUGH_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                              "Split", "Resize"})
# Activations folded into the producer's output range (onnxruntime drops them before Q).
FOLDABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Ops whose output holds exactly the input's values (only the shape or order changes).
VALUE_PRESERVING_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
QUANTIZE_OPS = QDQ_OPS | {"DynamicQuantizeLinear"}
# Float ops onnxruntime turns into integer computation by itself when they sit between Q/DQ pairs:
# QDQ fusions (QLinearAdd, QLinearSoftmax, ...; its CPU rules) and WeightBiasQuantization (Conv,
# ConvTranspose, Gemm). The ops its other rules touch only move or select values (Reshape, MaxPool, ...).
REQUANTIZED_BY_ONNXRUNTIME = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat",
                                        "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid", "Softmax",
                                        "Where"})
# Ops whose float weight onnxruntime's WeightBiasQuantization quantizes (it needs only input 0 dequantized).
WEIGHT_REQUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
# Ops onnxruntime's QDQ propagation moves a DequantizeLinear forward through (they only move values:
# a float one of them reading int8 values computes nothing differently).
DQ_PROPAGATING_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})

# The weight input of layers with weights, float and fused forms (onnxruntime renames fused ones).
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "FusedConv": 1, "FusedGemm": 1,
                "FusedMatMul": 1}
# Inputs of these ops that onnxq quantizes (or a kernel reads) as weights.
WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (0, 1), "Gemm": (0, 1, 2), "LSTM": (1, 2, 3),
                 "GRU": (1, 2, 3), "RNN": (1, 2, 3)}
# The weight scale input of onnxruntime's integer kernels.
INTEGER_WEIGHT_SCALE_INPUT = {"QLinearConv": 4, "QGemm": 4, "QLinearMatMul": 4, "MatMulIntegerToFloat": 3,
                              "DynamicQuantizeMatMul": 2}
# The integer (QOperator) form of light ops: com.microsoft kernels of onnxruntime's CPU provider.
QLINEAR_BINARY = {"Add": "QLinearAdd", "Mul": "QLinearMul"}
QLINEAR_UNARY = {"Sigmoid": "QLinearSigmoid", "LeakyRelu": "QLinearLeakyRelu", "AveragePool": "QLinearAveragePool",
                 "GlobalAveragePool": "QLinearGlobalAveragePool"}


def is_integer_kernel(op_type: str) -> bool:
    """onnxruntime's int8 kernels (standard and com.microsoft) by name."""
    return (op_type.startswith(("QLinear", "DynamicQuantize", "MatMulInteger", "ConvInteger", "QGemm",
                                "QAttention", "QOrdered", "MatMulNBits")) or op_type == "QEmbedLayerNormalization")


def gemm_attribute_problem(attrs: Mapping) -> str | None:
    """Why a Gemm's attributes keep it from onnxruntime's int8 matmul kernels (static QGemm and dynamic
    DynamicQuantizeMatMul alike), or None: they must compute A @ B (+ C)."""
    if attrs.get("transA", 0):
        return "transposed A input"
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return "alpha or beta other than 1 (onnxruntime has no int8 kernel for it)"
    return None
