"""The automatic default (onnxq.search.auto): the task measure it steers by, the search order, the budget,
and the pipeline around it (held-back samples, the written recipe reproducing the choice)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import conv_relu_model, image_batch, make_model, save, tensor, weight, write_npz_folder
from onnx import helper

from onnxq.cli import main
from onnxq.runtime.agreement import NEAR_TIE, OutputAgreement, OutputMeasure
from onnxq.search import auto

# ------------------------------------------------------------------ near ties and decided agreement


def test_class_near_ties_are_left_out_of_the_decided_agreement() -> None:
    agreement = OutputAgreement(OutputMeasure("y", "classes", "test"))
    decided = np.array([[0.9, 0.1], [0.8, 0.2]])  # fp32 decides: the candidate keeps one, flips one
    tie = np.array([[0.51, 0.49]])  # top two within NEAR_TIE: any change may flip it
    agreement.add(decided, np.array([[0.7, 0.3], [0.4, 0.6]]))
    agreement.add(tie, np.array([[0.49, 0.51]]))
    summary = agreement.summary()
    assert summary["samples"] == 3 and summary["near_ties"] == 1
    assert summary["agreement"] == pytest.approx(1 / 3) and summary["decided_agreement"] == pytest.approx(0.5)


def test_ctc_near_tie_counts_only_when_the_runner_up_changes_the_text() -> None:
    blank = 0
    measure = OutputMeasure("y", "sequence", "test", ctc_blank=blank)

    def scores(rows: list[list[float]]) -> np.ndarray:
        return np.array([rows], dtype=np.float64)

    # position 1 is a near tie between class 1 and class 2: the runner-up changes the text "1" -> "2"
    changes = scores([[0.9, 0.05, 0.05], [0.1, 0.46, 0.44], [0.9, 0.05, 0.05]])
    # position 1 is a near tie between class 1 and class 1's repeat neighbour: blank vs 1 after another 1
    harmless = scores([[0.05, 0.9, 0.05], [0.47, 0.49, 0.04], [0.9, 0.05, 0.05]])
    for sample, ties in ((changes, 1), (harmless, 0)):
        agreement = OutputAgreement(measure)
        agreement.add(sample, sample)
        assert agreement.summary()["near_ties"] == ties


def test_a_space_that_pads_most_lines_is_read_as_padding_even_when_punctuation_ends_many() -> None:
    from onnxq.runtime.agreement import _with_ctc

    blank, space, dot = 0, 9, 8
    rng = np.random.default_rng(0)
    lines = []
    for i in range(32):
        text = list(rng.integers(1, 8, size=6))
        text[2] = space  # a space between words: the space is the most frequent class but the blank
        ending = [space] if i < 13 else [dot] if i < 19 else []  # 13 padded, 6 end with a dot
        lines.append(np.array([c for t in text + ending for c in (t, blank)] + [blank] * 10))
    measure = _with_ctc(OutputMeasure("y", "sequence", "test"), lines)
    assert (measure.ctc_blank, measure.ctc_padding) == (blank, space)
    no_padding = _with_ctc(OutputMeasure("y", "sequence", "test"), [line[line != space] for line in lines])
    assert no_padding.ctc_padding is None  # the dot ends 6 of 32 lines: no padding


def test_decoder_sequences_are_judged_on_the_positions_fp32_decides() -> None:
    agreement = OutputAgreement(OutputMeasure("logits", "sequence", "test"))  # no CTC blank: a decoder
    reference = np.array([[[3.0, 0.0], [0.0, 3.0], [1.0, 1.0 - NEAR_TIE / 10]]])  # last position: a near tie
    flipped_tie = reference.copy()
    flipped_tie[0, 2] = [1.0, 1.1]
    agreement.add(reference, flipped_tie)
    summary = agreement.summary()
    assert summary["agreement"] == 0.0  # the whole sequence is not the same ...
    assert summary["decided_agreement"] == 1.0  # ... but every position fp32 decides is
    flipped_decided = reference.copy()
    flipped_decided[0, 0] = [0.0, 3.0]
    other = OutputAgreement(OutputMeasure("logits", "sequence", "test"))
    other.add(reference, flipped_decided)
    assert other.summary()["decided_agreement"] == 0.0


def test_a_decision_map_is_judged_by_the_iou_of_its_positives() -> None:
    reference = np.full((1, 1, 10, 10), 0.05)
    reference[0, 0, 0, :5] = 0.95  # five text pixels in a hundred
    lost_two = reference.copy()
    lost_two[0, 0, 0, :2] = 0.05
    agreement = OutputAgreement(OutputMeasure("map", "decisions", "test"))
    agreement.add(reference, lost_two)
    summary = agreement.summary()
    assert summary["element_agreement"] == pytest.approx(0.98)  # the share of same-side pixels hides it ...
    assert summary["agreement"] == pytest.approx(0.6) and summary["decided_agreement"] == pytest.approx(0.6)
    small = OutputAgreement(OutputMeasure("vad", "decisions", "test"))  # a few values: the same-side share
    small.add(np.array([[0.9, 0.1, 0.8, 0.2]]), np.array([[0.9, 0.1, 0.3, 0.2]]))
    assert small.summary()["agreement"] == pytest.approx(0.75)


# ------------------------------------------------------------------ the search, on a fake model space


class FakeReference:
    """Scores a candidate (what the fake space's build returns) with `score(candidate) -> decided agreement`."""

    def __init__(self, score, delay_s: float = 0.0) -> None:
        self.score, self.delay_s = score, delay_s

    def fidelity_of(self, candidate: auto.Candidate) -> SimpleNamespace:
        time.sleep(self.delay_s)
        value = self.score(candidate)
        return SimpleNamespace(agreement=value, decided_agreement=value, outputs=[])


LAYERS = {f"conv{i}": "Conv" for i in range(8)} | {"matmul": "MatMul"}


def fake_space(speed=None, **kwargs) -> auto.SearchSpace:
    def default_speed(candidate: auto.Candidate) -> float:
        if candidate.mode == "dynamic":
            return 1.2
        return 3.0 - 0.2 * len(candidate.keep_float) - 0.3 * len(candidate.dynamic)

    return auto.SearchSpace(build=lambda candidate: candidate, int8_layers=LAYERS,
                            dynamic_layers=frozenset({"matmul"}), methods=("global", "percentile"),
                            speed=speed or default_speed, rank_layers=lambda: sorted(LAYERS, reverse=True),
                            adaround_layers=lambda ranking: frozenset(ranking[:2]), **kwargs)


def test_static_meeting_the_target_ends_the_search_at_once() -> None:
    outcome = auto.search(fake_space(), FakeReference(lambda _c: 1.0))
    assert [m.candidate.name for m in outcome.measured] == ["static global"]
    assert outcome.chosen.candidate.mode == "static" and not outcome.notes


def test_far_from_the_target_skips_repairs_and_keeps_the_fastest_that_meets_it() -> None:
    def score(c: auto.Candidate) -> float:
        if c.mode == "dynamic":
            return 1.0
        return 0.5 + 0.3 * (len(c.keep_float) >= 4)  # float fallbacks help, never enough

    outcome = auto.search(fake_space(), FakeReference(score))
    measured = outcome.measured
    assert outcome.chosen.candidate.mode == "dynamic"
    assert not any(m.candidate.bias_correction or m.candidate.adaround for m in measured)  # 0.5 is out of reach
    met_at = next(i for i, m in enumerate(measured) if m.meets(auto.TARGET_AGREEMENT))
    assert all(m.expected_speedup > 1.2 for m in measured[met_at + 1:])  # nothing slower is tried after
    assert len({m.candidate for m in measured}) == len(measured)


def test_run_time_candidates_come_before_the_ranking_probe_and_it_counts_against_the_budget() -> None:
    events: list[str] = []

    def score(c: auto.Candidate) -> float:
        events.append(c.name)
        return 0.5

    def rank() -> list[str]:
        events.append("probe")
        return sorted(LAYERS, reverse=True)

    auto.search(replace(fake_space(), rank_layers=rank), FakeReference(score))
    probe = events.index("probe")
    assert {"dynamic", "static global, MatMul/Gemm/LSTM dynamic"} <= set(events[:probe])
    assert any("float" in name for name in events[probe:])
    events.clear()  # too little budget left for the probe and two candidates: no probe, no fallbacks
    outcome = auto.search(replace(fake_space(), rank_layers=rank), FakeReference(score, delay_s=0.03),
                          budget_s=0.15)
    assert "probe" not in events and not outcome.ranking


def test_a_repair_within_reach_wins_at_full_speed() -> None:
    def score(c: auto.Candidate) -> float:
        return 0.995 if c.bias_correction and c.method == "percentile" else 0.95 if c.method == "percentile" else 0.9

    outcome = auto.search(fake_space(), FakeReference(score))
    chosen = outcome.chosen.candidate
    assert chosen.bias_correction and chosen.method == "percentile" and not chosen.keep_float
    assert [m.candidate.name for m in outcome.measured] == ["static global", "static percentile",
                                                          "static percentile + bias correction"]


def test_nothing_meeting_the_target_keeps_the_most_agreeing_with_a_note() -> None:
    outcome = auto.search(fake_space(), FakeReference(lambda c: 0.5 + 0.01 * len(c.keep_float)))
    best = max(m.decided_agreement for m in outcome.measured)
    assert outcome.chosen.decided_agreement == best and best < auto.TARGET_AGREEMENT
    assert any("did not reach" in note for note in outcome.notes)


def test_the_budget_ends_the_search_and_says_so() -> None:
    outcome = auto.search(fake_space(), FakeReference(lambda _c: 0.5, delay_s=0.05), budget_s=0.08)
    assert len(outcome.measured) == 1  # a second candidate, as slow as the first, would end past the budget
    assert any("budget of 0.08 s" in note for note in outcome.notes)


def test_a_candidate_that_fails_to_build_is_a_row_with_its_error() -> None:
    def score(c: auto.Candidate) -> float:
        if c.dynamic:
            raise RuntimeError("onnxruntime refused")
        return 0.5 + 0.5 * (len(c.keep_float) >= 2)

    outcome = auto.search(fake_space(), FakeReference(score))
    errors = [m for m in outcome.measured if m.error]
    assert errors and "onnxruntime refused" in errors[0].error
    assert outcome.chosen.meets(auto.TARGET_AGREEMENT) and len(outcome.chosen.candidate.keep_float) == 2



class ShuffledScorer:
    """Scores a whole group, in a shuffled order, whatever meets the target: the most a parallel scorer
    (onnxq.search.distributed.RayScorer) may do; the search must keep only what the serial one measures."""

    where, width = "shuffled", 4

    def __init__(self, reference: FakeReference, seed: int, rank=None) -> None:
        self.reference, self.random, self.groups, self.rank = reference, random.Random(seed), [], rank
        self.probes: list[str] = []  # what became of each probe started: "used" or "cancelled"

    def score(self, candidates, build, _enough) -> dict[int, auto.Scored]:
        self.groups.append([c.name for c in candidates])
        order = self.random.sample(range(len(candidates)), len(candidates))
        return {i: auto.score(self.reference, build(candidates[i])) for i in order}

    def rank_later(self, probe):
        probe()
        index = len(self.probes)
        self.probes.append("running")
        scorer = self

        class Started:
            def result(self) -> list[str]:
                scorer.probes[index] = "used"
                return scorer.rank()

            def cancel(self) -> None:
                scorer.probes[index] = "cancelled"

        return Started()


def random_score(seed: int):
    """Agreement per candidate, fixed by the seed and the candidate: from hopeless to meeting the target,
    sometimes an error."""
    def score(c: auto.Candidate) -> float:
        draw = random.Random(f"{seed} {c}").random()
        if draw < 0.05:
            raise RuntimeError(f"onnxruntime refused {c.name}")
        return 0.8 + 0.2 * draw ** 0.5

    return score


@pytest.mark.parametrize("seed", range(40))
def test_scoring_groups_at_once_gives_the_serial_search(seed: int) -> None:
    score = random_score(seed)
    probes: list[int] = []

    def rank() -> list[str]:
        probes.append(seed)
        return sorted(LAYERS, key=lambda label: random.Random(f"{seed} {label}").random())

    space = replace(fake_space(), rank_layers=rank, probe=lambda: (None, {}))
    serial = auto.search(space, FakeReference(score))
    assert len(probes) == (1 if serial.ranking else 0)
    scorer = ShuffledScorer(FakeReference(score), seed, rank)  # the probe runs on the scorer, maybe ahead
    grouped = auto.search(space, FakeReference(score), scorer=scorer)
    rows = [[{k: v for k, v in m.to_dict().items() if k != "seconds"} for m in o.measured] for o in (serial, grouped)]
    assert rows[0] == rows[1]
    assert grouped.chosen.candidate == serial.chosen.candidate and grouped.ranking == serial.ranking
    assert grouped.notes == serial.notes
    assert scorer.probes.count("used") == len(probes) // 2  # where the serial search ranked, not elsewhere
    assert set(scorer.probes) <= {"used", "cancelled"}  # a probe started ahead and not needed is cancelled
    assert (serial.scored_on, grouped.scored_on) == ("this process", "shuffled")


def test_on_a_scorer_the_budget_is_checked_before_each_group() -> None:
    scorer = ShuffledScorer(FakeReference(lambda _c: 0.5, delay_s=0.05), 0)
    outcome = auto.search(fake_space(), FakeReference(lambda _c: 0.5), budget_s=0.08, scorer=scorer)
    assert scorer.groups == [["static global", "static percentile"]]  # the first group runs whole
    assert len(outcome.measured) == 2 and any("budget of 0.08 s" in note for note in outcome.notes)

# ------------------------------------------------------------------ the pipeline and the CLI

FEATURES, HIDDEN, CLASSES = 48, 64, 10


def outlier_classifier(seed: int = 3) -> onnx.ModelProto:
    """x [1, 48] -> MatMul -> Relu -> MatMul -> Softmax: ten classes."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    inits = {"w1": weight(rng, (FEATURES, HIDDEN), fan_in=FEATURES),
             "w2": 4 * weight(rng, (HIDDEN, CLASSES), fan_in=HIDDEN)}
    return make_model(nodes, [tensor("x", [1, FEATURES])], [tensor("probs", [1, CLASSES])], inits)


def outlier_calibration(folder: Path, count: int = 40) -> Path:
    """Normal features; in the first three quarters every third sample carries one huge feature, so a
    static range over the calibration data leaves the ordinary values a handful of int8 steps."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    for i in range(count):
        x = rng.standard_normal((1, FEATURES)).astype(np.float32)
        if i < count * 3 // 4 and i % 3 == 0:
            x[0, i % FEATURES] = 2000.0
        np.savez(folder / f"s{i:03d}.npz", x=x)
    return folder


def invoke(*args) -> tuple[int, dict | None, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.stderr + result.stdout
    report = json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None
    return result.exit_code, report, result.stderr


@pytest.mark.auto_search
def test_default_quantize_moves_off_a_static_setting_that_loses_the_answer(tmp_path: Path) -> None:
    model = save(outlier_classifier(), tmp_path / "m.onnx")
    calib = outlier_calibration(tmp_path / "calib")
    out, recipe = tmp_path / "q.onnx", tmp_path / "choice.yaml"
    code, report, err = invoke("quantize", model, "-o", out, "--calib", calib, "--save-recipe", recipe, "--json", "-q")
    assert code == 0, err
    search = report["auto"]
    by_name = {c["name"]: c for c in search["candidates"]}
    assert by_name["static global"]["decided_agreement"] < auto.TARGET_AGREEMENT  # the setting --fast writes
    chosen = by_name[search["chosen"]]
    assert chosen["name"] != "static global" and chosen["decided_agreement"] >= auto.TARGET_AGREEMENT
    assert report["fidelity"]["outputs"][0]["task"]["kind"] == "classes"
    assert report["fidelity"]["outputs"][0]["task"]["decided_agreement"] >= auto.TARGET_AGREEMENT
    # the saved recipe rebuilds the same bytes without searching
    again = tmp_path / "again.onnx"
    code, report_again, err = invoke("quantize", model, "-o", again, "--calib", calib, "--recipe", recipe, "--json",
                                     "-q")
    assert code == 0, err
    assert "auto" not in report_again or not report_again["auto"]
    assert again.read_bytes() == out.read_bytes()
    # --fast keeps the single pass, and its answer is the worse one
    fast = tmp_path / "fast.onnx"
    code, report_fast, err = invoke("quantize", model, "-o", fast, "--calib", calib, "--fast", "--json", "-q")
    assert code == 0, err
    assert not report_fast.get("auto")
    assert report_fast["fidelity"]["outputs"][0]["task"]["decided_agreement"] < auto.TARGET_AGREEMENT


@pytest.mark.auto_search
@pytest.mark.parametrize("static_only", ["--save-stats", "--save-plan", "--format", "--load-stats"])
def test_what_only_static_mode_makes_keeps_the_search_static(tmp_path: Path, static_only: str) -> None:
    """Statistics, a plan or QOperator ops exist only in static mode: the search must not choose run-time
    quantization there (it did, and the run then failed on an option the user never gave)."""
    model = save(outlier_classifier(), tmp_path / "m.onnx")
    calib = outlier_calibration(tmp_path / "calib")
    if static_only == "--load-stats":
        assert invoke("calibrate", model, "-o", tmp_path / "s.npz", "--calib", calib, "-q")[0] == 0
        extra = ["--load-stats", tmp_path / "s.npz"]
    else:
        extra = [static_only, "qoperator" if static_only == "--format" else tmp_path / "side.file"]
    code, report, err = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", calib, *extra, "--json",
                               "-q")
    assert code == 0, err
    assert report["auto"]["chosen"].startswith("static")
    assert all(c.get("mode", "static") == "static" and "dynamic" not in c["name"] for c in report["auto"]["candidates"])


@pytest.mark.auto_search
@pytest.mark.parametrize("extra, flag", [(["--fast"], "--budget"), (["--fast"], "--target-agreement"),
                                         (["--mode", "dynamic"], "--budget")])
def test_search_options_are_refused_where_no_search_runs(tmp_path: Path, extra: list[str], flag: str) -> None:
    model = save(outlier_classifier(), tmp_path / "m.onnx")
    calib = outlier_calibration(tmp_path / "calib")
    code, _, err = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", calib, *extra, flag, "0.5")
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_inspect_names_the_answer_each_output_carries(tmp_path: Path) -> None:
    model = save(outlier_classifier(), tmp_path / "m.onnx")
    code, report, err = invoke("inspect", model, "--json")
    assert code == 0, err
    assert [(m["name"], m["kind"]) for m in report["task_measures"]] == [("probs", "classes")]
    assert "probs: classes" in CliRunner().invoke(main, ["inspect", str(model)]).stdout


def test_emulated_dynamic_matmul_computes_what_the_kernel_computes() -> None:
    from onnxq.commands.dynamic import rewrite_dynamic
    from onnxq.quant.plan import QuantSettings
    from onnxq.runtime.emulation import LEVEL, emulated

    model = outlier_classifier()
    seven_bits = QuantSettings(weight_range="reduced").weight_qtype  # no pair of products saturates on any CPU
    dynamic = rewrite_dynamic(model, seven_bits, True)[0]
    standard = emulated(dynamic)
    assert not any(n.op_type == "DynamicQuantizeMatMul" for n in standard.graph.node)
    assert {n.op_type for n in standard.graph.node} >= {"DynamicQuantizeLinear", "DequantizeLinear", "MatMul"}
    x = np.random.default_rng(0).standard_normal((1, FEATURES)).astype(np.float32)
    import onnxruntime as ort

    def run(m: onnx.ModelProto, level) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    kernel = run(dynamic, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    written_out = run(standard, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert LEVEL == "disabled"
    np.testing.assert_allclose(written_out, kernel, atol=1e-4)
    assert np.argmax(written_out) == np.argmax(kernel)


@pytest.mark.auto_search
def test_saved_recipe_calibrates_on_the_same_samples_as_the_search(tmp_path: Path) -> None:
    model = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 12)
    recipe = tmp_path / "r.yaml"
    code, report, err = invoke("quantize", model, "-o", tmp_path / "a.onnx", "--calib", calib, "--save-recipe", recipe,
                               "--json", "-q")
    assert code == 0, err
    assert report["auto"]["chosen"].startswith("static")  # activation ranges come from the calibration samples
    assert report["auto"]["measured"]["speedup"] > 0 and report["auto"]["measured"]["threads"] == 1
    assert report["data"]["calibration"]["samples"] == 9
    assert "holdout: 0.25" in recipe.read_text()
    code, again, err = invoke("quantize", model, "-o", tmp_path / "b.onnx", "--calib", calib, "--recipe", recipe,
                              "--json", "-q")
    assert code == 0, err
    assert not again.get("auto") and again["data"]["calibration"]["samples"] == 9
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_holdout_is_refused_without_calibration_samples(tmp_path: Path) -> None:
    model = save(outlier_classifier(), tmp_path / "m.onnx")
    stats = tmp_path / "s.npz"
    code, _, err = invoke("calibrate", model, "-o", stats, "--calib", outlier_calibration(tmp_path / "calib"))
    assert code == 0, err
    code, _, err = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--load-stats", stats, "--holdout", "0.5")
    assert code == 2 and "--holdout" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.auto_search
def test_a_chosen_model_slower_than_fp32_here_is_said_in_a_note(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxq.commands import static_flow

    monkeypatch.setattr(static_flow, "measured_speedup", lambda *_args, **_kwargs: {"speedup": 0.6, "runs": 5,
                                                                                 "threads": 1})
    model = save(conv_relu_model(), tmp_path / "m.onnx")
    calib = write_npz_folder(tmp_path / "calib", lambda rng: {"x": image_batch(rng)}, 12)
    code, report, err = invoke("quantize", model, "-o", tmp_path / "q.onnx", "--calib", calib, "--json", "-q")
    assert code == 0, err  # the user asked for int8: it is written, and the note says it does not pay
    assert report["auto"]["measured"]["speedup"] == 0.6
    assert any("0.60x fp32 here" in note and "does not pay" in note for note in report["notes"])
    code, report, err = invoke("quantize", model, "-o", tmp_path / "t.onnx", "--calib", calib, "--json", "-q",
                               "--target-cpu", "avx2")  # a named target is not this machine: nothing timed
    assert code == 0, err
    assert report["auto"]["measured"] is None and not any("does not pay" in note for note in report["notes"])
