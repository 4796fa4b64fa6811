"""Domain errors. Every error a user can cause carries where it happened; the CLI renders it as
one line on stderr and exits with the error's code (2 bad input or usage, 1 run failure).

The library's messages (errors, log lines, summaries) name an option by its Python name in
backquotes (`max_new_tokens`, or `few_shot=False` for a switch turned off), never by a flag; the CLI
shows the flags of its command instead ("--max-new-tokens", "--no-few-shot": see
cai.cli.render.as_flags)."""

from __future__ import annotations

import re
from pathlib import Path

OPTION_NAME = re.compile(r"`([a-z][a-z0-9_]*)(=False)?`")     # how a message names an option


class CaiError(Exception):
    """Base of every error cai reports to a person (never with a traceback)."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CaiError):
    """A bad option value or combination of options."""

    exit_code = 2


class OptionError(UsageError):
    """A bad value of one option. `option` is its name as the Python API spells it (`device`,
    `max_new_tokens`). Other options named in the message are written in backquotes: `str()`
    reads "device: … `dtype` …" without them, and the CLI shows "--device: … --dtype …"."""

    def __init__(self, option: str, message: str):
        self.option = option
        self.detail = message
        super().__init__(f"{option}: {message.replace('`', '')}")

    def flag(self) -> str:
        """The command-line spelling: '--max-new-tokens: … --other-option …'."""
        text = OPTION_NAME.sub(lambda m: ("--no-" if m[2] else "--") + m[1].replace("_", "-"), self.detail)
        return f"--{self.option.replace('_', '-')}: {text}"


class OutputError(CaiError):
    """An output that cannot be written, locked or continued (full disk, another run holds it)."""

    exit_code = 1

    def __init__(self, path: str | Path, message: str, exit_code: int | None = None):
        self.path = str(path)
        if exit_code is not None:
            self.exit_code = exit_code
        super().__init__(f"{self.path}: {message}")


class InputError(CaiError):
    """A problem in a file the user gave us, located by path, line and (optionally) field."""

    exit_code = 2

    def __init__(self, path: str | Path, message: str, line: int | None = None,
                 column: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        self.field = field
        self.index: int | None = None     # an invalid prompt line's place in the input (set by read_prompts)
        where = self.path
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")
        self.detail = message


class ConstitutionError(InputError):
    """A constitution file that does not parse or validate. `problems` holds every problem
    found in the file (each a ConstitutionError of its own); this error is the first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.problems: list[ConstitutionError] = [self]


class TemplateError(InputError):
    """A prompt template that does not parse or render."""


class ModelError(CaiError):
    """A model that cannot be found or loaded."""

    exit_code = 2


class BackendError(CaiError):
    """Generation failed while the run was under way."""

    exit_code = 1
