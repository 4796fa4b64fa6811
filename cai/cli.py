"""The `cai` command line. Parses options, builds the objects, draws progress and summaries on
stderr. stdout carries records only. No generation logic lives here."""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from cai import __version__
from cai.errors import BackendError, CaiError, UsageError
from cai.records import to_format

err = Console(stderr=True)
log = logging.getLogger("cai")

app = typer.Typer(
    name="cai", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Constitutional-AI preference data: a model answers, critiques its answer against a "
         "principle and revises it; each (original, revision) pair becomes one JSONL record for "
         "DPO training (rejected, chosen).\n\n"
         "[bold]Examples[/bold]\n\n"
         "  cai generate examples/prompts.jsonl -o pairs.jsonl\n\n"
         "  cai generate prompts.txt --model Qwen/Qwen2.5-0.5B-Instruct --revisions 2 -o - | head\n\n"
         "  cai constitution list",
)
constitution_app = typer.Typer(no_args_is_help=True, help="List and check constitution files.")
app.add_typer(constitution_app, name="constitution")


def reports_errors(command):
    """Turn cai's errors into one red line on stderr and the error's exit code."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CaiError as exc:
            err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:      # before any work that a command reports itself
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"cai {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """cai: constitutional-AI preference data."""


def _check_options(**values) -> None:
    """Range and choice checks of the options given, reported as one line each (click's own are
    multi-line boxes). Commands pass the options they have; each is checked before any input is read."""
    from cai.backends.hf import DEVICES, DTYPES
    from cai.constitution import SAMPLING_MODES

    at_least_one = ("revisions", "batch_size", "max_new_tokens", "limit", "threads")
    for name in at_least_one:
        if values.get(name) is not None and values[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be at least 1 (got {values[name]})")
    if values.get("temperature", 0) < 0:
        raise UsageError(f"--temperature: must be 0 (greedy) or more (got {values['temperature']:g})")
    if not 0 < values.get("top_p", 1) <= 1:
        raise UsageError(f"--top-p: must be greater than 0 and at most 1 (got {values['top_p']:g})")
    for name, allowed in (("sampling", SAMPLING_MODES), ("device", DEVICES), ("dtype", DTYPES)):
        if values.get(name) is not None and values[name] not in allowed:
            raise UsageError(f"--{name}: unknown value '{values[name]}'; choose from {', '.join(allowed)}")


class _StderrHandler(logging.Handler):
    """Log lines on stderr, one line each however long (greppable, never wrapped mid-path)."""

    STYLES = {"WARNING": "yellow", "ERROR": "red", "INFO": "dim"}

    def emit(self, record: logging.LogRecord) -> None:
        line = Text(f"{record.levelname.lower()}: ", style=self.STYLES.get(record.levelname, ""))
        line.append(record.getMessage())
        err.print(line, soft_wrap=True, highlight=False)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("cai")
    logger.handlers[:] = [_StderrHandler()]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# Options that `generate` and `judge` share: which model, and how to reach it.
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model: a local folder, a .gguf file or a Hub id. Default: the embedded SmolLM2-135M-Instruct.", show_default=False)]
BackendOpt = Annotated[str, typer.Option("--backend", metavar="hf|openai", help="hf: a local transformers model; openai: an OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve) at --base-url.")]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="With --backend openai: the server's API root, e.g. http://127.0.0.1:8000/v1.", show_default=False)]
ApiKeyEnvOpt = Annotated[str, typer.Option("--api-key-env", help="With --backend openai: the environment variable holding the API key (never printed or recorded).")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="With --backend openai: seconds before a request is given up and retried.")]
RetriesOpt = Annotated[int, typer.Option("--max-retries", help="With --backend openai: retries of a failed request (connection errors, timeouts, 429, 5xx).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch [default: one per core].", show_default=False)]
PlainChatOpt = Annotated[bool, typer.Option("--plain-chat-format", help="For a tokenizer without a chat template: use cai's plain 'User:/Assistant:' format.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints, which can run code: only for models you trust.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda|mps", help="Where the model runs.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", metavar="auto|float32|bfloat16|float16|int8", help="Weights dtype. GPU: auto is bfloat16 (float16 without bf16). CPU: auto and float16 keep linear weights in float16 and compute in float32 (fast, same results to float16 rounding); float32 is plain float32; int8 quantizes the decoder's linears (faster still, slightly less exact, and its greedy output depends on how conversations are batched).")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model's repository to run.")]
# What to keep: shared by `generate --judge` and `judge`.
MinPreferenceOpt = Annotated[Optional[float], typer.Option("--min-preference", metavar="P", help="Keep only pairs whose chosen side the judge prefers with probability at least P (0-1); the others go to the filtered file.", show_default=False)]
SwapOpt = Annotated[bool, typer.Option("--swap", help="Where the judge prefers the original response, write it as chosen and the revision as rejected.")]
ClampOpt = Annotated[Optional[str], typer.Option("--clamp", metavar="LO,HI", help="Soft labels: clamp judge.label into [LO, HI], e.g. 0.4,0.6 as in RL-CAI.", show_default=False)]
KeepFilteredOpt = Annotated[bool, typer.Option("--keep-filtered", help="Write dropped pairs whole, with their reasons, to the filtered file (without it: their ids and reasons only).")]
FilteredOpt = Annotated[Optional[str], typer.Option("--filtered", help="JSONL file of dropped pairs and their reasons [default: OUTPUT.filtered.jsonl]; a rerun skips the ids it holds.", show_default=False)]


def _check_backend_options(backend_name: str, model: str | None, base_url: str | None,
                           max_retries: int, request_timeout: float) -> None:
    if backend_name not in ("hf", "openai"):
        raise UsageError(f"--backend: unknown value '{backend_name}'; choose from hf, openai")
    if backend_name == "openai" and (not base_url or not model):
        raise UsageError("--backend openai needs --base-url URL and --model NAME (the name the server serves)")
    if backend_name == "hf" and base_url:
        raise UsageError("--base-url is for --backend openai")
    if max_retries < 0 or request_timeout <= 0:
        raise UsageError("--max-retries must be at least 0, --timeout more than 0")


def _model_source(backend_name: str, model: str | None, base_url: str | None, dtype: str) -> tuple[str, str]:
    """(what the backend loads or calls, the model name records carry)."""
    if backend_name != "hf":
        return base_url, model
    from cai.backends.hf import weights_name
    from cai.models import resolve_model

    source, model_name = resolve_model(model)
    return source, weights_name(model_name, dtype)


def _open_backend(backend_name: str, source: str, model_name: str, quiet: bool, *, base_url=None, api_key_env="OPENAI_API_KEY",
                  request_timeout=120.0, max_retries=5, device="auto", dtype="auto", trust_remote_code=False,
                  allow_pickle=False, plain_chat_format=False, threads=None):
    """The backend the options name, loaded (with a spinner on stderr for a local model)."""
    if backend_name == "openai":
        from cai.backends.openai import OpenAIBackend

        return OpenAIBackend(base_url, model_name, api_key_env=api_key_env, timeout=request_timeout,
                             max_retries=max_retries)
    from cai.backends.hf import HFBackend, HFOptions

    with err.status(f"loading {model_name}…", spinner="dots") if not quiet else nullcontext():
        return HFBackend(source, model_name, HFOptions(
            device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, plain_chat_format=plain_chat_format, threads=threads))


def _judge_options(min_preference: float | None, clamp: str | None):
    """The judge's settings from --min-preference and --clamp, checked."""
    from cai.judge import JudgeConfig

    if min_preference is not None and not 0 <= min_preference <= 1:
        raise UsageError(f"--min-preference: must be between 0 and 1 (got {min_preference:g})")
    bounds = None
    if clamp is not None:
        try:
            low, high = (float(part) for part in clamp.split(","))
        except ValueError:
            raise UsageError(f"--clamp: expected LO,HI such as 0.4,0.6 (got '{clamp}')") from None
        if not 0 <= low <= high <= 1:
            raise UsageError(f"--clamp: need 0 ≤ LO ≤ HI ≤ 1 (got {clamp})")
        bounds = (low, high)
    return JudgeConfig(clamp=bounds)


