"""`cai review` on a big pairs file: how long until the page shows the first pair, and how long
moving to the next pair takes, in Debian's Chromium (headless, through Playwright).

    python bench/review_open.py --pairs 100000 --json bench/review_open.json

The file is made here: --pairs records built from the scripted backend's records of the test
suite (tests/reviewdata.py: judged in both orders, conversational, about 1.6 KB a line), each with
its own id and one of five principles, plus a filtered file of dropped pairs (one in ten). Timed:
`cai review FILE --no-browser` from its start to the address on stderr (index built, decisions
file read, lock taken, port open), the page from `goto` to its first pair shown, and --moves
presses of → (the next pair, in file order) from the key to the next pair shown. The index's
second pass (each line parsed for the filters' figures) runs while the first pair is shown:
`filters_and_figures_s` is when the page has them (its filters, sorting and plots)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def make(folder: Path, count: int) -> Path:
    from reviewdata import make_pairs, records

    (folder / "seed").mkdir()
    seed = make_pairs(folder / "seed", hostile=False)
    base = records(seed)
    dropped = records(f"{seed}.filtered.jsonl")[0]
    rnd = random.Random(0)
    pairs = folder / "big.jsonl"
    with pairs.open("w") as kept, open(f"{pairs}.filtered.jsonl", "w") as side:
        for i in range(count):
            source = dropped if i % 10 == 9 else base[i % len(base)]
            record = {**source, "id": f"p{i:06d}", "principle": rnd.choice(["harm", "honesty", "privacy", "manipulation",
                                                                           "dignity"])}
            (side if i % 10 == 9 else kept).write(json.dumps(record, ensure_ascii=False) + "\n")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        pairs = make(Path(tmp), args.pairs)
        size = pairs.stat().st_size + Path(f"{pairs}.filtered.jsonl").stat().st_size
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "cai", "review", str(pairs), "--no-browser", "--port", "0"],
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        url = None
        for line in proc.stderr:
            found = re.search(r"open (http://\S+)", line)
            if found:
                url = found[1]
                break
        ready = time.perf_counter() - start
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync"])
                page = browser.new_page()
                t = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("#pair-id")
                first_pair = time.perf_counter() - t
                page.wait_for_selector("body[data-ready]", timeout=60_000)
                figures_in = time.perf_counter() - t
                moves = []
                for _ in range(args.moves):
                    before = page.text_content("#pair-id")
                    t = time.perf_counter()
                    page.keyboard.press("ArrowRight")
                    expect(page.locator("#pair-id")).not_to_have_text(before)
                    moves.append(time.perf_counter() - t)
                browser.close()
        finally:
            proc.terminate()
            proc.wait()
    figures = {"pairs": args.pairs, "bytes": size, "server_ready_s": round(ready, 2), "first_pair_s": round(first_pair, 2),
               "open_total_s": round(ready + first_pair, 2),
               "filters_and_figures_s": round(ready + figures_in, 2), "move_median_ms": round(1000 * sorted(moves)[len(moves) // 2], 1),
               "move_max_ms": round(1000 * max(moves), 1)}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
