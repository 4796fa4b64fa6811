"""Several endpoints from one run against one endpoint with the same slots: the 64-prompt bench
through two llama-server instances (each -np S/2, half the threads) driven by one `cai generate
--base-url A --base-url B`, and through one llama-server (-np S, all the threads), side by side in
one run on the same GGUF, prompts and settings (greedy, 128 new tokens a turn, no filters).

    bash bench/build_llama_server.sh                 # once
    python bench/fleet.py --json bench/fleet.json

What it shows: that spreading a run over endpoints costs nothing against one server of the
same size (on one machine they share its cores, so no more is expected), and each endpoint's
share of the requests. Peers' settings are in the JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from cai.inputs import read_prompts  # noqa: E402
from cai.model_files import embedded_gguf  # noqa: E402
from peers import free_port, peak_rss_of, start_server, stop_server  # noqa: E402
from throughput import run  # noqa: E402


def llama(binary: str, gguf: str, port: int, slots: int, threads: int, args) -> list[str]:
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * args.slot_context), "-t", str(threads), "--jinja", "--no-webui",
            "--alias", args.served_name]


def serve_and_run(name: str, servers: list[tuple[int, int]], items, args, console: Console) -> dict:
    """Start one llama-server per (slots, threads), run the bench through all of them from one
    cai run (each endpoint's concurrency its slots), stop them."""
    procs, urls = [], []
    try:
        for i, (slots, threads) in enumerate(servers):
            port = free_port()
            command = llama(args.llama_server, args.gguf, port, slots, threads, args)
            console.print(f"[dim]{name}: {' '.join(command)}[/dim]", highlight=False)
            procs.append(start_server(command, port, Path(args.logs) / f"{name.replace(' ', '_')}-{i}.log"))
            urls.append(f"http://127.0.0.1:{port}/v1")
        options = dict(backend="openai", base_url=urls, model=args.served_name,
                       timeout=args.request_timeout, concurrency=servers[0][0], seed=0,
                       max_new_tokens=args.max_new_tokens, temperature=0.0, few_shot=True, filter=False,
                       lock=False, repairs=0)
        row = run(None, args.constitution, items, options, name, console)
        row["servers"] = [{"url": url, "slots": slots, "threads": threads, "peak_rss_mb": peak_rss_of(proc.pid)}
                          for url, (slots, threads), proc in zip(urls, servers, procs)]
    finally:
        for proc in procs:
            stop_server(proc)
    row["engine"] = name
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(ROOT / "bench/prompts64.txt"))
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    built = ROOT / "build/llama.cpp/build/bin/llama-server"
    parser.add_argument("--llama-server", default=str(built))
    parser.add_argument("--slots", type=int, default=8, help="slots in all: one server -np S, or two of -np S/2")
    parser.add_argument("--slot-context", type=int, default=2048)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--served-name", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--request-timeout", type=float, default=1200)
    parser.add_argument("--logs", default="/tmp/cai-bench-fleet")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    args.gguf = args.gguf or str(embedded_gguf())
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    threads = torch.get_num_threads()
    items = read_prompts(args.prompts)[:args.limit]
    half = max(1, threads // 2)
    one = serve_and_run(f"one llama-server -np {args.slots}", [(args.slots, threads)], items, args, console)
    two = serve_and_run(f"two llama-servers -np {args.slots // 2}", [(args.slots // 2, half)] * 2, items, args, console)
    rows = [one, two]
    for row in rows:
        console.print(f"{row['engine']}: {row['wall_s']:.1f} s, {row['pairs_per_min']:.1f} pairs/min, "
                      f"{row['generated_tok_per_s']:.1f} tok/s", highlight=False)
        for figures in row["endpoints"]:
            console.print(f"  {figures['url']}: {figures['requests']} requests, {figures['errors']} errors, "
                          f"median {figures['median_latency']} s", highlight=False)
    ratio = two["pairs_per_min"] / one["pairs_per_min"]

    def content(record: dict) -> tuple:
        return record["chosen"], record["rejected"], record["critique"]

    same = sum(content(r) == content(two["records"].get(i, r)) for i, r in one["records"].items())
    console.print(f"records identical between the two runs: {same} of {len(one['records'])} (llama-server's greedy "
                  "output depends on how its slots are batched)", highlight=False)
    for row in rows:
        del row["records"]
    console.print(f"two endpoints from one run / one endpoint: {ratio:.2f}× the pairs a minute", highlight=False)
    if args.json_path:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
        Path(args.json_path).write_text(json.dumps({
            "machine": {"cpu": cpu, "cores": threads, "features": sorted(f for f in flags if f.startswith(("avx", "amx")))},
            "settings": {"prompts": len(items), "max_new_tokens": args.max_new_tokens, "greedy": True,
                         "slots_in_all": args.slots, "slot_context": args.slot_context, "gguf": Path(args.gguf).name},
            "runs": rows, "two_over_one": round(ratio, 3), "identical_records": same}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
