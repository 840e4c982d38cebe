"""What a quantized model is, with no onnxruntime in it: the graph view, op knowledge, the
arithmetic, statistics and ranges, placement, the per-tensor plan and the writers that turn a
plan into a QDQ or QOperator model."""
