"""Real inputs for each model, written as folders of .npz feeds (one complete feed per file).

Every set is split into calibration and evaluation parts by source: different documents
for the text lines and the encoder's sentences, different photos for the detectors,
different texts (and voices) for speech. Layout:
``CACHE/data/<model>-<n_calib>-<n_eval>/{calib,eval}/NNNN.npz`` plus ``meta.json`` with
labels and whatever the task metric needs.
"""

from __future__ import annotations

import codecs
import contextlib
import html
import io
import json
import re
import shutil
import subprocess
import sysconfig
import wave
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench import runners
from bench.models import CACHE, REPO, fetch_wheel, source_folder

OCR_LINES = REPO / "calibration_data" / "ocr_lines"
PHOTO_EXT = (".png", ".jpg", ".jpeg")
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "moon", "motorcycle_left", "page", "retina", "rocket", "text")
VAD_SR = 16000
VAD_CHUNK = 512
VAD_CONTEXT = 64
STDLIB = Path(sysconfig.get_paths()["stdlib"])
IDLE_DOCS = ("help.html", "README.txt", "CREDITS.txt", "extend.txt")
SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()-]*[a-z]{2}[.!?]")  # plain prose: no code or markup
SEQ_LEN = 64  # encoder feeds: every sentence padded (or truncated) to this many tokens


@dataclass
class DataSet:
    """Calibration and evaluation feeds of one model."""

    calib: Path
    eval: Path
    meta: dict

    @property
    def n_calib(self) -> int:
        """Number of calibration feeds."""
        return len(list(self.calib.glob("*.npz")))

    @property
    def n_eval(self) -> int:
        """Number of evaluation feeds."""
        return len(list(self.eval.glob("*.npz")))


def load_feeds(folder: Path) -> list[dict[str, np.ndarray]]:
    """All feeds of a folder of .npz files, in sorted order."""
    feeds = []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as data:
            feeds.append({k: data[k] for k in data.files})
    return feeds


def _write(folder: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:04d}.npz", **feed)


def _ocr_lines(split: str, n: int) -> list[tuple[Path, str]]:
    rows = [line.split("\t", 1) for line in (OCR_LINES / split / "labels.tsv").read_text().splitlines() if line]
    return [(OCR_LINES / split / name, text) for name, text in rows[:n]]


def _rec_feed(path: Path) -> dict[str, np.ndarray]:
    from demo.ocr import preprocess

    return {"x": preprocess(path)}


