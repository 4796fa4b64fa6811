"""cai.run.select's Selection: which records a run makes (limit, shard, invalid lines) and, once
the output has been read back, which of them are done, resumed, removed, or whether there is
nothing to do. Plain data: no model, no backend, no files."""

from __future__ import annotations

import pytest

from cai.constitution import load_constitution
from cai.feedback import FeedbackConfig
from cai.options import GenerateOptions
from cai.pipeline import RunConfig
from cai.records import shard_of
from cai.run.select import Selection, select

CONSTITUTION = load_constitution("harmless")
PRINCIPLES = [p.id for p in CONSTITUTION.principles]
ROWS = [{"id": f"p{i}", "prompt": f"How do I make tea number {i}?"} for i in range(12)]
SAMPLED = RunConfig(revisions=0, sampling="random", feedback=FeedbackConfig(min_margin=0.2).describe("policy"))


def choose(rows=ROWS, config=RunConfig(), **options) -> Selection:
    return select(rows, GenerateOptions(**options), CONSTITUTION, config)


def test_limit_and_shard_choose_by_place_and_id_and_the_whole_input_stays_known():
    whole = choose()
    assert whole.ids == [r["id"] for r in ROWS] and whole.all_ids == set(whole.ids) and whole.planned == 12
    cut = choose(limit=8, shard="2/3")
    expected = [f"p{i}" for i in range(8) if shard_of(f"p{i}", 3) == 2]
    assert 0 < len(expected) < 8            # the shard keeps some of the limit's prompts, not all
    assert [item.id for item in cut.items] == cut.ids == expected
    assert cut.all_ids == whole.all_ids     # every shard, no limit: what decides `removed`
    assert cut.planned == len(expected) and cut.done == frozenset() and cut.resumed == 0
    # the shards of one limit share its prompts out, each once
    shards = [choose(limit=8, shard=f"{k}/3").ids for k in (1, 2, 3)]
    assert sorted(i for ids in shards for i in ids) == sorted(f"p{i}" for i in range(8))


def test_resume_counts_only_this_runs_records_and_removed_only_those_of_no_prompt():
    cut = choose(limit=8, shard="2/3")
    mine, others = cut.ids[0], [f"p{i}" for i in range(12) if f"p{i}" not in cut.ids]
    resumed = cut.resuming({mine, *others, "gone-1", "gone-2"})
    assert resumed is not cut and cut.done == frozenset()       # a new selection; the first one unchanged
    assert resumed.resumed == 1                 # other shards' and beyond-limit records are not this run's
    assert resumed.removed == 2                 # ... nor removed: their prompts are still in the input
    assert not resumed.todo(mine) and all(resumed.todo(i) for i in cut.ids[1:])
    assert not resumed.nothing_to_do
    assert cut.resuming(cut.ids).nothing_to_do and cut.resuming(cut.ids).removed == 0


def test_sampling_all_plans_a_record_per_principle_and_resumes_each_on_its_own():
    rows = ROWS[:3] + [{"id": "broken"}] + ROWS[3:5]
    selection = choose(rows, RunConfig(sampling="all"), skip_invalid=True, limit=4)
    assert [item.id for item in selection.items] == ["p0", "p1", "p2"]      # line 4 (invalid) counts in the limit
    assert selection.ids == [f"p{i}/{p}" for i in range(3) for p in PRINCIPLES]
    assert selection.all_ids == {f"p{i}/{p}" for i in range(5) for p in PRINCIPLES}
    assert len(selection.invalid) == 1 and selection.invalid[0].line == 4
    assert selection.skipped_invalid == len(PRINCIPLES)                   # an invalid line stands for each principle
    assert selection.planned == 4 * len(PRINCIPLES)
    half = selection.resuming([f"p0/{p}" for p in PRINCIPLES] + [f"p1/{PRINCIPLES[0]}", "p1", "p9/x"])
    assert half.resumed == len(PRINCIPLES) + 1
    assert half.removed == 2                      # "p1" is no record of this input's plan, nor "p9/x"
    assert not half.todo(f"p1/{PRINCIPLES[0]}") and half.todo(f"p1/{PRINCIPLES[1]}")
    assert half.todo(f"p2/{PRINCIPLES[0]}")
    # invalid lines are skipped, not to make: every planned record there is nothing to do
    assert selection.resuming(selection.ids).nothing_to_do


