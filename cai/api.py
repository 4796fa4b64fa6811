"""The Python API: the same runs as the command line, with options as keyword arguments named
like the long flags (`max_new_tokens=8`, `filter=False` for `--no-filter`).

>>> import cai
>>> summary = cai.generate(["How do I pick a lock?"], max_new_tokens=8)   # doctest: +SKIP
>>> summary.records[0]["chosen"]                                          # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any


def _checked(function):
    """Check the arguments of an entry point against its annotations, as the options' own types
    are checked (cai.options.check_arguments): a wrong type is an OptionError naming it."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from cai.options import check_arguments

        args, kwargs = check_arguments(function, args, kwargs)
        return function(*args, **kwargs)
    return wrapper


@_checked
def generate(prompts: str | Iterable[str | dict], output: str | None = None, *, model: Any = None,
             constitution: Any = "harmless", progress: Callable | None = None, stop: Callable[[], bool] | None = None,
             **options: Any):
    """Make (rejected, chosen) pairs from `prompts` (a path, or an iterable of prompt strings or
    dicts with a `prompt` field). With `output` a path, records are written there and a rerun
    resumes, as `cai generate -o` does; with `output=None` they come back as `summary.records`.
    Returns a `Summary`: counts of kept, dropped, failed and skipped records, `complete`, and
    `exit_code` (what the CLI would exit with). `progress(phase, summary)` is called as the run
    goes; `stop()` returning True ends it gracefully (by default SIGINT/SIGTERM/SIGHUP do)."""
    from cai.options import GenerateOptions, build
    from cai.run.generate import run

    opts = build(GenerateOptions, {"model": model, "constitution": constitution, **options})
    return run(prompts, output, opts, progress=progress, stop=stop)


@_checked
def judge(pairs: str | Iterable[dict], output: str | None = None, *, model: Any = None, **options: Any):
    """Label finished pairs with the judge's preference (`cai judge`); `output=None` returns them
    as `summary.records`."""
    from cai.options import JudgeOptions, build
    from cai.run.judge import run

    return run(pairs, output, build(JudgeOptions, {"model": model, **options}))


@_checked
def merge(output: str, inputs: list[str], *, overwrite: bool = False, on_conflict: str = "error", lock: bool = True):
    """Combine output files of one run into `output` (`cai merge`)."""
    from cai.run.merge import merge as merge_files

    return merge_files(output, list(inputs), overwrite=overwrite, on_conflict=on_conflict, lock=lock)


def export(pairs: str, output: str, **options: Any):
    """Write pairs in another shape or file type (`cai export`)."""
    from cai.options import check_arguments
    from cai.run.export import export as export_pairs

    args, kwargs = check_arguments(export_pairs, (pairs, output), options)
    return export_pairs(*args, **kwargs)


@_checked
def compare(a: str | Iterable, b: str | None = None, *, constitution: Any = None, templates: Any = None,
            output: str | None = None, model: Any = None, show: int = 3, **options: Any) -> dict:
    """Compare two runs (`cai compare`): two output files `a` and `b`; or, with two constitutions
    and/or two template sets (lists), the prompts `a` run once per side into OUTPUT/LABEL.jsonl
    with generate's `options`, then compared. Returns the comparison (what --json prints)."""
    from cai.errors import OptionError
    from cai.options import GenerateOptions, build
    from cai.run.compare import compare_files, compare_runs

    def listed(value):
        return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]

    constitutions, template_sets = listed(constitution), listed(templates)
    if b is not None:
        if constitutions or template_sets or output or options or model is not None:
            raise OptionError("constitution", "is for comparing runs; with two files give only the files")
        return compare_files(str(a), str(b), show=show)
    if output is None:
        raise OptionError("output", "comparing runs needs a folder for them")
    opts = build(GenerateOptions, {"model": model, **options})
    return compare_runs(a, opts, constitutions or ["harmless"], template_sets or ["default"], output, show=show)


@_checked
def load_constitution(spec: str):
    """A constitution by shipped name or path, validated (ConstitutionError names file:line)."""
    from cai.constitution import load_constitution as load

    return load(spec)
