"""Throughput: cai's pipeline against the straightforward loop, side by side in one process.

The straightforward loop makes one pair at a time and re-encodes the whole conversation at every
turn (transformers' `generate`, batch 1, no cache kept between turns). cai's pipeline keeps up to
--batch-size conversations in flight on its engine (static KV cache, continuous batching, the shared
prefix and each conversation's earlier turns reused). Both run greedy with the same prompts, model,
constitution, weight format (--dtype) and max tokens, and both go through the same Pipeline, so
their records must be the same: the bench compares them and says how many agree.

    python bench/throughput.py                           # embedded model, 64 prompts, 128 tokens a turn
    python bench/throughput.py --naive-limit 64 --json bench/throughput.json
    python bench/throughput.py --dtype int8 --json bench/throughput-int8.json

The straightforward loop takes about 15-25 s a pair here, so by default it runs on the first 16
prompts only (--naive-limit); rates are per pair and per token, and the records are compared on
those prompts. Prints a table; --json writes the same figures."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import cai  # noqa: E402
from cai.inputs import read_prompts  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(backend, constitution: str, items, options: dict, label: str, console: Console) -> dict:
    """One pass of `cai.generate` over `items` with the backend already loaded (or None: the
    backend `options` open, such as a server's)."""
    samples = []
    start = time.perf_counter()

    def progress(phase: str, summary) -> None:
        if phase == "records":
            samples.append((summary.kept, round(rss_mb())))
            console.print(f"[dim]{label}: {summary.kept}/{summary.planned} pairs, {time.perf_counter() - start:.0f} s, "
                          f"RSS {samples[-1][1]} MB[/dim]", highlight=False)

    opened = {} if backend is None else {"model": backend}
    summary = cai.generate([{"id": item.id, "prompt": item.text} for item in items], None, **opened,
                           constitution=constitution, progress=progress, **options)
    assert summary.complete, summary.problem()
    wall = time.perf_counter() - start
    if options.get("filter", True):          # the run's own filters (and repairs): kept and dropped whole
        records, kept = summary.records + summary.side.get("filtered", []), len(summary.records)
    else:                                    # what cai generate's default filters would keep of them
        records = summary.records
        kept = sum(_filters(constitution, options.get("few_shot", True)).apply(r).kept for r in records)
    generated = sum(r["meta"]["tokens"]["completion"] for r in records)
    engine = getattr(backend, "engine", None)
    if engine is not None and getattr(backend, "use_engine", False):     # cai's own engine (not vLLM's)
        stats = engine.stats
        computed, reused = stats.prefill_computed, stats.prefill_reused
        cache_mb = engine.cache.bytes / 2**20
        steps = {"decode_steps": stats.decode_steps, "drafted": stats.drafted, "accepted": stats.accepted,
                 "ids": stats.ids, "head_rows": stats.head_rows, "attended": stats.attended}
    else:
        computed, reused, cache_mb = sum(r["meta"]["tokens"]["prompt"] for r in records), 0, 0.0
        steps = {}
    return {
        "path": label, "prompts": len(records), "batch_size": summary.width, "wall_s": round(wall, 1),
        "pairs_per_min": round(len(records) / wall * 60, 2), "kept": kept,
        "kept_per_min": round(kept / wall * 60, 2), "generated_tokens": generated,
        "generated_tok_per_s": round(generated / wall, 1), "prefill_computed": computed, "prefill_reused": reused,
        "kv_cache_mb": round(cache_mb), "peak_rss_mb": round(peak_rss_mb()), **steps, "rss_samples": samples,
        "records": {r["id"]: r for r in records}, "endpoints": summary.endpoints,
    }


def _filters(constitution: str, few_shot: bool):
    from cai.filters import DEFAULT_CHECKS, FilterConfig, Filters, references_of

    references = references_of(cai.load_constitution(constitution)) if few_shot else ()
    return Filters(FilterConfig(checks=DEFAULT_CHECKS, references=references))


def same(a: dict, b: dict) -> bool:
    keys = ("prompt", "rejected", "chosen", "principle", "critique", "rounds")
    return all(a[k] == b[k] for k in keys) and a["meta"]["finish_reasons"] == b["meta"]["finish_reasons"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(ROOT / "bench/prompts64.txt"))
    parser.add_argument("--limit", type=int, default=64, help="prompts for cai's pipeline")
    parser.add_argument("--naive-limit", type=int, default=16, help="prompts for the straightforward loop (0: skip it)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None, help="default: cai's own default for the machine")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="auto", help="as cai's --dtype: auto (float16 weights on CPU), float32, int8, …")
    parser.add_argument("--no-draft", dest="draft", action="store_false", help="turn off the engine's prompt-lookup drafts")
    parser.add_argument("--repeat", type=int, default=1,
                        help="use each prompt this many times (as distinct prompts), e.g. 16 for a 1,024-prompt memory run")
    parser.add_argument("--no-few-shot", dest="few_shot", action="store_false")
    parser.add_argument("--repairs", type=int, default=0,
                        help="cai's pipeline runs its filters with this many repairs (the loop keeps what they would keep)")
    parser.add_argument("--json", dest="json_path", help="write the figures here")
    args = parser.parse_args()

    console = Console(stderr=True)
    backend = cai.open_backend(cai.BackendSpec(model=args.model, threads=args.threads, dtype=args.dtype))
    backend.draft = args.draft
    items = read_prompts(args.prompts)
    if args.repeat > 1:
        items = [replace(item, id=f"{item.id}-{k}", text=f"{item.text} (Variant {k}.)")
                 for k in range(1, args.repeat + 1) for item in items]
    items = items[:args.limit]
    options = dict(seed=0, max_new_tokens=args.max_new_tokens, temperature=0.0, few_shot=args.few_shot,
                   filter=False, lock=False)

    results = []
    if args.naive_limit:
        backend.use_engine = False
        results.append(run(backend, args.constitution, items[:args.naive_limit], {**options, "batch_size": 1},
                           "straightforward loop", console))
        backend.use_engine = True
    pipeline_options = {**options, "batch_size": args.batch_size}
    if args.repairs:
        pipeline_options.update(filter=True, keep_filtered=True, repairs=args.repairs)
    results.append(run(backend, args.constitution, items, pipeline_options,
                       "cai pipeline" + (f" (repairs {args.repairs})" if args.repairs else ""), console))

    table = Table(title=f"{backend.model_name} · {args.constitution} · greedy · {args.max_new_tokens} new tokens a turn · "
                        f"threads {__import__('torch').get_num_threads()}")
    for column in ("path", "prompts", "batch", "pairs/min", "kept/min", "gen tok/s", "prefill computed", "prefill reused",
                   "KV cache MB", "peak RSS MB", "wall s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for r in results:
        table.add_row(r["path"], str(r["prompts"]), str(r["batch_size"]), f"{r['pairs_per_min']:.2f}",
                      f"{r['kept_per_min']:.2f}", f"{r['generated_tok_per_s']:.1f}", f"{r['prefill_computed']:,}", f"{r['prefill_reused']:,}",
                      str(r["kv_cache_mb"]), str(r["peak_rss_mb"]), f"{r['wall_s']:.0f}")
    summary = {"model": backend.model_name, "dtype": args.dtype, "draft": args.draft, "constitution": args.constitution, "max_new_tokens": args.max_new_tokens,
               "few_shot": args.few_shot,
               "threads": __import__("torch").get_num_threads()}
    if len(results) == 2:
        naive, ours = results
        shared = [i for i in naive["records"] if i in ours["records"]]
        identical = sum(same(naive["records"][i], ours["records"][i]) for i in shared)
        summary.update(speedup_pairs_per_min=round(ours["pairs_per_min"] / naive["pairs_per_min"], 2),
                       speedup_kept_per_min=round(ours["kept_per_min"] / naive["kept_per_min"], 2)
                       if naive["kept_per_min"] else None,
                       speedup_tok_per_s=round(ours["generated_tok_per_s"] / naive["generated_tok_per_s"], 2),
                       identical_records=identical, compared_records=len(shared))
        kept_ratio = summary["speedup_kept_per_min"]
        table.add_row("ratio", "", "", f"{summary['speedup_pairs_per_min']:.1f}×",
                      f"{kept_ratio:.1f}×" if kept_ratio else "–", f"{summary['speedup_tok_per_s']:.1f}×", "", "", "", "", "")
    Console(width=160).print(table)
    cai_run = results[-1]
    if "decode_steps" in cai_run:
        Console().print(f"engine: {cai_run['decode_steps']:,} decode steps; prompt-lookup drafts {cai_run['drafted']:,} "
                        f"ids, {cai_run['accepted']:,} accepted")
    if len(results) == 2:
        Console().print(f"records identical on the prompts both ran: {summary['identical_records']} of "
                        f"{summary['compared_records']}")
    if args.json_path:
        out = {**summary, "runs": [{k: v for k, v in r.items() if k != "records"} for r in results]}
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