@app.command(epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai generate examples/prompts.jsonl -o pairs.jsonl            [dim]# embedded SmolLM2-135M-Instruct[/dim]\n\n"
    "  cai generate prompts.txt --model Qwen/Qwen2.5-0.5B-Instruct --revisions 2 -o - | head\n\n"
    "  cat prompts.jsonl | cai generate - --constitution my.yaml -o pairs.jsonl\n\n"
    "  cai generate prompts.jsonl -o pairs.jsonl                      [dim]# run again: resumes where it stopped[/dim]"))
@reports_errors
def generate(
    prompts: Annotated[str, typer.Argument(help="Prompts: a .jsonl file (one object per line), a text file (one prompt per line), or - for stdin.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Where records go: a .jsonl file, or - for stdout.")] = "-",
    model: ModelOpt = None,
    constitution: Annotated[str, typer.Option("--constitution", "-c", help="A shipped constitution by name (see `cai constitution list`) or a path to a YAML file.")] = "harmless",
    templates: Annotated[str, typer.Option("--templates", help="Prompt templates: a shipped set by name or a folder of .jinja files.")] = "default",
    prompt_field: Annotated[str, typer.Option("--prompt-field", help="JSONL field that holds the prompt.")] = "prompt",
    revisions: Annotated[Optional[int], typer.Option("--revisions", "-r", help="Critique → revise rounds per prompt. Default: the constitution's (1).", show_default=False)] = None,
    sampling: Annotated[Optional[str], typer.Option("--sampling", metavar="random|all|cycle", help="Principle per prompt: random (weighted), all (one record per principle), cycle (round robin). Default: the constitution's (random).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for principle choice and sampling: same seed, same records.")] = 0,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Conversations in flight at once [default: as many as the KV cache fits, up to 64].", show_default=False)] = None,
    threads: ThreadsOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Token limit of each generated turn.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (0 < p ≤ 1).")] = 0.95,
    few_shot: Annotated[bool, typer.Option("--few-shot/--no-few-shot", help="Show the constitution's worked examples to the model as earlier turns.")] = True,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="Use only the first N prompts.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an existing output (the default when it holds records of the same run): skip the ids it holds, append the rest.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Append to an output that holds records of a different run config.")] = False,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip (and count) malformed input lines instead of stopping.")] = False,
    truncate_long: Annotated[bool, typer.Option("--truncate-long", help="Cut prompts too long for the model's context instead of skipping them.")] = False,
    plain_chat_format: PlainChatOpt = False,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="standard|conversational", help="Record shape: standard (prompt/chosen/rejected strings) or conversational (lists of chat messages).")] = "standard",
    backend_name: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option("--concurrency", help="With --backend openai: requests in flight at once.")] = 16,
    request_timeout: TimeoutOpt = 120.0,
    max_retries: RetriesOpt = 5,
    failures: Annotated[Optional[str], typer.Option("--failures", help="JSONL file for prompts whose requests failed after their retries [default: OUTPUT.failures.jsonl].", show_default=False)] = None,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop the run at the first prompt that fails (instead of recording it in the failures file).")] = False,
    filter_: Annotated[bool, typer.Option("--filter/--no-filter", help="Clean revisions (preambles, role labels, next-turn debris) and drop pairs not worth training on: empty, unchanged, truncated, meta-talk, copied, repetitive. Counted by reason in the summary.")] = True,
    similarity_threshold: Annotated[float, typer.Option("--similarity", metavar="S", help="Drop a pair as unchanged when its revision is at least this similar to the original (0-1, over words).")] = 0.9,
    drop_refusals: Annotated[bool, typer.Option("--drop-refusals", help="Also drop pairs whose revision refuses (for constitutions that must not teach refusing).")] = False,
    keep_filtered: KeepFilteredOpt = False,
    filtered: FilteredOpt = None,
    judge_pairs: Annotated[bool, typer.Option("--judge", help="Label each kept pair with the model's own AI-feedback preference (see `cai judge`).")] = False,
    min_preference: MinPreferenceOpt = None,
    swap: SwapOpt = False,
    clamp: ClampOpt = None,
    shard: Annotated[Optional[str], typer.Option("--shard", metavar="K/N", help="Take only shard K of N (1 ≤ K ≤ N), a deterministic slice of the prompts by id; combine shard outputs with `cai merge`.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, logs or summary; errors only.")] = False,
) -> None:
    """Generate (rejected, chosen) pairs from prompts.

    For each prompt the model answers, critiques its answer against a principle of the
    constitution, and revises it; one JSONL record per prompt is written as its conversation ends.
    """
    from cai.backends.base import SamplingParams
    from cai.constitution import load_constitution
    from cai.errors import InputError
    from cai.io import RecordWriter, check_writable, read_prompts, scan_output
    from cai.pipeline import Pipeline, RunConfig, fingerprint_differences, record_plans, run_fingerprint
    from cai.prompts import load_templates
    from cai.records import FORMATS, shard_of

    _setup_logging(quiet)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    _check_options(revisions=revisions, sampling=sampling, batch_size=batch_size, max_new_tokens=max_new_tokens, threads=threads,
                   temperature=temperature, top_p=top_p, limit=limit, device=device, dtype=dtype)
    if fmt not in FORMATS:
        raise UsageError(f"--format: unknown value '{fmt}'; choose from {', '.join(FORMATS)}")
    _check_backend_options(backend_name, model, base_url, max_retries, request_timeout)
    if concurrency < 1:
        raise UsageError(f"--concurrency: must be at least 1 (got {concurrency})")
    if not 0 < similarity_threshold <= 1:
        raise UsageError(f"--similarity: must be greater than 0 and at most 1 (got {similarity_threshold:g})")
    if not judge_pairs and (min_preference is not None or swap or clamp):
        raise UsageError("--min-preference, --swap and --clamp need --judge")
    judge_config = _judge_options(min_preference, clamp)
    filtered_path = filtered or (f"{output}.filtered.jsonl" if output != "-" else None)
    if keep_filtered and not filtered_path:
        raise UsageError("--keep-filtered with -o - needs --filtered FILE")
    shard_k, shard_n = _parse_shard(shard) if shard else (1, 1)
    if output == "-" and resume:
        raise UsageError("--resume needs an output file (-o FILE), not stdout")

    constitution_obj = load_constitution(constitution)
    template_set = load_templates(templates)
    invalid: list[InputError] = []
    items = read_prompts(prompts, prompt_field=prompt_field, invalid=invalid if skip_invalid else None)
    for error in invalid[:5]:
        log.warning("skipped: %s", error)
    if len(invalid) > 5:
        log.warning("skipped %d more invalid lines", len(invalid) - 5)
    if limit is not None:
        items = items[:limit]
    if shard_n > 1:
        items = [item for item in items if shard_of(item.id, shard_n) == shard_k]
        log.info("shard %d/%d: %d prompts", shard_k, shard_n, len(items))

    config = RunConfig(
        revisions=revisions or constitution_obj.defaults.revisions,
        sampling=sampling or constitution_obj.defaults.sampling,
        seed=seed, batch_size=batch_size or 1, few_shot=few_shot,      # batch_size: set once the backend is known
        params=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
    )
    source, model_name = _model_source(backend_name, model, base_url, dtype)

    # An existing output is continued when it holds records of this same run, refused otherwise.
    # The ids of pairs the filters dropped (the filtered file) count as done too.
    done: set[str] = set()
    append_at = drop_append_at = dropped_before = None
    out_path = Path(output)
    if output != "-":
        if out_path.is_dir():
            raise UsageError(f"-o {output}: is a directory")
        dropped_before = (scan_output(Path(filtered_path)) if filtered_path and Path(filtered_path).is_file()
                          and out_path.is_file() and not overwrite else None)
        if out_path.exists() and (out_path.stat().st_size > 0 or (dropped_before and dropped_before.ids)) and not overwrite:
            existing = scan_output(out_path)
            # The run that wrote the file: its first record, else (every pair so far was dropped)
            # its first dropped pair, whose line carries the same fingerprint.
            first = existing.first or (dropped_before.first if dropped_before else None)
            changed = fingerprint_differences(first, run_fingerprint(
                model_name, constitution_obj, template_set, config)) if first else []
            if existing.first and isinstance(existing.first.get("prompt"), list) != (fmt == "conversational"):
                changed.append(f"format → {fmt}")
            if changed and not force:
                raise UsageError(f"-o {output}: holds records of a different run ({'; '.join(changed)}); "
                                 "use another -o, --overwrite to replace it, or --force to append anyway")
            done, append_at = set(existing.ids), existing.whole_bytes
            if dropped_before:
                done |= dropped_before.ids
                drop_append_at = dropped_before.whole_bytes
            log.info("resuming %s: %d records already there%s%s", output, len(existing.ids),
                     f" and {len(dropped_before.ids)} dropped in {filtered_path}" if dropped_before and dropped_before.ids else "",
                     " (cutting a torn last line)" if existing.torn else "")

    if done and all(record_id in done for _, records in record_plans(constitution_obj, config, items)
                    for record_id, _ in records):
        # a rerun of a finished run: say so without loading a model that would have nothing to do
        log.info("nothing to do: every record of this run is already in %s%s", output,
                 f" or dropped in {filtered_path}" if dropped_before and dropped_before.ids else "")
        return

    from cai.filters import DEFAULT_CHECKS, FilterConfig, Filters, references_of
    from cai.judge import Judge

    # An unwritable output fails in a second, not after a minute of model loading; the file itself
    # is opened only once the model has loaded, so a model error leaves it as it was.
    check_writable(output)
    if filtered_path:
        check_writable(filtered_path)
    backend = _open_backend(backend_name, source, model_name, quiet, base_url=base_url, api_key_env=api_key_env,
                            request_timeout=request_timeout, max_retries=max_retries, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                            plain_chat_format=plain_chat_format, threads=threads)
    if backend_name == "openai":
        config = replace(config, batch_size=concurrency)
    elif batch_size is None:
        config = replace(config, batch_size=backend.default_width())
        log.info("up to %d conversations in flight (--batch-size)", config.batch_size)
    failures_path = failures or (f"{output}.failures.jsonl" if output != "-" else None)
    failure_log = _FailureLog(failures_path, fail_fast)
    filters = Filters(FilterConfig(
        checks=DEFAULT_CHECKS + (("refusal",) if drop_refusals else ()), similarity=similarity_threshold,
        references=references_of(constitution_obj) if few_shot else ())) if filter_ else None
    curation = _Curation(filters, Judge(backend, constitution_obj, template_set, judge_config) if judge_pairs else None,
                         min_preference, swap, _SideFile(filtered_path, drop_append_at), keep_filtered)
    writer = RecordWriter(output, append_at=append_at)
    stopper = _GracefulStop()
    try:
        pipeline = Pipeline(backend, constitution_obj, template_set, config)
        jobs, left_out = pipeline.plan(items, skip=done, truncate_long=truncate_long)
        for item, reason in left_out[:5]:
            log.warning("skipped: %s:%d: %s (--truncate-long cuts such prompts to fit)",
                        "<stdin>" if prompts == "-" else prompts, item.line, reason)
        if done:
            log.info("%d records to go", len(jobs))
        with stopper:
            stats = _run(pipeline, jobs, writer, quiet, stopper, fmt, curation, failure_log)
    except BrokenPipeError:
        # The reader went away (`cai generate … -o - | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except KeyboardInterrupt:
        writer.close()
        _interrupted(writer.count, output)
        raise typer.Exit(130) from None
    finally:
        backend.close()
        failure_log.close()
        curation.drops.close()
    writer.close()
    stats.update(skipped_invalid=len(invalid), skipped_long=len(left_out), resumed=len(done),
                 failed=failure_log.count, failures=failures_path, filtered=filtered_path)
    if stats["stopped"]:
        if stats["made"] + failure_log.count < len(jobs):
            _interrupted(writer.count, output)
            raise typer.Exit(130)
        # every prompt had started before the Ctrl-C, and each finished: the run is whole
        log.info("Ctrl-C came after the last prompt had started; every prompt finished")
    if not quiet:
        _summary(stats, output, constitution_obj.ref, model_name)
    if failure_log.count:
        where = f" (listed in {failures_path})" if failures_path else ""
        raise CaiError(f"{failure_log.count} prompts failed after their retries{where}; "
                       "run the same command again to retry just those")


