"""onnxq: turn an fp32 ONNX model into an int8 ONNX model that runs fast on CPU."""

__version__ = "0.1.0"
