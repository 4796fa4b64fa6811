"""`cai constitution list|show|validate|schema|init`."""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cai.cli.root import constitution_app, reports_errors
from cai.cli.render import err
from cai.errors import UsageError


@constitution_app.command("list")
@reports_errors
def constitution_list() -> None:
    """The shipped constitutions, with their principle counts."""
    from cai.constitution import load_constitution, shipped_constitutions

    table = Table(show_header=True)
    for column in ("name", "principles", "few-shot", "description"):
        table.add_column(column)
    for name in shipped_constitutions():
        c = load_constitution(name)
        table.add_row(name, str(len(c.principles)), str(len(c.few_shot)), c.description)
    Console().print(table)


@constitution_app.command("show")
@reports_errors
def constitution_show(
    spec: Annotated[str, typer.Argument(metavar="NAME|PATH", help="A shipped name or a path to a YAML file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the parsed constitution as JSON.")] = False,
) -> None:
    """The principles of a constitution, as a table (or JSON for machines)."""
    import json
    from dataclasses import asdict

    from cai.constitution import load_constitution

    c = load_constitution(spec)
    if as_json:
        print(json.dumps({"ref": c.ref, **asdict(c)}, ensure_ascii=False, indent=2))
        return
    out = Console()
    out.print(f"[bold]{c.name}[/bold] {c.ref}  version {c.version}  ({c.path})", highlight=False)
    if c.description:
        out.print(c.description, highlight=False)
    out.print(f"defaults: revisions={c.defaults.revisions} sampling={c.defaults.sampling}; "
              f"{len(c.few_shot)} few-shot example(s)", highlight=False)
    table = Table(show_header=True, show_lines=True)
    table.add_column("id", no_wrap=True)
    table.add_column("weight")
    for column in ("tags", "critique", "revision"):
        table.add_column(column, overflow="fold")
    for p in c.principles:
        table.add_row(p.id, f"{p.weight:g}", ", ".join(p.tags), p.critique, p.revision)
    out.print(table)


@constitution_app.command("validate")
@reports_errors
def constitution_validate(
    paths: Annotated[list[str], typer.Argument(help="Constitution files (or shipped names) to check.")],
) -> None:
    """Check constitution files and print every problem; exit 0 when all are valid, 2 otherwise
    (fit for pre-commit)."""
    from cai.constitution import load_constitution
    from cai.errors import ConstitutionError

    failed = 0
    for spec in paths:
        try:
            c = load_constitution(spec)
        except ConstitutionError as exc:
            failed += 1
            for problem in exc.problems:
                err.print(f"[bold red]error:[/bold red] {problem}", highlight=False, soft_wrap=True)
            continue
        err.print(f"[green]ok[/green] {spec}: {c.ref}, {len(c.principles)} principles", highlight=False)
    if failed:
        raise typer.Exit(2)


@constitution_app.command("schema")
def constitution_schema() -> None:
    """Print the JSON Schema of constitution files (for yaml-language-server and other editors)."""
    import json

    from cai.constitution import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))


@constitution_app.command("init")
@reports_errors
def constitution_init(
    path: Annotated[str, typer.Argument(help="Where to write the starter file (- for stdout).")] = "constitution.yaml",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter constitution that validates, ready to edit."""
    from cai.constitution import starter_text

    text = starter_text()
    if path == "-":
        sys.stdout.write(text)
        return
    target = Path(path)
    if target.exists() and not force:
        raise UsageError(f"{path}: file exists; pass --force to overwrite it")
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror}") from None
    err.print(f"wrote {path}; check your edits with: cai constitution validate {path}", highlight=False)
