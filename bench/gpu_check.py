"""cai's decode engine on a GPU: is it exact, and how fast is it? Random-weight models of real
checkpoints' shapes, built on the device in the target dtype (nothing is downloaded or read).

    python bench/gpu_check.py --json gpu_check.json                 # CUDA: the three real shapes
    python bench/gpu_check.py --shapes tiny --conversations 8       # CPU: the tiny shape

Correctness: the engine against transformers' greedy `generate` (batch 1, re-encoding each turn),
token for token over three turns of each of --check-conversations conversations (a shared system
prompt of --system-tokens ids, a different user part each, one conversation sharing nothing, and
fewer slots than conversations). Each turn is the previous prompt + the engine's answer + new user
ids, so turns stay comparable after a divergence. Random weights make poor greedy tests: every
position's hidden state points much the same way (near-uniform attention), so answers repeat one
token whatever the context, and the logits' top two sit close enough for bf16 rounding to swap
them. So the model is shaped after it is built: the input embeddings x --embed-scale (10: the
current token counts), query and key projections x --sharpen (2: attention picks positions), a
head of its own (a tied one would echo the input) whose rows are scaled by exp(--peak x N(0, 1))
(0.3: a heavy-tailed spread, so the top logit stands clear of the runner-up). Scaling the whole
head would not help: rounding is relative, so margins and errors grow together. A divergence is a
near-tie when the reference's logit for its own pick exceeds its logit for the engine's pick by at
most TOLERANCE[dtype] x that step's largest |logit|; any other divergence, or an engine error, is a
FAIL (exit status 1).
(Measured on the CPU, SmolLM2's shape, 2 seeds x 160 positions: bf16 and float32 forwards chose
different argmaxes at 1-2% of positions with these settings, up to 6% with --peak 0, and always
within 2.3% of the largest |logit| over the settings tried; bf16's 2^-4 leaves room for that.)

Speed: --conversations conversations of about --prompt-tokens ids (half of it the shared system
prompt), --max-new-tokens each with no stop ids, so every method makes the same tokens: the engine
(all in flight), batched `generate` (left-padded, all at once) and transformers' continuous
batching `generate_batch` (its error is recorded where it is missing or fails). One small warm-up
per method; each timing includes the method's own setup (the engine's cache, generate_batch's
manager). Later measurements are skipped with a note when --budget-s is nearly spent.
Prints tables; --json writes every figure."""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing here is fetched; never wait on a network

import torch  # noqa: E402
import transformers  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402

from cai.backends.engine import Engine  # noqa: E402
from cai.backends.runner import ATTENTION  # noqa: E402

# name: (model_type, config fields)
SHAPES = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=320, max_position_embeddings=2048,
                           tie_word_embeddings=False)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                   sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False)),
}
REAL = ("smollm2-135m", "qwen2.5-1.5b", "llama-3-8b")
# near-tie tolerance, relative to the step's largest |logit|: a few units of the dtype's rounding
TOLERANCE = {"float32": 1e-3, "bfloat16": 2 ** -4, "float16": 2 ** -7}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, fraction: float) -> bool:
        """True while less than `fraction` of the budget is spent."""
        return self.elapsed() < fraction * self.seconds

    def note(self, what: str) -> str:
        return f"skipped {what}: budget nearly spent ({self.elapsed():.0f} of {self.seconds:.0f} s)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(shape: str, dtype: torch.dtype, device: torch.device, args):
    """A random-weight model of the shape, made on the device; then shaped so that greedy answers
    depend on the context and have clear winners (see the module's docstring)."""
    model_type, fields = SHAPES[shape]
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=None, **fields)
    torch.manual_seed(args.seed)
    with torch.device(device):          # random weights made on the device, never on the host first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        head = model.get_output_embeddings()
        embeddings = model.get_input_embeddings().weight
        g = torch.Generator(device=device).manual_seed(args.seed)
        if head.weight is embeddings:           # a head of its own: a tied one would echo the input
            head.weight = torch.nn.Parameter(torch.empty_like(embeddings))
            head.weight.normal_(0, config.initializer_range, generator=g)
            model.config.tie_word_embeddings = False
        rows = torch.randn(head.weight.shape[0], 1, generator=g, device=device, dtype=torch.float32)
        head.weight.mul_(torch.exp(args.peak * rows).to(dtype))
        embeddings.mul_(args.embed_scale)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(args.sharpen)
            layer.self_attn.k_proj.weight.mul_(args.sharpen)
    return model