def _summary_table(title: str) -> Table:
    """A two-column (name, value) table for a command's summary on stderr."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def _interrupted(count: int, output: str) -> None:
    where = output if output != "-" else "stdout"
    err.print(f"[yellow]interrupted[/yellow]: {count} records written to {where}."
              + (" Run the same command again to continue where it stopped." if output != "-" else ""),
              highlight=False, soft_wrap=True)


class _GracefulStop:
    """First Ctrl-C: start no new prompt, finish those in flight, write them, stop. Second Ctrl-C: stop at once
    (records already written stay whole: each is one write of one line)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        err.print("[yellow]stopping: finishing the conversations in flight[/yellow] (Ctrl-C again to stop at once)")

    def __enter__(self):
        import signal

        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard: expected K/N such as 2/8 (got '{value}')") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard: K must be between 1 and N (got {value})")
    return k, n


class _SideFile:
    """A JSONL file beside the output (failures, dropped pairs), opened at its first line. A fresh
    run removes an old one; a resumed run appends after its `append_at` whole bytes."""

    def __init__(self, path: str | None, append_at: int | None = None):
        self.path, self.append_at = path, append_at
        self._writer = None
        if path and append_at is None and Path(path).is_file():
            Path(path).unlink()          # it describes an earlier run

    def write(self, line: dict) -> None:
        if not self.path:
            return
        if self._writer is None:
            from cai.io import RecordWriter

            self._writer = RecordWriter(self.path, append_at=self.append_at)
        self._writer.write(line)

    def sync(self) -> None:
        if self._writer is not None:
            self._writer.sync()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _FailureLog:
    """Prompts whose conversation failed for good (a remote request that kept failing): one JSON
    line each in the failures file (which a rerun replaces: it retries them), or a warning when
    there is no file; --fail-fast stops the run."""

    def __init__(self, path: str | None, fail_fast: bool):
        self.file, self.fail_fast, self.count = _SideFile(path), fail_fast, 0

    def __call__(self, job, stage: str, reason: str) -> None:
        from datetime import datetime, timezone

        if self.fail_fast:
            raise BackendError(f"prompt {job.record_id} (input line {job.prompt.line}): {stage}: {reason} (--fail-fast)")
        self.count += 1
        log.warning("failed: prompt %s: %s: %s", job.record_id, stage, reason)
        self.file.write({"id": job.record_id, "prompt": job.prompt.text, "stage": stage, "error": reason,
                         "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def close(self) -> None:
        self.file.close()


class _Curation:
    """Filters and judge between the pipeline and the output: returns the pairs to write, sends
    the others to the filtered file (`drops`: id, principle and reasons, or with `keep_whole` the
    whole record and its reasons; a rerun skips the ids it holds), and keeps the counts for the
    summary."""

    def __init__(self, filters, judge, min_preference: float | None, swap: bool, drops: _SideFile,
                 keep_whole: bool = False):
        from collections import Counter

        self.filters, self.judge, self.min_preference, self.swap = filters, judge, min_preference, swap
        self.drops, self.keep_whole = drops, keep_whole
        self.reasons: Counter[str] = Counter()
        self.dropped = self.judged = self.unjudged = self.swapped = 0
        self.preferences: list[tuple[float, float]] = []
        self._errors_seen: set[str] = set()

    def __call__(self, records: list[dict]) -> list[dict]:
        from cai.filters import curate
        from cai.pipeline import FINGERPRINT_KEYS

        kept = []
        for verdict in curate(records, self.filters, self.judge, self.min_preference, self.swap):
            judge = verdict.record.get("judge")
            if verdict.judge_error:
                self.unjudged += 1
                if verdict.judge_error not in self._errors_seen and len(self._errors_seen) < 5:
                    self._errors_seen.add(verdict.judge_error)      # each distinct reason once
                    log.warning("not judged: %s: %s", verdict.record.get("id"), verdict.judge_error)
            elif judge and self.judge is not None:
                self.judged += 1
                self.swapped += judge["swapped"]
                self.preferences.append((judge["preference"], judge["orders"][0]))
            if verdict.reasons:
                self.dropped += 1
                self.reasons.update(verdict.reasons)
                line = verdict.record if self.keep_whole else {
                    "id": verdict.record.get("id"), "principle": verdict.record.get("principle"),
                    # the run's fingerprint, so a rerun can tell whether this file is its own
                    "meta": {k: v for k, v in verdict.record.get("meta", {}).items() if k in FINGERPRINT_KEYS}}
                self.drops.write({**line, "filter": {"reasons": verdict.reasons}})
            else:
                kept.append(verdict.record)
        self.drops.sync()
        return kept

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = []
        if self.filters is not None or self.min_preference is not None:
            reasons = " · ".join(f"{reason} {count}" for reason, count in self.reasons.most_common())
            rows.append(("dropped (filters)", f"{self.dropped}" + (f" ({reasons})" if reasons else "")))
        if self.judge is not None and not self.preferences:
            rows.append(("judge", "no pair judged" + (f" ({self.unjudged} could not be)" if self.unjudged else "")))
        elif self.judge is not None:
            n = len(self.preferences)
            mean = sum(p for p, _ in self.preferences) / n
            single = sum(o for _, o in self.preferences) / n
            rows.append(("judge: P(revision better)", f"{mean:.3f} both orders · {single:.3f} revision as (B) only · "
                                                      f"{self.judged} judged" + (f", {self.swapped} swapped" if self.swap else "")
                                                      + (f", {self.unjudged} not judged" if self.unjudged else "")))
        return rows


def _run(pipeline, jobs, writer, quiet: bool, stopper: _GracefulStop, fmt: str, curation: _Curation,
         on_failure=None) -> dict:
    stats = {"made": 0, "records": 0, "changed": 0, "tokens": 0, "truncated": 0, "stopped": False,
             "start": time.monotonic(), "curation": curation}
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("[dim]ETA[/dim]"), TimeRemainingColumn(),
        console=err, disable=quiet, transient=False)
    with progress:
        task = progress.add_task("prompts", total=len(jobs), rate="")

        def show_rate() -> None:
            elapsed = max(time.monotonic() - stats["start"], 1e-9)
            progress.update(task, rate=(
                f"{stats['made'] / elapsed * 60:.1f} pairs/min · {stats['tokens'] / elapsed:.1f} tok/s"))

        def on_turn(stage: str, completion) -> None:
            stats["tokens"] += completion.completion_tokens
            show_rate()

        for made in pipeline.run(jobs, on_turn=on_turn, stop=lambda: stopper.requested, on_failure=on_failure):
            stats["made"] += len(made)
            records = curation(made)
            for record in records:
                writer.write(to_format(record, fmt) if fmt != "standard" else record)
                stats["records"] += 1
                stats["changed"] += record["chosen"].strip() != record["rejected"].strip()
                reasons = record["meta"]["finish_reasons"]
                stats["truncated"] += "length" in (reasons["response"], *reasons["revision"])
            writer.sync()
            progress.update(task, advance=len(made))
            show_rate()
        stats["stopped"] = stopper.requested
    stats["elapsed"] = time.monotonic() - stats["start"]
    return stats


def _summary(stats: dict, output: str, constitution_ref: str, model_name: str) -> None:
    elapsed = max(stats["elapsed"], 1e-9)
    table = _summary_table("cai generate")
    table.add_row("model", model_name)
    table.add_row("constitution", constitution_ref)
    table.add_row("pairs made", str(stats["made"]))
    table.add_row("records written", str(stats["records"]))
    if stats["resumed"]:
        table.add_row("already there (resumed)", str(stats["resumed"]))
    if stats["skipped_invalid"]:
        table.add_row("invalid input lines skipped", str(stats["skipped_invalid"]))
    if stats["skipped_long"]:
        table.add_row("prompts too long for the context", str(stats["skipped_long"]))
    if stats.get("failed"):
        table.add_row("failed (retry: run again)", f"{stats['failed']}" + (f" → {stats['failures']}" if stats.get("failures") else ""))
    for name, value in stats["curation"].summary_rows():
        table.add_row(name, value)
    table.add_row("chosen ≠ rejected", f"{stats['changed']} of {stats['records']}")
    if stats["curation"].filters is None:
        table.add_row("truncated (hit max tokens)", str(stats["truncated"]))
    table.add_row("generated tokens", f"{stats['tokens']:,}")
    table.add_row("time", f"{elapsed:.1f} s")
    table.add_row("speed", f"{stats['made'] / elapsed * 60:.1f} pairs/min · {stats['tokens'] / elapsed:.1f} tok/s")
    table.add_row("output", "stdout" if output == "-" else str(Path(output).resolve()))
    if stats["curation"].dropped and stats.get("filtered"):
        table.add_row("dropped pairs", str(Path(stats["filtered"]).resolve()))
    err.print(table)


@app.command("merge", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai merge pairs.jsonl shard-*.jsonl          [dim]# shards written with --shard K/N[/dim]"))
@reports_errors
def merge(
    output: Annotated[str, typer.Argument(help="The combined .jsonl file to write (- for stdout).", show_default=False)],
    shards: Annotated[list[str], typer.Argument(help="Files written by cai generate (e.g. with --shard K/N).", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Combine output files of one run (shards, or runs on several machines) into one, keeping
    each id once. Torn lines (a killed writer) and foreign lines (not a record, or a record of a
    different run config) are left out and reported with file:line."""
    import json

    from cai.io import check_writable
    from cai.pipeline import fingerprint_differences

    _setup_logging(False)
    if output != "-" and Path(output).exists() and not overwrite:
        raise UsageError(f"{output}: exists; pass --overwrite to replace it")
    if output != "-" and any(Path(output).resolve() == Path(shard).resolve() for shard in shards):
        raise UsageError(f"{output}: is also one of the inputs")
    for shard in shards:
        if not Path(shard).is_file():
            raise UsageError(f"{shard}: no such file")
    check_writable(output)
    seen: set[str] = set()
    lines: list[bytes] = []
    reference = None
    counts = {"kept": 0, "duplicate": 0, "torn": 0, "foreign": 0}
    problems: list[str] = []
    for shard in shards:
        with open(shard, "rb") as fp:
            for number, raw in enumerate(fp, start=1):
                where = f"{shard}:{number}"
                if not raw.strip():
                    continue
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("no newline")
                    record = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    counts["torn"] += 1
                    problems.append(f"{where}: torn or not JSON; left out")
                    continue
                meta = record.get("meta") if isinstance(record, dict) else None
                if not isinstance(meta, dict) or not isinstance(record.get("id"), str) or "chosen" not in record:
                    counts["foreign"] += 1
                    problems.append(f"{where}: not a cai record; left out")
                    continue
                if reference is None:
                    reference = record
                # "key: the first record's value → this one's"
                differences = fingerprint_differences(reference, {
                    **{k: meta.get(k) for k in ("model", "constitution", "templates", "seed")},
                    "params": meta.get("params") if isinstance(meta.get("params"), dict) else {}})
                if differences:
                    counts["foreign"] += 1
                    problems.append(f"{where}: a record of a different run ({'; '.join(differences)}); left out")
                    continue
                if record["id"] in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(record["id"])
                lines.append(raw)
                counts["kept"] += 1
    for problem in problems[:10]:
        log.warning("%s", problem)
    if len(problems) > 10:
        log.warning("%d more lines left out", len(problems) - 10)
    if output == "-":
        sys.stdout.buffer.write(b"".join(lines))
        sys.stdout.flush()
    else:
        tmp = Path(f"{output}.tmp-{os.getpid()}")
        tmp.write_bytes(b"".join(lines))
        os.replace(tmp, output)
    err.print(f"merged {len(shards)} files: {counts['kept']} records, {counts['duplicate']} duplicate ids dropped, "
              f"{counts['torn']} torn and {counts['foreign']} foreign lines left out → "
              f"{'stdout' if output == '-' else output}", highlight=False, soft_wrap=True)


@app.command("judge", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai judge pairs.jsonl -o judged.jsonl                       [dim]# the embedded model as judge[/dim]\n\n"
    "  cai judge pairs.jsonl --model Qwen/Qwen2.5-1.5B-Instruct --min-preference 0.6 -o kept.jsonl\n\n"
    "  cai judge pairs.jsonl --backend openai --base-url http://gpu:8000/v1 --model judge --swap --clamp 0.4,0.6 -o -"))
@reports_errors
def judge(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Where judged records go: a .jsonl file, or - for stdout.")] = "-",
    model: ModelOpt = None,
    constitution: Annotated[Optional[str], typer.Option("--constitution", "-c", help="Where the principles' judge questions (`choice`) come from [default: the shipped constitution the records name].", show_default=False)] = None,
    templates: Annotated[str, typer.Option("--templates", help="Template set whose judge.jinja words the question.")] = "default",
    prefix: Annotated[str, typer.Option("--prefix", help="How the judge's answer starts; the option letter is read right after it.")] = "The answer is: (",
    min_preference: MinPreferenceOpt = None,
    swap: SwapOpt = False,
    clamp: ClampOpt = None,
    keep_filtered: KeepFilteredOpt = False,
    filtered: FilteredOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Pairs scored per call to the backend.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    backend_name: BackendOpt = "hf",
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = "OPENAI_API_KEY",
    request_timeout: TimeoutOpt = 120.0,
    max_retries: RetriesOpt = 5,
    threads: ThreadsOpt = None,
    plain_chat_format: PlainChatOpt = False,
    allow_pickle: PickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: RemoteCodeOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary; errors only.")] = False,
) -> None:
    """AI-feedback preference labels (RL-CAI): the judge model answers the principle's question
    about the original (A/B) and the revision (B/A); its preference is read from the option tokens'
    log-probabilities and averaged over both orders. Adds a `judge` field to every record."""
    from cai.io import RecordWriter, check_writable, read_records
    from cai.judge import Judge
    from cai.prompts import load_templates

    _setup_logging(quiet)
    _check_backend_options(backend_name, model, base_url, max_retries, request_timeout)
    _check_options(batch_size=batch_size, threads=threads, device=device, dtype=dtype)
    config = replace(_judge_options(min_preference, clamp), prefix=prefix)
    filtered_path = filtered or (f"{output}.filtered.jsonl" if output != "-" else None)
    if keep_filtered and not filtered_path:
        raise UsageError("--keep-filtered with -o - needs --filtered FILE")
    if output != "-" and Path(output).exists() and not overwrite:
        raise UsageError(f"{output}: exists; pass --overwrite to replace it")
    if output != "-" and Path(output).resolve() == Path(pairs).resolve():
        raise UsageError(f"{output}: is also the input")
    records = read_records(pairs)
    constitution_obj = _judge_constitution(constitution, records)
    template_set = load_templates(templates)
    check_writable(output)
    source, model_name = _model_source(backend_name, model, base_url, dtype)
    backend = _open_backend(backend_name, source, model_name, quiet, base_url=base_url, api_key_env=api_key_env,
                            request_timeout=request_timeout, max_retries=max_retries, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                            plain_chat_format=plain_chat_format, threads=threads)
    curation = _Curation(None, Judge(backend, constitution_obj, template_set, config), min_preference, swap,
                         _SideFile(filtered_path), keep_filtered)
    writer = RecordWriter(output)
    start = time.monotonic()
    try:
        with Progress(TextColumn("[bold]judging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, disable=quiet) as progress:
            task = progress.add_task("judging", total=len(records))
            for i in range(0, len(records), batch_size):
                for record in curation(records[i:i + batch_size]):
                    writer.write(record)
                writer.sync()
                progress.update(task, advance=len(records[i:i + batch_size]))
    except KeyboardInterrupt:
        writer.close()
        err.print(f"[yellow]interrupted[/yellow]: {writer.count} judged records written", highlight=False)
        raise typer.Exit(130) from None
    finally:
        backend.close()
        curation.drops.close()
    writer.close()
    if not quiet:
        table = _summary_table("cai judge")
        table.add_row("judge", model_name)
        table.add_row("pairs read", str(len(records)))
        table.add_row("records written", str(writer.count))
        for name, value in curation.summary_rows():
            table.add_row(name, value)
        table.add_row("time", f"{time.monotonic() - start:.1f} s")
        table.add_row("output", "stdout" if output == "-" else str(Path(output).resolve()))
        err.print(table)
    if curation.unjudged and curation.judged == 0:
        raise CaiError(f"no pair could be judged ({curation.unjudged} failed); see the warnings above")


def _judge_constitution(spec: str | None, records: list[dict]):
    """The constitution whose `choice` questions the judge asks: the one named, or else the
    shipped one the records name (by the name part of meta.constitution); None (a generic question)
    when there is none to find."""
    from cai.constitution import load_constitution, shipped_constitutions

    if spec:
        return load_constitution(spec)
    refs = {(r.get("meta") or {}).get("constitution") for r in records} - {None}
    names = {str(ref).split("@")[0] for ref in refs}
    if len(names) == 1 and (name := names.pop()) in shipped_constitutions():
        constitution = load_constitution(name)
        if constitution.ref not in refs:
            log.warning("the records were made with %s; asking the questions of the shipped %s",
                        ", ".join(sorted(refs)), constitution.ref)
        return constitution
    log.warning("no shipped constitution matches the records' (%s); the judge asks a generic question "
                "(pass --constitution to use the principles' own)", ", ".join(sorted(refs)) or "none named")
    return None


@app.command("export", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai export pairs.jsonl --format conversational -o pairs.chat.jsonl\n\n"
    "  cai export pairs.jsonl --format sft -o sft.jsonl            [dim]# prompt + final revision (SL-CAI)[/dim]\n\n"
    "  cai export pairs.jsonl -o pairs.parquet --test-size 0.1     [dim]# pairs.train.parquet, pairs.test.parquet[/dim]"))
@reports_errors
def export(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .jsonl or .parquet file, or - for stdout (JSONL).")] = "-",
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="standard|conversational|sft", help="Shape to write.")] = "standard",
    test_size: Annotated[Optional[float], typer.Option("--test-size", help="Fraction (0-1) held out into OUT.test.*; the rest goes to OUT.train.*.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the train/test split (by record id, so stable under reordering).")] = 0,
) -> None:
    """Convert pairs between shapes: standard, conversational, or an SFT file; JSONL or Parquet."""
    from cai.io import RecordWriter, check_writable, read_records
    from cai.records import EXPORT_FORMATS, split_by_id

    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format: unknown value '{fmt}'; choose from {', '.join(EXPORT_FORMATS)}")
    if test_size is not None and not 0 < test_size < 1:
        raise UsageError(f"--test-size: must be between 0 and 1 (got {test_size:g})")
    if test_size is not None and output == "-":
        raise UsageError("--test-size needs an output file (-o FILE)")
    records = [to_format(r, fmt) for r in read_records(pairs)]
    parts = {output: records} if test_size is None else {
        _with_part(output, name): part for name, part in zip(("train", "test"), split_by_id(records, test_size, seed))}
    for target, part in parts.items():
        check_writable(target)
        if target.endswith(".parquet"):
            try:
                import datasets
            except ImportError:
                raise UsageError("Parquet output needs the `datasets` package (pip install datasets)") from None
            datasets.disable_progress_bars()
            datasets.Dataset.from_list(part).to_parquet(target)
        else:
            writer = RecordWriter(target)
            for record in part:
                writer.write(record)
            writer.close()
        if target != "-":
            err.print(f"wrote {len(part)} {fmt} records to {target}", highlight=False)


def _with_part(path: str, part: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{part}{p.suffix}"))


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


@app.command("stats", epilog=(
    "[bold]Examples[/bold]\n\n"
    "  cai stats pairs.jsonl                          [dim]# reads pairs.jsonl.filtered.jsonl too, if there[/dim]\n\n"
    "  cai stats pairs.jsonl --json | jq .judge\n\n"
    "  cai stats pairs.jsonl --plot pairs.png         [dim]# needs matplotlib: pip install 'cai[plot]'[/dim]\n\n"
    "  cat pairs.jsonl | cai stats - --filtered dropped.jsonl"))
@reports_errors
def stats(
    pairs: Annotated[str, typer.Argument(help="A file written by cai generate (either format), or - for stdin.", show_default=False)],
    filtered: Annotated[Optional[str], typer.Option("--filtered", help="The side file of dropped records [default: PAIRS.filtered.jsonl when it exists; none for stdin].", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout instead of tables on stderr.")] = False,
    plot_path: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png", help="Also draw lengths, similarity, judge preference and drop reasons into a PNG (needs matplotlib).", show_default=False)] = None,
) -> None:
    """What a run produced: kept and dropped records (by reason and principle), lengths, how much
    the revisions changed, the judge's preferences and finish reasons."""
    import json

    from cai import stats as stats_mod
    from cai.io import check_writable

    _setup_logging(False)
    if plot_path is not None:
        stats_mod.check_plotting()
        check_writable(plot_path)
    report, samples = stats_mod.collect(pairs, filtered, warn=lambda message: log.warning("%s", message))
    if plot_path is not None:
        stats_mod.plot(report, samples, plot_path)
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _stats_tables(report)
    if plot_path is not None:
        err.print(f"wrote {plot_path}", highlight=False)


def _stats_tables(report: dict) -> None:
    def fmt(value) -> str:
        if value is None:
            return "–"
        return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}".rstrip("0").rstrip(".")

    def pct(part: int, whole: int) -> str:
        return f"{part:,} ({part / whole:.1%})" if whole else f"{part:,}"

    source = report["input"]
    kept, total = source["kept"], source["total"]
    table = _summary_table("cai stats")
    table.add_row("records", source["records"] if source["records"] != "-" else "stdin")
    table.add_row("dropped records", source["filtered"] or "[dim]no side file: none dropped[/dim]")
    table.add_row("kept", pct(kept, total))
    table.add_row("dropped", pct(source["dropped"], total))
    table.add_row("total", fmt(total))
    for reason, count in source["dropped_by_reason"].items():
        table.add_row(f"  dropped: {reason}", pct(count, total))
    if source["torn_lines"]:
        table.add_row("torn lines skipped", fmt(source["torn_lines"]))
    table.add_row("cleaned (meta.cleaned)", pct(report["cleaned"], kept))
    err.print(table)

    table = Table(title="principles", title_justify="left")
    for column in ("principle", "kept", "dropped", "judge mean"):
        table.add_column(column, justify="left" if column == "principle" else "right")
    for name, row in report["principles"].items():
        table.add_row(name, fmt(row["kept"]), fmt(row["dropped"]), fmt(row["judge_mean"]))
    err.print(table)

    table = Table(title="distributions (words)", title_justify="left")
    table.add_column("")
    for column in ("min", "p10", "p50", "p90", "max", "mean"):
        table.add_column(column, justify="right")
    rows = {**report["lengths"], "word edits": report["edits"]["word_edits"], "similarity": report["edits"]["similarity"]}
    for name, dist in rows.items():
        table.add_row(name, *(fmt(dist[k]) for k in ("min", "p10", "p50", "p90", "max", "mean")))
    err.print(table)
    err.print(f"near-identical (similarity ≥ 0.9): {pct(report['edits']['near_identical'], kept)}; "
              f"identical (whitespace aside): {pct(report['edits']['identical'], kept)}", highlight=False, soft_wrap=True)

    judge = report["judge"]
    if judge:
        table = Table(title="judge: P(revision better)", show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        table.add_row("judged", pct(judge["judged"], kept))
        table.add_row("mean (both orders)", fmt(judge["mean_preference"]))
        table.add_row("mean, revision shown as B", fmt(judge["mean_revision_as_b"]))
        table.add_row("mean, revision shown as A", fmt(judge["mean_revision_as_a"]))
        table.add_row("preferred (> 0.5)", f"{judge['fraction_preferred']:.1%}")
        if judge["swapped"]:
            table.add_row("swapped (original kept as chosen)", pct(judge["swapped"], kept))
        counts, edges = judge["histogram"]["counts"], judge["histogram"]["edges"]
        widest = max(counts) or 1
        for low, high, count in zip(edges, edges[1:], counts):
            table.add_row(f"  {low:.1f}–{high:.1f}", f"{'█' * round(20 * count / widest):<20} {count:,}")
        err.print(table)

    finish = report["finish_reasons"]
    table = Table(title="finish reasons", title_justify="left")
    for column in ("reason", "response", "final revision"):
        table.add_column(column, justify="left" if column == "reason" else "right")
    for reason in dict.fromkeys([*finish["response"], *finish["revision"]]):
        table.add_row(reason, pct(finish["response"].get(reason, 0), kept), pct(finish["revision"].get(reason, 0), kept))
    err.print(table)


def main() -> None:
    app(prog_name="cai")


if __name__ == "__main__":
    main()
