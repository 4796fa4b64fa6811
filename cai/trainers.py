"""What each preference trainer reads, and the config that points it at an export folder. Pure
functions: a cai record → the row a trainer's loader takes, and a folder's files → its config
text and the command that starts training. Facts from the trainers' own loaders:

trl          conversational rows (prompt = messages, chosen/rejected = one assistant message);
             `trl dpo --config` YAML with `datasets: [{path: json, data_files: …}]`
axolotl      the same rows; `rl: dpo`, type `chat_template.default` with `field_messages: prompt`
openrlhf     the same rows; `--data.prompt_key prompt --data.apply_chat_template`
llamafactory sharegpt rows (messages; chosen/rejected as single message dicts) and alpaca rows
             (instruction/system; chosen/rejected strings), both registered with `ranking: true`
             in `dataset_info.json` (never `formatting: openai`: it edits the system prompt)
nemo-rl      PreferenceDataset rows: `context` messages and two ranked `completions`
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

import yaml

from cai.records import to_format

TRAINERS = ("trl", "axolotl", "openrlhf", "llamafactory", "nemo-rl")


def conversational(record: dict) -> dict:
    """TRL's conversational preference row (what TRL, axolotl and OpenRLHF read)."""
    row = to_format(record, "conversational")
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def soft_margin(record: dict) -> float | None:
    """A labelled pair's soft label as a reward margin: logit(P(chosen better)), the margin
    TRL's reward trainer reads from a row's `margin` (the Bradley-Terry model's reward gap);
    None without a label (`judge.label`, of `cai judge`, `--judge` or `--samples`)."""
    import math

    judge = record.get("judge")
    label = judge.get("label") if isinstance(judge, dict) else None
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
        return None
    p = min(max(float(label), 1e-6), 1 - 1e-6)
    return round(math.log(p / (1 - p)), 6)


def trl_row(record: dict) -> dict:
    """TRL's conversational row, with the soft label as `margin` where the pair has one (TRL's
    reward trainer reads it; its DPO trainer leaves it be)."""
    row = conversational(record)
    margin = soft_margin(record)
    return row if margin is None else {**row, "margin": margin}


def sharegpt(record: dict) -> dict:
    """LLaMA-Factory's sharegpt ranking row, with OpenAI role/content tags."""
    row = conversational(record)
    return {"messages": row["prompt"], "chosen": row["chosen"][0], "rejected": row["rejected"][0]}


