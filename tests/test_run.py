"""The run module (cai.run.generate) with a scripted backend: resume, side files, curation,
accounting and outcome, sharding and limits, in milliseconds and without a model."""

from __future__ import annotations

import json

import pytest

from cai.errors import OptionError, OutputError
from cai.options import GenerateOptions
from cai.run.generate import run
from conftest import read_jsonl
from cai.backends.scripted import ScriptedBackend

PROMPTS = [f"How do I make tea number {i}?" for i in range(12)]


def options(backend, **extra) -> GenerateOptions:
    return GenerateOptions(model=backend, **{"filter": False, "max_new_tokens": 16, **extra})


def without_created(records: list[dict]) -> dict[str, dict]:
    out = {}
    for r in records:
        meta = {k: v for k, v in r["meta"].items() if k != "created"}
        out[r["id"]] = {**r, "meta": meta}
    return out


def write_prompts(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def test_a_whole_run_accounts_for_every_record(tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run(write_prompts(tmp_path), str(out), options(ScriptedBackend()))
    assert summary.complete and summary.exit_code == 0
    assert (summary.planned, summary.kept, summary.dropped, summary.failed, summary.skipped) == (12, 12, 0, 0, 0)
    assert len(read_jsonl(out)) == 12
    assert not (tmp_path / "out.jsonl.lock").exists(), "the lock file goes with the run"
    assert not (tmp_path / "out.jsonl.skipped.jsonl").exists()


def test_output_none_returns_records_and_side_lines(tmp_path):
    backend = ScriptedBackend(fail={PROMPTS[0]}, unchanged={PROMPTS[1]})
    summary = run(PROMPTS[:4], None, options(backend, filter=True))
    assert sorted(r["prompt"] for r in summary.records) == sorted(PROMPTS[2:4])
    assert [line["id"] for line in summary.side["failures"]] == [summary.side["failures"][0]["id"]]
    assert summary.side["filtered"][0]["filter"]["reasons"] == ["unchanged"]
    assert (summary.kept, summary.dropped, summary.failed) == (2, 1, 1)
    assert summary.exit_code == 1 and "1 failed after their retries" in summary.problem()
    assert not backend.closed, "a backend the caller opened stays open"


def test_limit_then_resume_equals_one_full_run(tmp_path):
    prompts = write_prompts(tmp_path)
    whole = tmp_path / "whole.jsonl"
    run(prompts, str(whole), options(ScriptedBackend(), sampling="cycle"))
    cut = tmp_path / "cut.jsonl"
    first = run(prompts, str(cut), options(ScriptedBackend(), sampling="cycle", limit=3))
    assert first.kept == 3 and first.complete
    second = run(prompts, str(cut), options(ScriptedBackend(), sampling="cycle"))
    assert (second.resumed, second.kept) == (3, 9)
    assert without_created(read_jsonl(cut)) == without_created(read_jsonl(whole))


@pytest.mark.parametrize("sampling", ["random", "all", "cycle"])
def test_shards_merged_equal_the_unsharded_run(tmp_path, sampling):
    from cai.run.merge import merge

    prompts = write_prompts(tmp_path)
    whole = tmp_path / "whole.jsonl"
    run(prompts, str(whole), options(ScriptedBackend(), sampling=sampling, revisions=2))
    shards = []
    for k in (1, 2):
        shard = tmp_path / f"shard{k}.jsonl"
        run(prompts, str(shard), options(ScriptedBackend(), sampling=sampling, revisions=2, shard=f"{k}/2"))
        shards.append(str(shard))
    merged = tmp_path / "merged.jsonl"
    merge(str(merged), shards)
    assert without_created(read_jsonl(merged)) == without_created(read_jsonl(whole))


def test_skip_invalid_does_not_shift_cycle_principles(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6]))
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": p}) for p in PROMPTS[:6]]
    lines[2] = '{"prompt": '              # the third prompt broken: later prompts keep their place
    bad.write_text("\n".join(lines) + "\n")
    a = run(good, str(tmp_path / "a.jsonl"), options(ScriptedBackend(), sampling="cycle"))
    b = run(bad, str(tmp_path / "b.jsonl"), options(ScriptedBackend(), sampling="cycle", skip_invalid=True))
    assert a.complete and b.skipped_invalid == 1 and b.exit_code == 1
    principle = {r["prompt"]: r["principle"] for r in read_jsonl(tmp_path / "a.jsonl")}
    for r in read_jsonl(tmp_path / "b.jsonl"):
        assert r["principle"] == principle[r["prompt"]]


