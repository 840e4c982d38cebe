"""What onnxq knows about ONNX ops and onnxruntime's CPU kernels, in one place."""

from __future__ import annotations

MS_DOMAIN = "com.microsoft"

# Ops onnxruntime's CPU provider runs as int8 kernels when wrapped in DQ -> op -> Q.
COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool",
                         "Sigmoid", "LeakyRelu"})
# Heavy ops are worth a quantize/dequantize of their inputs; light ops only when their
# inputs are quantized anyway (else they add error and conversions for little speed).
HEAVY_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# Ops onnxruntime runs in int8 with a float output when no QuantizeLinear follows.
FLOAT_OUTPUT_OPS = frozenset({"MatMul", "Gemm"})
# Ops that move or select values without arithmetic: they share their input's scale.
PASS_THROUGH_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                              "Split", "Resize"})
# Activations folded into the producer's output range (onnxruntime drops them before Q).
FOLDABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
# Ops whose output holds exactly the input's values (only the shape or order changes).
VALUE_PRESERVING_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})

QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
# Float ops onnxruntime turns into integer computation by itself when they sit between Q/DQ pairs:
# QDQ fusions (QLinearAdd, QLinearSoftmax, ...; its CPU rules) and WeightBiasQuantization (Conv,
# ConvTranspose, Gemm). The ops its other rules touch only move or select values (Reshape, MaxPool, ...).
REQUANTIZED_BY_ONNXRUNTIME = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat",
                                        "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid", "Softmax",
                                        "Where"})

# The weight input of layers with weights, float and fused forms (onnxruntime renames fused ones).
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "FusedConv": 1, "FusedGemm": 1,
                "FusedMatMul": 1}
# The weight scale input of onnxruntime's integer kernels.
INTEGER_WEIGHT_SCALE_INPUT = {"QLinearConv": 4, "QGemm": 4, "QLinearMatMul": 4, "MatMulIntegerToFloat": 3,
                              "DynamicQuantizeMatMul": 2}


def is_integer_kernel(op_type: str) -> bool:
    """onnxruntime's int8 kernels (standard and com.microsoft) by name."""
    return (op_type.startswith(("QLinear", "DynamicQuantize", "MatMulInteger", "ConvInteger", "QGemm",
                                "QAttention", "QOrdered", "MatMulNBits")) or op_type == "QEmbedLayerNormalization")
