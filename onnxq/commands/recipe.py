"""Recipes: per-node precision chosen in a YAML file, and the effective recipe a run writes back.

A recipe has `settings` (the defaults of `onnxq quantize` options; flags given on the command
line still win) and `rules`, each a selector plus what to do with the nodes it matches:

    settings: {method: percentile, percentile: 99.99}
    rules:
      - match: {op_type: Softmax}                     # op type (or a list of them)
        precision: float
      - match: {name_regex: "^/encoder/layer\\.5/"}   # regular expression on the node name
        precision: float
      - match: {name: conv_3}                         # exact node name
        precision: int16                              # 16-bit activations
        per_channel: false
        method: mse
      - match: {op_type: MatMul}
        weights: int4                                 # --mode weight-only
      - match: {name: conv_7}
        adaround: true                                # learned rounding of this layer's weights

All selector fields given must match. Rules apply in order; a later rule overrides an earlier
one field by field, so general rules go first and exceptions after them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx_graphsurgeon as gs
import yaml

from onnxq.commands.dynamic import LayerOptions
from onnxq.commands.option_table import RECIPE_SETTINGS
from onnxq.enums import NodeStatus
from onnxq.errors import UsageError, first_line
from onnxq.model_io import atomic_write_bytes
from onnxq.quant.ir import all_graphs, node_label
from onnxq.quant.placement import Placement, quantized_tensors_of
from onnxq.quant.plan import ActivationOverride
from onnxq.quant.ranges import METHODS

RECIPE_VERSION = 1
PRECISIONS = (NodeStatus.FLOAT.value, NodeStatus.INT8.value, NodeStatus.INT16.value, NodeStatus.DYNAMIC.value)
WEIGHT_TYPES = (NodeStatus.INT8.value, NodeStatus.INT4.value)
WEIGHT_BITS = {NodeStatus.INT8.value: 8, NodeStatus.INT4.value: 4}
SETTINGS = RECIPE_SETTINGS  # what `settings:` may hold: the options' recipe keys (onnxq.commands.option_table)


@dataclass(frozen=True)
class Selector:
    name: str | None = None
    name_regex: str | None = None
    op_type: tuple[str, ...] = ()

    def matches(self, label: str, op_type: str) -> bool:
        return ((self.name is None or self.name == label)
                and (self.name_regex is None or re.search(self.name_regex, label) is not None)
                and (not self.op_type or op_type in self.op_type))

    def to_dict(self) -> dict:
        found = {"name": self.name, "name_regex": self.name_regex,
                 "op_type": list(self.op_type) if len(self.op_type) != 1 else self.op_type[0]}
        return {k: v for k, v in found.items() if v not in (None, [])}


@dataclass(frozen=True)
class Rule:
    match: Selector
    precision: str | None = None  # float | int8 | int16 (16-bit activations)
    weights: str | None = None  # int8 | int4 (weight-only mode)
    per_channel: bool | None = None
    method: str | None = None
    percentile: float | None = None
    adaround: bool | None = None  # learned rounding of this node's weights (static mode)
    reason: str | None = None

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "match"}
        return {"match": self.match.to_dict(), **{k: v for k, v in values.items() if v is not None}}


@dataclass(frozen=True)
class NodeChoice:
    """What the rules say about one node (None: no rule set it); `rules` are 1-based rule numbers."""

    precision: str | None = None
    weights: str | None = None
    per_channel: bool | None = None
    method: str | None = None
    percentile: float | None = None
    adaround: bool | None = None
    rules: tuple[int, ...] = ()
    reason: str | None = None  # the last matching rule's, if it gave one

    def why(self) -> str:
        return self.reason or "recipe rule " + ", ".join(str(r) for r in self.rules)


@dataclass
class Recipe:
    settings: dict = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)

    def choice_for(self, label: str, op_type: str) -> NodeChoice:
        merged: dict = {}
        matched: list[int] = []
        for number, rule in enumerate(self.rules, start=1):
            if rule.match.matches(label, op_type):
                matched.append(number)
                merged.update({k: v for k, v in rule.to_dict().items() if k != "match"})
        return NodeChoice(**merged, rules=tuple(matched))

    def choices(self, nodes: list[tuple[str, str]]) -> dict[str, NodeChoice]:
        """Label -> choice for every (label, op type) some rule matches."""
        found = {label: self.choice_for(label, op) for label, op in nodes}
        return {label: choice for label, choice in found.items() if choice.rules}

    def unmatched_rules(self, nodes: list[tuple[str, str]]) -> list[int]:
        """Rules that select no node: almost always a typo, so the run reports them."""
        return [number for number, rule in enumerate(self.rules, start=1)
                if not any(rule.match.matches(label, op) for label, op in nodes)]

    def to_dict(self) -> dict:
        return {"version": RECIPE_VERSION, "settings": dict(sorted(self.settings.items())),
                "rules": [rule.to_dict() for rule in self.rules]}

    def save(self, path: Path) -> None:
        text = "# onnxq recipe: onnxq quantize MODEL --recipe THIS_FILE ...\n" + yaml.safe_dump(
            self.to_dict(), sort_keys=False, default_flow_style=None, width=120)
        atomic_write_bytes(path, text.encode())

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise UsageError(f"recipe not found: {path}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UsageError(f"recipe {path} is not readable YAML: {first_line(exc)}") from None
        return parse_recipe(data if data is not None else {}, str(path))


def parse_recipe(data: object, where: str) -> Recipe:
    """Validate a recipe's plain data; every mistake names the file and the rule."""
    _require(isinstance(data, dict), where, "must be a mapping with 'settings' and/or 'rules'")
    assert isinstance(data, dict)
    _no_unknown(data, {"version", "settings", "rules"}, where)
    _require(data.get("version", RECIPE_VERSION) == RECIPE_VERSION, where,
             f"version {data.get('version')!r} is not supported (this onnxq reads version {RECIPE_VERSION})")
    settings = _parse_settings(data.get("settings") or {}, f"{where}: settings")
    raw_rules = data.get("rules") or []
    _require(isinstance(raw_rules, list), where, "'rules' must be a list")
    rules = [_parse_rule(raw, f"{where}: rule {n}") for n, raw in enumerate(raw_rules, start=1)]
    return Recipe(settings, rules)


