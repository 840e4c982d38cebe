"""Everything that runs onnxruntime: sessions, data, calibration passes, evaluation against
fp32 and the task agreement it measures, the fusion and precision check, latency."""
