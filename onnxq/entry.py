"""The `onnxq` console entry point: signal handling and a private scratch folder before any heavy import.

Ctrl-C or SIGTERM at any moment, even while numpy and onnxruntime load, prints one line and
exits 128 + the signal number (onnxq.interrupts). Every temporary folder onnxq or a library
makes goes inside one scratch folder, removed on the way out however the run ends.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from . import interrupts
from .errors import one_line
from .interrupts import Interrupted
from .outputs import interrupt_message


def run() -> None:
    """Run the command line and exit with its code."""
    try:
        interrupts.install()
        with scratch_folder():
            from .cli import run_click

            code = run_click()
    except Interrupted as exc:
        _say(interrupt_message(exc.verb))
        code = exc.exit_code
    except KeyboardInterrupt:  # before the handler was installed
        interrupts.ignore()
        _say(interrupt_message("interrupted"))
        code = 130
    interrupts.ignore()  # the run is over: a late signal changes nothing
    sys.exit(code)


@contextmanager
def scratch_folder() -> Iterator[str]:
    """A temporary folder that holds every temporary file of this run (tempfile's default), then goes."""
    folder = tempfile.mkdtemp(prefix="onnxq-run-")
    previous, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = folder  # the environment for native code (onnxruntime's files)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        with interrupts.held():
            shutil.rmtree(folder, ignore_errors=True)


def _say(line: str) -> None:
    with suppress(OSError, ValueError):  # stderr closed
        print(one_line(line), file=sys.stderr, flush=True)
