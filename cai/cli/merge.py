"""`cai merge`: combine the output files of one run."""

from typing import Annotated

import typer

from cai.cli.root import app, reports_errors
from cai.cli.options import NoLockOpt
from cai.cli.render import err, setup_logging


@app.command("merge", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai merge pairs.jsonl shard-*.jsonl          [dim]# shards written with --shard K/N[/dim]"))
@reports_errors
def merge(
    output: Annotated[str, typer.Argument(help="The combined .jsonl file to write (- for stdout).", show_default=False)],
    shards: Annotated[list[str], typer.Argument(help="Files written by cai generate (e.g. with --shard K/N).", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    on_conflict: Annotated[str, typer.Option("--on-conflict", metavar="error|first|last", help="One id with two different records: stop and write nothing (error), or keep the first or the last one read.")] = "error",
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Merge the shards that are there even if their manifests say shards of the array are missing or did not finish.")] = False,
    no_lock: NoLockOpt = False,
) -> None:
    """Combine output files of one run (shards, or runs on several machines) into one, keeping
    each id once, and their side files (dropped pairs, failures, skipped prompts) into OUTPUT's,
    so every prompt stays accounted for. Torn lines (a killed writer) and foreign lines (not a
    record, or a record of a different run config) are left out and reported with file:line;
    one id with two different records is a conflict; records of two shapes are refused."""
    import logging

    from cai.output import SIDE_FILES
    from cai.run.merge import MergeConflict
    from cai.run.merge import merge as merge_files

    setup_logging(False)
    log = logging.getLogger("cai")
    try:
        summary = merge_files(output, shards, overwrite=overwrite, on_conflict=on_conflict, lock=not no_lock,
                              allow_partial=allow_partial)
    except MergeConflict as exc:
        for line in exc.conflicts[:10]:
            log.warning("conflict: %s", line)
        raise
    if summary.review:
        from cai.cli.export import _review_line

        _review_line(summary.review)
    for problem in summary.problems[:10]:
        log.warning("%s", problem)
    if len(summary.problems) > 10:
        log.warning("and %d more lines left out", len(summary.problems) - 10)
    for line in summary.conflicts[:10]:
        log.warning("conflict: %s (kept the %s)", line, on_conflict)
    if summary.shards is not None and summary.shards.problem():
        log.warning("merged anyway (--allow-partial): %s", summary.shards.problem())
    err.print(f"merged {summary.files} files: {summary.kept} records, {summary.duplicate} duplicate ids dropped, "
              f"{summary.torn} torn and {summary.foreign} foreign lines left out"
              + (f", {len(summary.conflicts)} conflicts (kept the {on_conflict})" if summary.conflicts else "")
              + (f" from {len(summary.shards.present)} of {summary.shards.count} shards" if summary.shards else "")
              + f" → {'stdout' if output == '-' else output}"
              + "".join(f"; {count} {name} → {output}{SIDE_FILES[kind]}" for kind, name in
                        (("filtered", "dropped pairs"), ("failures", "failures"), ("skipped", "skipped prompts"))
                        if (count := summary.side.get(kind))), highlight=False, soft_wrap=True)
