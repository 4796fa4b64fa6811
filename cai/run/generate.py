"""The resumable generation run, as a library: the CLI's `cai generate` and the Python API's
`cai.generate` both call `run`. It locks the output, reads what is there (resume), selects the
prompts, runs the pipeline, curates, writes records and side files, and returns a Summary.
It prints nothing (messages go to the `cai` logger) and never decides how to show progress."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cai.errors import BackendError, OptionError
from cai.options import GenerateOptions
from cai.output import (MemoryWriter, RecordWriter, SideFile, check_side_file, note_run, runs_path,
                        scan_output, side_path)
from cai.run.summary import REFUSED_HINT, SKIP_HINT, Summary
from cai.run.session import RunSession

log = logging.getLogger("cai")

Progress = Callable[[str, Summary], None]   # (phase, summary): loading, running, turn, records
WARN_FIRST = 5                                # warnings of one kind shown before "and N more"


class _Paths:
    """The output and its side files (None: not written; in memory for a run without output)."""

    def __init__(self, output: str | None, options: GenerateOptions):
        self.output = output
        self.filtered = options.filtered or side_path(output, "filtered")
        self.failures = options.failures or side_path(output, "failures")
        self.skipped = options.skipped or side_path(output, "skipped")
        if options.keep_filtered and output == "-" and not options.filtered:
            raise OptionError("keep_filtered", "with output to stdout needs `filtered` FILE")
        seen: dict[str, str] = {}
        for option, path in (("output", output), ("filtered", self.filtered), ("failures", self.failures),
                             ("skipped", self.skipped)):
            if path and path != "-":
                real = os.path.realpath(path)
                if real in seen:
                    raise OptionError(option, f"{path} is also the `{seen[real]}` file; each needs its own")
                seen[real] = option

    def files(self) -> list[str]:
        return [p for p in (self.output, self.filtered, self.failures, self.skipped) if p and p != "-"]


def run(prompts: str | Iterable, output: str | None, options: GenerateOptions, *,
        progress: Progress | None = None, stop: Callable[[], bool] | None = None, stdin=None) -> Summary:
    """Make the records of `prompts` (a path, '-' for stdin, or an iterable of strings / dicts)
    into `output` (a path, '-' for stdout, or None to return them as `summary.records`). An
    output that holds records of the same run is continued. `stop()` true: start no new prompt
    and end when those in flight are done; without one, SIGINT, SIGTERM and SIGHUP do that."""
    from cai.backends.spec import is_open_backend, resolve
    from cai.constitution import Constitution, load_constitution
    from cai.pipeline import RunConfig
    from cai.templates import load_templates
    from cai.run.select import select

    from dataclasses import replace

    options.check()
    if options.resume and output in (None, "-"):
        raise OptionError("resume", "needs an output file")
    # `{shard}` in a name: this run's shard number (pairs.{shard}.jsonl → pairs.3.jsonl)
    output = options.named(output)
    options = replace(options, filtered=options.named(options.filtered), failures=options.named(options.failures),
                      skipped=options.named(options.skipped))
    paths = _Paths(output, options)
    source = _refuse_overlap(prompts, paths)
    constitution = (options.constitution if isinstance(options.constitution, Constitution)
                    else load_constitution(options.constitution))
    templates = load_templates(options.templates)
    config = RunConfig(
        revisions=options.revisions or constitution.defaults.revisions,
        sampling=options.sampling or constitution.defaults.sampling, seed=options.seed,
        few_shot=options.few_shot, params=_sampling(options),     # the width is decided once the backend is open
        reasoning=options.reasoning, reasoning_tags=options.tags(),
        repairs=options.repairs if options.filter else 0,          # repairs answer to the filters
        repair_from=options.repair_from, filters=options.filters_described(),
        critique=options.critique, keep_rounds=options.keep_rounds)
    feedback = options.feedback_config()
    if feedback is not None:
        # sampled pairs (issue 33): no critique rounds, one record id per prompt (see cai.feedback)
        if feedback.principles > len(constitution.principles):
            raise OptionError("principles_per_comparison", f"is {feedback.principles}, but {constitution.ref} has "
                              f"only {len(constitution.principles)} principles")
        feedback_name = _feedback_name(options)
        config = replace(config, revisions=0, sampling="random", repairs=0,
                         feedback=feedback.describe(feedback_name))
    selection = select(prompts, options, constitution, config, stdin)
    if options.format == "standard":
        conversation = next((item for item in selection.items if item.history), None)
        if conversation is not None:
            raise OptionError("format", f"is standard, but {source}:{conversation.line} is a conversation with earlier "
                                        "turns, which a standard record (one prompt string) cannot hold; use `format` "
                                        "conversational")
    # `model` may be a backend already open (the caller keeps it open and closes it)
    resolved = (None, options.model.model_name) if is_open_backend(options.model) else resolve(options.backend_spec())
    summary = Summary(model=resolved[1], constitution=constitution.ref, output=output, source=source,
                      filtered=paths.filtered, failures=paths.failures, skipped_file=paths.skipped,
                      planned=selection.planned, skipped_invalid=selection.skipped_invalid)
    with RunSession(paths.files(), lock=options.lock and output is not None, stop=stop, grace=options.grace,
                    on_signal=_log_signal) as session:
        with session.stoppable():
            _run(selection, paths, options, constitution, templates, config, resolved, summary, progress, session)
        if not summary.nothing_to_do:
            session.note_stop()                 # a stop asked for ends the run as stopped
        if session.stopped_by is not None:
            summary.stopped_by, summary.stop_exit = session.stopped_by, session.stop_exit
        summary.elapsed = time.monotonic() - summary.start
        if summary.manifest_started:
            note_run(output, _run_line("end", summary, options))    # still under the lock
    return summary


def _run_line(event: str, summary: Summary, options: GenerateOptions) -> dict:
    """A line of the output's manifest: what the run (this shard) plans when it starts, and
    when it ends what it made and whether it finished (every record of the shard placed)."""
    import socket
    from datetime import datetime, timezone

    from cai import __version__

    k, n = options.shard_numbers()
    line = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shard": f"{k}/{n}" if options.shard is not None else None, "planned": summary.planned}
    if event == "start":
        return {**line, "task": options.shard_task() or None, "resumed": summary.resumed, "source": summary.source,
                "model": summary.model, "host": socket.gethostname(), "pid": os.getpid(), "cai": __version__}
    return {**line, "finished": not summary.not_made, "kept": summary.kept, "dropped": summary.dropped,
            "failed": summary.failed, "skipped": summary.skipped, "not_made": summary.not_made,
            "stopped_by": summary.stopped_by, "exit_code": summary.exit_code, "elapsed": round(summary.elapsed, 3),
            "endpoints": summary.endpoints}


def _run(selection, paths: _Paths, options: GenerateOptions, constitution, templates, config, resolved,
         summary: Summary, progress: Progress | None, session) -> None:
    from dataclasses import replace

    from cai.fingerprint import run_fingerprint
    from cai.pipeline import TOO_LONG, Pipeline

    fingerprint = run_fingerprint(summary.model, constitution, templates, config)
    _refuse_foreign_sides(options, fingerprint)
    found, append_at, drop_append_at = _existing(paths, options, fingerprint, summary.source,
                                                 lambda: _prompt_check(selection, constitution, config))
    selection = selection.resuming(found)
    summary.resumed, summary.removed = selection.resumed, selection.removed
    if paths.output not in (None, "-"):
        if append_at is None:            # a new output (or one replaced): a new manifest
            Path(runs_path(paths.output)).unlink(missing_ok=True)
        note_run(paths.output, _run_line("start", summary, options))
        summary.manifest_started = True
    if summary.removed:
        log.warning("%s holds %d records of prompts no longer in %s (left as they are)",
                    paths.output, summary.removed, summary.source)
    skips = SideFile(paths.skipped, memory=paths.output is None, kind="skipped")
    _skip_invalid(selection, skips)
    if selection.nothing_to_do:
        summary.nothing_to_do = True
        _finish_side(summary, skips, None, None)
        if not selection.ids:
            log.info("nothing to do: no prompt of %s falls in this run (limit, shard)", summary.source)
            if paths.output not in (None, "-") and not Path(paths.output).exists():
                RecordWriter(paths.output).close()       # an empty shard is an empty file, for `cai merge`
        else:
            log.info("nothing to do: every record of this run is already in %s%s", paths.output,
                     f" (or dropped in {paths.filtered})" if paths.filtered else "")
        summary.records = [] if paths.output is None else None
        return
    if progress:
        progress("loading", summary)
    stop = session.stop
    backend = session.backend(options, resolved)          # the session closes what it opened
    try:
        width = options.batch_size or backend.default_width()
        summary.width = width
        config = replace(config, batch_size=width)
        if config.feedback is not None:
            from cai.feedback import FeedbackModel, SampledPipeline

            feedback_backend = _open_feedback(options, backend, session)
            pipeline = SampledPipeline(backend, FeedbackModel(feedback_backend, constitution, templates,
                                                              options.feedback_config()),
                                       constitution, templates, config, options.feedback_config())
        else:
            pipeline = Pipeline(backend, constitution, templates, config)
        jobs, left_out = pipeline.plan(selection.items, todo=selection.todo,
                                       truncate_long=options.truncate_long)
        summary.skipped_long = sum(why.kind == TOO_LONG for _, _, why in left_out)
        summary.skipped_refused = len(left_out) - summary.skipped_long
        for number, (item, record_id, why) in enumerate(left_out):
            if number < WARN_FIRST:
                log.warning("skipped: %s:%d: %s (%s)", summary.source, item.line, why.reason,
                            SKIP_HINT if why.kind == TOO_LONG else REFUSED_HINT)
            skips.write({"id": record_id, "line": item.line, "kind": why.kind, "reason": why.reason, "prompt": item.text})
        if len(left_out) > WARN_FIRST:
            log.warning("skipped: and %d more (%s)", len(left_out) - WARN_FIRST, skips.where())
        skips.close()
        if summary.resumed:
            log.info("%d records to go", len(jobs))
        if options.judge and config.feedback is None and options.feedback_spec() is not None:
            judge_backend = _open_feedback(options, backend, session)     # --judge --judge-model
        else:
            judge_backend = backend
        curation = _curation(options, constitution, templates, judge_backend, paths, drop_append_at, config)
        failures = _Failures(paths.failures, options.fail_fast, memory=paths.output is None)
        writer = MemoryWriter() if paths.output is None else RecordWriter(paths.output, append_at=append_at)
        try:
            if hasattr(stop, "arm"):
                stop.arm()
            summary.start = time.monotonic()        # speed is of the generation, not of the model load
            if progress:
                progress("running", summary)
            if config.feedback is not None:
                _sampled_loop(pipeline, jobs, writer, curation, failures, options.format, summary, progress, stop)
            else:
                _loop(pipeline, jobs, writer, curation, failures, options.format, summary, progress, stop)
        finally:
            if hasattr(stop, "finish"):
                stop.finish()                       # the grace timer must not cut the cleanup short
            if config.feedback is None:
                summary.dropped = curation.dropped  # a sampled run counts prompts, not pairs (_sampled_loop)
            summary.curation = curation.counts()
            summary.failed = failures.file.count
            writer.close()
            failures.close()
            curation.drops.close()
            _finish_side(summary, skips, curation.drops, failures.file)
            summary.records = writer.records
    finally:
        report = getattr(backend, "endpoint_report", None)
        summary.endpoints = report() if report else []


def _feedback_name(options: GenerateOptions) -> str:
    """The feedback model's name as records carry it ("policy": the policy model gives it)."""
    from cai.backends.spec import is_open_backend, resolve

    spec = options.feedback_spec()
    if spec is None:
        return "policy"
    if is_open_backend(spec.model):
        return spec.model.model_name
    return resolve(spec)[1]