def test_failures_then_rerun_retries_just_those(tmp_path):
    prompts = write_prompts(tmp_path)
    out = tmp_path / "out.jsonl"
    first = run(prompts, str(out), options(ScriptedBackend(fail={PROMPTS[4], PROMPTS[7]})))
    assert (first.kept, first.failed, first.exit_code) == (10, 2, 1)
    assert sorted(line["prompt"] for line in read_jsonl(f"{out}.failures.jsonl")) == sorted([PROMPTS[4], PROMPTS[7]])
    backend = ScriptedBackend()
    second = run(prompts, str(out), options(backend))
    assert (second.resumed, second.kept, second.exit_code) == (10, 2, 0)
    assert backend.calls == 2 * 3, "only the two failed prompts run again (three turns each)"
    assert not (tmp_path / "out.jsonl.failures.jsonl").exists()
    assert len(read_jsonl(out)) == 12


def test_dropped_pairs_go_to_the_filtered_file_and_count_as_done(tmp_path):
    prompts = write_prompts(tmp_path, PROMPTS[:4])
    out = tmp_path / "out.jsonl"
    first = run(prompts, str(out), options(ScriptedBackend(unchanged={PROMPTS[2]}), filter=True))
    assert (first.kept, first.dropped, first.exit_code) == (3, 1, 0)
    assert [line["filter"]["reasons"] for line in read_jsonl(f"{out}.filtered.jsonl")] == [["unchanged"]]
    again = run(prompts, str(out), options(ScriptedBackend(), filter=True))
    assert again.nothing_to_do and again.resumed == 4


def test_too_long_prompts_are_skipped_into_the_skipped_file(tmp_path):
    prompts = write_prompts(tmp_path, ["short one", "long " * 400, "short two"])
    out = tmp_path / "out.jsonl"
    summary = run(prompts, str(out), options(ScriptedBackend(context_length=300), few_shot=False))
    assert (summary.kept, summary.skipped_long, summary.exit_code) == (2, 1, 1)
    assert [line["kind"] for line in read_jsonl(f"{out}.skipped.jsonl")] == ["too long"]
    assert "try `few_shot=False` or `truncate_long`" in summary.problem()


def test_no_record_made_at_all_says_so(tmp_path):
    prompts = write_prompts(tmp_path, PROMPTS[:2])
    summary = run(prompts, str(tmp_path / "out.jsonl"), options(ScriptedBackend(fail=set(PROMPTS[:2]))))
    assert summary.nothing_made() and summary.problem().startswith("no record could be made")


def test_a_stop_ends_the_run_with_the_rest_unmade(tmp_path):
    prompts = write_prompts(tmp_path)
    out = tmp_path / "out.jsonl"
    backend = ScriptedBackend(width=2)
    seen = []

    def stop() -> bool:
        return len(seen) >= 1

    summary = run(prompts, str(out), options(backend, batch_size=2), stop=stop,
                  progress=lambda phase, s: seen.append(s.kept) if phase == "records" else None)
    assert summary.stopped_by == "stop" and summary.exit_code == 130
    assert summary.kept + summary.not_made == 12 and 0 < summary.kept < 12
    rest = run(prompts, str(out), options(ScriptedBackend()))
    assert rest.complete and len(read_jsonl(out)) == 12


def test_a_second_run_on_a_locked_output_fails_at_once(tmp_path):
    from cai.locks import OutputLock

    out = tmp_path / "out.jsonl"
    with OutputLock(str(out)):
        with pytest.raises(OutputError) as caught:
            run(PROMPTS[:2], str(out), options(ScriptedBackend()))
    assert caught.value.exit_code == 2 and "another cai run is writing it (pid" in str(caught.value)
    assert not out.exists()


