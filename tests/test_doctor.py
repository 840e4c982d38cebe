"""`onnxq doctor` and `--target-cpu`: feature detection fed fake CPU descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxq.cli import main
from onnxq.commands.doctor import this_machine
from onnxq.cpu import read_cpu_description

AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"
VNNI = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse avx avx2 avx512f avx512bw avx512_vnni amx_tile amx_int8 amx_bf16\n")
AVX_VNNI = "model name\t: 12th Gen Intel(R) Core(TM) i7-1260P\nflags\t\t: sse avx avx2 avx_vnni\n"
ARM = ("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes crc32 asimddp i8mm\n"
       "CPU implementer\t: 0x41\n")
NO_AVX2 = "model name\t: Intel(R) Xeon(R) CPU E5-2670\nflags\t\t: fpu sse sse2 sse4_2 avx\n"


def write(tmp_path: Path, text: str, name: str = "cpuinfo") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "weight_range", "features", "phrase", "cpu_class"), [
    (AVX2_ONLY, "reduced", {"avx2"}, "saturating int16", "avx2"),
    (VNNI, "full", {"avx2", "avx512bw", "avx512_vnni", "amx_int8"}, "int32", "amx"),
    (AVX_VNNI, "full", {"avx2", "avx_vnni"}, "int32", "avx512-vnni"),
    (ARM, "full", {"asimddp", "i8mm"}, "aarch64", "arm64"),
    (NO_AVX2, "reduced", set(), "no AVX2", "avx2"),
])
def test_features_and_defaults(tmp_path: Path, text: str, weight_range: str, features: set[str], phrase: str,
                               cpu_class: str) -> None:
    info = this_machine(write(tmp_path, text))
    assert {flag for flag, present in info["int8_features"].items() if present} == features
    assert info["defaults"]["weight_range"] == weight_range
    assert info["cpu_class"] == cpu_class
    assert any(phrase in line for line in info["implications"]), info["implications"]
    assert any("speed table" in line for line in info["implications"])


def test_doctor_json_round_trips_as_target(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--cpuinfo", str(write(tmp_path, VNNI)), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8480+" and info["arch"] == "x86_64"
    features, name = read_cpu_description(write(tmp_path, result.stdout, "target.json"))
    assert features.has_vnni and not features.int8_products_may_saturate and name == info["cpu"]


def test_doctor_text(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--cpuinfo", str(write(tmp_path, AVX2_ONLY))])
    assert result.exit_code == 0
    assert "CPU: AMD EPYC 7B12 (x86_64); class avx2" in result.stdout and "--weight-range reduced" in result.stdout


@pytest.mark.parametrize("text", ["", "{\"arch\": 1}", "model name : x\n"])
def test_bad_cpu_description_is_a_data_error(tmp_path: Path, text: str) -> None:
    result = CliRunner().invoke(main, ["doctor", "--cpuinfo", str(write(tmp_path, text))])
    assert result.exit_code == 4 and result.stderr.startswith("onnxq: error:") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(("text", "expected"), [(VNNI, "full"), (AVX2_ONLY, "reduced")])
def test_quantize_for_a_target_cpu(tmp_path: Path, conv_model_path: Path, conv_calib: Path, text: str,
                                   expected: str) -> None:
    result = CliRunner().invoke(main, ["quantize", str(conv_model_path), "-o", str(tmp_path / "q.onnx"), "--calib",
                                       str(conv_calib), "--target-cpu", str(write(tmp_path, text)), "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["weight_range"] == expected
    assert "target CPU" in report["settings"]["weight_range_reason"]
    assert report["target_cpu"]["source"] == f"--target-cpu {tmp_path / 'cpuinfo'}"
