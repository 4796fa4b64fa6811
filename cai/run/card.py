"""The dataset card of an export folder: a Hub-format README.md (YAML header with the data files
per split, so `datasets.load_dataset(DIR)` finds them) written from the records and the run's
side files: the constitution and its principles, the model and generation settings, what was
kept, dropped, failed and skipped and why, the judge's figures and how much the revisions edit."""

from __future__ import annotations

import yaml


def card(report: dict, records: list[dict], files: dict[str, str], trainer: str, command: str,
         load_hint: str) -> str:
    """`files`: split → file name inside the folder. `report`: `cai.stats.collect` of the pairs."""
    meta = next((r.get("meta") for r in records if isinstance(r.get("meta"), dict)), {}) or {}
    source = report["input"]
    constitution = str(meta.get("constitution") or "unknown")
    name = constitution.split("@")[0]
    header = {
        "license": "other",           # placeholder: the license of the prompts and of the model's outputs
        "pretty_name": f"cai preference pairs ({name})",
        "task_categories": ["text-generation"],
        "tags": ["dpo", "preference", "constitutional-ai", "cai", "synthetic"],
        "size_categories": [_size(len(records))],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": split, "path": path} for split, path in files.items()]}],
    }
    params = meta.get("params") or {}
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# cai preference pairs: {name}", "",
             "Preference pairs made with `cai` by the supervised stage of Constitutional AI: "
             "the model answered each prompt (`rejected`), critiqued its answer against a principle of the "
             "constitution, and revised it (`chosen`).", "",
             "> **License:** set the `license` field above: it depends on the prompts you used and on the "
             "terms of the model that wrote the answers.", "",
             "## How it was made", "",
             "| | |", "|---|---|",
             f"| model | `{meta.get('model', 'unknown')}` |",
             f"| constitution | `{constitution}` |",
             f"| templates | `{meta.get('templates', 'unknown')}` |",
             f"| seed | {meta.get('seed', '–')} |",
             *(f"| {key} | {value} |" for key, value in params.items()),
             f"| cai | {meta.get('cai', '–')} |", "",
             "## What was kept", "",
             "| | records |", "|---|---|",
             f"| kept (in this dataset) | {source['kept']} |",
             f"| dropped by the filters or the judge | {source['dropped']} |",
             *(f"| &nbsp;&nbsp;dropped: {reason} | {count} |" for reason, count in source["dropped_by_reason"].items()),
             f"| failed (the backend, after its retries) | {source.get('failed', 0)} |",
             f"| skipped (too long for the context, refused by the chat template, or invalid input) | {source.get('skipped', 0)} |",
             *(f"| &nbsp;&nbsp;skipped: {kind} | {count} |" for kind, count in source.get("skipped_by_kind", {}).items()),
             f"| total | {source['total']} |", ""]
    lines += ["## Principles", "", "| principle | kept | dropped | judge mean P(revision better) |", "|---|---|---|---|"]
    for principle, row in report["principles"].items():
        mean = "–" if row["judge_mean"] is None else f"{row['judge_mean']:.3f}"
        lines.append(f"| `{principle}` | {row['kept']} | {row['dropped']} | {mean} |")
    lines.append("")
    judge = report.get("judge")
    if judge:
        lines += ["## AI-feedback judge", "",
                  f"{judge['judged']} pairs judged; mean P(revision better) {judge['mean_preference']:.3f} over both "
                  f"orders ({judge['mean_revision_as_b']:.3f} with the revision shown as (B), "
                  f"{judge['mean_revision_as_a']:.3f} as (A)); {judge['fraction_preferred']:.1%} prefer the revision"
                  + (f"; {judge['swapped']} swapped (the original kept as chosen)" if judge["swapped"] else "") + ".", ""]
    feedback = report.get("feedback")
    if feedback:
        fb = (meta.get("feedback") if isinstance(meta.get("feedback"), dict) else {}) or {}
        label = feedback["label"]
        lines += ["## AI feedback on sampled pairs (the second stage)", "",
                  f"{feedback['pairs']} pairs of answers sampled from the policy model and compared by the feedback "
                  f"model `{fb.get('model', 'unknown')}` under the constitution's principles (each in both orders). "
                  f"Soft label P(chosen better): min {_fmt(label['min'])}, median {_fmt(label['p50'])}, "
                  f"mean {_fmt(label['mean'])}, max {_fmt(label['max'])}"
                  + (f"; the two orders agree in {feedback['agreement']:.1%} of the principles asked"
                     if feedback["agreement"] is not None else "") + ".", "",
                  "| principle | asked | chosen wins | mean P(chosen better) | orders agree |", "|---|---|---|---|---|",
                  *(f"| `{name}` | {row['asked']} | {row['win_rate']:.1%} | {row['chosen_mean']:.3f} | "
                    f"{row['agreement']:.1%} |" for name, row in feedback["principles"].items()), ""]
    edits, lengths = report["edits"], report["lengths"]
    lines += ["## How much the revisions change", "",
              "| words | p10 | median | p90 | mean |", "|---|---|---|---|---|",
              *(f"| {field} | {_fmt(d['p10'])} | {_fmt(d['p50'])} | {_fmt(d['p90'])} | {_fmt(d['mean'])} |"
                for field, d in (("prompt", lengths["prompt"]), ("rejected", lengths["rejected"]),
                                 ("chosen", lengths["chosen"]), ("word edits", edits["word_edits"]))),
              "", f"Near-identical pairs (word similarity ≥ 0.9): {edits['near_identical']}; identical: "
              f"{edits['identical']}.", ""]
    lines += ["## Fields", "",
              "`prompt`, `chosen`, `rejected` (strings, or chat-message lists in the conversational shape) as TRL "
              "reads them; `principle` and `critique` of the last round; `rounds` (every critique and revision); "
              "`meta` (model, constitution hash, seed, parameters, finish reasons, tokens).", "",
              "## Use", "", "```python", "from datasets import load_dataset", "",
              "pairs = load_dataset(\"PATH/TO/THIS/FOLDER\")", "```", "", f"Train with {trainer}:", "", "```sh",
              command, "```", "", load_hint, ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.1f}".rstrip("0").rstrip(".") if isinstance(value, float) else f"{value:,}"


def _size(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"