def test_output_that_is_the_prompts_file_is_refused_even_with_overwrite(tmp_path):
    prompts = write_prompts(tmp_path)
    before = prompts.read_bytes()
    with pytest.raises(OptionError, match="is the prompts file"):
        run(prompts, str(prompts), options(ScriptedBackend(), overwrite=True))
    assert prompts.read_bytes() == before


def test_resume_says_how_many_records_are_of_removed_prompts(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    run(write_prompts(tmp_path, PROMPTS[:6]), str(out), options(ScriptedBackend()))
    with caplog.at_level("WARNING", logger="cai"):
        summary = run(write_prompts(tmp_path, PROMPTS[2:8]), str(out), options(ScriptedBackend()))
    assert summary.removed == 2 and summary.kept == 2
    assert "holds 2 records of prompts no longer in" in caplog.text


def test_merge_conflict_lists_both_places_and_writes_nothing(tmp_path):
    from cai.run.merge import MergeConflict, merge

    a = tmp_path / "a.jsonl"
    run(PROMPTS[:3], str(a), options(ScriptedBackend()))
    records = read_jsonl(a)
    records[1]["chosen"] = "something else entirely"
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(MergeConflict) as caught:
        merge(str(tmp_path / "m.jsonl"), [str(a), str(b)])
    assert f"{a}:2 and {b}:2 differ" in str(caught.value) and caught.value.exit_code == 1
    assert not (tmp_path / "m.jsonl").exists()
    kept = merge(str(tmp_path / "m.jsonl"), [str(a), str(b)], on_conflict="last")
    assert kept.kept == 3 and len(kept.conflicts) == 1
    assert read_jsonl(tmp_path / "m.jsonl")[1]["chosen"] == "something else entirely"


def test_write_error_is_one_error_naming_what_is_safe(tmp_path):
    if not __import__("os").path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OutputError, match="No space left on device"):
        run(PROMPTS[:2], "/dev/full", options(ScriptedBackend()))


def test_unknown_option_names_a_close_match():
    import cai

    with pytest.raises(OptionError, match="did you mean max_new_tokens"):
        cai.generate(PROMPTS[:1], max_new_token=8)


# --- found in review ------------------------------------------------------------------------

def test_a_side_file_named_after_another_output_is_covered_by_its_lock(tmp_path):
    from cai.locks import Locks, OutputLock

    a, b = tmp_path / "A.jsonl", tmp_path / "B.jsonl"
    with OutputLock(str(a)):
        with pytest.raises(OutputError, match="another cai run is writing it"):
            run(PROMPTS[:2], str(b), options(ScriptedBackend(), filtered=f"{a}.filtered.jsonl"))
    link = tmp_path / "link.jsonl"
    link.symlink_to(b)
    with OutputLock(str(b)):
        with pytest.raises(OutputError, match="another cai run"):
            Locks([str(link)]).__enter__()


def test_output_and_a_side_file_must_differ(tmp_path):
    out = tmp_path / "m.jsonl"
    with pytest.raises(OptionError, match="is also the output file"):
        run(PROMPTS[:2], str(out), options(ScriptedBackend(), skipped=str(out)))


