"""Repairs 0…N from one run at --repairs N: each try has its own seed (derived from the record id,
the turn and the try number), so a run allowed fewer repairs makes exactly the first tries of
this one. A pair kept after k repairs is kept by any run allowing k or more, and dropped by one
allowing fewer, for the reasons its try number `n` failed with (a response retried as truncated
stays truncated). Reads the records `bench/quality.py --records DIR` wrote (kept and dropped,
whole) and prints kept and reasons left for each allowance; `--check` compares with runs made
at those allowances for real (same prompts, seed and settings).

    python bench/repairs_table.py /tmp/repair-records/harmless-on-r3.jsonl
    python bench/repairs_table.py DIR/helpful-honest-on-r3.jsonl --check DIR/helpful-honest-on-r{0,1,2}.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path


def outcome(record: dict, allowed: int) -> tuple[bool, list[str]]:
    """(kept, reasons) of a record's prompt in a run allowing `allowed` repairs."""
    tries = record["meta"].get("repairs") or []
    final = (record.get("filter") or {}).get("reasons") or []
    if len(tries) <= allowed:
        return not final, final
    return False, tries[allowed]["reasons"]


def table(records: list[dict], most: int) -> list[dict]:
    rows = []
    for allowed in range(most + 1):
        fates = [outcome(r, allowed) for r in records]
        reasons = Counter(reason for kept, why in fates if not kept for reason in why)
        rows.append({"repairs": allowed, "kept": sum(k for k, _ in fates), "of": len(records),
                     "reasons_left": dict(reasons.most_common())})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="a --records file of a run at --repairs N")
    parser.add_argument("--check", nargs="*", default=[], help="records of real runs at fewer repairs (…-rK.jsonl)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    most = int(re.search(r"-r(\d+)\.jsonl$", args.records).group(1))
    rows = table(records, most)
    checks = {}
    for path in args.check:
        allowed = int(re.search(r"-r(\d+)\.jsonl$", path).group(1))
        real = {r["id"]: r for r in (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())}
        derived = {r["id"]: outcome(r, allowed) for r in records}
        same = sum(derived[i] == (not (real[i].get("filter") or {}).get("reasons"),
                                  (real[i].get("filter") or {}).get("reasons") or []) for i in real)
        texts = sum(r["chosen"] == real[r["id"]]["chosen"] for r in records
                    if len(r["meta"].get("repairs") or []) <= allowed)
        checks[allowed] = {"same_outcome": same, "of": len(real), "same_chosen_where_settled": texts}
    for row in rows:
        check = checks.get(row["repairs"])
        print(f"repairs {row['repairs']}: kept {row['kept']}/{row['of']} ({100 * row['kept'] / row['of']:.0f}%)  "
              f"left: {', '.join(f'{k} {v}' for k, v in row['reasons_left'].items()) or '-'}"
              + (f"  [real run: {check['same_outcome']}/{check['of']} same outcome]" if check else ""))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"from": args.records, "rows": rows, "checks": checks}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
