"""`python -m onnxq`: the same as the `onnxq` command."""

from onnxq.entry import run

run()
