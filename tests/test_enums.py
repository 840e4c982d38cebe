"""The closed value sets (onnxq.enums) are the ones the command line, recipes and plans accept."""

from __future__ import annotations

import json

import click
import pytest

from onnxq.cli import main
from onnxq.commands import recipe
from onnxq.enums import Format, Mode, NodeStatus, SpeedGuard, WeightRange
from onnxq.quant.placement import NodeDecision


def _choices(command: str, option: str) -> tuple[str, ...]:
    params = {p.opts[0]: p for p in main.commands[command].params}
    assert isinstance(params[option].type, click.Choice)
    return tuple(params[option].type.choices)


@pytest.mark.parametrize(("option", "enum", "setting"), [("--mode", Mode, "mode"), ("--format", Format, "format"),
                                                          ("--weight-range", WeightRange, "weight_range"),
                                                          ("--speed-guard", SpeedGuard, "speed_guard")])
def test_quantize_options_and_recipe_settings_accept_the_enum_values(option: str, enum: type, setting: str) -> None:
    assert _choices("quantize", option) == enum.values()
    assert recipe.SETTINGS[setting].allowed == enum.values()


def test_members_are_the_plain_strings_reports_hold() -> None:
    assert Mode.WEIGHT_ONLY == "weight-only" and f"{Mode.WEIGHT_ONLY}" == "weight-only" == str(Mode.WEIGHT_ONLY)
    assert json.dumps({NodeStatus.SHARED_SCALE: Format.QOPERATOR}) == '{"shared-scale": "qoperator"}'


def test_a_node_decision_holds_a_known_status_as_a_plain_string() -> None:
    decision = NodeDecision("conv", "Conv", NodeStatus.INT8)
    assert type(decision.status) is str and decision.status == "int8"
    with pytest.raises(ValueError, match="int9"):
        NodeDecision("conv", "Conv", "int9")
