"""Throughput of `cai generate --backend openai` through a real `transformers serve`, at several
concurrency levels, on the same prompts (greedy, fixed max tokens).

    python bench/serve_throughput.py                       # embedded model, 8 prompts, concurrency 1 4 16
    python bench/serve_throughput.py --json bench/serve_throughput.json

It starts `transformers serve` on 127.0.0.1 with the model folder (offline), runs cai's pipeline
through the OpenAI-compatible backend once per concurrency level, and prints pairs/min and
generated tok/s. Needs the dev extra (transformers[serving])."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import cai  # noqa: E402
from cai.inputs import read_prompts  # noqa: E402
from cai.models import resolve_model  # noqa: E402


def start_server(model_dir: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"transformers serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("transformers serve did not come up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(ROOT / "bench/prompts64.txt"))
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--model", default=None, help="a model folder; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    console = Console(stderr=True)
    model_dir, _ = resolve_model(args.model)
    proc, url = start_server(model_dir, Path("/tmp/cai-bench-serve.log"))
    rows = []
    try:
        items = read_prompts(args.prompts)[:args.limit]
        for width in args.concurrency:
            start = time.perf_counter()
            summary = cai.generate([{"id": item.id, "prompt": item.text} for item in items], None,
                                   backend="openai", base_url=url, model=model_dir, api_key_env="CAI_BENCH_NO_KEY",
                                   timeout=600, concurrency=width, seed=0, max_new_tokens=args.max_new_tokens,
                                   temperature=0.0, filter=False)
            wall = time.perf_counter() - start
            records = summary.records
            generated = sum(r["meta"]["tokens"]["completion"] for r in records)
            rows.append({"concurrency": width, "pairs": len(records), "wall_s": round(wall, 1),
                         "pairs_per_min": round(len(records) / wall * 60, 2),
                         "generated_tok_per_s": round(generated / wall, 1)})
            console.print(f"[dim]concurrency {width}: {rows[-1]}[/dim]")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    table = Table(title=f"cai --backend openai → transformers serve · {Path(model_dir).name} · greedy · "
                        f"{args.max_new_tokens} new tokens a turn · {args.limit} prompts")
    for column in ("concurrency", "pairs", "pairs/min", "gen tok/s", "wall s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["concurrency"]), str(r["pairs"]), f"{r['pairs_per_min']:.2f}",
                      f"{r['generated_tok_per_s']:.1f}", f"{r['wall_s']:.0f}")
    Console(width=140).print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
