"""`cai generate`: parse the options, run the library's generation run, render what it returns."""

from typing import Annotated, Optional

import typer

from cai.cli.root import app, error_line, reports_errors, standalone
from cai.cli.options import (ClampOpt, FilteredOpt, KeepFilteredOpt, MinPreferenceOpt, NoLockOpt, SwapOpt,
                             TrustDisagreeingOpt, backend_options)
from cai.cli.render import RunProgress, err, generate_summary, setup_logging


@app.command(epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai generate examples/prompts.jsonl -o pairs.jsonl            [dim]# embedded SmolLM2-135M-Instruct[/dim]\n\n"
    "  cai generate prompts.txt --model Qwen/Qwen2.5-0.5B-Instruct --revisions 2 -o - | head\n\n"
    "  cat prompts.jsonl | cai generate - --constitution my.yaml -o pairs.jsonl\n\n"
    "  cai generate prompts.jsonl -o pairs.jsonl                      [dim]# run again: resumes where it stopped[/dim]"))
@reports_errors
@backend_options
def generate(
    prompts: Annotated[str, typer.Argument(help="Prompts: .jsonl (one object per line), .csv/.tsv (a header row), a text file (one prompt per line), any of them .gz/.bz2/.xz/.zst compressed; .parquet, .arrow/.feather, a folder saved by datasets, a Hub dataset id (owner/name); or - for stdin.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Where records go: a .jsonl file (named .jsonl.gz, .bz2, .xz or .zst: written compressed, resumable all the same), or - for stdout.")] = "-",
    constitution: Annotated[str, typer.Option("--constitution", "-c", help="A shipped constitution by name (see `cai constitution list`) or a path to a YAML file.")] = "harmless",
    templates: Annotated[str, typer.Option("--templates", help="Prompt templates: a shipped set by name or a folder of .jinja files.")] = "default",
    input_format: Annotated[Optional[str], typer.Option("--input-format", metavar="jsonl|csv|tsv|text|parquet|arrow", help="The prompts' format, for stdin or a file whose name does not say it (default: told by the suffix, else JSONL when the first line starts with '{', else text).", show_default=False)] = None,
    prompt_field: Annotated[str, typer.Option("--prompt-field", help="Field (or column) that holds the prompt: a string, a chat transcript (a messages list, ShareGPT conversations, or hh-rlhf 'Human: … Assistant: …' text), or a dotted path into nested fields. Without a 'prompt' field, 'messages' or 'conversations' is used.")] = "prompt",
    response_field: Annotated[Optional[str], typer.Option("--response-field", help="Field holding an existing answer to revise: only critique and revision run (a conversation ending with an assistant turn is taken the same way).", show_default=False)] = None,
    regenerate: Annotated[bool, typer.Option("--regenerate", help="Drop a conversation's final assistant turn and have the model answer anew.")] = False,
    split: Annotated[Optional[str], typer.Option("--split", help="The split of a datasets folder or dataset id (train, test, …).", show_default=False)] = None,
    reasoning: Annotated[str, typer.Option("--reasoning", metavar="auto|off|keep|drop", help="Reasoning models: off tells the model not to think (its chat template's switch, or chat_template_kwargs to a server); keep lets it think and stores each turn's reasoning apart; drop lets it think and discards it; auto is off where the template has the switch, else drop. Reasoning never enters chosen, rejected or the history of later turns.")] = "auto",
    reasoning_tags: Annotated[str, typer.Option("--reasoning-tags", metavar="OPEN,CLOSE", help="The tags around inline reasoning.")] = "<think>,</think>",
    revisions: Annotated[Optional[int], typer.Option("--revisions", "-r", help="Critique → revise rounds per prompt. Default: the constitution's (1).", show_default=False)] = None,
    sampling: Annotated[Optional[str], typer.Option("--sampling", metavar="random|all|cycle", help="Principle per prompt: random (weighted), all (one record per principle), cycle (round robin by the prompt's place in the input). Default: the constitution's (random).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for principle choice and sampling: same seed, same records.")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Conversations in flight at once [default: as many as the KV cache fits, up to 64; with --backend openai, --concurrency].", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Token limit of each generated turn.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (0 < p ≤ 1).")] = 0.95,
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help="Show the constitution's worked examples to the model as earlier turns.")] = True,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="Use only the first N prompts of the input.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an existing output (the default when it holds records of the same run): skip the ids it holds, append the rest.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Append to an output that holds records of a different run config.")] = False,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip malformed input lines (listed in the skipped file) instead of stopping.")] = False,
    truncate_long: Annotated[bool, typer.Option("--truncate-long", help="Cut prompts too long for the model's context instead of skipping them.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="standard|conversational", help="Record shape: standard (prompt/chosen/rejected strings) or conversational (lists of chat messages).")] = "standard",
    failures: Annotated[Optional[str], typer.Option("--failures", help="JSONL file for prompts whose requests failed after their retries [default: OUTPUT.failures.jsonl].", show_default=False)] = None,
    skipped: Annotated[Optional[str], typer.Option("--skipped", help="JSONL file for prompts skipped as too long or invalid [default: OUTPUT.skipped.jsonl].", show_default=False)] = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop the run at the first prompt that fails (instead of recording it in the failures file).")] = False,
    filter_: Annotated[bool, typer.Option("--filter/--no-filter", help="Clean revisions (preambles, role labels, next-turn debris) and drop pairs not worth training on: empty, unchanged, truncated, meta-talk, copied, repetitive. Counted by reason in the summary.")] = True,
    repairs: Annotated[int, typer.Option("--repairs", metavar="N", help="Tries again, up to N times a pair, a turn whose pair the filters would drop: a fresh sample of the revision (a response cut at --max-new-tokens is resampled at once); 0 turns it off. Each try has its own seed, so a resumed run makes the same records; a greedy run samples its repairs at temperature 0.5.")] = 3,
    repair_from: Annotated[str, typer.Option("--repair-from", metavar="revision|critique", help="What a repair samples anew: the revision, or the critique and the revision.")] = "revision",
    similarity: Annotated[float, typer.Option("--similarity", metavar="S", help="Drop a pair as unchanged when its revision is at least this similar to the original (0-1, over words).")] = 0.9,
    drop_refusals: Annotated[bool, typer.Option("--drop-refusals", help="Also drop pairs whose revision refuses (for constitutions that must not teach refusing).")] = False,
    keep_filtered: KeepFilteredOpt = False,
    filtered: FilteredOpt = None,
    judge: Annotated[bool, typer.Option("--judge", help="Label each kept pair with the model's own AI-feedback preference (see `cai judge`).")] = False,
    min_preference: MinPreferenceOpt = None,
    trust_disagreeing: TrustDisagreeingOpt = False,
    swap: SwapOpt = False,
    clamp: ClampOpt = None,
    shard: Annotated[Optional[str], typer.Option("--shard", metavar="K/N|auto", help="Take only shard K of N (1 ≤ K ≤ N), a deterministic slice of the prompts by id; combine shard outputs with `cai merge`. auto: K and N from a Slurm array job (SLURM_ARRAY_TASK_ID/_MIN/_COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with auto/N). An output name may hold {shard} (-o pairs.{shard}.jsonl).", show_default=False)] = None,
    grace: Annotated[float, typer.Option("--grace", metavar="SECONDS", help="After Ctrl-C, SIGTERM or SIGHUP: how long conversations in flight may take to finish before the run stops at once.")] = 15.0,
    no_lock: NoLockOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, logs or summary; errors and the line saying what was not made still show.")] = False,
    spec=None,
) -> None:
    """Generate (rejected, chosen) pairs from prompts.

    For each prompt the model answers, critiques its answer against a principle of the
    constitution, and revises it; one JSONL record per prompt is written as its conversation ends.
    """
    from dataclasses import asdict

    from cai.options import GenerateOptions
    from cai.run.generate import run
    from cai.signals import StopSignals

    setup_logging(quiet)
    options = GenerateOptions(
        **asdict(spec), constitution=constitution, templates=templates, input_format=input_format,
        prompt_field=prompt_field, response_field=response_field, regenerate=regenerate, split=split, reasoning=reasoning,
        reasoning_tags=reasoning_tags, revisions=revisions,
        sampling=sampling, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, few_shot=few_shot, limit=limit, resume=resume, overwrite=overwrite, force=force,
        skip_invalid=skip_invalid, truncate_long=truncate_long, format=fmt, failures=failures, skipped=skipped,
        fail_fast=fail_fast, filter=filter_, similarity=similarity, repairs=repairs, repair_from=repair_from, drop_refusals=drop_refusals,
        keep_filtered=keep_filtered, filtered=filtered, judge=judge, min_preference=min_preference,
        trust_disagreeing=trust_disagreeing, swap=swap,
        clamp=clamp, shard=shard, grace=grace, lock=not no_lock)

    def on_signal(name: str, seconds: float) -> None:
        err.print(f"[yellow]{name}: stopping: finishing the conversations in flight[/yellow] (up to {seconds:g} s; "
                  "Ctrl-C again to stop at once)", highlight=False)

    with StopSignals(grace, on_signal=on_signal, keep=standalone()) as stopper, RunProgress(quiet) as progress:
        summary = run(prompts, output, options, progress=progress, stop=stopper)
    if summary.nothing_to_do:
        if summary.problem():
            error_line(summary.problem())
        raise typer.Exit(summary.exit_code)
    if summary.stopped_by and summary.not_made:
        where = "stdout" if summary.output == "-" else summary.output
        err.print(f"[yellow]interrupted[/yellow] ({summary.stopped_by}): {summary.kept} records written to {where}."
                  + (" Run the same command again to continue where it stopped." if summary.output != "-" else ""),
                  highlight=False, soft_wrap=True)
    elif summary.stopped_by:
        err.print(f"[dim]{summary.stopped_by} came after the last prompt had started; every prompt finished[/dim]", highlight=False)
    if not quiet and not (summary.stopped_by and summary.not_made):
        generate_summary(summary)
    problem = summary.problem()
    if problem and not (summary.stopped_by and summary.not_made and not summary.failed and not summary.skipped):
        error_line(problem)
    raise typer.Exit(summary.exit_code)
