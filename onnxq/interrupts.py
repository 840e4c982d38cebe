"""Ctrl-C and SIGTERM as one exception that unwinds cleanly (standard library only: installed before imports).

The handler raises `Interrupted` once and ignores every later SIGINT/SIGTERM, so the
unwinding it starts (temporary folders and files removed by their context managers) is
not cut short by a second signal. While `held()` is active (renaming outputs into place)
a signal is only recorded and raised when the block ends.
"""

from __future__ import annotations

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


_state = {"held": 0, "pending": 0, "installed": False}


def _handler(signum: int, frame: object) -> None:
    if _state["held"]:
        _state["pending"] = _state["pending"] or signum
        return
    ignore()
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to `Interrupted` (main thread only; a no-op elsewhere)."""
    try:
        for signum in SIGNALS:
            signal.signal(signum, _handler)
    except ValueError:  # not the main thread
        return
    _state["installed"] = True


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
