"""`python -m onnxq`: the same as the `onnxq` command."""

from .entry import run

run()
