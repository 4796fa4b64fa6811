"""The `cai` command line: one module per command, each parsing its options, calling the library
and rendering what it returns on stderr. stdout carries records only."""

from cai.cli import constitution, export, generate, judge, merge, stats  # noqa: F401  (they register their commands)
from cai.cli.app import app


def main() -> None:
    app(prog_name="cai")


__all__ = ["app", "main"]