def _open_feedback(options: GenerateOptions, policy, session):
    """The feedback model: the policy's backend, an open backend the caller gave, or one opened
    from `judge_model` & co. by the session, as the policy is (and closed with it)."""
    spec = options.feedback_spec()
    return policy if spec is None else session.backend(spec)


def _sampled_loop(pipeline, jobs, writer, curation, failures, fmt: str, summary: Summary, progress, stop) -> None:
    """A sampled run's records (issue 33): each prompt comes out kept (one or more pairs written),
    dropped (every pair dropped by the filters, or none decided by `min_margin`: the filtered
    file says why) or failed (a sample, or the feedback, could not be made)."""
    from cai.fingerprint import FINGERPRINT_KEYS
    from cai.records import to_format

    def on_turn(stage: str, completion) -> None:
        summary.tokens += completion.completion_tokens
        if progress:
            progress("turn", summary)

    fingerprint = {k: v for k, v in pipeline.fingerprint().items() if k in FINGERPRINT_KEYS}
    for outcomes in pipeline.run(jobs, on_turn=on_turn, stop=stop):
        for outcome in outcomes:
            if outcome.failed:
                failures(outcome.job, *outcome.failed)
                continue
            summary.made += 1
            if outcome.dropped:
                curation.reasons.update(["margin"])
                curation.drops.write({"id": outcome.job.record_id, "principle": None, "meta": fingerprint,
                                      "filter": {"reasons": ["margin"], "detail": outcome.dropped}})
                summary.dropped += 1
                continue
            kept = curation(outcome.records)
            for record in kept:
                writer.write(to_format(record, fmt) if fmt != "standard" else record)
                summary.pairs += 1
                reasons = record["meta"]["finish_reasons"]
                summary.truncated += "length" in (reasons["response"], *reasons["revision"])
            if kept:
                summary.kept += 1
                summary.changed += 1
            else:
                summary.dropped += 1
        writer.sync()
        curation.drops.sync()
        summary.failed = failures.file.count
        if progress:
            progress("records", summary)