def test_invalid_lines_under_sampling_all_are_counted_as_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n{broken\n")
    out = tmp_path / "out.jsonl"
    first = run(bad, str(out), options(ScriptedBackend(), sampling="all", skip_invalid=True))
    principles = first.planned // 2
    assert (first.kept, first.skipped_invalid, first.not_made, first.exit_code) == (principles, principles, 0, 1)
    again = run(bad, str(out), options(ScriptedBackend(), sampling="all", skip_invalid=True))
    assert again.nothing_to_do and again.exit_code == 1, "the invalid line is still not made"
    assert "skipped as invalid input lines" in again.problem()


def test_an_empty_shard_writes_an_empty_file(tmp_path):
    prompts = write_prompts(tmp_path, PROMPTS[:1])
    outs = [tmp_path / f"s{k}.jsonl" for k in range(1, 9)]
    for k, out in enumerate(outs, start=1):
        summary = run(prompts, str(out), options(ScriptedBackend(), shard=f"{k}/8"))
        assert summary.exit_code == 0
    assert all(out.exists() for out in outs)
    assert sum(len(read_jsonl(out)) for out in outs) == 1


def test_an_invalid_line_is_in_one_shard_however_the_path_is_spelled(tmp_path, monkeypatch):
    from cai.run.select import select
    from cai.constitution import load_constitution
    from cai.pipeline import RunConfig

    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"prompt": p}) for p in PROMPTS] + ["{broken"]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    constitution = load_constitution("harmless")
    placements = []
    for spelling in ("p.jsonl", "./p.jsonl", str(tmp_path / "p.jsonl")):
        placements.append([len(select(spelling, options(None, skip_invalid=True, shard=f"{k}/3"), constitution,
                                      RunConfig()).invalid) for k in (1, 2, 3)])
    assert all(sum(found) == 1 for found in placements) and placements[0] == placements[1] == placements[2]


def test_api_prompts_must_be_strings_conversations_or_dicts():
    import cai

    with pytest.raises(OptionError, match="item 1: expected a prompt string, a list of chat messages or a dict, got int"):
        cai.generate([5, {"prompt": "x"}], model=ScriptedBackend())
    with pytest.raises(OptionError, match="no prompts given"):
        cai.generate([], model=ScriptedBackend())


def test_signals_nohup_a_failing_message_and_the_cleanup(monkeypatch):
    import os
    import signal

    from cai.signals import StopSignals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals(5) as stopper:               # `nohup`: SIGHUP stays ignored
            stopper.arm()
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stopper()
    finally:
        signal.signal(signal.SIGHUP, previous)

    def broken_stderr(name, grace):
        raise SystemExit(1)                           # what rich does when stderr is gone

    with StopSignals(5, on_signal=broken_stderr) as stopper:
        stopper.arm()
        os.kill(os.getpid(), signal.SIGTERM)          # noted, not fatal
        assert stopper() and stopper.name == "SIGTERM"
        stopper.finish()
        os.kill(os.getpid(), signal.SIGTERM)          # during the cleanup: noted, nothing raised
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_merge_writes_through_a_symlink_and_refuses_a_device(tmp_path):
    import os

    from cai.run.merge import merge

    a = tmp_path / "a.jsonl"
    run(PROMPTS[:2], str(a), options(ScriptedBackend()))
    real = tmp_path / "real.jsonl"
    real.write_text("")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    merge(str(link), [str(a)], overwrite=True)
    assert link.is_symlink() and len(read_jsonl(real)) == 2
    if os.path.exists("/dev/full"):
        with pytest.raises(OptionError, match="not a regular file"):
            merge("/dev/full", [str(a)], overwrite=True)
        assert not os.path.isfile("/dev/full")


# --- issue 31: merging keeps every prompt's place -------------------------------------------------

def test_merged_shards_keep_their_dropped_failed_and_skipped_prompts(tmp_path):
    """`cai merge` ignored the shards' side files: merged stats showed 0 dropped and a rerun on
    the merged output made the dropped pairs again. Now the side files merge beside the output."""
    from cai.run.merge import merge

    prompts = write_prompts(tmp_path)
    scripted = dict(fail={PROMPTS[4]}, unchanged={PROMPTS[1], PROMPTS[7]})
    shards = []
    for k in (1, 2):
        shard = tmp_path / f"shard{k}.jsonl"
        run(prompts, str(shard), options(ScriptedBackend(**scripted), filter=True, shard=f"{k}/2"))
        shards.append(str(shard))
    merged = tmp_path / "merged.jsonl"
    summary = merge(str(merged), shards)
    assert (summary.kept, summary.side) == (9, {"filtered": 2, "failures": 1, "skipped": 0})
    ids = {r["id"] for r in read_jsonl(merged)}
    dropped = {line["id"] for line in read_jsonl(f"{merged}.filtered.jsonl")}
    failed = {line["id"] for line in read_jsonl(f"{merged}.failures.jsonl")}
    assert len(ids | dropped | failed) == 12 and not (ids & dropped or ids & failed or dropped & failed)
    # a rerun over the merged output makes only what failed, nothing dropped again
    backend = ScriptedBackend(unchanged=scripted["unchanged"])
    again = run(prompts, str(merged), options(backend, filter=True))
    assert (again.resumed, again.kept, again.dropped, again.exit_code) == (11, 1, 0, 0)
    # side files named after the output are never replaced without `overwrite`, even alone
    merged.unlink()
    with pytest.raises(OptionError, match="merged.jsonl.filtered.jsonl exists"):
        merge(str(merged), shards)
    assert merge(str(merged), shards, overwrite=True).side["filtered"] == 2


