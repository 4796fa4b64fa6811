"""Which records a run makes, in one place: read the input, keep the prompts inside `limit` and
the shard, and (once the output has been read back) leave out what an earlier run already made.
Limit and shard are decided by a prompt's place in the whole input and its id, never by what an
earlier step left out, so however a run is cut (limit, shards, skipped lines, resume) each prompt
gets the same records. Plain data: what is on disk is found by the run (`cai.run.generate`), what
it means for this run is decided here."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cai.errors import InputError
from cai.messages import PromptItem


@dataclass(frozen=True)
class Selection:
    """The prompts of a run and the records they plan, and (after `resuming`) which of those an
    earlier run already made. A record is done by its id; in a run whose records are made a
    prompt at a time (`by_prompt`: sampled pairs, whose ids may be `ID#i-j`, or `keep_rounds`,
    whose earlier rounds' pairs are `ID#rK`), by the part of its id before the last '#'."""

    items: list[PromptItem]             # the prompts of this run
    invalid: list[InputError]           # invalid lines of this run (skip_invalid)
    ids: list[str]                      # the record ids this run plans (of `items`)
    all_ids: frozenset[str]             # the record ids the whole input plans (every shard, no limit)
    per_invalid: int = 1                # records an invalid line stands for (principles, with 'all')
    by_prompt: bool = False             # records found are counted per planned id (see above)
    done: frozenset[str] = frozenset()  # ids already made (by_prompt: the ids they belong to)

    @property
    def planned(self) -> int:
        """Records this run stands for: those it plans, and those its invalid lines would have made."""
        return len(self.ids) + self.skipped_invalid

    @property
    def skipped_invalid(self) -> int:
        return len(self.invalid) * self.per_invalid

    def resuming(self, found: Iterable[str]) -> Selection:
        """This selection continuing an output that holds the records of ids `found` (those in the
        output and those the filters dropped)."""
        if self.by_prompt:
            # an id the input plans is that record; another (ID#i-j, ID#rK) belongs to the part
            # before its last '#', so a prompt id that holds a '#' itself keeps it
            return replace(self, done=frozenset(record_id if record_id in self.all_ids else record_id.rsplit("#", 1)[0]
                                                for record_id in found))
        return replace(self, done=frozenset(found))

    def todo(self, record_id: str) -> bool:
        """Whether the record of this id (a planned id: a prompt's id in a sampled run) is still to make."""
        return record_id not in self.done

    @functools.cached_property
    def resumed(self) -> int:
        """Records of this run already made."""
        return sum(record_id in self.done for record_id in self.ids)

    @functools.cached_property
    def removed(self) -> int:
        """Records (prompts, in a `by_prompt` run) of the output whose prompts are no longer in the
        input (in no shard, at no limit)."""
        return len(self.done - self.all_ids)

    @property
    def nothing_to_do(self) -> bool:
        """Every record this run plans is already made (or it plans none)."""
        return self.resumed == len(self.ids)


def select(prompts, options, constitution, config, stdin=None) -> Selection:
    """The prompts of `prompts` (a path, '-' for stdin, or an iterable of prompts) this run takes,
    and the records they plan under `config`; nothing done yet (see `Selection.resuming`)."""
    from cai.inputs import read_prompts
    from cai.pipeline import record_ids
    from cai.records import shard_of

    invalid: list[InputError] = []
    input_format = options.input_format
    if isinstance(prompts, (str, bytes)) or hasattr(prompts, "__fspath__"):
        source, stream = str(prompts), stdin
    else:
        if input_format not in (None, "jsonl"):
            from cai.errors import OptionError

            raise OptionError("input_format", "is for a prompts file or stdin; prompts given as a list are read "
                                              "as JSONL rows")
        source, stream, input_format = "-", io.BytesIO(_as_jsonl(prompts, options.prompt_field)), "jsonl"
    items = read_prompts(source, stdin=stream, invalid=invalid if options.skip_invalid else None,
                         fields=options.fields(), split=options.split, input_format=input_format)
    invalid.sort(key=lambda error: error.line or 0)
    shard_k, shard_n = options.shard_numbers()

    def inside(index: int, key: str) -> bool:
        return (options.limit is None or index < options.limit) and (shard_n == 1 or shard_of(key, shard_n) == shard_k)

    chosen = [item for item in items if inside(_index(item), item.id)]
    if shard_n > 1:
        import logging

        logging.getLogger("cai").info("shard %d/%d: %d prompts", shard_k, shard_n, len(chosen))
    return Selection(
        items=chosen,
        invalid=[error for error in invalid if inside(error.index or 0, f"line\x1f{error.index}")],
        # the ids alone (no principles drawn, no plan kept a prompt): a million prompts stay cheap
        ids=[record_id for item in chosen for record_id in record_ids(constitution, config, item)],
        all_ids=frozenset(record_id for item in items for record_id in record_ids(constitution, config, item)),
        per_invalid=len(constitution.principles) if config.sampling == "all" else 1,
        # a sampled prompt's pairs, and a record's round pairs (ID#rK), are made together
        by_prompt=config.feedback is not None or config.keep_rounds)


def _index(item: PromptItem) -> int:
    return item.index if item.index is not None else item.line - 1


def _as_jsonl(prompts: Iterable, prompt_field: str) -> bytes:
    """An iterable of prompts (strings, conversations as lists of chat messages, or row dicts) as
    JSONL bytes, so it is read and checked exactly as a file would be."""
    from cai.errors import OptionError

    lines = []
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, (str, dict, list, tuple)):
            raise OptionError("prompts", f"item {number}: expected a prompt string, a list of chat messages or a dict, "
                                         f"got {type(prompt).__name__}")
        lines.append(json.dumps(prompt if isinstance(prompt, dict) else {prompt_field: prompt}, ensure_ascii=False))
    if not lines:
        raise OptionError("prompts", "no prompts given")
    return ("\n".join(lines) + "\n").encode("utf-8")
