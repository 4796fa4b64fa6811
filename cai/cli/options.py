"""A command's options come from its options dataclass (cai/options.py and each backend's
Settings), where each is declared once with its flag, help and choices (cai/declare.py).
`declared(GenerateOptions)` gives a command those options as typer parameters, grouped in
--help panels, and hands them over as one options object `options`; with `config=True` the
command also takes `--config FILE` (values for the same fields; flags given on the command line
win) and `--print-config` (the effective configuration as YAML on stdout, then exit)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from cai.declare import PANELS, flag_of
from cai.options import GenerateOptions

CONFIG_PARAMETERS = [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option("--config", metavar="FILE", rich_help_panel="Run", show_default=False, help=(
            "Read the run's options from a YAML file (keys as the long flags, `max_new_tokens` or "
            "`max-new-tokens`; `prompts` and `output` too); flags given on the command line win. "
            "Write one with --print-config."))]),
    inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--print-config", rich_help_panel="Run", help=(
            "Print the run's effective configuration (this command line, its --config and the defaults) as YAML "
            "on stdout and exit, running nothing."))]),
]


def cli_type(f: dataclasses.Field, hint) -> Any:
    """The type typer parses for field `f` (its Flag's `cli`, else the annotation)."""
    meta = flag_of(f)
    if meta.cli is not None:
        return meta.cli
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return Optional[args[0]]
    return hint


def cli_parameters(cls, names: list[str]) -> list[inspect.Parameter]:
    """The typer parameters of `cls`'s options `names`, each Annotated with its typer.Option."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    params = []
    for name in names:
        f, meta = by_name[name], flag_of(by_name[name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        param = parameter_name(cls, name)
        if meta.invert:
            kind, default = bool, not default
        else:
            kind = cli_type(f, hints[name])
            default = list(default) if isinstance(default, tuple) and default else (None if default == () else default)
        info = typer.Option(*meta.flags, help=escape(meta.help), metavar=meta.metavar, show_default=meta.show_default,
                            rich_help_panel=meta.panel)
        params.append(inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, info]))
    return params


def option_names(cls, *, exclude=(), only=None) -> list[str]:
    """The command-line options of `cls` (less `exclude`, or just `only`), in the order the
    dataclass declares them (`declared` places them in their --help panels)."""
    return [f.name for f in dataclasses.fields(cls) if flag_of(f) is not None
            and f.name not in exclude and (only is None or f.name in only)]


def from_cli(cls, names: list[str], values: dict[str, Any]) -> dict[str, Any]:
    """The fields of `cls` that the command-line `values` (typer's, by parameter name) give."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    found = {}
    for name in names:
        meta = flag_of(by_name[name])
        if meta.invert:
            found[name] = not values[parameter_name(cls, name)]
            continue
        value = values[name]
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        elif value is None and by_name[name].default == ():
            value = ()
        found[name] = value
    return found


def parameter_name(cls, name: str) -> str:
    """The typer parameter of option `name`: its own name, or `no_NAME` for an inverted flag (--no-lock)."""
    meta = flag_of(next(f for f in dataclasses.fields(cls) if f.name == name))
    return "no_" + name if meta.invert else name


def _place(parameter: inspect.Parameter) -> int:
    """Where a parameter goes in --help: arguments first, then options by panel (a stable sort
    keeps the declared order within one)."""
    if parameter.annotation is typer.Context:
        return len(PANELS)
    info = typing.get_args(parameter.annotation)[1]
    if isinstance(info, typer.models.ArgumentInfo):
        return -1
    return PANELS.index(info.rich_help_panel or "Run")


# typer hands the command its context through a parameter of this type (which flags were given)
CONTEXT = inspect.Parameter("typer_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
CONFIG_ARGUMENTS = ("prompts", "pairs", "output")      # a command's own arguments that a config file may hold


def declared(cls, *, exclude=(), only=None, config: str | None = None):
    """Give `command` the options of `cls` as typer parameters after its own (its arguments and
    what only the CLI has, such as --quiet); the command receives them as `options`, an instance
    of `cls`. With `config` (the command's name), the
    command takes --config and --print-config too (see the module's docstring)."""
    names = option_names(cls, exclude=exclude, only=only)
    block = cli_parameters(cls, names)

    def decorate(command):
        signature = inspect.signature(command)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
               if p.name != "options"]
        extra = [*CONFIG_PARAMETERS, CONTEXT] if config else []

        @functools.wraps(command)
        def wrapper(**kwargs):
            fields = from_cli(cls, names, {p.name: kwargs.pop(p.name) for p in block})
            if config:
                fields = _configured(cls, fields, kwargs, [p.name for p in own if p.name in CONFIG_ARGUMENTS],
                                     kwargs.pop("config"), kwargs.pop("print_config"), config,
                                     kwargs.pop("typer_context"))
            return command(options=cls(**fields), **kwargs)

        parameters = sorted([*own, *block, *extra], key=_place)
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__          # typer must read the new signature, not the command's
        return wrapper

    return decorate


def _configured(cls, fields: dict, arguments: dict, own: list[str], path: str | None, printing: bool,
                command: str, context) -> dict:
    """`fields` (the command line's) over those of the config file `path`, over the defaults;
    the command's own `arguments` likewise (updated in place). With `printing`, the effective
    configuration goes to stdout and the command exits."""
    from cai.runconfig import effective, read_config, render

    def given(parameter: str) -> bool:
        source = context.get_parameter_source(parameter)
        return source is not None and source.name != "DEFAULT"

    if path is not None:
        from_file, own_from_file = read_config(path, cls, own=tuple(own), names=set(fields))
        fields = {name: value if given(parameter_name(cls, name)) or name not in from_file else from_file[name]
                  for name, value in fields.items()}
        for name, value in own_from_file.items():
            if not given(name):
                arguments[name] = value
    if printing:
        options = cls(**fields)
        options.check()
        sys.stdout.write(render(effective(options, {name: arguments.get(name) for name in own}, names=set(fields)), command))
        raise typer.Exit(0)
    return fields


def option_annotation(cls, name: str):
    """The typer annotation of one declared option, for a command that takes it without the rest
    of `cls` (`cai merge --no-lock`)."""
    return cli_parameters(cls, [name])[0].annotation


NoLockOpt = option_annotation(GenerateOptions, "lock")     # a parameter named `no_lock`
