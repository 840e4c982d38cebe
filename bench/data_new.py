"""Real inputs for the ``new`` suite: models nobody tuned onnxq on, and the main models on wider data.

Each builder writes ``dst/{calib,eval}/NNNN.npz`` and returns the meta dict (labels, sources, truth)
the task metric needs. Calibration and evaluation are split by source everywhere: photos by scene
(datasets.photos), scanned pages by document, rendered pages and captchas by text document, fonts
and seed. Pre-processing follows each model's own package (cited per builder).
"""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bench import datasets
from bench.models import CACHE, fetch_wheel

FONTS = Path("/usr/share/fonts/truetype/dejavu")
OPENCV_DATA = CACHE / "opencv-doc" / "x" / "usr" / "share" / "doc" / "opencv-doc" / "examples" / "data"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# Photos whose ImageNet class is plain to a person (first name of each accepted class in opencv-doc's
# classification_classes_ILSVRC2012.txt); the others count for agreement with fp32 only.
IMAGENET_TRUTH = {
    "apple": ("Granny Smith",), "baboon": ("baboon",), "orange": ("orange",), "messi5": ("soccer ball",),
    "chicky_512": ("Pekinese", "Shih-Tzu", "Brabancon griffon", "Lhasa", "Japanese spaniel", "Tibetan terrier"),
    "fruits": ("orange", "lemon", "Granny Smith"), "squirrel_cls": ("fox squirrel",),
    "sudoku": ("crossword puzzle",), "coffee": ("espresso", "cup", "coffee mug"),
    "chelsea": ("tabby", "tiger cat", "Egyptian cat"), "motorcycle_left": ("moped", "motor scooter"),
    "rocket": ("missile", "projectile", "space shuttle"), "camera": ("tripod", "reflex camera"),
    "china": ("palace", "bell cote", "monastery", "church"), "home": ("palace", "monastery", "bell cote", "church"),
    "licenseplate_motion": ("cab", "limousine", "minivan", "beach wagon", "sports car", "convertible", "car wheel",
                            "grille", "racer"),
}

CAPTCHA_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no l/o/0/1: ambiguous to people too
CAPTCHA_FONTS = {"calib": ("DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansCondensed-Bold.ttf"),
                 "eval": ("DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf")}

OCRMYPDF = "ocrmypdf==17.13.0"  # its sdist ships real scanned pages as test resources (tests/resources)
SCANS = {  # file in tests/resources -> source document (derivatives of one scan share its key)
    "linn.png": "linn", "skew.pdf": "linn", "typewriter.png": "typewriter", "baiona.png": "baiona",
    "c03-29.pdf": "huckfinn", "epson.pdf": "wiki-ocr", "masks.pdf": "wiki-linux", "francais.pdf": "francais",
}
LAYOUT_CLASSES = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
                  "reference", "equation")  # layout_cdla.onnx's own metadata ("character")


def _write(folder: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:04d}.npz", **feed)


