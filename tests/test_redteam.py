"""The fast subset of the red team (bench/robustness/redteam.py) against the real `onnxq` command."""

from __future__ import annotations

from bench.robustness.redteam import PROBLEMS, all_cases, run_all, summary


def test_red_team_fast_subset() -> None:
    cases = [case for case in all_cases() if case.fast]
    assert len(cases) >= 15 and {c.kind for c in cases} >= {"path clash", "bad input", "signal", "determinism"}
    text, counts = summary(run_all(cases, jobs=2, keep=None))
    assert all(counts[name] == 0 for name in PROBLEMS), text
