"""The judge run (`cai judge`, `cai.judge`): read finished pairs, label each with the judge's
preference, curate (min-preference, swap) and write them. Prints nothing; returns a summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import BackendError, OptionError
from cai.options import JudgeOptions
from cai.output import MemoryWriter, RecordWriter, SideFile, check_side_file, side_path

log = logging.getLogger("cai")


@dataclass
class JudgeSummary:
    model: str = ""
    output: str | None = None
    read: int = 0
    written: int = 0
    curation: dict = field(default_factory=dict)
    records: list[dict] | None = None
    stopped_by: str | None = None
    stop_exit: int = 130
    elapsed: float = 0.0

    @property
    def exit_code(self) -> int:
        return self.stop_exit if self.stopped_by else 0


def run(pairs: str | list[dict], output: str | None, options: JudgeOptions, *,
        progress: Callable[[int, int], None] | None = None, stop: Callable[[], bool] | None = None) -> JudgeSummary:
    from cai.backends.spec import is_open_backend, resolve
    from cai.curation import Curation
    from cai.inputs import read_records
    from cai.judging import Judge
    from cai.templates import load_templates
    from cai.run.session import RunSession

    options.check()
    filtered = options.filtered or side_path(output, "filtered")
    if options.keep_filtered and output == "-" and not options.filtered:
        raise OptionError("keep_filtered", "with output to stdout needs `filtered` FILE")
    if output not in (None, "-") and Path(output).exists() and not options.overwrite:
        raise OptionError("output", f"{output} exists; pass `overwrite` to replace it")
    check_side_file(options.filtered, "filtered", options.overwrite)
    if (isinstance(pairs, str) and output not in (None, "-") and Path(pairs).exists()
            and Path(output).resolve() == Path(pairs).resolve()):
        raise OptionError("output", f"{output} is also the input")
    records = read_records(pairs) if isinstance(pairs, str) else _given(pairs)
    constitution = judge_constitution(options.constitution, records)
    templates = load_templates(options.templates)
    resolved = (None, options.model.model_name) if is_open_backend(options.model) else resolve(options.backend_spec())
    summary = JudgeSummary(model=resolved[1], output=output, read=len(records))
    start = time.monotonic()
    with RunSession([output, filtered], lock=options.lock and output is not None, stop=stop) as session:
        backend = session.backend(options, resolved)
        curation = Curation(None, Judge(backend, constitution, templates, options.judge_config(options.prefix)),
                            options.min_preference, options.swap, SideFile(filtered, memory=output is None),
                            options.keep_filtered, options.trust_disagreeing)
        writer = MemoryWriter() if output is None else RecordWriter(output)
        if progress:
            progress(0, len(records))
        try:
            with session.stoppable():
                for i in range(0, len(records), options.batch_size):
                    if session.stop():
                        break
                    for record in curation(records[i:i + options.batch_size]):
                        writer.write(record)
                    writer.sync()
                    if progress:
                        progress(min(i + options.batch_size, len(records)), len(records))
        finally:
            writer.close()
            curation.drops.close()
            summary.written, summary.curation, summary.records = writer.count, curation.counts(), writer.records
        session.note_stop()
    summary.stopped_by, summary.stop_exit = session.stopped_by, session.stop_exit
    summary.elapsed = time.monotonic() - start
    if curation.unjudged and curation.judged == 0 and not summary.stopped_by:
        raise BackendError(f"no pair could be judged ({curation.unjudged} failed); see the warnings above")
    return summary


def _given(pairs) -> list[dict]:
    """Records a Python caller passed, each a dict (copied: the judge labels its own)."""
    records = []
    for number, record in enumerate(pairs, start=1):
        if not isinstance(record, dict):
            raise OptionError("pairs", f"item {number}: expected a record dict, got {type(record).__name__}")
        records.append(dict(record))
    return records


def judge_constitution(spec, records: list[dict]):
    """The constitution whose `choice` questions the judge asks: the one named, or else the
    shipped one the records name (by the name part of meta.constitution); None (a generic question)
    when there is none to find."""
    from cai.constitution import Constitution, load_constitution, shipped_constitutions

    if isinstance(spec, Constitution):
        return spec
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
                "(pass a constitution to use the principles' own)", ", ".join(sorted(refs)) or "none named")
    return None
