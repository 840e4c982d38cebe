"""Command options as one table: the click declarations in onnxq.cli are what the Python API takes too.

A command's callback hands its values, with where each came from (the command line, the
environment, the default), to a plain function in onnxq.cli that builds the library request.
onnxq.api resolves keyword arguments against the same declarations (names, defaults, types,
ranges, choices, environment variables such as ONNXQ_FAST) and calls the same functions, so the
CLI and the API cannot drift apart. A keyword is the long option name with `_` for `-`:
`--weight-bits` is `weight_bits`, `--format` is `format`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import click
from click.core import ParameterSource

from onnxq.errors import UsageError

try:  # what click 8.3+ keeps in a context for an option without a value (before a callback sees None)
    from click._utils import UNSET
except ImportError:  # older click stores None
    UNSET = None

CLI_ONLY = {"as_json", "quiet", "verbose", "report_path"}  # how the CLI shows results; the API returns them
EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


@dataclass
class CommandOptions:
    """A command's option values by parameter name, and which of them the user gave."""

    values: dict[str, Any]
    sources: dict[str, ParameterSource]
    given: frozenset[str]  # typed on the command line (or passed to the API): checked to have an effect

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def is_default(self, name: str) -> bool:
        """Neither given nor from the environment: a recipe's setting may replace it."""
        return self.sources.get(name) not in EXPLICIT

    @classmethod
    def current(cls, values: dict[str, Any]) -> CommandOptions:
        """The callback's values with their sources from click's current context."""
        context = click.get_current_context()
        sources = {name: context.get_parameter_source(name) for name in values}
        return cls(dict(values), sources, frozenset(n for n, s in sources.items() if s == ParameterSource.COMMANDLINE))


def keywords(command: click.Command) -> dict[str, str]:
    """API keyword -> parameter name for the command's options (not its arguments, -o, or display options)."""
    names = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden or param.name in CLI_ONLY or param.name == "output":
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = param.name
    return names


def defaults(command: click.Command) -> dict[str, Any]:
    """Each API keyword's value when it is not given: the declared default, or the environment's (ONNXQ_FAST)."""
    fixed = {param.name: None for param in command.params if isinstance(param, click.Argument)}
    options, _ = resolve(command, {}, {**fixed, "output": None}, command.name or "command")
    return {keyword: options[name] for keyword, name in keywords(command).items()}


def resolve(command: click.Command, given: Mapping[str, Any], fixed: Mapping[str, Any], where: str,
            objects: frozenset[str] = frozenset()) -> tuple[CommandOptions, click.Context]:
    """Keyword arguments -> CommandOptions, through the command's own declarations.

    `fixed`: values set by the API function itself (the model, the output path); `objects`: parameters whose
    values the caller has already made what the request builders take (data loaders, shapes as a dict): passed
    through as they are. None means "not given".
    Returns the click context too: push it (`with context:`) to run code that reads option names from it.
    """
    names = keywords(command)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"{where}() has no option {unknown[0]!r}; its options: {', '.join(sorted(names))}")
    by_name = {param.name: param for param in command.params}
    context = click.Context(command, info_name=where)
    opts, passed, explicit = {}, {}, set()
    for keyword, value in given.items():
        name = names[keyword]
        param = by_name[name]
        if value is None:
            continue  # not given
        if name in objects:
            passed[name] = value
        else:
            opts[name] = _cli_form(param, value)
        if not (_is_flag(param) and value is False):  # a flag cannot be given as off on the command line
            explicit.add(name)
    with context:
        for param in command.params:
            if param.name in fixed or param.name in passed:
                continue
            try:
                param.handle_parse_result(context, opts, [])
            except click.BadParameter as exc:
                keyword = next(k for k, n in names.items() if n == param.name)
                raise UsageError(f"{keyword}={given.get(keyword)!r}: {exc.format_message()}") from None
    values = {**{name: None if value is UNSET else value for name, value in context.params.items()}, **passed,
              **fixed}
    sources = {name: context.get_parameter_source(name) or ParameterSource.DEFAULT for name in context.params}
    sources.update(dict.fromkeys([*passed, *fixed], ParameterSource.COMMANDLINE))
    return CommandOptions(values, sources, frozenset(explicit)), context


def _is_flag(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and param.is_flag


def _cli_form(param: click.Parameter, value: Any) -> Any:
    """A Python value as click would receive it from the command line."""
    if param.multiple and isinstance(value, (str, os.PathLike)):
        return (value,)
    if param.multiple:
        return tuple(value)
    if isinstance(param.type, click.Choice) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # weight_bits=4 as --weight-bits 4
    if value is True and isinstance(param, click.Option) and not param.is_flag and param.flag_value is not None:
        return param.flag_value  # ray=True: --ray without an address
    return value
