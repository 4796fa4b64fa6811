"""The paper's second stage on the embedded model (issue 33): `cai generate --samples N` with the
embedded SmolLM2-135M-Instruct as both policy and feedback model, and the figures the README
quotes: the label distribution, how often the two orders agree, and the time per pair.

    python bench/rlcai.py --json bench/rlcai.json                       # N = 2, K = 4
    python bench/rlcai.py --samples 4 --principles 4 --cot --json bench/rlcai-cot.json

Each configuration runs once, from a fresh output, greedy feedback (the policy samples at the
given temperature); time per pair is the run's wall time over the pairs written (model load
excluded: `summary.elapsed` starts once the model is loaded)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """The CPU the figures were measured on: its name, cores and vector features."""
    import os

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    return {"cpu": cpu, "cores": os.cpu_count(), "features": sorted(f for f in flags if f.startswith(("avx", "amx")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(ROOT / "bench" / "quality_prompts.jsonl"))
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--principles", type=int, default=4)
    parser.add_argument("--cot", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import cai
    from cai.stats import collect

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "pairs.jsonl")
        summary = cai.generate(args.prompts, out, samples=args.samples, principles_per_comparison=args.principles,
                               cot=args.cot, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                               limit=args.limit, filter=False)
        report, _ = collect(out)
    feedback = report["feedback"] or {}
    figures = {
        "machine": machine(), "model": summary.model,
        "prompts": args.limit, "samples": args.samples, "principles_per_comparison": args.principles,
        "cot": args.cot, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
        "pairs": summary.pairs, "failed": summary.failed, "elapsed_s": round(summary.elapsed, 2),
        "seconds_per_pair": round(summary.elapsed / summary.pairs, 3) if summary.pairs else None,
        "label": feedback.get("label"), "histogram": feedback.get("histogram"),
        "agreement": feedback.get("agreement"), "principles": feedback.get("principles"),
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
