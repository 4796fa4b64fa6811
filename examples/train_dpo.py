"""DPO-train a model on a file that `cai generate` wrote, with TRL's DPOTrainer.

    cai generate examples/prompts.jsonl -o - | tee pairs.jsonl | wc -l
    python examples/train_dpo.py pairs.jsonl --model HuggingFaceTB/SmolLM2-135M-Instruct --output-dir dpo-out
    cai generate examples/prompts.jsonl -o - | python examples/train_dpo.py - --model MODEL   # a real pipe

Both record formats work unmodified: standard (prompt/chosen/rejected strings; TRL applies the
chat template when the tokenizer has one) and conversational (lists of chat messages).
Needs `pip install trl datasets`. Runs on CPU (float32) or a GPU.
"""

from __future__ import annotations

import argparse
import math


def train(pairs: str, model, tokenizer, output_dir: str, max_steps: int = -1, epochs: float = 1.0,
          learning_rate: float = 5e-6, batch_size: int = 2, beta: float = 0.1):
    """Train `model` in place on `pairs`; returns the list of logged training losses."""
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    if pairs == "-":                 # a pipe: `cai generate … -o - | python train_dpo.py -`
        import json
        import sys

        from datasets import Dataset

        rows = [json.loads(line) for line in sys.stdin if line.strip()]
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    else:
        data = load_dataset("json", data_files=pairs, split="train")
        data = data.select_columns(["prompt", "chosen", "rejected"])   # the metadata stays in the file
    config = DPOConfig(
        output_dir=output_dir, max_steps=max_steps, num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, beta=beta, logging_steps=1, save_strategy="no",
        report_to=[], max_length=1024, bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", help="JSONL written by cai generate (or cai export), or - for stdin")
    parser.add_argument("--model", required=True, help="model id or folder to train (usually the one that generated)")
    parser.add_argument("--output-dir", default="dpo-out")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    losses = train(args.pairs, model, tokenizer, args.output_dir, args.max_steps, args.epochs,
                   args.learning_rate, args.batch_size, args.beta)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    final = losses[-1] if losses else math.nan
    print(f"trained {len(losses)} logged steps, final loss {final:.4f}; checkpoint in {args.output_dir}")


if __name__ == "__main__":
    main()
