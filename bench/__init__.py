"""Benchmark suite for onnxq: real models, real data, peers, one table per model."""