def free(device: torch.device, collect: bool = True) -> None:
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def plain_attention(model):
    """The model's own attention for transformers' generate; the engine's again afterwards."""
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(ATTENTION)


def run_engine(engine: Engine, requests: dict[str, list[int]], max_new: int) -> dict:
    for key, tokens in requests.items():
        engine.submit(key, tokens, max_new)
    results = {}
    while engine.busy:
        results.update(dict(engine.step()))
    return results


def reference(model, prompt: list[int], max_new: int, device) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode(), plain_attention(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def divergence(ref: list[int], got: list[int], logits: torch.Tensor, tolerance: float) -> dict | None:
    pos = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if pos is None:
        return None if len(ref) == len(got) else {"position": min(len(ref), len(got)), "near_tie": False,
                                                  "why": f"lengths {len(ref)} and {len(got)}"}
    row = logits[pos]
    top = row.topk(2).values
    scale = float(row.abs().max())
    gap = float(row[ref[pos]] - row[got[pos]])
    return {"position": pos, "reference_token": ref[pos], "engine_token": got[pos],
            "top2_margin": round(float(top[0] - top[1]), 5), "gap_to_engine_token": round(gap, 5),
            "max_abs_logit": round(scale, 4), "tolerance": round(tolerance * scale, 5),
            "near_tie": gap <= tolerance * scale}


def check(model, dtype_name: str, args, vocab: int, device, sampler=None) -> dict:
    """The engine against greedy generate over three turns of each conversation. `sampler`: the
    engine's (a cai.backends.sampler.Sampler; its own by default)."""
    rng = random.Random(args.seed)
    root = [rng.randrange(3, vocab) for _ in range(args.system_tokens)]
    convs = {f"c{i}": root + [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 40))]
             for i in range(args.check_conversations - 1)}
    convs["odd"] = [rng.randrange(3, vocab) for _ in range(rng.randrange(20, 60))]   # shares nothing
    slots = max(1, args.check_conversations - 2)
    engine = Engine(model, slots=slots, stop_ids=[], sampler=sampler)
    exact = {key: True for key in convs}
    divergences, turns = [], 0
    for turn in range(3):
        max_new = args.check_new_tokens + 4 * turn
        results = run_engine(engine, convs, max_new)
        for key, prompt in convs.items():
            got = results[key].tokens
            ref, logits = reference(model, prompt, max_new, device)
            turns += 1
            d = divergence(ref, got, logits, TOLERANCE[dtype_name])
            if d:
                exact[key] = False
                divergences.append({"conversation": key, "turn": turn, **d})
            convs[key] = prompt + got + [rng.randrange(3, vocab) for _ in range(5 + 7 * turn + len(key) % 5)]
    stats = engine.stats
    del engine
    return {"conversations": len(exact), "exact": sum(exact.values()), "turns": turns,
            "turns_exact": turns - len(divergences), "slots": slots, "system_tokens": args.system_tokens,
            "near_ties": sum(d["near_tie"] for d in divergences),
            "failures": sum(not d["near_tie"] for d in divergences), "divergences": divergences,
            "tolerance_relative": TOLERANCE[dtype_name],
            "engine": {"prefill_computed": stats.prefill_computed, "prefill_reused": stats.prefill_reused,
                       "decode_steps": stats.decode_steps, "drafted": stats.drafted, "accepted": stats.accepted}}