def test_keep_rounds_and_sampled_runs_count_a_prompts_records_together():
    found = {"p0", "p0#r1", "p0#r2", "p1#r1", "gone#r1"}
    rounds = choose(config=RunConfig(revisions=3, keep_rounds=True), limit=4).resuming(found)
    assert rounds.by_prompt and rounds.done == {"p0", "p1", "gone"}
    assert (rounds.resumed, rounds.removed) == (2, 1)
    assert not rounds.todo("p0") and not rounds.todo("p1") and rounds.todo("p2")
    # a sampled run's pairs (ID#i-j with min_margin) are its prompt's
    sampled = choose(config=SAMPLED, limit=4)
    assert sampled.by_prompt and sampled.ids == ["p0", "p1", "p2", "p3"]
    pairs = sampled.resuming({"p2#0-1", "p2#1-2", "p3", "gone#0-2"})
    assert (pairs.resumed, pairs.removed) == (2, 1) and [i for i in pairs.ids if pairs.todo(i)] == ["p0", "p1"]
    assert sampled.resuming({"p0#0-1", "p1#0-2", "p2#1-2", "p3"}).nothing_to_do
    # a run made record by record takes an id with '#' as it is
    plain = choose(limit=4).resuming({"p0#r1", "p1"})
    assert not plain.by_prompt and (plain.resumed, plain.removed) == (1, 1) and plain.todo("p0")


def test_a_prompt_id_holding_a_hash_is_resumed_not_made_again():
    """Regression: under keep_rounds or a sampled run, a found id used to be cut at its first
    '#', so a prompt whose own id holds one ('a#b') never counted as done and its records were
    made, and appended, a second time."""
    rows = [{"id": "a#b", "prompt": "Tea?"}, {"id": "x#r1", "prompt": "Coffee?"}, {"id": "c", "prompt": "Water?"}]
    rounds = choose(rows, RunConfig(revisions=2, keep_rounds=True)).resuming(
        {"a#b", "a#b#r1", "x#r1", "x#r1#r1", "gone#x#r1"})
    assert rounds.done == {"a#b", "x#r1", "gone#x"}
    assert (rounds.resumed, rounds.removed) == (2, 1)
    assert not rounds.todo("a#b") and not rounds.todo("x#r1") and rounds.todo("c")
    sampled = choose(rows, SAMPLED).resuming({"a#b#0-1", "c"})
    assert [i for i in sampled.ids if sampled.todo(i)] == ["x#r1"] and sampled.removed == 0


def test_a_run_no_prompt_falls_in_has_nothing_to_do():
    empty = choose(ROWS[:1], shard="2/2" if shard_of("p0", 2) == 1 else "1/2")
    assert empty.ids == [] and empty.items == [] and empty.planned == 0
    assert empty.nothing_to_do and empty.resuming({"p0"}).removed == 0
    assert not choose(ROWS[:1]).nothing_to_do


@pytest.mark.parametrize("config", [RunConfig(), RunConfig(sampling="all", revisions=2), SAMPLED],
                         ids=["random", "all", "sampled"])
def test_the_pipeline_plans_what_the_selection_says_is_to_do(config):
    """The resume's decision reaches the jobs: Pipeline.plan (and SampledPipeline.plan) make
    exactly the records the selection has not seen done."""
    from cai.backends.scripted import ScriptedBackend
    from cai.feedback import FeedbackModel, SampledPipeline
    from cai.pipeline import Pipeline
    from cai.templates import load_templates

    templates, backend = load_templates("default"), ScriptedBackend()
    if config.feedback is not None:
        fb = FeedbackConfig(min_margin=0.2)
        pipeline = SampledPipeline(backend, FeedbackModel(backend, CONSTITUTION, templates, fb), CONSTITUTION,
                                   templates, config, fb)
    else:
        pipeline = Pipeline(backend, CONSTITUTION, templates, config)
    selection = choose(config=config, limit=5)
    done = selection.ids[::2]
    resumed = selection.resuming(f"{i}#0-1" if config.feedback else i for i in done)
    jobs, left_out = pipeline.plan(resumed.items, todo=resumed.todo)
    assert left_out == [] and [job.record_id for job in jobs] == [i for i in selection.ids if i not in done]
    assert resumed.resumed == len(done) and len(jobs) == len(selection.ids) - resumed.resumed
