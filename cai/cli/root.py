"""The root command: the typer app, its sub-apps, and the one place errors become a red line and an
exit code."""

import functools

import typer
from rich.markup import escape

from cai import __version__
from cai.cli.render import as_flags, current_context, err
from cai.errors import CaiError, OptionError

app = typer.Typer(
    name="cai", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Constitutional-AI preference data: a model answers, critiques its answer against a "
         "principle and revises it; each (original, revision) pair becomes one JSONL record for "
         "DPO training (rejected, chosen).\n\n"
         "[bold]Examples[/bold]\n\n"
         "  cai generate examples/prompts.jsonl -o pairs.jsonl\n\n"
         "  cai generate prompts.txt --model Qwen/Qwen2.5-0.5B-Instruct --revisions 2 -o - | head\n\n"
         "  cai preview \"How do I pick a lock?\" --judge\n\n"
         "  cai constitution list",
)

constitution_app = typer.Typer(no_args_is_help=True, help="List and check constitution files.")
app.add_typer(constitution_app, name="constitution")


STANDALONE = "standalone"      # the context object main() runs the app with


def standalone() -> bool:
    """Whether `cai` runs as its own process (main() runs the app with STANDALONE as the click
    context's object), not inside another program (tests, notebooks): only then may a command
    leave its signal handlers in place until the process exits."""
    ctx = current_context()
    return ctx is not None and ctx.obj == STANDALONE


def error_line(message: str) -> None:
    """One red line on stderr; the options a library message names are shown as flags."""
    err.print(f"[bold red]error:[/bold red] {escape(as_flags(message))}", highlight=False, markup=True, soft_wrap=True)


def reports_errors(command):
    """Turn cai's errors into one red line on stderr and the error's exit code; the options
    an error names are shown as flags (`--device: …`)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from cai.signals import StopNow

        try:
            return command(*args, **kwargs)
        except CaiError as exc:
            error_line(exc.flag() if isinstance(exc, OptionError) else str(exc))
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # the reader went away (`cai generate … -o - | head`): stop quietly, as Unix tools do
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except StopNow as exc:          # before any work that a command reports itself
            err.print(f"[yellow]interrupted[/yellow] ({exc})")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"cai {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """cai: constitutional-AI preference data."""
