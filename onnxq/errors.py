"""Errors that reach the user as one line and a documented exit code."""

from __future__ import annotations

# Exit codes, documented in the README. Keep them stable: CI scripts depend on them.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_MODEL = 3
EXIT_BAD_DATA = 4
EXIT_OUTPUT = 5
EXIT_GATE_MISSED = 6


class OnnxqError(Exception):
    """An expected failure with a message for the user and an exit code."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelError(OnnxqError):
    """The model file is missing, unreadable, invalid or unsupported."""

    exit_code = EXIT_BAD_MODEL


class DataError(OnnxqError):
    """Calibration or evaluation data is missing or does not fit the model."""

    exit_code = EXIT_BAD_DATA


class OutputError(OnnxqError):
    """The output cannot be written where the user asked."""

    exit_code = EXIT_OUTPUT


class UsageError(OnnxqError):
    """Options that contradict each other or are out of range."""

    exit_code = EXIT_USAGE


MAX_REASON = 300  # characters of a library's message quoted in an error line


def first_line(exc: BaseException) -> str:
    """A library exception's message as one line: its lines joined (a first line may end mid-sentence, as
    onnx.checker's "... of node:" does), cut at MAX_REASON characters; its type name when it has no message
    (or the message is only a key or a number, as KeyError's and OSError's can be)."""
    text = " ".join(str(exc).split()).replace(" ==> Context: ", "; ")
    if not text or text.strip("'\"").isdigit() or isinstance(exc, KeyError):
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3].rstrip() + "..."


def one_line(message: str) -> str:
    """A message as one printable line: line breaks and other control characters (in paths, too) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def read_problem(exc: BaseException) -> str:
    """Why a data file could not be read, in words (not a bare exception name)."""
    name = type(exc).__name__
    text = str(exc)
    if name == "BadZipFile" or "zip file" in text.lower():
        return "not a valid .npz (zip) file: truncated or another format"
    if isinstance(exc, ValueError) and "pickle" in text.lower():
        return "it holds Python objects (pickled), which onnxq does not load; save plain numeric arrays"
    if isinstance(exc, KeyError):
        return f"it lacks the entry {text}"
    if isinstance(exc, UnicodeDecodeError):
        return "not text in UTF-8"
    if isinstance(exc, EOFError):
        return "the file ends early (truncated)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return first_line(exc) if text else f"unreadable ({name})"