def _loop(pipeline, jobs, writer, curation, failures, fmt: str, summary: Summary, progress, stop) -> None:
    from cai.edits import edit_of
    from cai.pipeline import round_pairs
    from cai.records import to_format

    def on_turn(stage: str, completion) -> None:
        summary.tokens += completion.completion_tokens
        if progress:
            progress("turn", summary)

    check = (lambda record: curation.filters.apply(record).reasons) if curation.filters else None
    for made in pipeline.run(jobs, on_turn=on_turn, stop=stop, on_failure=failures, check=check):
        summary.made += len(made)
        kept = curation(made)
        summary.dropped = curation.dropped
        for record in kept:
            record["meta"]["edit"] = edit_of(record)         # of the final, cleaned chosen
            writer.write(to_format(record, fmt) if fmt != "standard" else record)
            for extra in round_pairs(record) if pipeline.config.keep_rounds else ():
                verdict = curation.filters.apply(extra) if curation.filters else None
                if verdict is None or verdict.kept:           # an earlier round's pair the filters pass
                    extra = verdict.record if verdict else extra
                    extra["meta"] = {**extra["meta"], "edit": edit_of(extra)}
                    writer.write(to_format(extra, fmt) if fmt != "standard" else extra)
                    summary.pairs += 1
            summary.kept += 1
            summary.pairs += 1
            summary.repaired += bool(record["meta"].get("repairs"))
            summary.changed += record["chosen"].strip() != record["rejected"].strip()
            reasons = record["meta"]["finish_reasons"]
            summary.truncated += "length" in (reasons["response"], *reasons["revision"])
        writer.sync()
        summary.failed = failures.file.count
        if progress:
            progress("records", summary)