def _spread(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def photo_split() -> tuple[list[Path], list[Path]]:
    """datasets.photos() without the scanned pages among them (opencv-doc's imageTextN/imageTextR, one page
    twice, and scikit-image's book page): those belong to scan_pages, which keeps a document on one side."""
    return tuple([p for p in side if not re.search(r"imagetext|-page$", p.stem.lower())]
                 for side in datasets.photos())


def _stem(path: Path) -> str:
    """The photo's own name, without the wheel prefix the photo cache gives it."""
    for prefix in ("scikit-image-", "scikit-learn-"):
        if path.stem.startswith(prefix):
            return path.stem[len(prefix):]
    return path.stem


# ---------------------------------------------------------------- ImageNet classifier (EfficientNet-Lite0)

def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, from Debian's opencv-doc (fetched with the photos)."""
    datasets.photos()  # makes sure opencv-doc is unpacked
    return [line.strip() for line in (OPENCV_DATA / "dnn" / "classification_classes_ILSVRC2012.txt").open()]


def _views(img: Image.Image) -> list[tuple[str, Image.Image]]:
    """The package's view (shorter side to 224, then the centre 224x224: the exported graph is fixed at 224)
    and two closer views (shorter side 320, top-left and bottom-right 224x224)."""
    out = []
    for name, short, corner in (("centre", 224, None), ("near-tl", 320, 0), ("near-br", 320, 1)):
        scale = short / min(img.size)
        w, h = max(224, round(img.width * scale)), max(224, round(img.height * scale))
        big = img.resize((w, h), Image.Resampling.BILINEAR)
        x0 = (w - 224) // 2 if corner is None else (w - 224) * corner
        y0 = (h - 224) // 2 if corner is None else (h - 224) * corner
        out.append((name, big.crop((x0, y0, x0 + 224, y0 + 224))))
    return out


def imagenet_feed(img: Image.Image) -> dict[str, np.ndarray]:
    """efficientnet-lite-pytorch's README transform: ToTensor, Normalize(ImageNet mean, std), NCHW."""
    x = (np.asarray(img.convert("RGB"), np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return {"input": x.transpose(2, 0, 1)[None].astype(np.float32)}


def build_imagenet(dst: Path, n_calib: int, n_eval: int) -> dict:
    """Photos (split by scene), three views each; labels where the photo's class is plain."""
    classes = imagenet_classes()
    first = {name.split(",")[0].strip(): i for i, name in enumerate(classes)}
    meta: dict = {"views": "centre (package), near-tl, near-br", "normalisation": "ImageNet mean/std (package README)"}
    for split, files, n in zip(("calib", "eval"), photo_split(), (n_calib, n_eval), strict=True):
        samples = []
        for path in files:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
            truth = [first[c] for c in IMAGENET_TRUTH.get(_stem(path), ())]
            samples += [(f"{path.name}:{view}", imagenet_feed(v), truth if view == "centre" else [])
                        for view, v in _views(rgb)]
        centre = [s for s in samples if s[0].endswith(":centre")]  # every photo once, as the package sees it
        picked = _spread(centre, n) + _spread([s for s in samples if not s[0].endswith(":centre")],
                                              max(0, n - len(centre)))
        _write(dst / split, [feed for _, feed, _ in picked])
        meta[f"{split}_sources"] = [name for name, _, _ in picked]
        meta[f"{split}_labels"] = [truth for _, _, truth in picked]
    return meta


# ---------------------------------------------------------------- captcha reader (ddddocr)

def ddddocr_charset(cache: Path = CACHE) -> list[str]:
    """The beta charset of ddddocr 1.6.1 (the one ``DdddOcr(beta=True)`` pairs with common.onnx), read from
    the wheel's charset_manager.py with ``ast`` (nothing of the package is imported)."""
    with zipfile.ZipFile(fetch_wheel("ddddocr==1.6.1", cache)) as zf:
        source = zf.read("ddddocr/models/charset_manager.py").decode()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_beta_charset":
            ret = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            return list(ast.literal_eval(ret.value))
    raise RuntimeError("ddddocr's beta charset was not found")


def captcha_feed(img: Image.Image) -> dict[str, np.ndarray]:
    """ddddocr's OCR pre-processing: height 64 (width in proportion, LANCZOS), grey, /255, [1, 1, 64, W]."""
    width = int(img.size[0] * (64 / img.size[1]))
    grey = img.resize((width, 64), Image.Resampling.LANCZOS).convert("L")
    return {"input1": (np.asarray(grey, np.float32) / 255.0)[None, None]}


def build_captcha(dst: Path, n_calib: int, n_eval: int) -> dict:
    """Captchas from the ``captcha`` package (200x70, milder warping than its default): calibration and
    evaluation differ in font, seed and text."""
    from captcha.image import ImageCaptcha

    meta: dict = {"generator": "captcha.image.ImageCaptcha(width=200, height=70), rotate ±15°, warp 0.05-0.15",
                  "alphabet": CAPTCHA_ALPHABET}
    charset = ddddocr_charset()
    (dst / "charset.json").parent.mkdir(parents=True, exist_ok=True)
    (dst / "charset.json").write_text(json.dumps(charset, ensure_ascii=False))
    seen: set[str] = set()
    for split, n, seed in (("calib", n_calib, 11), ("eval", n_eval, 22)):
        gen = ImageCaptcha(width=200, height=70, fonts=[str(FONTS / f) for f in CAPTCHA_FONTS[split]])
        gen.character_rotate, gen.character_warp_dx, gen.character_warp_dy = (-15, 15), (0.05, 0.15), (0.05, 0.15)
        random.seed(seed)  # ImageCaptcha draws its noise and warps from the random module
        rng = random.Random(seed)
        texts, feeds = [], []
        while len(texts) < n:
            text = "".join(rng.choice(CAPTCHA_ALPHABET) for _ in range(rng.randint(4, 6)))
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            feeds.append(captcha_feed(gen.generate_image(text)))
        _write(dst / split, feeds)
        meta[f"{split}_labels"] = texts
        meta[f"{split}_fonts"] = list(CAPTCHA_FONTS[split])
    return meta


# ---------------------------------------------------------------- pages: real scans and rendered documents

def scanned_pages(cache: Path = CACHE) -> dict[str, list[tuple[str, Image.Image]]]:
    """Real scanned pages from OCRmyPDF's test resources (its sdist; CC-BY-SA-4.0 and public domain, see the
    resources' README), plus opencv-doc's scanned text page and scikit-image's book page, by source."""
    import pypdfium2 as pdfium

    root = cache / "scans"
    if not (root / ".complete").exists():
        folder = cache / "wheels" / OCRMYPDF.replace("==", "-")
        folder.mkdir(parents=True, exist_ok=True)
        if not list(folder.glob("*.tar.gz")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                            "--disable-pip-version-check", OCRMYPDF, "-d", str(folder)], check=True)
        with tarfile.open(next(folder.glob("*.tar.gz"))) as tf:
            for member in tf.getmembers():
                if member.name.split("/tests/resources/")[-1] in SCANS and "/tests/resources/" in member.name:
                    root.mkdir(parents=True, exist_ok=True)
                    (root / Path(member.name).name).write_bytes(tf.extractfile(member).read())
        (root / ".complete").touch()
    pages: dict[str, list[tuple[str, Image.Image]]] = {}
    for name, key in sorted(SCANS.items()):
        path = root / name
        if path.suffix == ".pdf":
            img = pdfium.PdfDocument(str(path))[0].render(scale=150 / 72).to_pil().convert("RGB")
        else:
            with Image.open(path) as im:
                img = im.convert("RGB")
        pages.setdefault(key, []).append((name, img))
    datasets.photos()
    pages["opencv-imagetext"] = [(n, Image.open(OPENCV_DATA / n).convert("RGB"))
                                 for n in ("imageTextN.png", "imageTextR.png")]
    pages["skimage-page"] = [(p.name, Image.open(p).convert("RGB")) for p in (cache / "photos").glob("*-page.png")]
    return {k: v for k, v in pages.items() if v}


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONTS / name), size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def render_page(paragraphs: list[str], title: str, photo: Path, rng: random.Random,
                serif: bool) -> tuple[Image.Image, list[list[int]], list[list[int]]]:
    """An A4 page at 100 dpi (827x1169): header, title, one or two columns of paragraphs, a figure (a crop
    of ``photo``) with its caption, a table with its caption, a footer. Returns the page, its layout boxes
    ``[x0, y0, x1, y1, class]`` (LAYOUT_CLASSES) and its text-line boxes ``[x0, y0, x1, y1]``."""
    page = Image.new("RGB", (827, 1169), "white")
    draw = ImageDraw.Draw(page)
    body = "DejaVuSerif.ttf" if serif else "DejaVuSans.ttf"
    bold = "DejaVuSerif-Bold.ttf" if serif else "DejaVuSans-Bold.ttf"
    layout: list[list[int]] = []
    lines_out: list[list[int]] = []

    def text_block(lines: list[str], font: ImageFont.FreeTypeFont, x: int, y: int, cls: int, gap: int) -> int:
        top = y
        right = x
        for line in lines:
            x0, y0, x1, y1 = draw.textbbox((x, y), line, font=font)
            draw.text((x, y), line, font=font, fill=(20, 20, 20))
            lines_out.append([x0, y0, x1, y1])
            right = max(right, x1)
            y += font.size + gap
        layout.append([x, top, right, y - gap, cls])
        return y

    margin, n_cols = 60, rng.choice((1, 2))
    small = _font(body, 11)
    text_block([f"{title.split()[0]} notes · {rng.randint(1990, 2024)}"], small, margin, 30, 6, 0)
    y = text_block(_wrap(draw, title, _font(bold, 24), 827 - 2 * margin), _font(bold, 24), margin, 70, 1, 6) + 20
    col_w = (827 - 2 * margin - 30 * (n_cols - 1)) // n_cols
    font = _font(body, rng.choice((13, 14, 15)))
    col, x, col_top = 0, margin, y
    figure_at, table_at = rng.randrange(len(paragraphs)), rng.randrange(len(paragraphs))
    for i, para in enumerate(paragraphs):
        lines = _wrap(draw, para, font, col_w)
        need = len(lines) * (font.size + 4) + (200 if i in (figure_at, table_at) else 0)
        if y + need > 1169 - 80:
            if col + 1 >= n_cols:
                break
            col, y = col + 1, col_top
            x = margin + col * (col_w + 30)
        y = text_block(lines, font, x, y, 0, 4) + 14
        if i == figure_at:
            with Image.open(photo) as im:
                fig = im.convert("RGB")
            fig.thumbnail((col_w, 150))
            page.paste(fig, (x, y))
            layout.append([x, y, x + fig.width, y + fig.height, 2])
            y = text_block([f"Figure {rng.randint(1, 9)}: {photo.stem.split('-', 1)[-1].replace('_', ' ')}."],
                           small, x, y + fig.height + 6, 3, 0) + 14
        if i == table_at:
            y = text_block([f"Table {rng.randint(1, 9)}: values measured by hand."], small, x, y, 5, 0) + 6
            rows, cols = rng.randint(3, 5), rng.randint(2, 4)
            cw, rh = min(col_w, 90 * cols) // cols, 20
            for r in range(rows + 1):
                draw.line([(x, y + r * rh), (x + cw * cols, y + r * rh)], fill=(0, 0, 0))
            for c in range(cols + 1):
                draw.line([(x + c * cw, y), (x + c * cw, y + rows * rh)], fill=(0, 0, 0))
            for r in range(rows):
                for c in range(cols):
                    cell = f"{rng.uniform(0, 100):.1f}" if r else f"col {c + 1}"
                    draw.text((x + c * cw + 4, y + r * rh + 4), cell, font=small, fill=(0, 0, 0))
            layout.append([x, y, x + cw * cols, y + rows * rh, 4])
            y += rows * rh + 14
    text_block([f"— {rng.randint(1, 300)} —"], small, 827 // 2 - 20, 1169 - 40, 7, 0)
    return page, layout, lines_out


def page_paragraphs(split: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) per document of one side: pydoc topics to calibrate, the evaluation documents
    (LICENSE, Zen, heapq, IDLE docs) to evaluate, as for the sentence encoder."""
    calib, evals = datasets.stdlib_documents()
    docs = calib if split == "calib" else evals
    other = evals if split == "calib" else calib
    out = []
    for name, sents in datasets.doc_sentences(docs, other).items():
        if len(sents) >= 6:
            paras = [" ".join(sents[i:i + 3]) for i in range(0, len(sents), 3)]
            out.append((name.split(":")[-1].replace("_", " ").title(), paras))
    return out


def scan_pages(split: str) -> list[dict]:
    """Every real scan of one side's sources (alternate sources by name): the full page, its top half and
    its bottom half. Each: name, image, kind "scan"."""
    scans = scanned_pages()
    keys = sorted(scans)
    out: list[dict] = []
    for key in keys[0::2] if split == "calib" else keys[1::2]:
        for name, img in scans[key]:
            w, h = img.size
            for part, box in (("page", (0, 0, w, h)), ("top", (0, 0, w, h // 2)), ("bottom", (0, h // 2, w, h))):
                out.append({"name": f"{key}/{name}:{part}", "image": img.crop(box), "kind": "scan"})
    return out


def rendered_pages(split: str, n: int) -> list[dict]:
    """``n`` rendered pages of one side (its documents, its photos as figures), with layout and line truth."""
    photos = photo_split()[0 if split == "calib" else 1]
    docs = page_paragraphs(split)
    rng = random.Random(7 if split == "calib" else 8)
    out = []
    for i in range(n):
        title, paras = docs[i % len(docs)]
        start = rng.randrange(max(1, len(paras) - 6))
        img, layout, lines = render_page(paras[start:start + 8], title, photos[i % len(photos)], rng, serif=i % 2 == 1)
        out.append({"name": f"rendered:{title}:{i}", "image": img, "kind": "rendered", "layout": layout,
                    "lines": lines})
    return out


def cv2_linear_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(img, (width, height)) with INTER_LINEAR (no anti-aliasing) in numpy, as rapid_layout does."""
    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, fy = axis(height, img.shape[0])
    x0, x1, fx = axis(width, img.shape[1])
    a = img.astype(np.float32)
    top = a[y0][:, x0] * (1 - fx[None, :, None]) + a[y0][:, x1] * fx[None, :, None]
    bot = a[y1][:, x0] * (1 - fx[None, :, None]) + a[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy[:, None, None]) + bot * fy[:, None, None]


def layout_feed(img: Image.Image) -> dict[str, np.ndarray]:
    """rapid_layout's PP pre-processing: BGR (it reads images with cv2), resized to 608x800, /255,
    ImageNet mean/std applied to the BGR channels as they come, NCHW."""
    bgr = np.asarray(img.convert("RGB"), np.float32)[:, :, ::-1]
    x = (cv2_linear_resize(bgr, 608, 800) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return {"image": x.transpose(2, 0, 1)[None].astype(np.float32)}


DET_W, DET_H = 736, 960  # rapidocr's limit_side_len 736 on the short side of a portrait page


def det_page_feed(img: Image.Image) -> tuple[dict[str, np.ndarray], float]:
    """rapidocr's det pre-processing for a page scaled to fit 736x960 (short side 736, sides multiples of
    32), padded white bottom/right so every feed has one shape: BGR, (x/255 - 0.5)/0.5. Returns the scale."""
    scale = min(DET_W / img.width, DET_H / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = Image.new("RGB", (DET_W, DET_H), "white")
    canvas.paste(img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), (0, 0))
    x = (np.asarray(canvas, np.float32)[:, :, ::-1] / 255.0 - 0.5) / 0.5
    return {"x": x.transpose(2, 0, 1)[None].astype(np.float32)}, scale


def _scaled(boxes: list[list[int]], sx: float, sy: float) -> list[list[float]]:
    return [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy, *b[4:]] for b in boxes]


def build_pages(task: str, dst: Path, n_calib: int, n_eval: int) -> dict:
    """Pages for the layout detector (``layout-det``) or the text detector (``text-det``): real scans and
    rendered pages; truth boxes for the rendered ones, in the model input's pixels."""
    meta: dict = {}
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        real = scan_pages(split)
        rendered = rendered_pages(split, max(n // 3, n - len(real)))  # at least a third with known truth
        picked = _spread(real, n - len(rendered)) + rendered
        feeds, truth = [], []
        for p in picked:
            img = p["image"]
            if task == "layout-det":
                feeds.append(layout_feed(img))
                sx, sy = 608 / img.width, 800 / img.height
                truth.append(_scaled(p["layout"], sx, sy) if "layout" in p else None)
            else:
                feed, scale = det_page_feed(img)
                feeds.append(feed)
                truth.append(_scaled(p["lines"], scale, scale) if "lines" in p else None)
        _write(dst / split, feeds)
        meta[f"{split}_sources"] = [p["name"] for p in picked]
        meta[f"{split}_kinds"] = [p["kind"] for p in picked]
        meta[f"{split}_truth"] = truth
    return meta


# ---------------------------------------------------------------- text lines cut from real photos (PP-OCRv4 rec)

def rapidocr_det_input(img: Image.Image) -> tuple[np.ndarray, float, float]:
    """rapidocr's whole-image det pre-processing: longer side capped at 2000, shorter side raised to 736
    (limit_type min), sides rounded to multiples of 32, BGR, (x/255 - 0.5)/0.5. Returns it and the scales."""
    w, h = img.size
    scale = min(1.0, 2000 / max(w, h))
    scale *= max(1.0, 736 / (min(w, h) * scale))
    rw, rh = max(32, int(round(w * scale / 32) * 32)), max(32, int(round(h * scale / 32) * 32))
    x = (np.asarray(img.convert("RGB").resize((rw, rh), Image.Resampling.BILINEAR), np.float32)[:, :, ::-1]
         / 255.0 - 0.5) / 0.5
    return x.transpose(2, 0, 1)[None].astype(np.float32), rw / w, rh / h


def detect_lines(session, img: Image.Image, box_thresh: float = 0.5, unclip: float = 1.6) -> list[tuple]:
    """Text boxes as rapidocr's DB post-processing finds them, axis-aligned: regions of prob > 0.3 (dilated
    2x2), mean prob >= ``box_thresh``, grown by area * ``unclip`` / perimeter. In image pixels, best first."""
    from scipy import ndimage

    x, sx, sy = rapidocr_det_input(img)
    prob = session.run(None, {"x": x})[0][0, 0]
    labels, _ = ndimage.label(ndimage.binary_dilation(prob > 0.3, np.ones((2, 2), bool)))
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = sl
        h, w = ys.stop - ys.start, xs.stop - xs.start
        score = float(prob[sl][labels[sl] == i].mean())
        if min(h, w) < 3 or score < box_thresh:
            continue
        d = h * w * unclip / (2 * (h + w))
        boxes.append((score, max(0, (xs.start - d) / sx), max(0, (ys.start - d) / sy),
                      min(img.width, (xs.stop + d) / sx), min(img.height, (ys.stop + d) / sy)))
    return sorted(boxes, reverse=True)


def rendered_phrase(text: str, photo: Path, rng: random.Random) -> Image.Image:
    """``text`` in a DejaVu face on a blurred crop of ``photo``, in a colour that stands out from it."""
    face = rng.choice(["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
                       "DejaVuSerif-Italic.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf"])
    font = _font(face, rng.randint(22, 40))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    pad = rng.randint(4, 12)
    w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    with Image.open(photo) as im:
        src = im.convert("RGB")
    scale = max(w / src.width, h / src.height, 1.0)
    src = src.resize((int(src.width * scale) + 1, int(src.height * scale) + 1))
    left, top = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
    bg = src.crop((left, top, left + w, top + h)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    dark = np.asarray(bg, np.float32).mean() > 128
    colour = tuple(rng.randint(0, 60) for _ in range(3)) if dark else tuple(rng.randint(200, 255) for _ in range(3))
    ImageDraw.Draw(bg).text((pad - x0, pad - y0), text, font=font, fill=colour)
    return bg.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def rec_score(session, feed: dict[str, np.ndarray], charset: list[str]) -> tuple[str, float]:
    """rapidocr's reading of a line: greedy CTC text and its score, the mean top probability of the kept steps."""
    probs = session.run(None, feed)[0][0]
    idx = probs.argmax(axis=1)
    keep = (idx != 0) & np.concatenate([[True], idx[1:] != idx[:-1]])
    text = "".join(charset[i] for i in idx[keep])
    return text, float(probs.max(axis=1)[keep].mean()) if keep.any() else 0.0


def build_rec_photos(det_model: Path, rec_model: Path, dst: Path, n_calib: int, n_eval: int,
                     per_source: int = 6) -> dict:
    """PP-OCRv4 recogniser on text lines from real images: half cut by the fp32 PP-OCRv4 detector from the
    side's photos and scanned pages (up to ``per_source`` per image, best first, kept when the fp32
    recogniser reads text with rapidocr's text_score >= 0.5 as rapidocr does; no ground truth), half
    phrases of the side's documents rendered on crops of the side's photos (ground truth known)."""
    from bench import metrics
    from demo.ocr import load_charset, preprocess

    session, rec = metrics.session(det_model), metrics.session(rec_model)
    charset = load_charset(rec_model)
    meta: dict = {}
    for split, n, seed in (("calib", n_calib, 3), ("eval", n_eval, 4)):
        rng = random.Random(seed)
        crops_dir = dst / "crops" / split
        crops_dir.mkdir(parents=True, exist_ok=True)
        images = [(p.name, Image.open(p).convert("RGB")) for p in photo_split()[0 if split == "calib" else 1]]
        images += [(s["name"], s["image"]) for s in scan_pages(split) if s["name"].endswith(":page")]
        cut = []
        for name, img in images:
            boxes = [b for b in detect_lines(session, img)
                     if (b[3] - b[1]) >= 1.2 * (b[4] - b[2]) and b[4] - b[2] >= 10]  # horizontal, 10 px high
            kept = []
            for b in boxes:
                crop = img.crop(tuple(round(v) for v in b[1:]))
                crop.save(crops_dir / "probe.png")
                text, score = rec_score(rec, {"x": preprocess(crops_dir / "probe.png")}, charset)
                if text.strip() and score >= 0.5:
                    kept.append((f"{name}#{len(kept)}", crop))
                if len(kept) == per_source:
                    break
            cut += kept
        (crops_dir / "probe.png").unlink(missing_ok=True)
        cut = _spread(cut, n - n // 2)
        calib_docs, eval_docs = datasets.stdlib_documents()
        mine, other = (calib_docs, eval_docs) if split == "calib" else (eval_docs, calib_docs)
        phrases = [s for _, s in datasets.pick_sentences(datasets.doc_sentences(mine, other), 4 * n)]
        photos = photo_split()[0 if split == "calib" else 1]
        rendered = []
        for i in range(n - len(cut)):
            words = phrases[i % len(phrases)].split()
            start = rng.randrange(max(1, len(words) - 4))
            text = " ".join(words[start:start + rng.randint(2, 5)])
            rendered.append((f"rendered:{i}", rendered_phrase(text, photos[i % len(photos)], rng), text))
        samples = [(name, img, None) for name, img in cut] + rendered
        feeds = []
        for i, (_, img, _) in enumerate(samples):
            path = crops_dir / f"{i:04d}.png"
            img.save(path)
            feeds.append({"x": preprocess(path)})
        _write(dst / split, feeds)
        meta[f"{split}_sources"] = [name for name, _, _ in samples]
        meta[f"{split}_labels"] = [text for _, _, text in samples]
    return meta