def _parse_settings(raw: object, where: str) -> dict:
    _require(isinstance(raw, dict), where, "must be a mapping")
    assert isinstance(raw, dict)
    _no_unknown(raw, set(SETTINGS), where)
    settings = {}
    for key, value in raw.items():
        kind, allowed = SETTINGS[key].kind, SETTINGS[key].allowed
        if key == "speed_guard" and isinstance(value, bool):  # recipes saved before the table: true/false
            value = "table" if value else "off"
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        _require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), where,
                 f"{key} must be a {kind.__name__}, got {value!r}")
        _require(allowed is None or value in allowed, where,
                 f"{key} must be one of {', '.join(map(str, allowed or ()))}, got {value!r}")
        settings[key] = value
    return settings


def _parse_rule(raw: object, where: str) -> Rule:
    _require(isinstance(raw, dict), where, "must be a mapping with 'match' and what to do")
    assert isinstance(raw, dict)
    _no_unknown(raw, {f.name for f in fields(Rule)}, where)
    selector = _parse_selector(raw.get("match"), where)
    rule = Rule(selector, **{k: v for k, v in raw.items() if k != "match"})
    _check_choice(rule.precision, PRECISIONS, "precision", where)
    _check_choice(rule.weights, WEIGHT_TYPES, "weights", where)
    _check_choice(rule.method, tuple(METHODS), "method", where)
    _require(rule.per_channel is None or isinstance(rule.per_channel, bool), where, "per_channel must be true/false")
    _require(rule.adaround is None or isinstance(rule.adaround, bool), where, "adaround must be true/false")
    _require(rule.percentile is None or (isinstance(rule.percentile, int | float) and 50 < rule.percentile <= 100),
             where, f"percentile must be a number in (50, 100], got {rule.percentile!r}")
    _require(rule.reason is None or isinstance(rule.reason, str), where, "reason must be text")
    _require(any(getattr(rule, f.name) is not None for f in fields(Rule) if f.name not in ("match", "reason")),
             where, "says nothing to do (give precision, weights, per_channel, method, percentile or adaround)")
    return rule