def speed_prompts(args, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed + 1)
    half = max(1, args.prompt_tokens // 2)
    root = [rng.randrange(3, vocab) for _ in range(half)]
    return [root + [rng.randrange(3, vocab) for _ in range(rng.randrange(max(1, 3 * half // 4), 5 * half // 4 + 1))]
            for _ in range(args.conversations)]


def time_engine(model, prompts, max_new, device, draft):
    engine = Engine(model, slots=len(prompts), stop_ids=[], draft=draft,
                    capacity=max(len(p) for p in prompts) + max_new)
    results = run_engine(engine, {f"s{i}": p for i, p in enumerate(prompts)}, max_new)
    s = engine.stats
    extra = {"decode_steps": s.decode_steps, "drafted": s.drafted, "accepted": s.accepted,
             "prefill_computed": s.prefill_computed, "prefill_reused": s.prefill_reused}
    return sum(len(r.tokens) for r in results.values()), extra


def time_generate(model, prompts, max_new, device, draft):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode(), plain_attention(model):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts), {"padded_width": width}


def time_generate_batch(model, prompts, max_new, device, draft):
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kwargs = {"progress_bar": False} if "progress_bar" in inspect.signature(model.generate_batch).parameters else {}
    try:        # a paged cache sized for this workload, not (the default) 90% of the free memory
        from transformers import ContinuousBatchingConfig
        blocks = len(prompts) * -(-(max(map(len, prompts)) + max_new) // 256) + 8
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=blocks)
    except (ImportError, TypeError):
        pass
    with plain_attention(model):
        out = model.generate_batch(inputs=prompts, generation_config=config, **kwargs)
    results = list(out.values())
    errors = [r.error for r in results if getattr(r, "error", None)]
    tokens = sum(len(r.generated_tokens) for r in results)
    if errors or len(results) != len(prompts) or tokens != len(prompts) * max_new:
        raise RuntimeError(f"{len(results)} of {len(prompts)} results, {tokens} tokens; errors: {errors[:3]}")
    return tokens, {}


METHODS = {"engine": time_engine, "generate": time_generate, "generate_batch": time_generate_batch}


def speed(model, args, vocab: int, device, budget: Budget) -> dict:
    prompts = speed_prompts(args, vocab)
    block = {"conversations": len(prompts), "max_new_tokens": args.max_new_tokens,
             "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
             "engine_draft": args.draft, "methods": {}}
    for name, method in METHODS.items():
        if not budget.allows(0.85):
            block["methods"][name] = {"skipped": budget.note(name)}
            continue
        try:
            method(model, prompts[:4], 4, device, args.draft)               # warm-up
            free(device, collect=False)
            sync(device)
            start = time.perf_counter()
            tokens, extra = method(model, prompts, args.max_new_tokens, device, args.draft)
            sync(device)
            wall = time.perf_counter() - start
            block["methods"][name] = {"wall_s": round(wall, 3), "tokens": tokens,
                                      "tok_s": round(tokens / wall, 1), **extra}
        except Exception as exc:                    # noqa: BLE001 - recorded, the run goes on
            block["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        free(device, collect=False)
    engine = block["methods"]["engine"].get("tok_s")
    for name in ("generate", "generate_batch"):
        other = block["methods"][name].get("tok_s")
        if engine and other:
            block[f"engine_vs_{name}"] = round(engine / other, 2)
    return block


def run_shape(shape: str, args, device, budget: Budget) -> dict:
    model_type, fields = SHAPES[shape]
    out = {"model_type": model_type, "layers": fields["num_hidden_layers"], "hidden": fields["hidden_size"],
           "vocab": fields["vocab_size"], "correctness": {}, "notes": []}
    order = [args.speed_dtype] + [d for d in args.dtypes if d != args.speed_dtype]
    model = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i, dtype_name in enumerate(order):
            if i and not budget.allows(0.7):
                out["notes"].append(budget.note(f"the {dtype_name} check"))
                continue
            start = time.perf_counter()
            if model is None:
                model = build(shape, DTYPES[dtype_name], device, args)
                out["parameters"] = sum(p.numel() for p in model.parameters())
            else:
                model.to(DTYPES[dtype_name])
            sync(device)
            out.setdefault("build_s", {})[dtype_name] = round(time.perf_counter() - start, 2)
            if dtype_name in args.dtypes:
                start = time.perf_counter()
                try:
                    out["correctness"][dtype_name] = check(model, dtype_name, args, fields["vocab_size"], device)
                except Exception as exc:            # noqa: BLE001 - an engine error is a FAIL, recorded
                    out["correctness"][dtype_name] = {"error": f"{type(exc).__name__}: {exc}",
                                                      "traceback": traceback.format_exc()[-2000:], "failures": 1}
                out["correctness"][dtype_name]["seconds"] = round(time.perf_counter() - start, 2)
                free(device)
            if dtype_name == args.speed_dtype:
                if budget.allows(0.8):
                    out["speed"] = {"dtype": dtype_name, **speed(model, args, fields["vocab_size"], device, budget)}
                else:
                    out["notes"].append(budget.note("the speed measurement"))
    finally:
        del model
        free(device)
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def tables(report: dict) -> list[Table]:
    knobs = " ".join(f"{k} {report['settings'][k]}" for k in ("embed_scale", "sharpen", "peak"))
    check_t = Table(title=f"engine vs greedy generate · {report['device_name']} · {knobs}")
    for column in ("shape", "dtype", "conversations exact", "turns exact", "near-ties", "FAIL", "first divergences", "s"):
        check_t.add_column(column, justify="left" if column in ("shape", "dtype", "first divergences") else "right")
    speed_t = Table(title=f"speed · {report['settings']['conversations']} conversations × "
                          f"{report['settings']['max_new_tokens']} new tokens, no stop ids")
    for column in ("shape", "dtype", "method", "wall s", "tokens", "tok/s", "engine ×", "note"):
        speed_t.add_column(column, justify="left" if column in ("shape", "dtype", "method", "note") else "right")
    for shape, r in report["shapes"].items():
        for dtype_name, c in r.get("correctness", {}).items():
            if "error" in c:
                check_t.add_row(shape, dtype_name, "-", "-", "-", "1", c["error"][:60], f"{c['seconds']:.1f}")
                continue
            first = "; ".join(f"{d['conversation']}/t{d['turn']}@{d['position']} "
                              f"{d.get('why') or 'gap %.3g' % d['gap_to_engine_token']}"
                              f"{'' if d['near_tie'] else ' FAIL'}" for d in c["divergences"][:3])
            check_t.add_row(shape, dtype_name, f"{c['exact']}/{c['conversations']}", f"{c['turns_exact']}/{c['turns']}",
                            str(c["near_ties"]), str(c["failures"]), first or "none", f"{c['seconds']:.1f}")
        s = r.get("speed")
        for name, m in (s or {}).get("methods", {}).items():
            ratio = s.get(f"engine_vs_{name}")
            note = m.get("error") or m.get("skipped") or ""
            speed_t.add_row(shape, s["dtype"], name, f"{m['wall_s']:.2f}" if "wall_s" in m else "-",
                            str(m.get("tokens", "-")), f"{m['tok_s']:,.0f}" if "tok_s" in m else "-",
                            f"{ratio:.2f}" if ratio else "", note[:70])
    return [check_t, speed_t]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)}; default: the real three "
                                         "on CUDA, tiny on CPU")
    parser.add_argument("--dtypes", help="checked dtypes; default bfloat16,float32 on CUDA, float32,bfloat16 on CPU")
    parser.add_argument("--speed-dtype", help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--check-conversations", type=int, default=6)
    parser.add_argument("--check-new-tokens", type=int, default=16, help="first turn; +4 a turn after")
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--peak", type=float, default=0.3, help="output-head rows scaled by exp(peak * N(0, 1))")
    parser.add_argument("--sharpen", type=float, default=2.0, help="query and key projections scaled by this")
    parser.add_argument("--embed-scale", type=float, default=10.0, help="input embeddings scaled by this")
    parser.add_argument("--draft", action="store_true", help="prompt-lookup drafts in the speed run (on in the check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shapes.split(",") if args.shapes else list(REAL if cuda else ["tiny"])
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    args.dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16", "float32"] if cuda else ["float32", "bfloat16"])
    args.speed_dtype = args.speed_dtype or ("bfloat16" if cuda else "float32")
    budget = Budget(args.budget_s)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "json_path"}, "shapes": {}}
    console = Console(width=180)
    for shape in shapes:
        if shape != shapes[0] and not budget.allows(0.6):
            report["shapes"][shape] = {"notes": [budget.note(f"the shape {shape}")]}
            continue
        console.print(f"[bold]{shape}[/] ({budget.elapsed():.0f} s)", highlight=False)
        try:
            report["shapes"][shape] = run_shape(shape, args, device, budget)
        except Exception as exc:                    # noqa: BLE001 - e.g. out of memory building it
            report["shapes"][shape] = {"error": f"{type(exc).__name__}: {exc}"[:500], "notes": []}
            free(device)
    report["elapsed_s"] = round(budget.elapsed(), 1)
    failures = sum(c.get("failures", 0) for r in report["shapes"].values() for c in r.get("correctness", {}).values())
    failures += sum("error" in r.get("speed", {}).get("methods", {}).get("engine", {}) for r in report["shapes"].values())
    failures += sum("error" in r for r in report["shapes"].values())
    report["result"] = "FAIL" if failures else "PASS"
    for table in tables(report):
        console.print(table)
    for shape, r in report["shapes"].items():
        for note in r.get("notes", []) + ([f"error: {r['error']}"] if "error" in r else []):
            console.print(f"{shape}: {note}", highlight=False)
    console.print(f"{report['result']}: {failures} failure(s) (divergences at a real margin, engine errors) "
                  f"· {report['elapsed_s']} s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
