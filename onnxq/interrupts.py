"""Ctrl-C and SIGTERM as one exception that unwinds cleanly (standard library only: installed before imports).

Until the command line is ready to catch it (`install(armed=True)`), a signal ends the process at
once with one line: while modules import there is nothing to clean up. Then the handler raises
`Interrupted` once and ignores every later SIGINT/SIGTERM, so the
unwinding it starts (temporary folders and files removed by their context managers) is
not cut short by a second signal. While `held()` is active (renaming outputs into place)
a signal is only recorded and raised when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
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


_state = {"held": 0, "pending": 0, "armed": False}


def _handler(signum: int, frame: object) -> None:
    if _state["held"]:
        _state["pending"] = _state["pending"] or signum
        return
    ignore()
    if not _state["armed"]:  # still importing: nothing to clean up, no code ready to catch an exception
        verb = "interrupted" if signum == signal.SIGINT else "terminated"
        with contextlib.suppress(OSError):
            os.write(2, f"onnxq: {verb}; no output written\n".encode())
        os._exit(128 + signum)
    raise Interrupted(signum)


def install(armed: bool = False) -> None:
    """Handle SIGINT and SIGTERM (main thread only; a no-op elsewhere): exit at once until `armed`, then raise
    `Interrupted` so the code running unwinds."""
    _state["armed"] = _state["armed"] or armed
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
        raise Interrupted(pending)