def _parse_selector(raw: object, where: str) -> Selector:
    _require(isinstance(raw, dict) and raw, where, "needs 'match' with name, name_regex and/or op_type")
    assert isinstance(raw, dict)
    _no_unknown(raw, {"name", "name_regex", "op_type"}, f"{where}: match")
    for key in ("name", "name_regex"):
        _require(raw.get(key) is None or isinstance(raw[key], str), where, f"match.{key} must be text")
    if raw.get("name_regex") is not None:
        try:
            re.compile(raw["name_regex"])
        except re.error as exc:
            raise UsageError(f"{where}: match.name_regex {raw['name_regex']!r} is not a valid regex ({exc})") from None
    op_type = raw.get("op_type") or []
    op_types = (op_type,) if isinstance(op_type, str) else tuple(op_type) if isinstance(op_type, list) else None
    _require(op_types is not None and all(isinstance(o, str) for o in op_types), where,
             "match.op_type must be an op type or a list of them")
    assert op_types is not None
    return Selector(raw.get("name"), raw.get("name_regex"), op_types)


def _check_choice(value: object, allowed: tuple, key: str, where: str) -> None:
    _require(value is None or value in allowed, where, f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _no_unknown(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - known)
    _require(not unknown, where, f"unknown key {unknown[0] if unknown else ''!r} (known: {', '.join(sorted(known))})")


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise UsageError(f"{where}: {message}")


def node_list(graph: gs.Graph) -> list[tuple[str, str]]:
    """(label, op type) of the nodes a recipe can select, also inside subgraphs."""
    return [(node_label(node), node.op) for sub in all_graphs(graph) for node in sub.nodes]


def placement_changes(choices: dict[str, NodeChoice]) -> dict:
    """PlacementOptions fields the rules set (float nodes are excluded like --exclude)."""
    return {
        "exclude_nodes": frozenset(label for label, c in choices.items() if c.precision == NodeStatus.FLOAT),
        "keep_float": {label: "dynamic: int8 with activations quantized at run time (recipe)"
                       for label, c in choices.items() if c.precision == NodeStatus.DYNAMIC},
        "int16_nodes": frozenset(label for label, c in choices.items() if c.precision == NodeStatus.INT16),
        "per_channel_nodes": {label: c.per_channel for label, c in choices.items() if c.per_channel is not None},
    }


def layer_options(choices: dict[str, NodeChoice]) -> LayerOptions:
    """What the rules decide per node in --mode dynamic and weight-only (placement_changes for static mode)."""
    return LayerOptions(
        keep_float={label: c.why() for label, c in choices.items() if c.precision == NodeStatus.FLOAT},
        per_channel={label: c.per_channel for label, c in choices.items() if c.per_channel is not None},
        weight_bits={label: WEIGHT_BITS[c.weights] for label, c in choices.items() if c.weights is not None},
    )


def dynamic_nodes(choices: dict[str, NodeChoice]) -> frozenset[str]:
    """Nodes a rule quantizes dynamically (static mode: MatMul/Gemm/LSTM beside static int8 layers)."""
    return frozenset(label for label, c in choices.items() if c.precision == NodeStatus.DYNAMIC)


def adaround_nodes(choices: dict[str, NodeChoice]) -> frozenset[str]:
    """Nodes a rule gives learned rounding (AdaRound) without --adaround for every layer."""
    return frozenset(label for label, c in choices.items() if c.adaround)


def pinned_int8(choices: dict[str, NodeChoice]) -> frozenset[str]:
    """Nodes a rule wants in int8: the speed guard and the accuracy target leave them alone."""
    return frozenset(label for label, c in choices.items() if c.precision == NodeStatus.INT8)


def activation_overrides(graph: gs.Graph, placement: Placement, choices: dict[str, NodeChoice]
                         ) -> dict[str, ActivationOverride]:
    """Per-tensor method, percentile (the rules') and width (16 bits around int16 nodes) by source tensor.

    A tensor is quantized once for all its readers: when several selected nodes share one,
    16 bits win over 8, and for the method the later node in the graph wins.
    """
    status = {d.name: d.status for d in placement.nodes}
    overrides: dict[str, ActivationOverride] = {}
    for node in graph.nodes:
        label = node_label(node)
        choice = choices.get(label, NodeChoice())
        wide = status.get(label) == NodeStatus.INT16  # by a rule or by the accuracy target's int16 fallback
        if not wide and (status.get(label) != NodeStatus.INT8 or (choice.method is None and choice.percentile is None)):
            continue
        for tensor in quantized_tensors_of(node, placement):
            source = placement.activations[tensor]
            old = overrides.get(source, ActivationOverride())
            overrides[source] = ActivationOverride(choice.method or old.method, choice.percentile or old.percentile,
                                                   old.wide or wide)
    return overrides

