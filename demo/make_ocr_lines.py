"""Render the OCR text-line calibration and evaluation sets.

Every image is a 320x48 RGB PNG holding one line of real English text taken
from documents that ship with CPython, rendered with a DejaVu font.  The
calibration and evaluation sets are drawn from disjoint source documents.
Output is deterministic for a given Python standard library, Pillow/FreeType
build and font files: running the script twice gives byte-identical files.

Usage::

    python demo/make_ocr_lines.py [--out DIR] [--font-dir DIR]

``--out`` defaults to ``calibration_data/ocr_lines`` in the repository root.
"""

from __future__ import annotations

import argparse
import codecs
import heapq
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

from PIL import Image, ImageDraw, ImageFont

WIDTH = 320
HEIGHT = 48
SEED = 20240611
N_CALIB = 64
N_EVAL = 200
MIN_CHARS = 15
MAX_CHARS = 35
RIGHT_MARGIN = 6
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "calibration_data" / "ocr_lines"
DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# Font file -> (smallest, largest) size in px.  The recogniser down-samples
# the width by 8 (320 px -> 40 CTC steps), so glyphs must stay wide enough;
# narrower faces get larger minimum sizes.
FONTS = {
    "DejaVuSans.ttf": (24, 28),
    "DejaVuSans-Bold.ttf": (22, 27),
    "DejaVuSansCondensed.ttf": (26, 30),
    "DejaVuSansCondensed-Bold.ttf": (24, 28),
    "DejaVuSerif.ttf": (24, 28),
    "DejaVuSerif-Bold.ttf": (22, 27),
    "DejaVuSerifCondensed.ttf": (26, 30),
    "DejaVuSerifCondensed-Bold.ttf": (24, 28),
    "DejaVuSansMono.ttf": (19, 24),
    "DejaVuSansMono-Bold.ttf": (18, 24),
}
# Characters allowed in a rendered line: plain prose, no markup or code.
LINE_CHARS = re.compile(r"[A-Za-z0-9 .,;:'\"()?!-]+")
# A run of 3+ spaces between words marks a table row, not prose.
TABLE_ROW = re.compile(r"\S {3,}\S")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


@dataclass(frozen=True)
class Source:
    """A named source document and a function returning its text."""

    name: str
    read: Callable[[], str]


def _stdlib_file(relative: str) -> Callable[[], str]:
    """Return a reader for a file inside the standard-library directory."""
    path = Path(sysconfig.get_paths()["stdlib"]) / relative
    return lambda: path.read_text(encoding="utf-8")


def _pydoc_topics() -> str:
    """Return the Python reference-manual topics bundled for ``pydoc``."""
    return "\n\n".join(topics[key] for key in sorted(topics))


def _zen_of_python() -> str:
    """Return the Zen of Python (stored ROT13-encoded in ``this``)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "this.py"
    source = path.read_text(encoding="utf-8")
    match = re.search(r's = """(.*?)"""', source, re.DOTALL)
    if match is None:
        raise RuntimeError(f"cannot find the Zen of Python in {path}")
    # One aphorism per line; make each line a sentence of its own.
    lines = codecs.decode(match.group(1), "rot13").splitlines()
    return "\n\n".join(lines)


def _heapq_text() -> str:
    """Return heapq's module docstring plus its ``__about__`` essay."""
    return f"{heapq.__doc__}\n\n{heapq.__about__}"


# Standard-library modules whose docstrings (module, classes, functions) are read as prose.
DOCSTRING_MODULES = ("argparse", "calendar", "csv", "dataclasses", "decimal", "difflib", "email.message",
                     "fractions", "functools", "http.client", "logging", "pathlib", "random", "shutil",
                     "statistics", "subprocess", "tempfile", "textwrap", "threading", "typing", "unittest",
                     "urllib.request", "zipfile")


def _module_docstrings() -> str:
    """Return the docstrings of DOCSTRING_MODULES and their public members, in a fixed order."""
    import importlib
    import inspect

    texts = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for member_name in sorted(vars(module)):
            member = getattr(module, member_name)
            if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            texts.append(inspect.getdoc(member) or "")
    return "\n\n".join(texts)


CALIB_SOURCES = (
    Source("pydoc_data/topics.py (Python reference manual topics)", _pydoc_topics),
)
EVAL_SOURCES = (
    Source("LICENSE.txt (CPython history and licence)", _stdlib_file("LICENSE.txt")),
    Source("this.py (The Zen of Python)", _zen_of_python),
    Source("heapq module docstring and __about__", _heapq_text),
    Source("docstrings of 23 standard-library modules (DOCSTRING_MODULES)", _module_docstrings),
)