def test_merge_refuses_records_of_two_shapes(tmp_path):
    from cai.run.merge import merge

    standard = tmp_path / "standard.jsonl"
    run(PROMPTS[:3], str(standard), options(ScriptedBackend()))
    chat = tmp_path / "chat.jsonl"
    run(PROMPTS[3:6], str(chat), options(ScriptedBackend(), format="conversational"))
    from cai.errors import InputError

    with pytest.raises(InputError, match=r"chat.jsonl:1: a conversational record, but .*standard.jsonl:1 is standard"):
        merge(str(tmp_path / "m.jsonl"), [str(standard), str(chat)])
    assert not (tmp_path / "m.jsonl").exists()


# --- issue 31: a resume that would mix two runs without a word ----------------------------------

def test_a_resume_refuses_a_prompt_changed_under_its_own_id(tmp_path, caplog):
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": f"q{i}", "prompt": PROMPTS[i]} for i in range(4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    run(prompts, str(out), options(ScriptedBackend(), limit=3))
    before = out.read_bytes()
    rows[1]["prompt"] = "A different question entirely?"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OptionError, match=r"out.jsonl:2: the record of id 'q1' was made from another prompt than "
                                          r".*p.jsonl now gives that id; use another output, overwrite"):
        run(prompts, str(out), options(ScriptedBackend()))
    assert out.read_bytes() == before
    with caplog.at_level("WARNING", logger="cai"):
        forced = run(prompts, str(out), options(ScriptedBackend(), force=True))
    assert (forced.resumed, forced.kept) == (3, 1) and "kept as they are (force)" in caplog.text
    # hashed ids cannot go stale: a changed text is a new id
    plain = tmp_path / "plain.jsonl"
    run(PROMPTS[:2], str(plain), options(ScriptedBackend()))
    again = run([PROMPTS[0], "Something new?"], str(plain), options(ScriptedBackend()))
    assert (again.resumed, again.kept, again.removed) == (1, 1, 1)


def test_a_resume_without_the_filters_over_a_filtered_output_is_refused(tmp_path):
    prompts = write_prompts(tmp_path)
    out = tmp_path / "out.jsonl"
    run(prompts, str(out), options(ScriptedBackend(unchanged={PROMPTS[1]}), filter=True, repairs=0, limit=4))
    with pytest.raises(OptionError, match=r"holds records of a different run \(filters: 'on' → 'off'\)"):
        run(prompts, str(out), options(ScriptedBackend(), filter=False))
    with pytest.raises(OptionError, match=r"filters: 'on' → 'on\+refusal'"):
        run(prompts, str(out), options(ScriptedBackend(), filter=True, repairs=0, drop_refusals=True))
    resumed = run(prompts, str(out), options(ScriptedBackend(), filter=True, repairs=0))
    assert (resumed.resumed, resumed.kept) == (4, 8)
    assert all("filters" not in r["meta"]["params"] for r in read_jsonl(out)), "the default adds nothing"
    unfiltered = tmp_path / "unfiltered.jsonl"
    run(prompts, str(unfiltered), options(ScriptedBackend(), limit=2))
    assert {r["meta"]["params"]["filters"] for r in read_jsonl(unfiltered)} == {"off"}