def alpaca(record: dict) -> dict:
    """LLaMA-Factory's alpaca ranking row; a conversation's earlier turns are its `history` of
    [user, assistant] pairs."""
    row = conversational(record)
    system = next((m["content"] for m in row["prompt"] if m["role"] == "system"), "")
    turns = [m for m in row["prompt"] if m["role"] != "system"]
    earlier, user = turns[:-1], turns[-1]["content"]
    if [m["role"] for m in earlier] != ["user", "assistant"] * (len(earlier) // 2):
        raise ValueError(f"record {record.get('id')}: its earlier turns do not alternate user, assistant, "
                         "as an alpaca history must")
    history = [[earlier[i]["content"], earlier[i + 1]["content"]] for i in range(0, len(earlier), 2)]
    return {"instruction": user, "input": "", "system": system, **({"history": history} if history else {}),
            "chosen": row["chosen"][0]["content"], "rejected": row["rejected"][0]["content"]}


def nemo(record: dict) -> dict:
    """NeMo-RL's PreferenceDataset row: the context and two ranked completions (rank 0 preferred)."""
    row = conversational(record)
    return {"context": row["prompt"], "completions": [{"rank": 0, "completion": row["chosen"]},
                                                      {"rank": 1, "completion": row["rejected"]}]}


@dataclass(frozen=True)
class Layout:
    """The data files a trainer's folder holds: split → relative path, and the row shape."""

    files: dict[str, str]
    shape: object


def layout(trainer: str, splits: list[str]) -> list[Layout]:
    if trainer == "trl":
        return [Layout({s: f"data/{s}.jsonl" for s in splits}, trl_row)]
    if trainer in ("axolotl", "openrlhf"):
        return [Layout({s: f"data/{s}.jsonl" for s in splits}, conversational)]
    if trainer == "llamafactory":
        return [Layout({s: f"llamafactory/cai_sharegpt_{s}.jsonl" for s in splits}, sharegpt),
                Layout({s: f"llamafactory/cai_alpaca_{s}.jsonl" for s in splits}, alpaca)]
    if trainer == "nemo-rl":
        return [Layout({s: f"nemo_rl/{s}.jsonl" for s in splits}, nemo)]
    raise ValueError(trainer)


def configs(trainer: str, folder: str, model: str, splits: list[str], train_records: int = 128) -> tuple[dict[str, str], str]:
    """({file name: text} of the configs to write beside the data, the command that trains).
    `folder` is absolute: the configs name their data by absolute path, so they work from any
    working directory."""
    test = "test" in splits
    if trainer == "trl":
        # `dataset_name: DIR` loads the folder by its card's `configs` (train, and test when there is one)
        config = {"model_name_or_path": model, "dataset_name": folder, "dataset_train_split": "train",
                  "output_dir": f"{folder}/trl-dpo-out", "beta": 0.1, "learning_rate": 5.0e-7,
                  "num_train_epochs": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8,
                  "max_length": 2048, "logging_steps": 10, "save_strategy": "epoch", "report_to": "none"}
        if test:
            config.update(dataset_test_split="test", eval_strategy="epoch", per_device_eval_batch_size=2)
        return ({"trl_dpo.yaml": _yaml(config, "trl dpo --config trl_dpo.yaml   (on a CPU add: --bf16 false --use_cpu true)")},
                f"trl dpo --config {shlex.quote(folder + '/trl_dpo.yaml')}")
    if trainer == "axolotl":
        data = lambda split: {"path": f"{folder}/data/{split}.jsonl", "ds_type": "json", "split": "train",  # noqa: E731
                              "type": "chat_template.default", "field_messages": "prompt",
                              "field_chosen": "chosen", "field_rejected": "rejected",
                              "message_property_mappings": {"role": "role", "content": "content"},
                              "roles": {"user": ["user"], "assistant": ["assistant"], "system": ["system"]}}
        config = {"base_model": model, "rl": "dpo", "chat_template": "tokenizer_default", "datasets": [data("train")],
                  **({"test_datasets": [data("test")]} if test else {"val_set_size": 0}),
                  "sequence_len": 2048, "micro_batch_size": 2, "gradient_accumulation_steps": 8, "num_epochs": 1,
                  "learning_rate": 5.0e-7, "optimizer": "adamw_torch", "lr_scheduler": "cosine", "bf16": "auto",
                  "output_dir": f"{folder}/axolotl-dpo-out", "dataset_prepared_path": f"{folder}/axolotl-prepared",
                  "logging_steps": 10}
        return ({"axolotl_dpo.yml": _yaml(config, "axolotl train axolotl_dpo.yml   (check the data first: axolotl preprocess)")},
                f"axolotl train {shlex.quote(folder + '/axolotl_dpo.yml')}")
    if trainer == "openrlhf":
        flags = [("--model.model_name_or_path", model), ("--data.dataset", f"{folder}/data/train.jsonl"),
                 ("--data.prompt_key", "prompt"), ("--data.chosen_key", "chosen"), ("--data.rejected_key", "rejected"),
                 ("--data.apply_chat_template", None), ("--data.max_len", "2048"),
                 *((("--eval.dataset", f"{folder}/data/test.jsonl"), ("--eval.split", "train")) if test else ()),
                 # steps are records // batch size: a small export gets a batch it can fill
                 ("--train.batch_size", str(128 if train_records >= 128 else max(2, train_records // 2 * 2))),
                 ("--train.micro_batch_size", "2"), ("--train.max_epochs", "1"),
                 ("--model.beta", "0.1"), ("--adam.lr", "5e-7"), ("--ds.zero_stage", "2"), ("--ds.param_dtype", "bf16"),
                 ("--ckpt.output_dir", f"{folder}/openrlhf-dpo-out")]
        lines = [f"  {flag}" + (f" {shlex.quote(value)}" if value is not None else "") for flag, value in flags]
        script = ("#!/usr/bin/env bash\n# OpenRLHF >= 0.10.2 (dotted flags; older releases: --pretrain, --dataset, "
                  "--prompt_key, …).\n# Without flash-attn add: --ds.attn_implementation eager\nset -euo pipefail\n"
                  "deepspeed --module openrlhf.cli.train_dpo \\\n" + " \\\n".join(lines) + ' "$@"\n')
        return {"openrlhf_dpo.sh": script}, f"bash {shlex.quote(folder + '/openrlhf_dpo.sh')}"
    if trainer == "llamafactory":
        info = {}
        for split in splits:
            suffix = "" if split == "train" else f"_{split}"
            info[f"cai_sharegpt{suffix}"] = {
                "file_name": f"cai_sharegpt_{split}.jsonl", "formatting": "sharegpt", "ranking": True,
                "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
            info[f"cai_alpaca{suffix}"] = {
                "file_name": f"cai_alpaca_{split}.jsonl", "ranking": True,
                "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                            "system": "system", "history": "history"}}
        config = {"model_name_or_path": model, "stage": "dpo", "do_train": True, "finetuning_type": "full",
                  "pref_beta": 0.1, "pref_loss": "sigmoid", "dataset": "cai_sharegpt",
                  **({"eval_dataset": "cai_sharegpt_test", "eval_strategy": "epoch", "per_device_eval_batch_size": 2}
                     if test else {}),
                  "dataset_dir": f"{folder}/llamafactory", "cutoff_len": 2048,
                  "output_dir": f"{folder}/llamafactory-dpo-out", "per_device_train_batch_size": 2,
                  "gradient_accumulation_steps": 8, "num_train_epochs": 1.0, "learning_rate": 5.0e-7,
                  "logging_steps": 10, "report_to": "none", "bf16": True}
        return ({"llamafactory/dataset_info.json": json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                 "llamafactory_dpo.yaml": _yaml(config, "llamafactory-cli train llamafactory_dpo.yaml   (alpaca rows: "
                                                 "dataset: cai_alpaca; on a CPU: bf16: false)")},
                f"llamafactory-cli train {shlex.quote(folder + '/llamafactory_dpo.yaml')}")
    if trainer == "nemo-rl":
        overrides = [f"policy.model_name={model}", f"policy.tokenizer.name={model}",
                     # `++`: dpo.yaml's data entries have no data_path key; a plain override of a missing key is refused
                     "data.train.dataset_name=PreferenceDataset", f"++data.train.data_path={folder}/nemo_rl/train.jsonl",
                     "data.train.split=train"]
        if test:
            overrides += ["data.validation.dataset_name=PreferenceDataset",
                          f"++data.validation.data_path={folder}/nemo_rl/test.jsonl", "data.validation.split=train"]
        else:
            overrides += ["dpo.val_period=0", "dpo.val_at_start=false", "dpo.val_at_end=false"]
        command = "uv run examples/run_dpo.py " + " ".join(shlex.quote(o) for o in overrides)
        script = ("#!/usr/bin/env bash\n# Run inside a checkout of NVIDIA-NeMo/RL: its examples/configs/dpo.yaml, "
                  "with cai's data.\nset -euo pipefail\n" + command + ' "$@"\n')
        return {"nemo_rl_dpo.sh": script}, f"bash {shlex.quote(folder + '/nemo_rl_dpo.sh')}   (from the NeMo-RL checkout)"
    raise ValueError(trainer)


def _yaml(config: dict, run: str) -> str:
    return f"# written by cai export; run: {run}\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
