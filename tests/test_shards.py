"""Arrays of jobs: `--shard auto` from Slurm's or a Kubernetes Indexed Job's variables, `{shard}`
in output names, each shard's manifest (planned, finished), and `cai merge` naming the shards
missing or unfinished with the array expression that runs them again."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.errors import OptionError
from cai.options import GenerateOptions, array_task
from cai.run.generate import run
from cai.run.merge import MergeIncomplete, merge
from conftest import read_jsonl
from cai.backends.scripted import ScriptedBackend

PROMPTS = [f"How do I make tea number {i}?" for i in range(20)]
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP",
         "JOB_COMPLETION_INDEX")


@pytest.fixture(autouse=True)
def no_scheduler(monkeypatch):
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)


def options(**extra) -> GenerateOptions:
    return GenerateOptions(model=ScriptedBackend(), **{"filter": False, "max_new_tokens": 16, **extra})


def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def slurm(monkeypatch, task: int, low: int, count: int, step: int | None = None):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", str(low))
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(count))
    if step is not None:
        monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", str(step))


def ids(path) -> list[str]:
    return sorted(r["id"] for r in read_jsonl(path))


@pytest.mark.parametrize("low", [0, 1])
def test_shard_auto_under_slurm_matches_shard_k_of_n(tmp_path, monkeypatch, low):
    prompts = prompts_file(tmp_path)
    for k in (1, 2, 3):
        run(prompts, str(tmp_path / f"by-hand.{k}.jsonl"), options(shard=f"{k}/3"))
        slurm(monkeypatch, task=low + k - 1, low=low, count=3)
        summary = run(prompts, str(tmp_path / "auto.{shard}.jsonl"), options(shard="auto"))
        assert summary.output == str(tmp_path / f"auto.{k}.jsonl")
        assert ids(tmp_path / f"auto.{k}.jsonl") == ids(tmp_path / f"by-hand.{k}.jsonl")
        [start, end] = read_jsonl(tmp_path / f"auto.{k}.jsonl.runs.jsonl")
        assert start["shard"] == f"{k}/3" and start["task"] == {"scheduler": "slurm", "task": low + k - 1,
                                                               "min": low, "step": 1}
        assert start["planned"] == end["planned"] == len(ids(tmp_path / f"auto.{k}.jsonl"))
        assert end["finished"] is True and end["exit_code"] == 0
    assert sum(len(ids(tmp_path / f"auto.{k}.jsonl")) for k in (1, 2, 3)) == 20


def test_shard_auto_under_a_kubernetes_indexed_job(tmp_path, monkeypatch):
    prompts = prompts_file(tmp_path)
    run(prompts, str(tmp_path / "by-hand.jsonl"), options(shard="2/4"))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    run(prompts, str(tmp_path / "auto.jsonl"), options(shard="auto/4"))
    assert ids(tmp_path / "auto.jsonl") == ids(tmp_path / "by-hand.jsonl")
    with pytest.raises(OptionError, match="a Kubernetes Indexed Job does not say how many it has: give auto/N"):
        run(prompts, str(tmp_path / "x.jsonl"), options(shard="auto"))


@pytest.mark.parametrize("env, spec, message", [
    ({}, "auto", "auto takes the shard from a Slurm array job (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, "
                 "SLURM_ARRAY_TASK_COUNT) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with auto/N); "
                 "none of them is set"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, "auto/4",
     "auto/4: the Slurm array has 8 tasks"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "auto", "some are missing or not numbers"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4",
      "SLURM_ARRAY_TASK_STEP": "2"}, "auto", "is not MIN 1 plus a multiple of STEP 2"),
    ({"JOB_COMPLETION_INDEX": "4"}, "auto/4", "JOB_COMPLETION_INDEX 4 is past the job's 4 completions"),
    ({}, "auto/x", "expected auto or auto/N"),
])
def test_shard_auto_without_its_variables_is_one_line(env, spec, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("/", "/")):
        array_task(spec, env)


def test_a_stepped_slurm_array_numbers_its_shards_in_order():
    assert array_task("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
                               "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"})[:2] == (3, 4)


def test_shard_in_a_name_needs_a_shard(tmp_path):
    with pytest.raises(OptionError, match=r"holds \{shard\}, but the run has no shard"):
        run(prompts_file(tmp_path), str(tmp_path / "p.{shard}.jsonl"), options())


def test_merge_names_missing_and_unfinished_shards_and_how_to_run_them_again(tmp_path, monkeypatch):
    prompts = prompts_file(tmp_path)
    for task in (0, 1, 3, 4):                               # tasks 2 and 5 never ran
        slurm(monkeypatch, task=task, low=0, count=6)
        run(prompts, str(tmp_path / "p.{shard}.jsonl"), options(shard="auto"))
    shards = [str(tmp_path / f"p.{k}.jsonl") for k in (1, 2, 4, 5)]
    # shard 4 was killed: its manifest has a start and no end
    lines = (tmp_path / "p.4.jsonl.runs.jsonl").read_text().splitlines()
    (tmp_path / "p.4.jsonl.runs.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(MergeIncomplete) as caught:
        merge(str(tmp_path / "all.jsonl"), shards)
    assert str(caught.value) == (f"shards 3, 6 of 6 are missing and shard 4 did not finish ({tmp_path / 'p.4.jsonl'}); "
                                 "run them again (sbatch --array=2-3,5 …); nothing written (`allow_partial` merges "
                                 "what is there)")
    assert caught.value.exit_code == 1 and not (tmp_path / "all.jsonl").exists()
    partial = merge(str(tmp_path / "all.jsonl"), shards, allow_partial=True)
    assert partial.shards.missing == [3, 6] and partial.shards.unfinished == [4]
    [line] = read_jsonl(tmp_path / "all.jsonl.runs.jsonl")
    assert line["event"] == "merge" and line["shards"]["complete"] is False and line["shards"]["missing"] == [3, 6]
    # shards made by hand are named by their --shard values
    for k in (1, 3):
        run(prompts, str(tmp_path / f"h.{k}.jsonl"), options(shard=f"{k}/3"))
    with pytest.raises(MergeIncomplete, match=r"shard 2 of 3 is missing; run it again \(--shard 2/3\)"):
        merge(str(tmp_path / "h.jsonl"), [str(tmp_path / "h.1.jsonl"), str(tmp_path / "h.3.jsonl")])


def test_a_complete_array_merges_and_the_cli_says_so(tmp_path, monkeypatch):
    prompts = prompts_file(tmp_path)
    for task in (1, 2):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(task - 1))
        run(prompts, str(tmp_path / "p.{shard}.jsonl"), options(shard="auto/2"))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "all.jsonl"), str(tmp_path / "p.1.jsonl"),
                                      str(tmp_path / "p.2.jsonl")])
    assert result.exit_code == 0, result.output
    assert "from 2 of 2 shards" in result.stderr and len(ids(tmp_path / "all.jsonl")) == 20
    (tmp_path / "p.2.jsonl.runs.jsonl").unlink()          # a shard without a manifest: not known to be missing
    one = CliRunner().invoke(app, ["merge", str(tmp_path / "one.jsonl"), str(tmp_path / "p.1.jsonl")])
    assert one.exit_code == 1 and "shard 2 of 2 is missing" in one.stderr
    assert "the Indexed Job's completion indexes 1" in one.stderr


def test_stats_reads_the_manifest_of_a_shard_and_of_a_merged_array(tmp_path, monkeypatch):
    from cai import stats

    prompts = prompts_file(tmp_path)
    run(prompts, str(tmp_path / "p.1.jsonl"), options(shard="1/3"))
    report, _ = stats.collect(str(tmp_path / "p.1.jsonl"))
    assert report["runs"] == {"runs": 1, "shard": "1/3", "finished": True, "endpoints": []}
    merge(str(tmp_path / "all.jsonl"), [str(tmp_path / "p.1.jsonl")], allow_partial=True)
    report, _ = stats.collect(str(tmp_path / "all.jsonl"))
    assert report["runs"]["shards"] == {"count": 3, "present": [1], "missing": [2, 3], "unfinished": [],
                                        "complete": False}
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "all.jsonl")])
    assert result.exit_code == 0 and "1 of 3 · missing 2, 3" in result.stderr
