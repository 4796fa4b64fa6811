"""Model families: which path each takes through cai's local backend (cai's engine, or plain
batched `generate`), whether it runs, and how fast, on one small fixed workload.

Each family is a random-weight model of a real checkpoint's shape (layers, widths, heads, head
size, context, sliding windows), with the vocabulary cut to 32,768 rows to save time and memory,
and a small byte-level BPE tokenizer trained here with that family's kind of chat template. The
weights are random, so the text is noise and turns run to --max-new-tokens: this measures the
plumbing and the speed, not the prose.

    python bench/families.py --json bench/families.json  # llama, qwen2, qwen3, gemma3: 8 prompts, 32 tokens a turn
    python bench/families.py --families gpt_neox,llama:generate   # Pythia's shape; Llama on plain generate

The workload is `cai.generate` over the first --limit prompts of bench/prompts64.txt, greedy,
one revision, no filters, the default constitution and few-shot setting and the default --dtype.
Prints a table; --json writes the same figures."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB = 32768

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's own shape of template: no system role (it opens the first user turn), "model" turns,
# <end_of_turn> closing each turn.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_SPECIALS = dict(pad="<|endoftext|>", bos="<|im_start|>", eos="<|im_end|>", extra=[])
GEMMA_SPECIALS = dict(pad="<pad>", bos="<bos>", eos="<eos>", extra=["<start_of_turn>", "<end_of_turn>"])

# family: (checkpoint whose shape it has, model_type, config fields, template, specials)
FAMILIES = {
    "llama": ("SmolLM2-135M", "llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True), CHATML, CHATML_SPECIALS),
    "qwen2": ("Qwen2.5-0.5B", "qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True), CHATML, CHATML_SPECIALS),
    "qwen3": ("Qwen3-0.6B", "qwen3", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True), CHATML, CHATML_SPECIALS),
    "gemma3": ("gemma-3-270m", "gemma3_text", dict(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        GEMMA, GEMMA_SPECIALS),
    "gpt_neox": ("Pythia-160m", "gpt_neox", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False), CHATML, CHATML_SPECIALS),
}

# What a plain run measures: gpt_neox (refused by the engine, like gemma3) is left to --families,
# to keep the run within about ten minutes here.
DEFAULT = ("llama", "qwen2", "qwen3", "gemma3")


def corpus() -> list[str]:
    lines = []
    for path in [*ROOT.glob("constitutions/*.yaml"), *ROOT.glob("prompts/*/*.jinja"),
                 ROOT / "examples/prompts.jsonl", ROOT / "bench/prompts64.txt", ROOT / "README.md",
                 *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("docs/commands/*.md"))]:   # the README's text, moved
        lines += path.read_text(encoding="utf-8").splitlines()
    return lines


def build(family: str, out: Path) -> float:
    """Writes the family's random-weight model and its tokenizer to `out`; returns its parameters
    in millions (counted here: on a CPU cai keeps linear weights as float16 buffers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    _, model_type, fields, template, sp = FAMILIES[family]
    specials = [sp["pad"], sp["eos"], sp["bos"], *sp["extra"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=8000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=sp["bos"], eos_token=sp["eos"],
                                        pad_token=sp["pad"], unk_token=None)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields)
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(out)     # checkpoints ship in bfloat16; cai loads its default
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def measure(name: str, limit: int, max_new_tokens: int) -> dict:
    """One row: `name` is a family, or family:generate for its plain batched-`generate` path
    even where the engine could drive it."""
    import torch

    import cai
    from cai.backends.runner import unsupported_reason
    from cai.inputs import read_prompts

    family, _, forced = name.partition(":")
    row = {"family": name, "shape": FAMILIES[family][0], "model_type": FAMILIES[family][1], "vocab": VOCAB}
    with tempfile.TemporaryDirectory(prefix=f"cai-{family}-") as folder:
        start = time.perf_counter()
        row["params_m"] = build(family, Path(folder))
        row["build_s"] = round(time.perf_counter() - start, 1)
        backend = None
        try:
            backend = cai.open_backend(cai.BackendSpec(model=folder))
            row["dtype"] = (f"{backend.linears} linear weights, float32 arithmetic" if backend.linears
                            else str(backend.dtype).replace("torch.", ""))
            reason = unsupported_reason(backend.model)
            row["path"], row["refused"] = ("generate", reason) if reason else ("engine", None)
            if forced == "generate":
                backend.use_engine = False
                row["path"] = "generate"
            prompts = [{"id": item.id, "prompt": item.text} for item in read_prompts(str(ROOT / "bench/prompts64.txt"))]
            start = time.perf_counter()
            summary = cai.generate(prompts[:limit], None, model=backend, seed=0, max_new_tokens=max_new_tokens,
                                   temperature=0.0, filter=False, revisions=1, lock=False)
            wall = time.perf_counter() - start
            if not summary.complete:
                raise RuntimeError(summary.problem())
            records = summary.records
            generated = sum(r["meta"]["tokens"]["completion"] for r in records)
            ran = "engine" if backend.engine is not None else "generate"
            assert ran == row["path"], f"unsupported_reason() said {row['path']}, the backend ran {ran}"
            row.update(worked=len(records) == limit, pairs=len(records), wall_s=round(wall, 1),
                       generated_tokens=generated, generated_tok_per_s=round(generated / wall, 1),
                       prompt_tokens=sum(r["meta"]["tokens"]["prompt"] for r in records),
                       pairs_per_min=round(len(records) / wall * 60, 2),
                       batch_size=summary.width, threads=torch.get_num_threads())
        except Exception as exc:  # noqa: BLE001 -- a family that fails is a row of the table
            row.update(worked=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        finally:
            if backend is not None:
                backend.close()
            gc.collect()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(DEFAULT),
                        help=f"comma-separated, of {', '.join(FAMILIES)} (default: {', '.join(DEFAULT)}); "
                             "family:generate runs one on plain batched generate")
    parser.add_argument("--limit", type=int, default=8, help="prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", dest="json_path", help="write the figures here")
    args = parser.parse_args()
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in chosen if f.partition(":")[0] not in FAMILIES or f.partition(":")[2] not in ("", "generate")]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    rows = []
    for family in chosen:
        console.print(f"[dim]{family}: building {FAMILIES[family.partition(':')[0]][0]} shape, running …[/dim]",
                      highlight=False)
        rows.append(measure(family, args.limit, args.max_new_tokens))
        console.print(f"[dim]{family}: {rows[-1].get('error') or 'ok'}[/dim]", highlight=False)
    base = next((r for r in rows if r["family"] == "llama" and r["worked"]), None)
    for r in rows:
        if base and r["worked"]:
            r["tok_per_s_vs_llama"] = round(r["generated_tok_per_s"] / base["generated_tok_per_s"], 2)

    table = Table(title=f"families · random weights, vocab {VOCAB} · {args.limit} prompts × "
                        f"{args.max_new_tokens} new tokens a turn · greedy · 1 revision")
    for column in ("family", "shape", "params M", "path", "worked", "gen tok/s", "vs llama", "pairs/min", "wall s"):
        table.add_column(column, justify="left" if column in ("family", "shape", "path", "worked") else "right")
    for r in rows:
        ok = r["worked"]
        table.add_row(r["family"], r["shape"], str(r.get("params_m", "")), r.get("path", ""),
                      "yes" if ok else f"no: {r.get('error', '')[:60]}",
                      f"{r['generated_tok_per_s']:.1f}" if ok else "",
                      f"{r['tok_per_s_vs_llama']:.2f}×" if "tok_per_s_vs_llama" in r else "",
                      f"{r['pairs_per_min']:.2f}" if ok else "", f"{r['wall_s']:.0f}" if ok else "")
    Console(width=160).print(table)
    for r in rows:
        if r.get("refused"):
            Console().print(f"{r['family']}: the engine refuses it ({r['refused']})")
    if args.json_path:
        out = {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "vocab": VOCAB,
               "weights": "random", "rows": rows}
        Path(args.json_path).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(r["worked"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
