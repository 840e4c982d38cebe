"""Ctrl-C and SIGTERM as one exception that unwinds cleanly (standard library only: installed before imports).

Until the command line is ready to catch it (`install(armed=True)`), a signal ends the process at
once with one line (removing the scratch folder): an exception raised while numpy or onnxruntime
import can leave their C extensions half made (a crash at exit). Then the handler raises
`Interrupted` once and ignores every later SIGINT/SIGTERM, so the
unwinding it starts (temporary folders and files removed by their context managers) is
not cut short by a second signal. While `held()` is active (renaming outputs into place)
a signal is only recorded and raised when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the process exits 128 + the signal number after unwinding."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def verb(self) -> str:
        return "interrupted" if self.signum == signal.SIGINT else "terminated"


_state = {"held": 0, "pending": 0, "armed": False, "received": 0}
_remove_on_exit: list[str] = []  # folders an immediate exit removes first (the run's scratch folder)


def _handler(signum: int, _frame: object) -> None:
    if _state["held"]:
        _state["pending"] = _state["pending"] or signum
        return
    ignore()
    if not _state["armed"]:  # still importing: an exception there can leave C extensions half made
        _exit_now(signum)
    _state["received"] = signum
    raise Interrupted(signum)


def _exit_now(signum: int) -> None:
    verb = "interrupted" if signum == signal.SIGINT else "terminated"
    with contextlib.suppress(OSError):
        os.write(2, f"onnxq: {verb}; no output written\n".encode())
    for folder in _remove_on_exit:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(128 + signum)


def remove_on_exit(folder: str | None) -> None:
    """Have an immediate exit (a signal before the command runs) remove `folder`; None: forget them all."""
    if folder is None:
        _remove_on_exit.clear()
    else:
        _remove_on_exit.append(folder)


def check() -> None:
    """Raise `Interrupted` again if a signal arrived and its exception was swallowed on the way (raised in a
    weakref callback or a destructor, Python only reports it): called before outputs are renamed into place."""
    if _state["received"]:
        raise Interrupted(_state["received"])


def _unraisable(info: sys.UnraisableHookArgs) -> None:
    if not isinstance(info.exc_value, Interrupted):  # an interrupt swallowed by Python: check() raises it later
        _default_unraisable(info)


_default_unraisable = sys.unraisablehook


def install(armed: bool = False) -> None:
    """Handle SIGINT and SIGTERM (main thread only; a no-op elsewhere): exit at once until `armed`, then raise
    `Interrupted` so the code running unwinds."""
    _state["armed"] = _state["armed"] or armed
    sys.unraisablehook = _unraisable
    with contextlib.suppress(ValueError):  # not the main thread
        for signum in SIGNALS:
            signal.signal(signum, _handler)


def ignore() -> None:
    """No further SIGINT/SIGTERM: the first one is being handled."""
    try:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    except ValueError:
        pass


@contextmanager
def held() -> Iterator[None]:
    """Delay a signal that arrives inside the block until its end (where it is raised)."""
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
    pending = _state["pending"]
    if pending and not _state["held"]:
        _state["pending"] = 0
        ignore()
        if not _state["armed"]:
            _exit_now(pending)
        _state["received"] = pending
        raise Interrupted(pending)
