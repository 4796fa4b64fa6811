"""What each CPU weight format costs in exactness: the model's loss on a fixed text and how long
its greedy answers stay identical to float32's, for --dtype float32, float16 (the CPU default),
int8 and, on a CPU with bf16 units, bfloat16, side by side in one process on the same model.

    python bench/precision.py --json bench/precision.json

The text is the shipped constitutions and the quality bench's prompts (files in this repository),
cut to --tokens tokens; the answers are to the first --prompts prompts of bench/prompts64.txt,
--max-new-tokens each. Prints a table; --json writes the same figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from cai.backends.hf import HFBackend, HFOptions  # noqa: E402
from cai.inputs import read_prompts  # noqa: E402
from cai.model_files import resolve_model  # noqa: E402


def corpus() -> str:
    files = sorted((ROOT / "constitutions").glob("*.yaml")) + [ROOT / "bench/quality_prompts.jsonl"]
    return "\n\n".join(f.read_text() for f in files)


def loss(backend: HFBackend, ids: torch.Tensor) -> float:
    with torch.inference_mode(), backend._plain_attention():
        return backend.model(input_ids=ids, labels=ids).loss.item()


def answers(backend: HFBackend, prompts: list[str], max_new: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = torch.tensor([backend.encode([{"role": "user", "content": prompt}])])
        with torch.inference_mode(), backend._plain_attention():
            tokens = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                            do_sample=False, pad_token_id=backend.tokenizer.pad_token_id)
        out.append(tokens[0, ids.shape[1]:].tolist())
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    source, name = resolve_model(args.model)
    prompts = [p.text for p in read_prompts(str(ROOT / "bench/prompts64.txt"))][:args.prompts]
    rows, reference = [], None
    from cai.backends.quant import cpu_has_bf16

    # bfloat16 where this CPU has the units for it (elsewhere cai refuses it on a CPU)
    for dtype in ("float32", "float16", "int8", *(("bfloat16",) if cpu_has_bf16() else ())):
        backend = HFBackend(source, name, HFOptions(dtype=dtype))
        ids = torch.tensor([backend.tokenizer(corpus(), add_special_tokens=False)["input_ids"][:args.tokens]])
        made = answers(backend, prompts, args.max_new_tokens)
        reference = reference or made
        same = [common_prefix(a, b) for a, b in zip(reference, made)]
        rows.append({"dtype": dtype, "loss": round(loss(backend, ids), 4), "text_tokens": ids.shape[1],
                     "answers_identical": sum(a == b for a, b in zip(reference, made)), "answers": len(made),
                     "mean_identical_prefix": round(sum(same) / len(same), 1)})
        backend.close()

    table = Table(title=f"{name} · loss on {rows[0]['text_tokens']:,} tokens of repository text · greedy answers "
                        f"to {args.prompts} prompts, {args.max_new_tokens} tokens, against float32")
    for column in ("--dtype", "loss", "perplexity", "answers identical", "mean identical prefix"):
        table.add_column(column, justify="left" if column == "--dtype" else "right")
    for r in rows:
        table.add_row(r["dtype"], f"{r['loss']:.4f}", f"{2.718281828 ** r['loss']:.2f}",
                      f"{r['answers_identical']}/{r['answers']}", f"{r['mean_identical_prefix']:.1f} tokens")
    Console(width=160).print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"model": name, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