def sentences(text: str) -> list[str]:
    """Split a document into whitespace-normalised prose sentences."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        if TABLE_ROW.search(paragraph):
            continue
        flat = " ".join(paragraph.split())
        found.extend(SENTENCE_END.split(flat))
    return [s for s in found if _is_prose(s)]


def _is_prose(sentence: str) -> bool:
    """Heuristically accept ordinary English sentences, rejecting code."""
    words = sentence.split()
    if len(words) < 4 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters >= 0.75 * len(sentence.replace(" ", ""))


def sentence_start(sentence: str) -> str | None:
    """Return the first ``MIN..MAX_CHARS`` characters, cut at a word boundary."""
    line = ""
    for word in sentence.split():
        extended = f"{line} {word}" if line else word
        if len(extended) > MAX_CHARS:
            break
        line = extended
    if len(line) < MIN_CHARS or not LINE_CHARS.fullmatch(line):
        return None
    return line


def load_group(sources: Iterable[Source]) -> tuple[list[str], str]:
    """Return (unique sentences, full normalised text) of a group of sources."""
    texts = [source.read() for source in sources]
    sents = list(dict.fromkeys(s for text in texts for s in sentences(text)))
    corpus = " ".join(" ".join(text.split()) for text in texts)
    return sents, corpus


def load_font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    """Load a font with basic layout (no ligatures, no libraqm dependence)."""
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


def fit_line(text: str, font: ImageFont.FreeTypeFont, room: int) -> str | None:
    """Return the longest word-prefix of ``text`` that fits in ``room`` px.

    Returns None when no prefix of at least ``MIN_CHARS`` characters fits.
    """
    words = text.split()
    while len(" ".join(words)) >= MIN_CHARS:
        line = " ".join(words)
        left, _, right, _ = font.getbbox(line)
        # Do not end a line on a dash or a bare punctuation "word".
        last = words[-1]
        if right - left <= room and any(c.isalnum() for c in last) and last[-1] != "-":
            return line
        words = words[:-1]
    return None


def render(
    text: str, rng: random.Random, font_dir: Path
) -> tuple[Image.Image, str] | None:
    """Render ``text`` with a random style; return (image, rendered text).

    The text is shortened at word boundaries until it fits; None is returned
    if fewer than ``MIN_CHARS`` characters would remain.
    """
    font_name = rng.choice(sorted(FONTS))
    font = load_font(font_dir / font_name, rng.randint(*FONTS[font_name]))
    x = rng.randint(2, 10)
    dy = rng.randint(-2, 2)
    dark_background = rng.random() < 0.25
    paper = rng.randint(10, 60) if dark_background else rng.randint(200, 255)
    ink = rng.randint(200, 255) if dark_background else rng.randint(0, 60)
    tint = [rng.randint(-6, 6) for _ in range(3)]
    background = tuple(min(255, max(0, paper + t)) for t in tint)
    foreground = tuple(min(255, max(0, ink + t)) for t in tint)

    line = fit_line(text, font, WIDTH - RIGHT_MARGIN - x)
    if line is None:
        return None
    left, top, _, bottom = font.getbbox(line)
    y = (HEIGHT - (bottom - top)) // 2 - top + dy
    image = Image.new("RGB", (WIDTH, HEIGHT), background)
    ImageDraw.Draw(image).text((x - left, y), line, font=font, fill=foreground)
    return image, line


def build_split(
    name: str,
    sources: tuple[Source, ...],
    count: int,
    *,
    out_dir: Path,
    font_dir: Path,
    forbidden: str,
) -> list[str]:
    """Render ``count`` lines from ``sources`` into ``out_dir/name``.

    Sentences, and rendered lines, that also occur in ``forbidden`` (the
    other split's text) are skipped, as are sentences whose first three words
    were already used.  Returns the rendered line texts.
    """
    rng = random.Random(f"{SEED}-{name}")
    sents, _ = load_group(sources)
    sents = [s for s in sents if s not in forbidden]
    rng.shuffle(sents)
    split_dir = out_dir / name
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob("*.png"):
        stale.unlink()

    labels: list[str] = []
    openings: set[str] = set()
    for sentence in sents:
        if len(labels) == count:
            break
        start = sentence_start(sentence)
        # Licence texts repeat boilerplate: keep one line per 3-word opening.
        opening = " ".join(sentence.lower().split()[:3])
        if start is None or opening in openings:
            continue
        rendered = render(start, rng, font_dir)
        if rendered is None or rendered[1] in forbidden:
            continue
        image, text = rendered
        openings.add(opening)
        image.save(split_dir / f"{len(labels):03d}.png", optimize=True)
        labels.append(text)
    if len(labels) < count:
        raise RuntimeError(f"{name}: only {len(labels)} of {count} lines available")
    tsv = "".join(f"{i:03d}.png\t{text}\n" for i, text in enumerate(labels))
    (split_dir / "labels.tsv").write_text(tsv, encoding="utf-8")
    return labels


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Render the OCR text-line calibration and evaluation sets."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output directory (default: %(default)s)",
    )
    parser.add_argument(
        "--font-dir",
        type=Path,
        default=DEFAULT_FONT_DIR,
        help="directory holding the DejaVu .ttf files (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    _, calib_corpus = load_group(CALIB_SOURCES)
    _, eval_corpus = load_group(EVAL_SOURCES)
    calib = build_split(
        "calib",
        CALIB_SOURCES,
        N_CALIB,
        out_dir=args.out,
        font_dir=args.font_dir,
        forbidden=eval_corpus,
    )
    held = build_split(
        "eval",
        EVAL_SOURCES,
        N_EVAL,
        out_dir=args.out,
        font_dir=args.font_dir,
        forbidden=calib_corpus,
    )
    overlap = set(calib) & set(held)
    if overlap:
        raise RuntimeError(f"lines on both sides: {sorted(overlap)}")
    print(f"wrote {len(calib)} calib and {len(held)} eval lines to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
