"""Durability loop: rounds of two concurrent `cai generate` runs on one output, a SIGTERM and a
kill -9 each, then a resume; checks that every id is there exactly once, that no line is torn, and
that every run that exited 0 left all of its records.

    python bench/writers_loop.py --model /path/to/model --rounds 20 --json bench/writers_loop.json

Prints a table of the rounds (exit codes seen) and the checks; --json writes the same."""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n") if path.exists() else [b""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="cai-writers-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i:04d}", "prompt": f"Tell me about item {i}."}) + "\n"
                               for i in range(args.prompts)))
    out = work / "pairs.jsonl"
    command = [sys.executable, "-m", "cai", "generate", str(prompts), "--model", args.model, "-o", str(out),
               "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "4", "--no-few-shot", "--no-filter", "-q"]
    expected = {f"p{i:04d}" for i in range(args.prompts)}
    codes: Counter[int] = Counter()
    problems: list[str] = []
    rounds = []

    def check_whole(label: str) -> None:
        ids = [json.loads(line)["id"] for line in lines(out)[:-1]]
        if len(ids) != len(set(ids)):
            problems.append(f"{label}: duplicated ids {[i for i, n in Counter(ids).items() if n > 1][:5]}")
        if set(ids) != expected:
            problems.append(f"{label}: exited 0 with {len(set(ids))} of {len(expected)} ids")

    def until_new_records(procs, extra: float) -> None:
        """Wait until the output has grown (a run is in its loop), then a random while longer."""
        before, deadline = len(lines(out)), time.monotonic() + 120
        while len(lines(out)) <= before and time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        time.sleep(rng.uniform(0, extra))

    start = time.monotonic()
    for number in range(1, args.rounds + 1):
        pair = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        until_new_records(pair, 3.0)
        for proc in pair:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        round_codes = []
        for proc in pair:
            code = proc.wait(timeout=120)
            stderr = proc.stderr.read().decode(errors="replace")
            round_codes.append(code)
            codes[code] += 1
            if code == 0:
                check_whole(f"round {number}")
            if "Traceback" in stderr:
                problems.append(f"round {number}: traceback: {stderr[-300:]}")
        killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until_new_records([killed], 3.0)
        killed.kill()
        round_codes.append(killed.wait())
        codes["kill -9"] += 1
        torn = lines(out)[-1] != b""
        rounds.append({"round": number, "codes": round_codes, "records": len(lines(out)) - 1, "torn_tail": torn})
        print(f"round {number:2d}: exits {round_codes}, {len(lines(out)) - 1} lines, torn tail {torn}", file=sys.stderr)
    final = subprocess.run(command, capture_output=True, timeout=3600)
    codes[final.returncode] += 1
    body = lines(out)
    torn = body[-1] != b""
    ids = [json.loads(line)["id"] for line in body[:-1]]        # json.loads raises on a torn line inside
    result = {
        "rounds": args.rounds, "prompts": args.prompts, "wall_s": round(time.monotonic() - start, 1),
        "exit_codes": {str(k): v for k, v in codes.items()}, "final_exit": final.returncode,
        "records": len(ids), "unique_ids": len(set(ids)), "all_ids": set(ids) == expected,
        "torn_lines": int(torn), "problems": problems, "per_round": rounds,
    }
    if final.returncode != 0:
        problems.append(f"final resume exited {final.returncode}: {final.stderr.decode()[-300:]}")
    ok = not problems and result["all_ids"] and len(ids) == len(set(ids)) and not torn
    print(json.dumps({k: v for k, v in result.items() if k != "per_round"}, indent=2))
    print("PASS" if ok else "FAIL")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
