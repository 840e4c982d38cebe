"""The `onnxq` console entry point: signal handling and a private scratch folder before any heavy import.

Ctrl-C or SIGTERM at any moment, even while numpy and onnxruntime load, prints one line and
exits 128 + the signal number (onnxq.interrupts). Every temporary folder onnxq or a library
makes goes inside one scratch folder, removed on the way out however the run ends.
"""

from __future__ import annotations

import sys

from onnxq import interrupts

interrupts.install()  # first of all: this module is only imported to run the command line

import atexit  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager, suppress  # noqa: E402
from typing import NoReturn  # noqa: E402

from onnxq.errors import one_line  # noqa: E402
from onnxq.interrupts import Interrupted  # noqa: E402
from onnxq.outputs import interrupt_message  # noqa: E402


def run() -> None:
    """Run the command line and exit with its code."""
    try:
        with scratch_folder():
            from onnxq.cli import run_click  # numpy, onnx, onnxruntime: a signal now exits at once

            interrupts.install(armed=True)  # from here on a signal unwinds: temporary files go, outputs are checked
            code = run_click()
            if code in (0, 6):
                interrupts.check()  # a signal whose exception a library swallowed: still an interrupted run
    except Interrupted as exc:
        _say(interrupt_message(exc.verb))
        _exit_unfinalized(exc.exit_code)
    except KeyboardInterrupt:  # before the handler was installed
        interrupts.ignore()
        _say(interrupt_message("interrupted"))
        _exit_unfinalized(130)
    interrupts.ignore()  # the run is over: a late signal changes nothing
    sys.exit(code)


def _exit_unfinalized(code: int) -> NoReturn:
    """Exit after an interrupt: atexit handlers run (Ray's shutdown, weight spill folders), then the process
    ends without Python's finalization and C++ static destructors. An interrupt can leave a native library
    mid-work (an onnxruntime thread pool whose run the signal cut short): its destructors at exit then abort
    the process ("terminate called without an active exception", exit -6 instead of 130/143), and objects
    the signal left half-built complain as they are freed; the one line already said what happened."""
    interrupts.ignore()
    sys.unraisablehook = _ignore
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


@contextmanager
def scratch_folder() -> Iterator[str]:
    """A temporary folder that holds every temporary file of this run (tempfile's default), then goes."""
    folder, previous, previous_env = "", tempfile.tempdir, os.environ.get("TMPDIR")
    try:
        with interrupts.held():  # a signal now arrives inside the try, with the folder known
            folder = tempfile.mkdtemp(prefix="onnxq-run-")
            interrupts.remove_on_exit(folder)
            tempfile.tempdir = os.environ["TMPDIR"] = folder  # the environment for native code too
        yield folder
    finally:
        tempfile.tempdir = previous
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        if folder:
            with interrupts.held():
                shutil.rmtree(folder, ignore_errors=True)
                interrupts.remove_on_exit(None)


def _ignore(_unraisable: object) -> None:
    """After an interrupt, objects the signal left half-built (a ZipFile opened mid-read) complain with a
    traceback as they are freed (by an atexit handler); the one line already said what happened."""


def _say(line: str) -> None:
    with suppress(OSError, ValueError):  # stderr closed
        print(one_line(line), file=sys.stderr, flush=True)
