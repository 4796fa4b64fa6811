"""Peak memory of planning a large prompt file: how much RSS `cai.inputs.read_prompts` and
`cai.run.select.select` (what `cai generate` does before loading a model) take for N prompts.

    PYTHONPATH=. python bench/inputs_memory.py --prompts 1000000 --json bench/inputs_memory.json
    PYTHONPATH=. python bench/inputs_memory.py --path prompts.jsonl

Writes N varied prompts of 100-300 characters as JSONL to a temporary folder (or reads --path),
then measures each step in a fresh subprocess (ru_maxrss is a peak, so one process a step):
RSS after imports, the peak after reading, the peak after selecting, and the seconds each took.
Prints a table; --json writes the same figures."""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("how why what explain describe compare could should would the a an of to in for with on my "
         "your their this that these recipe garden history river engine language poem letter bank "
         "budget neighbour lawyer medicine science weather planet music story child teacher city "
         "computer network password recipe doctor market price travel train mountain ocean book "
         "film law rule friend family job interview email apology summary list steps reasons "
         "safely quickly carefully honestly briefly legal illegal dangerous kind fair").split()


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fp:
        for i in range(n):
            size = rng.randint(100, 300)
            words: list[str] = []
            length = 0
            while length < size:
                word = rng.choice(WORDS)
                words.append(word)
                length += len(word) + 1
            text = " ".join(words)[:size].rstrip().capitalize() + "?"
            record = {"id": f"q{i}", "prompt": text} if i % 3 == 0 else {"prompt": text}
            fp.write(json.dumps(record, ensure_ascii=False) + "\n")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # KiB on Linux


def child(step: str, path: str) -> None:
    """One measured step in this process; prints its figures as one JSON line."""
    from cai.constitution import load_constitution
    from cai.inputs import read_prompts
    from cai.options import GenerateOptions
    from cai.pipeline import RunConfig
    from cai.run.select import select

    options, constitution, config = GenerateOptions(), load_constitution("harmless"), RunConfig()
    before = _rss_mb()
    start = time.perf_counter()
    if step == "read":
        count = len(read_prompts(path))
    else:
        count = len(select(path, options, constitution, config).ids)
    print(json.dumps({"step": step, "count": count, "rss_before_mb": before, "rss_peak_mb": _rss_mb(),
                      "seconds": time.perf_counter() - start}))


def measure(path: Path) -> dict:
    figures = {"file": str(path), "file_mb": path.stat().st_size / 1e6}
    for step in ("read", "select"):
        out = subprocess.run([sys.executable, __file__, "--child", step, "--path", str(path)],
                             check=True, capture_output=True, text=True, env=os.environ).stdout
        figures[step] = json.loads(out.strip().splitlines()[-1])
    figures["prompts"] = figures["read"]["count"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--path", help="measure this prompts file instead of writing one")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. the commit)")
    parser.add_argument("--child", choices=("read", "select"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path)
        return 0
    with tempfile.TemporaryDirectory(prefix="cai-inputs-") as tmp:
        path = Path(args.path) if args.path else Path(tmp) / "prompts.jsonl"
        if not args.path:
            write_prompts(path, args.prompts)
        figures = measure(path)
    figures["label"] = args.label
    read, sel = figures["read"], figures["select"]
    print(f"{'prompts':>10} {'file MB':>8} {'RSS before':>11} {'after read':>11} {'after select':>13} "
          f"{'read s':>7} {'select s':>9}")
    print(f"{figures['prompts']:>10} {figures['file_mb']:>8.1f} {read['rss_before_mb']:>9.1f}MB "
          f"{read['rss_peak_mb']:>9.1f}MB {sel['rss_peak_mb']:>11.1f}MB {read['seconds']:>7.1f} {sel['seconds']:>9.1f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
