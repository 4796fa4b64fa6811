"""The `cai` command line: one module per command, each parsing its options, calling the library
and rendering what it returns on stderr. stdout carries records only."""

from cai.cli import compare, constitution, export, generate, judge, merge, preview, review, stats  # noqa: F401  (they register their commands)
from cai.cli.root import STANDALONE, app


def main() -> None:
    try:
        app(prog_name="cai", obj=STANDALONE)
    except SystemExit as exc:
        from cai import signals

        if not signals.received:
            raise
        # A run stopped by a signal has written and synced everything: leave now, rather than
        # through an interpreter shutdown during which a scheduler's next SIGTERM would kill
        # the process and turn its exit code 143 into a signal death.
        import os
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        os._exit(code)


__all__ = ["app", "main"]
