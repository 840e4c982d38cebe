"""The commands as library functions: options declared once, recipes, requests, the quantize pipeline
(static, dynamic, weight-only), convert, qat-prep, inspect, doctor and the report."""