def _cls_feed(path: Path, rotate: bool) -> dict[str, np.ndarray]:
    """rapidocr's classifier input: BGR, height 48, width capped at 192, (x/255-0.5)/0.5."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if rotate:
        rgb = rgb.rotate(180)
    width = min(192, int(np.ceil(48 * rgb.width / rgb.height)))
    rgb = rgb.resize((width, 48), Image.Resampling.BILINEAR)
    x = (np.asarray(rgb, dtype=np.float32)[:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((1, 3, 48, 192), dtype=np.float32)
    out[0, :, :, :width] = x
    return {"x": out}


def build_ocr(task: str, dst: Path, n_calib: int, n_eval: int) -> dict:
    """Text lines for the recogniser (labels = text) or classifier (every 2nd line rotated 180°)."""
    meta: dict = {"source": "calibration_data/ocr_lines (calib: pydoc topics; eval: LICENSE, this.py, heapq)"}
    for split, n in (("calib", n_calib), ("eval", n_eval)):
        lines = _ocr_lines(split, n)
        if task == "ocr-rec":
            feeds = [_rec_feed(p) for p, _ in lines]
            meta[f"{split}_labels"] = [t for _, t in lines]
        else:
            feeds = [_cls_feed(p, i % 2 == 1) for i, (p, _) in enumerate(lines)]
            meta[f"{split}_labels"] = [i % 2 for i in range(len(lines))]  # 0 = upright, 1 = 180°
        _write(dst / split, feeds)
    return meta


def _opencv_doc_photos(cache: Path) -> list[Path]:
    """Real photos from Debian's opencv-doc package (downloaded, unpacked, never installed)."""
    root = cache / "opencv-doc"
    if not (root / "x").exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", "opencv-doc"], cwd=root, check=True, capture_output=True)
            deb = next(root.glob("opencv-doc_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(root / "x")], check=True)
        except (subprocess.CalledProcessError, StopIteration, FileNotFoundError):
            return []
    ex = root / "x" / "usr" / "share" / "doc" / "opencv-doc" / "examples"
    keep = [p for sub in ("data", "text") for p in sorted((ex / sub).glob("*"))
            if p.suffix.lower() in PHOTO_EXT and p.stat().st_size > 20_000 and "mask" not in p.name]
    return keep


def _wheel_photos(cache: Path) -> list[Path]:
    """scikit-image's and scikit-learn's bundled photos, unpacked from their wheels."""
    out = cache / "photos"
    found: list[Path] = []
    for req, prefix, names in (("scikit-image", "skimage/data/", SKIMAGE_PHOTOS),
                               ("scikit-learn", "sklearn/datasets/images/", ("china", "flower"))):
        members: list[str] = []
        wheel = fetch_wheel(req, cache)
        with zipfile.ZipFile(wheel) as zf:
            for m in zf.namelist():
                stem = Path(m).stem
                if m.startswith(prefix) and Path(m).suffix in PHOTO_EXT and stem in names:
                    dest = out / f"{req}-{Path(m).name}"
                    if not dest.exists():
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(zf.read(m))
                    members.append(m)
                    found.append(dest)
    return sorted(found)


def source_key(path: Path) -> str:
    """Scene a photo shows: pairs such as aero1/aero3, motorcycle_left/_right share one key."""
    stem = path.stem.split("-", 1)[-1].lower()
    stem = re.sub(r"^(ela|leuven)_?.*", r"\1", stem)  # ela_original/_modified, leuvenA/B
    return re.sub(r"(_left|_right|(?<=\D)\d|l|r)$", "", stem)


def photos(cache: Path = CACHE) -> tuple[list[Path], list[Path]]:
    """All photos split by source scene: alternate scenes calibrate / evaluate, never both."""
    allp = [p for p in _wheel_photos(cache) + _opencv_doc_photos(cache)
            if not re.search(r"gt|disp|mask|^left\d|^right\d", p.stem.lower())]
    groups: dict[str, list[Path]] = {}
    for p in sorted(allp, key=lambda p: p.name):
        groups.setdefault(source_key(p), []).append(p)
    keys = sorted(groups)
    calib = [p for k in keys[0::2] for p in groups[k]]
    evals = [p for k in keys[1::2] for p in groups[k]]
    return calib, evals


def letterbox(path: Path, size: int, *, bgr: bool, mean: float, std: float) -> np.ndarray:
    """Resize the longer side to ``size``, pad bottom/right with black, normalise: [1,3,size,size]."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    scale = size / max(rgb.size)
    w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(rgb.resize((w, h), Image.Resampling.BILINEAR), (0, 0))
    x = np.asarray(canvas, dtype=np.float32) / 255.0
    if bgr:
        x = x[:, :, ::-1]
    return ((x - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def build_photos(task: str, dst: Path, n_calib: int, n_eval: int) -> dict:
    """Photos for the text detector (640², BGR, ±1) or NudeNet (320², RGB, 0..1)."""
    calib, evals = photos()
    size, bgr, mean, std = (640, True, 0.5, 0.5) if task == "text-det" else (320, False, 0.0, 1.0)
    meta: dict = {"size": size}
    for split, files, n in (("calib", calib, n_calib), ("eval", evals, n_eval)):
        files = [files[i] for i in np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)]
        _write(dst / split, [{"images" if task == "yolo-det" else "x":
                              letterbox(p, size, bgr=bgr, mean=mean, std=std)} for p in files])
        meta[f"{split}_sources"] = [p.name for p in files]
    return meta


def _speak(text: str, voice: str, speed: int, out: Path) -> np.ndarray:
    """Render ``text`` with espeak-ng and return 16 kHz float32 mono audio."""
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text],
                   check=True, capture_output=True)
    with wave.open(str(out)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    t = np.arange(0, len(pcm) / rate, 1 / VAD_SR)
    return np.interp(t, np.arange(len(pcm)) / rate, pcm).astype(np.float32)


def _speech_track(texts: list[str], voices: list[str], seed: int, tmp: Path) -> np.ndarray:
    """Utterances separated by 0.3–1.2 s pauses, with light background noise."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(0, len(texts), 3):
        parts.append(np.zeros(int(rng.uniform(0.3, 1.2) * VAD_SR), np.float32))
        voice = voices[(i // 3) % len(voices)]
        parts.append(0.8 * _speak(" ".join(texts[i:i + 3]), voice, int(rng.integers(130, 190)), tmp / "s.wav"))
    track = np.concatenate(parts)
    return (track + rng.normal(0, 0.003, track.shape)).astype(np.float32)


def vad_sequence(session, audio: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Run a silero session over ``audio`` the way silero's wrapper does.

    Returns every chunk's feed (with the state the model itself carried) and the speech probabilities.
    """
    names = {i.name for i in session.get_inputs()}
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, VAD_CONTEXT), np.float32)
    feeds, probs = [], []
    for i in range(0, len(audio) - VAD_CHUNK + 1, VAD_CHUNK):
        x = np.concatenate([context, audio[None, i:i + VAD_CHUNK]], axis=1)
        feed = {"input": x, "state": state}
        if "sr" in names:
            feed["sr"] = np.array(VAD_SR, dtype=np.int64)
        out, state = session.run(None, feed)
        feeds.append(feed)
        probs.append(float(out[0, 0]))
        context = x[:, -VAD_CONTEXT:]
    return feeds, np.array(probs, np.float32)


def build_vad(model: Path, dst: Path, n_calib: int, n_eval: int) -> dict:
    """Speech from espeak-ng: calib from pydoc-topic lines, eval from licence/Zen/heapq lines."""
    import onnxruntime as ort

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: apt-get install espeak-ng")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    dst.mkdir(parents=True, exist_ok=True)
    meta: dict = {"sample_rate": VAD_SR, "chunk": VAD_CHUNK}
    for split, voices, seed in (("calib", ["en-us", "en"], 1), ("eval", ["en-gb-x-rp", "en-us+f3"], 2)):
        texts = [t for _, t in _ocr_lines(split, 48)]
        audio = _speech_track(texts, voices, seed, dst)
        feeds, probs = vad_sequence(session, audio)
        n = n_calib if split == "calib" else n_eval
        pick = np.linspace(0, len(feeds) - 1, min(n, len(feeds))).round().astype(int)
        _write(dst / split, [feeds[i] for i in pick])
        np.save(dst / f"{split}_audio.npy", audio)
        meta[f"{split}_seconds"] = round(len(audio) / VAD_SR, 1)
        meta[f"{split}_speech_fraction_fp32"] = float((probs > 0.5).mean())
    (dst / "s.wav").unlink(missing_ok=True)
    return meta


def sentences(text: str, min_words: int = 5, max_words: int = 32) -> list[str]:
    """Prose sentences of ``text`` in order, without repeats; paragraphs laid out as tables are skipped."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        if re.search(r"\S {3,}\S", para):
            continue
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            if SENTENCE.fullmatch(sent) and min_words <= len(sent.split()) <= max_words and sent not in out:
                out.append(sent)
    return out


def stdlib_documents() -> tuple[dict[str, str], dict[str, str]]:
    """English documents CPython ships, by name: calibration and evaluation ones.

    Calibration: the Language/Library Reference topics pydoc shows (one document per topic).
    Evaluation: LICENSE.txt, the Zen of Python, heapq's docstring and essay, IDLE's docs.
    """
    import heapq
    from pydoc_data.topics import topics

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    calib = {f"pydoc_data/topics.py:{key}": text for key, text in sorted(topics.items())}
    evals = {"LICENSE.txt": (STDLIB / "LICENSE.txt").read_text(), "this.py": codecs.decode(this.s, "rot13"),
             "heapq.py": f"{heapq.__doc__}\n\n{heapq.__about__}"}
    for name in IDLE_DOCS:
        text = (STDLIB / "idlelib" / name).read_text(errors="replace")
        evals[f"idlelib/{name}"] = html_text(text) if name.endswith(".html") else text
    return calib, evals


def html_text(text: str) -> str:
    """The text of an HTML page: tags become single spaces, entities characters."""
    return re.sub(r"[ \t]+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def doc_sentences(docs: dict[str, str], other: dict[str, str]) -> dict[str, list[str]]:
    """Sentences of each document, leaving out any that occurs in the ``other`` split's documents."""
    other_text = " ".join(" ".join(t.split()) for t in other.values())
    return {name: [s for s in sentences(text) if s not in other_text] for name, text in docs.items()}


def pick_sentences(docs: dict[str, list[str]], n: int) -> list[tuple[str, str]]:
    """``n`` (document, sentence) pairs: an even share per document, spread through it.

    Documents are visited smallest first, so a short one gives all it has and the rest is shared out.
    """
    left, out = n, []
    items = sorted(docs.items(), key=lambda kv: (len(kv[1]), kv[0]))
    for i, (name, sents) in enumerate(items):
        k = min(len(sents), left // (len(items) - i))
        out += [(name, sents[j]) for j in np.linspace(0, len(sents) - 1, k).round().astype(int)]
        left -= k
    return out


def build_sentences(model: Path, dst: Path, n_calib: int, n_eval: int) -> dict:
    """Sentence-encoder feeds: stdlib sentences tokenized by the model's tokenizer (in bench/.venv-export)."""
    calib_docs, eval_docs = stdlib_documents()
    picked = {"calib": pick_sentences(doc_sentences(calib_docs, eval_docs), n_calib),
              "eval": pick_sentences(doc_sentences(eval_docs, calib_docs), n_eval)}
    if {s for _, s in picked["calib"]} & {s for _, s in picked["eval"]}:
        raise RuntimeError("a sentence is on both sides of the calibration/evaluation split")
    dst.mkdir(parents=True, exist_ok=True)
    texts = dst / "sentences.json"
    texts.write_text(json.dumps({split: [s for _, s in pairs] for split, pairs in picked.items()}, indent=1))
    subprocess.run(runners.export_cmd("tokenize", source_folder(model), texts, dst, SEQ_LEN), check=True)
    meta: dict = {"source": "CPython 3 stdlib texts (calib: pydoc topics; eval: LICENSE, this.py, heapq, "
                            "idlelib docs)", "seq_len": SEQ_LEN}
    for split, pairs in picked.items():
        tokens = [int(f["attention_mask"].sum()) for f in load_feeds(dst / split)]
        meta[f"{split}_documents"] = dict(Counter(doc for doc, _ in pairs))
        meta[f"{split}_texts"] = [s for _, s in pairs]
        meta[f"{split}_tokens"] = tokens
        meta[f"{split}_truncated"] = sum(t >= SEQ_LEN for t in tokens)
    return meta


def build_transcripts(model: Path, dst: Path, n_calib: int, n_eval: int) -> dict:
    """Whisper decoder feeds: stdlib sentences (split as for the sentence encoder) spoken by espeak-ng with
    different voices per side, run through the fp32 encoder and tokenized (bench/whisper_child.py features)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is missing: apt-get install espeak-ng")
    calib_docs, eval_docs = stdlib_documents()
    picked = {"calib": pick_sentences(doc_sentences(calib_docs, eval_docs), n_calib),
              "eval": pick_sentences(doc_sentences(eval_docs, calib_docs), n_eval)}
    voices = {"calib": ("en-us", "en"), "eval": ("en-gb-x-rp", "en-us+f3")}
    items: dict[str, list[dict]] = {}
    (dst / "wav").mkdir(parents=True, exist_ok=True)
    for split, pairs in picked.items():
        items[split] = []
        for i, (_, text) in enumerate(pairs):
            wav = dst / "wav" / f"{split}-{i:04d}.wav"
            subprocess.run(["espeak-ng", "-v", voices[split][i % 2], "-s", str(150 + 10 * (i % 3)), "-w", str(wav),
                            text], check=True, capture_output=True)
            items[split].append({"wav": str(wav), "text": text})
    (dst / "items.json").write_text(json.dumps(items, indent=1))
    subprocess.run(runners.export_cmd("features", source_folder(model), dst / "items.json", dst,
                                      script="whisper_child.py"), check=True)
    shutil.rmtree(dst / "wav")
    meta: dict = {"source": "CPython 3 stdlib sentences spoken by espeak-ng (calib: pydoc topics, voices en-us/en; "
                            "eval: LICENSE, this.py, heapq, idlelib docs, voices en-gb-x-rp/en-us+f3)"}
    for split, pairs in picked.items():
        meta[f"{split}_texts"] = [t for _, t in pairs]
        meta[f"{split}_labels"] = json.loads((dst / f"{split}_labels.json").read_text())
    return meta


def build(name: str, task: str, model: Path, n_calib: int, n_eval: int, cache: Path = CACHE,
          data: str = "") -> DataSet:
    """Build (or reuse) the feeds of one model (``data``: a builder other than the task's own)."""
    from bench import data_new

    dst = cache / "data" / f"{name}-{n_calib}-{n_eval}"
    meta_file = dst / "meta.json"
    if not meta_file.exists():
        if dst.exists():
            shutil.rmtree(dst)
        if data == "det-pages":
            meta = data_new.build_pages("text-det", dst, n_calib, n_eval)
        elif data == "rec-photos":
            from bench.models import MODELS, prepare

            meta = data_new.build_rec_photos(prepare(MODELS["ppocr-det"], cache), prepare(MODELS["ppocr-rec"], cache),
                                             dst, n_calib, n_eval)
        elif task == "imagenet-cls":
            meta = data_new.build_imagenet(dst, n_calib, n_eval)
        elif task == "captcha-ocr":
            meta = data_new.build_captcha(dst, n_calib, n_eval)
        elif task == "layout-det":
            meta = data_new.build_pages(task, dst, n_calib, n_eval)
        elif task in ("ocr-rec", "ocr-cls"):
            meta = build_ocr(task, dst, n_calib, n_eval)
        elif task in ("text-det", "yolo-det"):
            meta = build_photos(task, dst, n_calib, n_eval)
        elif task == "vad":
            meta = build_vad(model, dst, n_calib, n_eval)
        elif task == "sentence-emb":
            meta = build_sentences(model, dst, n_calib, n_eval)
        elif task == "asr-decoder":
            meta = build_transcripts(model, dst, n_calib, n_eval)
        else:
            raise ValueError(f"unknown task {task}")
        meta_file.write_text(json.dumps(meta, indent=1))
    return DataSet(dst / "calib", dst / "eval", json.loads(meta_file.read_text()))
