"""`cai generate`: parse the options, run the library's generation run, render what it returns."""

from typing import Annotated, Optional

import typer

from cai.cli.app import app, error_line, reports_errors
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
    # issue 33: sampled pairs labelled by a feedback model (RL-CAI), and the first stage's variants
    samples: Annotated[Optional[int], typer.Option("--samples", metavar="N", help="The paper's second stage: sample N (≥ 2) answers per prompt (each seeded on its own; set --temperature above 0) and let the feedback model pick the better of each pair; records are best against worst (or, with --min-margin, every pair decided enough), the label in judge.label and the whole comparison in meta.feedback.", show_default=False)] = None,
    principles_per_comparison: Annotated[int, typer.Option("--principles-per-comparison", metavar="K", help="With --samples: principles asked per comparison (each in both orders; drawn by --seed, weighted); the label is their mean probability.")] = 1,
    min_margin: Annotated[Optional[float], typer.Option("--min-margin", metavar="M", help="With --samples: a record for every pair whose margin |2p - 1| is at least M (0-1), instead of best against worst; a prompt with none is dropped (reason: margin).", show_default=False)] = None,
    cot: Annotated[bool, typer.Option("--cot", help="With --samples: the feedback model reasons step by step before it answers; the reasoning is stored in meta.feedback.cot, and labels are clamped to 0.4,0.6 unless --clamp says otherwise.")] = False,
    judge_model: Annotated[Optional[str], typer.Option("--judge-model", help="The feedback model of --samples or --judge (default: the policy model itself): a local folder, a .gguf file, a Hub id, or with --judge-backend openai the name the server serves.", show_default=False)] = None,
    judge_backend: Annotated[Optional[str], typer.Option("--judge-backend", metavar="hf|openai", help="The feedback model's backend [default: hf, or openai with --judge-base-url].", show_default=False)] = None,
    judge_base_url: Annotated[Optional[list[str]], typer.Option("--judge-base-url", help="The feedback model's server (API root); give it again for more servers of the same model.", show_default=False)] = None,
    judge_api_key_env: Annotated[Optional[str], typer.Option("--judge-api-key-env", metavar="NAME", help="The environment variable holding the feedback server's API key.", show_default=False)] = None,
    judge_concurrency: Annotated[Optional[int], typer.Option("--judge-concurrency", help="Requests in flight at once to the feedback server [default: --concurrency].", show_default=False)] = None,
    critique: Annotated[bool, typer.Option("--critique/--no-critique", help="--no-critique: each round revises the answer directly against its principle, without a critique first (the paper found it as good for large models).")] = True,
    keep_rounds: Annotated[bool, typer.Option("--keep-rounds", help="With --revisions above 1: a record for each round (its revision against the one before it) as well as the final pair.")] = False,
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
        clamp=clamp, shard=shard, grace=grace, lock=not no_lock,
        # issue 33
        samples=samples, principles_per_comparison=principles_per_comparison, min_margin=min_margin, cot=cot,
        judge_model=judge_model, judge_backend=judge_backend, judge_base_url=judge_base_url,
        judge_api_key_env=judge_api_key_env, judge_concurrency=judge_concurrency, critique=critique,
        keep_rounds=keep_rounds)

    def on_signal(name: str, seconds: float) -> None:
        err.print(f"[yellow]{name}: stopping: finishing the conversations in flight[/yellow] (up to {seconds:g} s; "
                  "Ctrl-C again to stop at once)", highlight=False)

    import importlib

    app_module = importlib.import_module("cai.cli.app")     # the module (`cai.cli.app` the name is the Typer app)

    with StopSignals(grace, on_signal=on_signal, keep=app_module.standalone) as stopper, RunProgress(quiet) as progress:
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