def _prompt_check(selection, constitution, config):
    """Whether a record of the output was made from the prompt its id names now: a prompt with
    its own id (not the hash of its text) can change under that id between runs."""
    from cai.pipeline import record_ids
    from cai.records import conversation_of

    named = {record_id: item for item in selection.items if item.id != item.content_id
             for record_id in record_ids(constitution, config, item)}
    if not named:
        return None

    def check(record: dict) -> bool:
        item = named.get(str(record.get("id")))
        if item is None:
            return True
        try:
            _, history, prompt = conversation_of(record)
        except (KeyError, TypeError, AttributeError):
            return False
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        earlier = [(m.get("role"), m.get("content")) for m in history]
        same = (prompt == item.text or (meta.get("prompt_truncated") is True and isinstance(prompt, str)
                                        and item.text.startswith(prompt)))
        return same and earlier == [(m["role"], m["content"]) for m in item.history if m["role"] != "system"]

    return check


def _precision_hint(record: dict, fingerprint: dict) -> str:
    """Where only the model's CPU precision changed (a file made with float16 weights, cai's
    default before bfloat16 became auto's choice on AVX512-BF16 CPUs), how to continue it."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    old, new = meta.get("model"), fingerprint.get("model")
    if not (isinstance(old, str) and isinstance(new, str)) or old == new:
        return ""
    from cai.records import base_model

    if base_model(old) != base_model(new) or "(vllm" in old + new:
        return ""
    made = old[len(base_model(old)):].strip(" ()") or "float16"      # a bare name: float16 weights
    return f" (it was made with `dtype` {made}: pass that to continue it)"


def _existing(paths: _Paths, options: GenerateOptions, fingerprint: dict, source: str = "the input",
              prompt_check: Callable[[], Callable[[dict], bool] | None] | None = None
              ) -> tuple[set[str], int | None, int | None]:
    """(ids already done, bytes of the output to keep, bytes of the filtered file to keep): an
    existing output is continued when it holds records of this same run, refused otherwise; the
    ids of pairs the filters dropped (the filtered file) count as done too. A record made from
    another prompt than its id names now (what `prompt_check()` returns says) is refused too."""
    from cai.fingerprint import fingerprint_differences

    output = paths.output
    if output in (None, "-"):
        return set(), None, None
    out_path = Path(output)
    if out_path.is_dir():
        raise OptionError("output", f"{output} is a directory")
    filtered = Path(paths.filtered) if paths.filtered else None
    dropped = (scan_output(filtered) if filtered and filtered.is_file() and out_path.is_file()
               and not options.overwrite else None)
    if options.overwrite or not out_path.exists() or not (out_path.stat().st_size or (dropped and dropped.ids)):
        return set(), None, None
    existing = scan_output(out_path, prompt_check() if prompt_check else None)
    # the run that wrote the file: its first record, else (every pair so far was dropped) its
    # first dropped pair, whose line carries the same fingerprint
    first = existing.first or (dropped.first if dropped else None)
    changed = fingerprint_differences(first, fingerprint) if first else []
    if existing.first and isinstance(existing.first.get("prompt"), list) != (options.format == "conversational"):
        changed.append(f"format → {options.format}")
    if changed and not options.force:
        raise OptionError("output", f"{output} holds records of a different run ({'; '.join(changed)}); use "
                          "another output, `overwrite` to replace it, or `force` to append anyway"
                          + _precision_hint(first, fingerprint))
    if existing.stale:
        (record_id, line), more = existing.stale[0], len(existing.stale) - 1
        stale = (f"{output}:{line}: the record of id '{record_id}' was made from another prompt than {source} now "
                 f"gives that id" + (f" (and {more} more such ids)" if more else ""))
        if not options.force:
            raise OptionError("output", f"{stale}; use another output, `overwrite` to remake every record, or "
                              "`force` to keep the old records")
        log.warning("%s; kept as they are (force)", stale)
    done = set(existing.ids) | (dropped.ids if dropped else set())
    log.info("resuming %s: %d records already there%s%s", output, len(existing.ids),
             f" and {len(dropped.ids)} dropped in {paths.filtered}" if dropped and dropped.ids else "",
             " (cutting a torn last line)" if existing.torn else "")
    return done, existing.whole_bytes, dropped.whole_bytes if dropped else None


def _refuse_foreign_sides(options: GenerateOptions, fingerprint: dict) -> None:
    """A side file named explicitly (`filtered`, `failures`, `skipped`) is replaced or continued
    like the output: an existing one must be a cai side file of its kind, and the filtered file's
    records those of this run (as `_existing` asks of the output), unless `overwrite` (or, for a
    different run, `force`). Default side files are named after the output, and follow it."""
    from cai.fingerprint import fingerprint_differences

    for kind in ("filtered", "failures", "skipped"):
        existing = check_side_file(getattr(options, kind), kind, options.overwrite)
        if kind == "filtered" and existing is not None and not options.force:
            first, path = existing.first, options.filtered
            changed = fingerprint_differences(first, fingerprint) if first else []
            if changed:
                raise OptionError(kind, f"{path} holds records of a different run ({'; '.join(changed)}); use "
                                        "another file, `overwrite` to replace it, or `force` to append anyway")


def _refuse_overlap(prompts, paths: _Paths) -> str:
    """The prompts' name for messages; refuses an output or side file that is the prompts file
    (even with overwrite: it would destroy the input)."""
    if not isinstance(prompts, (str, os.PathLike)):
        return "<prompts>"
    source = str(prompts)
    if source == "-":
        return "<stdin>"
    for target in paths.files():
        if Path(target).exists() and Path(source).exists() and Path(target).resolve() == Path(source).resolve():
            raise OptionError("output", f"{target} is the prompts file; writing it would destroy the input")
    return source


def _skip_invalid(selection, skips: SideFile) -> None:
    for number, error in enumerate(selection.invalid):
        if number < WARN_FIRST:
            log.warning("skipped: %s", error)
        skips.write({"id": None, "line": error.line, "kind": "invalid", "reason": str(error)})
    if len(selection.invalid) > WARN_FIRST:
        log.warning("skipped: and %d more invalid lines (%s)", len(selection.invalid) - WARN_FIRST, skips.where())
    skips.sync()


def _finish_side(summary: Summary, skips: SideFile, drops: SideFile | None, failures: SideFile | None) -> None:
    skips.close()
    if drops is not None and drops.count and not drops.path and drops.lines is None:
        for line in drops.first:             # stdout: say which, as failures and skips are
            log.warning("dropped: %s: %s", line.get("id"), ", ".join(line["filter"]["reasons"]))
        log.warning("%d dropped pairs are listed nowhere: %s", drops.count, drops.nowhere)
    for name, side in (("skipped", skips), ("filtered", drops), ("failures", failures)):
        if side is not None and side.lines is not None:
            summary.side[name] = side.lines
    if not skips.count:
        summary.skipped_file = None


def make_filters(options: GenerateOptions, constitution, config):
    """The filters a run with these options applies (None with `filter` off): `cai generate`'s,
    and what `cai preview` shows the verdict of."""
    from cai.filters import DEFAULT_CHECKS, FilterConfig, Filters, references_of

    return Filters(FilterConfig(
        checks=DEFAULT_CHECKS + (("refusal",) if options.drop_refusals else ()), similarity=options.similarity,
        references=references_of(constitution) if config.few_shot else (),
        reasoning_tags=config.reasoning_tags)) if options.filter else None


def _curation(options: GenerateOptions, constitution, templates, backend, paths: _Paths, drop_append_at, config):
    from cai.curation import Curation
    from cai.judging import Judge

    filters = make_filters(options, constitution, config)
    judge = Judge(backend, constitution, templates, options.judge_config()) if options.judge else None
    drops = SideFile(paths.filtered, drop_append_at, memory=paths.output is None)
    return Curation(filters, judge, options.min_preference, options.swap, drops, options.keep_filtered,
                    options.trust_disagreeing)


class _Failures:
    """Conversations that failed for good (a remote request that kept failing): one JSON line
    each in the failures file, which a rerun replaces (it retries them); `fail_fast` stops."""

    def __init__(self, path: str | None, fail_fast: bool, memory: bool):
        self.file, self.fail_fast = SideFile(path, memory=memory, kind="failures"), fail_fast

    def __call__(self, job, stage: str, reason: str) -> None:
        from datetime import datetime, timezone

        if self.fail_fast:
            raise BackendError(f"prompt {job.record_id} (input line {job.prompt.line}): {stage}: {reason} (`fail_fast`)")
        if self.file.count < WARN_FIRST:
            log.warning("failed: prompt %s: %s: %s", job.record_id, stage, reason)
        self.file.write({"id": job.record_id, "prompt": job.prompt.text, "line": job.prompt.line, "stage": stage,
                         "error": reason, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.file.sync()

    def close(self) -> None:
        if self.file.count > WARN_FIRST:
            log.warning("failed: and %d more (%s)", self.file.count - WARN_FIRST, self.file.where())
        self.file.close()


def _sampling(options: GenerateOptions):
    from cai.backends.base import SamplingParams

    return SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p)


def _log_signal(name: str, grace: float) -> None:
    log.warning("%s: stopping: finishing the conversations in flight (up to %g s; again to stop at once)", name, grace)


