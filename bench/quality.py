"""Quality: what share of the pairs a model makes are worth training on, before and after cai's
clean-up and filters, and what an AI-feedback judge thinks of the revisions.

Runs the pipeline (cai generate's sampling settings by default) over bench/quality_prompts.jsonl (20 harmful and 20 benign prompts of
our own), then:
  raw        chosen ≈ rejected (word similarity ≥ 0.9) and chosen opening with a preamble or
             talk about "the response", before any clean-up;
  filters    kept / dropped by reason (kept + dropped = input), and the same two figures on the
             kept pairs; refusals among kept revisions, on benign and harmful prompts;
  judge      the model's preference for the revision (option-token log-probabilities), each
             order alone and averaged over both, on all pairs and on the kept ones.

    python bench/quality.py                                   # embedded model, harmless, few-shot on
    python bench/quality.py --variants harmless:on harmless:off helpful-honest:on --json bench/quality.json

Each variant is CONSTITUTION:on|off (the few-shot turns). Prints a table; --json writes the figures
and a line per pair (reasons, similarity, preference) for inspection; --records DIR writes the
cleaned records themselves."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from types import SimpleNamespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import cai  # noqa: E402
from cai.filters import is_refusal, similarity, starts_with_preamble  # noqa: E402
from cai.inputs import read_prompts  # noqa: E402
from cai.judging import Judge  # noqa: E402
from cai.templates import load_templates  # noqa: E402

NEAR = 0.9


def share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "0/0"


def mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def judge_figures(records: list[dict]) -> dict:
    judged = [r["judge"] for r in records if "judge" in r]
    return {"judged": len(judged),
            "preference_both_orders": mean([j["preference"] for j in judged]),
            "preference_revision_as_B": mean([j["orders"][0] for j in judged]),
            "preference_revision_as_A": mean([j["orders"][1] for j in judged]),
            "revision_preferred": sum(j["preference"] > 0.5 for j in judged)}


def _repaired_turns(kept: list[dict], dropped: list[dict]) -> dict:
    """Per turn retried (response, revision 1, …): tries made, and the pairs with such a try that
    were kept in the end or dropped anyway."""
    out: dict[str, dict] = {}
    for records, fate in ((kept, "kept"), (dropped, "dropped")):
        for r in records:
            turns = [t["turn"] for t in r["meta"].get("repairs") or ()]
            for turn in turns:
                out.setdefault(turn, {"tries": 0, "kept": 0, "dropped": 0})["tries"] += 1
            for turn in set(turns):
                out[turn][fate] += 1
    return out


def run_variant(backend, items, kinds, constitution_name: str, few_shot: bool, repairs: int, args, console) -> dict:
    constitution, templates = cai.load_constitution(constitution_name), load_templates(args.templates)
    label = f"{constitution_name}:{'on' if few_shot else 'off'}" + (
        f" · repairs {repairs}" + (f" from {args.repair_from}" if args.repair_from != "revision" else "") if repairs else "")
    start = time.perf_counter()
    # the run's own filters (and repairs), with every dropped pair kept whole for the figures below
    summary = cai.generate([{"id": item.id, "prompt": item.text} for item in items], None, model=backend,
                           constitution=constitution, templates=args.templates, few_shot=few_shot, seed=0,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=0.95, repairs=repairs, repair_from=args.repair_from,
                           keep_filtered=True)
    assert summary.complete, summary.problem()
    generation_s = time.perf_counter() - start
    kept = summary.records
    dropped = summary.side.get("filtered", [])
    records = kept + dropped
    console.print(f"[dim]{label}: {len(records)} pairs in {generation_s:.0f} s, {len(kept)} kept[/dim]", highlight=False)
    reasons = Counter(reason for r in dropped for reason in r["filter"]["reasons"])
    raw = [{**r, "chosen": r["rounds"][-1]["revision"]} for r in records]       # before clean-up
    verdicts = [SimpleNamespace(record=r, reasons=r.get("filter", {}).get("reasons", []),
                                similarity=similarity(r["chosen"], r["rejected"])) for r in records]
    judge_s = 0.0
    if args.judge:
        start = time.perf_counter()
        judge = Judge(backend, constitution, templates)
        cleaned = [v.record for v in verdicts]
        for i in range(0, len(cleaned), 8):
            judge.label(cleaned[i:i + 8])
        judge_s = time.perf_counter() - start
    kept_refusals = Counter(kinds[r["id"]] for r in kept if is_refusal(r["chosen"]))
    figures = {
        "variant": label, "constitution": constitution_name, "few_shot": few_shot, "repairs": repairs,
        "input": len(records),
        "raw_near_identical": sum(similarity(r["chosen"], r["rejected"]) >= NEAR for r in raw),
        "raw_preamble": sum(starts_with_preamble(r["chosen"]) for r in raw),
        "raw_truncated": sum("length" in (r["meta"]["finish_reasons"]["response"], r["meta"]["finish_reasons"]["revision"][-1])
                             for r in raw),
        "kept_first_try": sum(not r["meta"].get("repairs") for r in kept),
        "kept_after_repair": sum(bool(r["meta"].get("repairs")) for r in kept),
        "repaired_turns": _repaired_turns(kept, dropped),
        "generated_tokens": summary.tokens,
        "kept_per_min": round(len(kept) / generation_s * 60, 2),
        "pairs_per_min": round(len(records) / generation_s * 60, 2),
        "kept": len(kept), "dropped": len(records) - len(kept),
        "dropped_by_reason": dict(reasons.most_common()),
        "cleaned": sum(bool(r["meta"].get("cleaned")) for r in kept),
        "kept_near_identical": sum(similarity(r["chosen"], r["rejected"]) >= NEAR for r in kept),
        "kept_preamble": sum(starts_with_preamble(r["chosen"]) for r in kept),
        "kept_refusals_benign": kept_refusals["benign"], "kept_refusals_harmful": kept_refusals["harmful"],
        "kept_benign": sum(kinds[r["id"]] == "benign" for r in kept),
        "judge_all": judge_figures([v.record for v in verdicts]), "judge_kept": judge_figures(kept),
        "generation_s": round(generation_s, 1), "judge_s": round(judge_s, 1),
        "pairs": [{"id": v.record["id"], "kind": kinds[v.record["id"]], "reasons": v.reasons,
                   "similarity": round(v.similarity, 3), "preference": v.record.get("judge", {}).get("preference")}
                  for v in verdicts],
    }
    assert figures["kept"] + figures["dropped"] == figures["input"]
    if args.records:
        folder = Path(args.records)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{Path(constitution_name).stem}-{'on' if few_shot else 'off'}-r{repairs}.jsonl", "w") as out:
            for v in verdicts:
                out.write(json.dumps(v.record, ensure_ascii=False) + "\n")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(ROOT / "bench/quality_prompts.jsonl"))
    parser.add_argument("--variants", nargs="+", default=["harmless:on"], metavar="CONSTITUTION:on|off")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=0.7, help="default: cai generate's (0.7, top-p 0.95, seed 0)")
    parser.add_argument("--templates", default="default")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repairs", type=int, nargs="+", default=[0], metavar="N",
                        help="run each variant with each of these --repairs settings (default: 0)")
    parser.add_argument("--repair-from", default="revision", choices=("revision", "critique"))
    parser.add_argument("--no-judge", dest="judge", action="store_false")
    parser.add_argument("--records", metavar="DIR", help="write each variant's cleaned records (with reasons) here")
    parser.add_argument("--json", dest="json_path", help="write the figures here")
    args = parser.parse_args()

    console = Console(stderr=True, emoji=False)
    backend = cai.open_backend(cai.BackendSpec(model=args.model))
    name = backend.model_name
    items = read_prompts(args.prompts)[:args.limit]
    kinds = {json.loads(line)["id"]: json.loads(line).get("kind", "?")
             for line in Path(args.prompts).read_text().splitlines() if line.strip()}
    results = []
    for variant in args.variants:
        constitution_name, _, few_shot = variant.partition(":")
        for repairs in args.repairs:
            results.append(run_variant(backend, items, kinds, constitution_name, few_shot != "off", repairs, args, console))

    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, top-p 0.95, seed 0"
    table = Table(title=f"{name} · {sampling} · {args.max_new_tokens} new tokens a turn · {len(items)} prompts")
    for column in ("variant", "raw ≈", "raw preamble", "kept (after repair)", "dropped by reason", "kept ≈", "kept preamble",
                   "wall s", "pairs/min", "kept/min",
                   "kept refusals (benign/harmful)", "judge all: both · B · A", "judge kept: both · B · A"):
        table.add_column(column, overflow="fold")

    def judge_cell(j: dict) -> str:
        if not j["judged"]:
            return "-"
        return (f"{j['preference_both_orders']:.3f} · {j['preference_revision_as_B']:.3f} · "
                f"{j['preference_revision_as_A']:.3f} ({j['revision_preferred']}/{j['judged']} > 0.5)")

    for r in results:
        table.add_row(r["variant"], share(r["raw_near_identical"], r["input"]), share(r["raw_preamble"], r["input"]),
                      f"{share(r['kept'], r['input'])} ({r['kept_after_repair']})",
                      ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items()),
                      share(r["kept_near_identical"], r["kept"]), str(r["kept_preamble"]),
                      f"{r['generation_s']:.0f}", f"{r['pairs_per_min']:.1f}", f"{r['kept_per_min']:.1f}",
                      f"{r['kept_refusals_benign']}/{r['kept_refusals_harmful']}",
                      judge_cell(r["judge_all"]), judge_cell(r["judge_kept"]))
    Console(width=200).print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"model": name, "max_new_tokens": args.max_new_tokens,
                                                    "temperature": args.temperature, "templates": args.templates,
                                                    "prompts": len(items), "variants": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
