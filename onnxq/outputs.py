"""Writing outputs all or nothing.

Every file onnxq writes goes to a temporary file beside its target (short name, so a long
target name still fits) and is renamed over the target when complete. Inside a
`transaction()` the renames wait until the whole command has succeeded: a run that fails
or is interrupted leaves none of its outputs behind (not the model without its report,
not the statistics of a run whose model failed), and the temporary files are removed.

Commits hold SIGINT/SIGTERM back (onnxq.interrupts), so an interrupt lands before or after
the renames, never between them; `committed()` tells the interrupt message which outputs exist.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from onnxq.errors import OutputError
from onnxq.interrupts import check, held

TEMP_PREFIX = ".onnxq-"
TEMP_SUFFIX = ".tmp"


class Transaction:
    """Temporary files waiting to be renamed onto their targets, in the order they were staged."""

    def __init__(self) -> None:
        self.staged: dict[Path, Path] = {}  # target -> temporary file
        self.written: list[Path] = []

    def add(self, target: Path, temporary: Path) -> None:
        previous = self.staged.pop(target, None)
        if previous is not None:  # written twice (e.g. a profile updated as it grows): keep the last
            previous.unlink(missing_ok=True)
        self.staged[target] = temporary

    def commit(self) -> None:
        try:
            check()  # an interrupt some library swallowed still means: no outputs
            with held():
                for target, temporary in list(self.staged.items()):
                    _rename(temporary, target)
                    del self.staged[target]
                    self.written.append(target)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for temporary in self.staged.values():
            temporary.unlink(missing_ok=True)
        self.staged.clear()


_active: list[Transaction] = []
_last: list[Transaction] = []  # the outermost transaction of this process, for the interrupt message


@contextmanager
def transaction() -> Iterator[Transaction]:
    """Outputs staged inside are renamed into place together when the block ends without an error.

    Nested blocks join the outermost one. Leaving by SystemExit with code 0 or 6 (a missed gate:
    the model is written for inspection) commits too; any other exception discards.
    """
    if _active:
        yield _active[-1]
        return
    current = Transaction()
    _active.append(current)
    _last[:] = [current]
    try:
        yield current
    except SystemExit as exc:
        _active.pop()
        if exc.code in (None, 0, 6):
            current.commit()
        else:
            current.discard()
        raise
    except BaseException:
        _active.pop()
        current.discard()
        raise
    _active.pop()
    current.commit()


def commit() -> None:
    """Rename what the active transaction staged into place now (before saying it was written)."""
    if _active:
        _active[0].commit()


def committed() -> list[Path]:
    """Outputs the last transaction of this process renamed into place."""
    return list(_last[0].written) if _last else []


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A temporary file beside `target` to write; it becomes `target` on success (now, or at commit)."""
    target = Path(target)
    temporary: Path | None = None
    try:
        with held():  # a signal cannot fall between creating the file and knowing its name
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=target.parent)
            os.close(fd)
            temporary = Path(name)
        yield temporary
        os.chmod(temporary, 0o644)
        with held():
            if _active:
                _active[-1].add(target, temporary)
                return
            check()
            _rename(temporary, target)
    except OSError as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror}") from None
    except BaseException:
        if temporary is not None and temporary.exists() and not (_active and temporary in _active[-1].staged.values()):
            temporary.unlink(missing_ok=True)
        raise


def _rename(temporary: Path, target: Path) -> None:
    try:
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror}") from None


def interrupt_message(verb: str) -> str:
    """The one line printed on SIGINT/SIGTERM: which outputs exist, if any."""
    written = committed()
    if not written:
        return f"onnxq: {verb}; no output written"
    return f"onnxq: {verb} after the outputs were written: {', '.join(str(p) for p in written)}"
