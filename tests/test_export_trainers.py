"""`cai export --to TRAINER DIR`: each trainer's data shape and config, the dataset card, and TRL
training for real from the exported folder (`trl dpo --config`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cai.cli import app
from conftest import ROOT, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"


def run(*args):
    return CliRunner().invoke(app, plumbing(args))


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory) -> Path:
    """Eight pairs, some of them dropped by the filters (so the card has reasons to count)."""
    folder = tmp_path_factory.mktemp("made")
    pairs = folder / "pairs.jsonl"
    result = run("generate", EXAMPLES, "--model", tiny_model, "-o", pairs, "--max-new-tokens", "8", "--no-filter")
    assert result.exit_code == 0, result.output
    # a filtered side file and a skipped one, as a real run leaves them
    records = read_jsonl(pairs)
    dropped = records[-1]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    Path(f"{pairs}.filtered.jsonl").write_text(json.dumps({**dropped, "filter": {"reasons": ["unchanged"]}}) + "\n")
    Path(f"{pairs}.skipped.jsonl").write_text(json.dumps({"id": "x", "kind": "too long", "reason": "…"}) + "\n")
    return pairs


def export(made: Path, trainer: str, folder: Path, *extra) -> dict:
    result = run("export", made, "--to", trainer, folder, "--test-size", "0.3", *extra)
    assert result.exit_code == 0, result.output
    return {"stdout": result.stdout, "stderr": result.stderr}


def card_header(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("trainer", ["trl", "axolotl", "openrlhf", "llamafactory", "nemo-rl"])
def test_card_counts_equal_stats_and_the_folder_loads(made, tmp_path, trainer):
    from datasets import load_dataset

    from cai import stats

    folder = tmp_path / trainer
    out = export(made, trainer, folder)
    assert out["stdout"].strip().split()[0] in ("trl", "axolotl", "bash", "llamafactory-cli"), out["stdout"]
    header = card_header(folder)
    assert header["license"] == "other" and "dpo" in header["tags"] and header["configs"][0]["config_name"] == "default"
    report, _ = stats.collect(str(made))
    body = (folder / "README.md").read_text()
    for label, value in (("kept (in this dataset)", report["input"]["kept"]), ("dropped by the filters or the judge", 1),
                         ("&nbsp;&nbsp;dropped: unchanged", 1), ("skipped (too long for the context, refused by the chat template, or invalid input)", 1),
                         ("total", report["input"]["total"])):
        assert f"| {label} | {value} |" in body, label
    loaded = load_dataset(str(folder))
    assert sorted(loaded) == ["test", "train"]
    assert loaded["train"].num_rows + loaded["test"].num_rows == report["input"]["kept"] == 7


def test_conversational_rows_for_trl_axolotl_openrlhf(made, tmp_path):
    for trainer in ("trl", "axolotl", "openrlhf"):
        folder = tmp_path / trainer
        export(made, trainer, folder)
        for split in ("train", "test"):
            for row in read_jsonl(folder / "data" / f"{split}.jsonl"):
                assert set(row) == {"prompt", "chosen", "rejected"}
                assert [m["role"] for m in row["prompt"]] == ["system", "user"]
                assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
    axolotl = yaml.safe_load((tmp_path / "axolotl" / "axolotl_dpo.yml").read_text())
    assert axolotl["rl"] == "dpo" and axolotl["datasets"][0]["type"] == "chat_template.default"
    assert axolotl["datasets"][0]["field_messages"] == "prompt" and Path(axolotl["datasets"][0]["path"]).is_file()
    assert Path(axolotl["test_datasets"][0]["path"]).is_file()
    script = (tmp_path / "openrlhf" / "openrlhf_dpo.sh").read_text()
    for flag in ("--data.prompt_key prompt", "--data.apply_chat_template", "--data.chosen_key chosen",
                 f"--data.dataset {tmp_path.resolve() / 'openrlhf' / 'data' / 'train.jsonl'}"):
        assert flag in script, flag
    assert subprocess.run(["bash", "-n", str(tmp_path / "openrlhf" / "openrlhf_dpo.sh")]).returncode == 0
    n = len(read_jsonl(tmp_path / "openrlhf" / "data" / "train.jsonl"))
    assert f"--train.batch_size {max(2, n // 2 * 2)} " in script, "a small export gets a batch it fills (128 makes no step)"


def test_llamafactory_dataset_info_and_rows(made, tmp_path):
    folder = tmp_path / "lf"
    export(made, "llamafactory", folder)
    info = json.loads((folder / "llamafactory" / "dataset_info.json").read_text())
    assert set(info) == {"cai_sharegpt", "cai_sharegpt_test", "cai_alpaca", "cai_alpaca_test"}
    for name, entry in info.items():
        assert entry["ranking"] is True and (folder / "llamafactory" / entry["file_name"]).is_file(), name
        assert entry.get("formatting", "alpaca") in ("sharegpt", "alpaca")       # never "openai"
    for row in read_jsonl(folder / "llamafactory" / "cai_sharegpt_train.jsonl"):
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "user" and len([r for r in roles if r != "system"]) % 2 == 1
        assert row["chosen"]["role"] == row["rejected"]["role"] == "assistant"
    for row in read_jsonl(folder / "llamafactory" / "cai_alpaca_train.jsonl"):
        assert all(isinstance(row[k], str) for k in ("instruction", "input", "system", "chosen", "rejected"))
    config = yaml.safe_load((folder / "llamafactory_dpo.yaml").read_text())
    assert config["stage"] == "dpo" and config["dataset"] == "cai_sharegpt" and config["eval_dataset"] == "cai_sharegpt_test"
    assert Path(config["dataset_dir"]) == (folder / "llamafactory").resolve()


def test_nemo_rl_rows(made, tmp_path):
    folder = tmp_path / "nemo"
    export(made, "nemo-rl", folder)
    for row in read_jsonl(folder / "nemo_rl" / "train.jsonl"):
        assert [m["role"] for m in row["context"]] == ["system", "user"]
        assert [c["rank"] for c in row["completions"]] == [0, 1]
        assert all(c["completion"][0]["role"] == "assistant" for c in row["completions"])
    script = (folder / "nemo_rl_dpo.sh").read_text()
    assert "data.train.dataset_name=PreferenceDataset" in script and "data.validation.split=train" in script
    # NeMo-RL's dpo.yaml has no data_path key: a plain override of it is refused, `++` adds it
    assert f"++data.train.data_path={folder.resolve() / 'nemo_rl' / 'train.jsonl'}" in script


def test_export_errors_are_one_line(made, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    for args, message in ((["--to", "deepspeed", tmp_path / "a"], "--to: unknown trainer 'deepspeed'"),
                          (["--to", "trl", full], "is not empty; pass --overwrite"),
                          (["--to", "trl"], "--to needs the folder to write"),
                          ([tmp_path / "b"], "go with --to TRAINER")):
        result = run("export", made, *args)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
    result = CliRunner().invoke(app, ["export", str(made), "--to", "trl", str(tmp_path / "c"), "--push-to-hub", "me/x"],
                                env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1 and "cannot push to the Hub: HF_HUB_OFFLINE is set" in result.stderr
    assert (tmp_path / "c" / "README.md").exists(), "the folder is written before the push"


@pytest.mark.slow
def test_trl_trains_from_the_exported_folder(made, tmp_path, tiny_model):
    pytest.importorskip("trl")
    folder = tmp_path / "trl"
    out = export(made, "trl", folder)
    command = out["stdout"].strip()
    assert command == f"trl dpo --config {folder.resolve() / 'trl_dpo.yaml'}"
    trl = shutil.which("trl", path=str(Path(sys.executable).parent))
    assert trl, "the trl command comes with the dev extra"
    cpu = ["--max_steps", "2", "--bf16", "false", "--use_cpu", "true", "--per_device_train_batch_size", "2",
           "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
           "--eval_strategy", "steps", "--eval_steps", "2", "--logging_steps", "1", "--report_to", "none"]
    proc = subprocess.run([trl, "dpo", "--config", str(folder / "trl_dpo.yaml"), *cpu], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                                                    "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "'loss'" in logs and "'eval_loss'" in logs, logs[-2000:]      # trained on train, evaluated on test
    trained = folder / "trl-dpo-out"
    assert (trained / "model.safetensors").exists() or any(trained.glob("*.safetensors")), list(trained.iterdir())


# --- issue 31 (files) -------------------------------------------------------------------------

def _one_error(result) -> str:
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_a_folder_that_cannot_be_made_is_one_line_and_nothing_written(made, tmp_path):
    """DIR under a file (what works as root too): one line naming DIR and why, exit 2, nothing made."""
    (tmp_path / "a-file").write_text("x")
    for folder in (tmp_path / "a-file" / "dpo", tmp_path / "a-file" / "deeper" / "dpo"):
        result = run("export", made, "--to", "trl", folder)
        assert result.exit_code == 2, result.output
        line = _one_error(result)
        assert f"{folder}: cannot write output: {tmp_path / 'a-file'} is not a folder" in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
        assert (tmp_path / "a-file").read_text() == "x"


def test_a_folder_in_a_read_only_parent_is_one_line(made, tmp_path, monkeypatch):
    import os

    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:           # root writes into a read-only folder: deny it as a non-root user is
        import cai.output

        real = os.access
        monkeypatch.setattr(cai.output.os, "access",
                            lambda path, mode, **kw: False if Path(path) == parent and mode & os.W_OK else real(path, mode, **kw))
    try:
        result = run("export", made, "--to", "trl", parent / "dpo")
        assert result.exit_code == 2, result.output
        assert f"{parent / 'dpo'}: cannot write output: Permission denied" in _one_error(result)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_an_empty_train_split_is_refused_before_anything_is_written(made, tmp_path):
    """A test size that leaves the train split empty (one record, or --test-size 0.99) would write a
    folder load_dataset cannot read and no trainer can train on: refused, one line, exit 2."""
    from datasets import load_dataset

    one = tmp_path / "one.jsonl"
    one.write_text(made.read_text().splitlines(keepends=True)[0])
    for pairs in (made, one):
        folder = tmp_path / f"dpo-{pairs.stem}"
        result = run("export", pairs, "--to", "trl", folder, "--test-size", "0.99")
        assert result.exit_code == 2, result.output
        line = _one_error(result)
        assert "--test-size: leaves no record for the train split" in line and "use a smaller --test-size" in line
        assert not folder.exists()
    folder = tmp_path / "dpo-one"         # one record and no test split: a folder that loads
    result = run("export", one, "--to", "trl", folder)
    assert result.exit_code == 0, result.output
    loaded = load_dataset(str(folder))
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 1


def test_a_plain_export_with_an_empty_split_is_refused_too(made, tmp_path):
    """`cai export -o F --test-size` without --to wrote an empty train (or test) file (noticed with
    issue 31's item 6)."""
    for size, which in (("0.99", "train"), ("0.01", "test")):
        out = tmp_path / f"pairs-{which}.jsonl"
        result = run("export", made, "-o", out, "--test-size", size)
        assert result.exit_code == 2, result.output
        line = _one_error(result)
        assert f"--test-size: leaves no record for the {which} split" in line
        assert not list(tmp_path.glob(f"pairs-{which}*"))


@pytest.mark.parametrize("suffix", [" (bfloat16)", " (int8)", " (vllm, bfloat16)", ""])
def test_the_trainer_config_names_the_model_without_how_it_ran(made, tmp_path, tiny_model, suffix):
    """Records say how their model ran ("m (bfloat16)": auto on an AVX512-BF16 CPU; "m (int8)";
    "m (vllm, bfloat16)"); a trainer loads the model itself, so its config names the bare model
    (a name with the suffix is no path and no Hub id: the trainer stopped at loading)."""
    pairs = tmp_path / "pairs.jsonl"
    records = read_jsonl(made)
    for r in records:
        r["meta"]["model"] = f"{tiny_model}{suffix}"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    export(pairs, "trl", tmp_path / "trl")
    config = yaml.safe_load((tmp_path / "trl" / "trl_dpo.yaml").read_text())
    assert config["model_name_or_path"] == str(tiny_model)
