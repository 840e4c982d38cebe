"""The recipe as a run applies it: its choice per node of this model (with --exclude as rules), and the
effective recipe --save-recipe writes, which rebuilds the model without timing or searching."""

from __future__ import annotations

from onnxq.commands.checks import unmatched_excludes
from onnxq.commands.recipe import NodeChoice, Recipe, Rule, Selector, node_list
from onnxq.commands.request import QuantizeRequest, holdout_fraction
from onnxq.enums import Format, Mode, NodeStatus
from onnxq.errors import UsageError
from onnxq.passes.recovery import RecoveryOptions
from onnxq.quant.ir import Graph
from onnxq.quant.ops import DYNAMIC_OPS
from onnxq.quant.plan import QuantSettings


def recipe_choices(request: QuantizeRequest, graph: Graph, *, with_exclude: bool = False
                   ) -> tuple[dict[str, NodeChoice], list[str]]:
    """The recipe's choice per node, and notes on rules that select nothing or cannot apply.

    `with_exclude`: --exclude as float rules (static mode applies --exclude in the placement instead).
    """
    nodes = node_list(graph)
    rules = request.recipe.rules + (exclude_rules(request, graph) if with_exclude else [])
    choices = Recipe(rules=rules).choices(nodes)
    notes = [f"recipe rule {n} ({request.recipe.rules[n - 1].match.to_dict()}) selects no node"
             for n in request.recipe.unmatched_rules(nodes)] + unmatched_excludes(request.exclude, nodes)
    if request.output_format == Format.QOPERATOR and any(c.precision == NodeStatus.INT16 for c in choices.values()):
        raise UsageError("16-bit activations (recipe precision: int16) have no integer operators: use --format qdq")
    if request.mode == Mode.STATIC and any(c.weights == "int4" for c in choices.values()):
        raise UsageError("int4 weights (recipe weights: int4) need --mode weight-only")
    ops = dict(nodes)
    wrong = [label for label, c in choices.items()
             if c.precision == NodeStatus.DYNAMIC and ops.get(label) not in DYNAMIC_OPS]
    if wrong or (request.mode == Mode.WEIGHT_ONLY and any(c.precision == NodeStatus.DYNAMIC for c in choices.values())):
        what = f"{ops.get(wrong[0])} {wrong[0]}" if wrong else "--mode weight-only"
        raise UsageError(f"precision: dynamic applies to MatMul, Gemm and LSTM layers in static or dynamic mode, "
                         f"not to {what}")
    return choices, notes


def exclude_rules(request: QuantizeRequest, graph: Graph) -> list[Rule]:
    """--exclude X as recipe rules: X selects an op type if the model has one by that name, else a node."""
    op_types = {op for _, op in node_list(graph)}
    return [Rule(Selector(op_type=(x,)) if x in op_types else Selector(name=x), precision="float",
                 reason="excluded by the user") for x in request.exclude]


def effective_recipe(request: QuantizeRequest, settings: QuantSettings, graph: Graph,
                     automatic: dict[str, tuple[str, str]], recovery: RecoveryOptions | None = None,
                     searched_adaround: frozenset[str] = frozenset()) -> Recipe:
    """The recipe that rebuilds this model without timing or searching: the settings as used, the
    user's rules, --exclude, and the speed guard's, the target search's and the automatic search's
    choices (`automatic`: label -> (precision, why); `recovery` as applied; `searched_adaround`: the
    layers the automatic search gave AdaRound) as rules."""
    values = {"mode": request.mode, "per_channel": settings.per_channel, "weight_range": settings.weight_range,
              "auto": False}  # the recipe holds the search's choice: rebuilding it searches nothing
    if holdout_fraction(request) is not None:  # a rebuild calibrates on the same samples
        values["holdout"] = holdout_fraction(request)
    if request.smooth_alpha is not None:
        values.update(smooth_alpha=request.smooth_alpha, smooth_mul=request.smooth_mul)
    if request.mode == Mode.STATIC:
        recovery = recovery or RecoveryOptions(request.bias_correction, request.adaround_seconds)
        values.update(method=settings.method, percentile=settings.percentile, symmetric=settings.symmetric,
                      speed_guard="off", format=request.output_format, equalize=request.equalize,
                      int8_gates=request.int8_gates, bias_correction=recovery.bias_correction,
                      adaround=request.adaround_seconds is not None)
        if recovery.adaround_seconds is not None:
            values["adaround_seconds"] = recovery.adaround_seconds
    elif request.mode == Mode.WEIGHT_ONLY:
        values.update(weight_bits=request.weight_only.bits, block_size=request.weight_only.block_size,
                      weight_zero_points=not request.weight_only.symmetric, weight_method=request.weight_only.method)
    rules = request.recipe.rules + exclude_rules(request, graph)
    rules += [Rule(Selector(name=label), precision=precision, reason=why)
              for label, (precision, why) in sorted(automatic.items())]
    rules += [Rule(Selector(name=label), adaround=True, reason="automatic search: AdaRound where it pays")
              for label in sorted(searched_adaround)]
    return Recipe({**request.recipe.settings, **values}, rules)

