"""How an option is declared: once, as a field of an options dataclass, with its flag, help and
choices in the field's metadata. The command line's parameters (`cai.cli.options.declared`), the
Python API's keyword checking (`cai.options.build`), `--config` files and `--print-config`, and
the documentation's option tables are all read from these fields; nothing else declares an option.

    max_new_tokens: int = option(256, "--max-new-tokens", help="Token limit of each generated turn.")

A field without `option()` is not on the command line (the Python API and config files still take
it). The CLI type is read from the annotation; give `cli` where the annotation also admits what
only Python can pass (`str | Constitution`: the command line gives the string)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The --help panels, in the order they are shown; an option names its own.
PANELS = ("Input", "Model", "Generation", "Curation", "Judge", "Output and resume", "Run")


@dataclass(frozen=True)
class Flag:
    """What the command line shows of one option."""

    flags: tuple[str, ...]                # "--max-new-tokens", "-n"; "--filter/--no-filter" for an on/off pair
    help: str
    choices: tuple[str, ...] = ()         # the values it takes (checked by `check_choices`; the metavar names them)
    metavar: str | None = None
    show_default: bool = True
    cli: Any = None                       # the type the command line parses, where the annotation is wider
    invert: bool = False                  # "--no-lock" sets `lock` False: the flag is the field's negation
    panel: str = "Run"

    @property
    def long(self) -> str:
        """The long flag as users write it (`--no-lock`, `--filter`)."""
        first = next(f for f in self.flags if f.startswith("--"))
        return first.split("/")[0]


def option(default: Any = None, *flags: str, help: str, choices: tuple[str, ...] = (), metavar: str | None = None,
           show_default: bool | None = None, cli: Any = None, invert: bool = False, panel: str = "Run",
           factory: Any = None):
    """A dataclass field that is also a command-line option (see the module's docstring).
    `show_default` defaults to False where the default is None (nothing worth showing)."""
    if panel not in PANELS:
        raise ValueError(f"unknown panel {panel!r}")
    shown = default is not None if show_default is None else show_default
    meta = {"flag": Flag(tuple(flags), help, tuple(choices), metavar or ("|".join(choices) if choices else None),
                         shown, cli, invert, panel)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> Flag | None:
    """The command-line declaration of a dataclass field, or None if it has none."""
    return f.metadata.get("flag")


def flags(cls) -> dict[str, Flag]:
    """Field name → its Flag, for every field of `cls` that is a command-line option."""
    return {f.name: flag_of(f) for f in dataclasses.fields(cls) if flag_of(f) is not None}


def check_choices(options) -> None:
    """Every option of `options` that declares its choices holds one of them (or None where its
    default is None)."""
    from cai.errors import OptionError

    for f in dataclasses.fields(options):
        meta = flag_of(f)
        if meta is None or not meta.choices:
            continue
        value = getattr(options, f.name)
        if value is None and f.default is None:
            continue
        if value not in meta.choices:
            raise OptionError(f.name, f"unknown value '{value}'; choose from {', '.join(meta.choices)}")
