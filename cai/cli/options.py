"""Options shared by several commands, declared once. `backend_options` adds the backend block
(which model, how to reach it) to a command and hands it over as one BackendSpec."""

import functools
import inspect
from typing import Annotated, Optional

import typer

from cai.options import BackendSpec

# (name, annotation, default): the backend block of `generate` and `judge`
BACKEND_OPTIONS = [
    ("model", Annotated[Optional[str], typer.Option("--model", "-m", help="Model: a local folder, a .gguf file or a Hub id. Default: the embedded SmolLM2-135M-Instruct.", show_default=False)], None),
    ("backend", Annotated[str, typer.Option("--backend", metavar="hf|openai|vllm", help="hf: a local transformers model; openai: an OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve) at --base-url; vllm: vLLM's engine in this process (pip install 'cai[vllm]'; CPUs: see docs/backends.md).")], "hf"),
    ("base_url", Annotated[Optional[list[str]], typer.Option("--base-url", help="With --backend openai: the server's API root, e.g. http://127.0.0.1:8000/v1. Give it again for more servers of the same model: each request goes to the one with the fewest in flight, and one that fails is taken out until it answers again.", show_default=False)], None),
    ("base_urls", Annotated[Optional[str], typer.Option("--base-urls", metavar="FILE", help="With --backend openai: a file of API roots, one a line, each optionally followed by its own --concurrency (`http://node7:8000/v1 32`).", show_default=False)], None),
    ("allow_down", Annotated[bool, typer.Option("--allow-down", help="With several endpoints: start even if some cannot be reached (they are asked again every few seconds and join when they answer).")], False),
    ("api_key_env", Annotated[Optional[str], typer.Option("--api-key-env", metavar="NAME", help="With --backend openai: the environment variable holding the API key (never printed or recorded); a variable named here must be set. [default: OPENAI_API_KEY, when set]", show_default=False)], None),
    ("concurrency", Annotated[int, typer.Option("--concurrency", help="With --backend openai: requests in flight at once (what --batch-size is for a local model).")], 16),
    ("timeout", Annotated[float, typer.Option("--timeout", help="With --backend openai: seconds before a request is given up and retried.")], 120.0),
    ("max_retries", Annotated[int, typer.Option("--max-retries", help="With --backend openai: retries of a failed request (connection errors, timeouts, 429, 5xx, replies without text).")], 5),
    ("threads", Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch [default: one per core].", show_default=False)], None),
    ("plain_chat_format", Annotated[bool, typer.Option("--plain-chat-format", help="For a tokenizer without a chat template: use cai's plain 'User:/Assistant:' format.")], False),
    ("allow_pickle", Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints, which can run code: only for models you trust.")], False),
    ("device", Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda|mps", help="Where the model runs.")], "auto"),
    ("dtype", Annotated[str, typer.Option("--dtype", metavar="auto|float32|bfloat16|float16|int8", help="Weights dtype. GPU: auto is bfloat16 (float16 without bf16). CPU: auto and float16 keep linear weights in float16 and compute in float32 (fast, same results to float16 rounding); float32 is plain float32; bfloat16, on a CPU with bf16 units (AMX or AVX512-BF16), runs the linears on them (several times faster, slightly less exact, and its greedy output depends on how conversations are batched, so a resumed run may not repeat an uncut one token for token), the rest float32; int8 quantizes the decoder's linears (faster than float16, slightly less exact, and its greedy output depends on how conversations are batched).")], "auto"),
    ("trust_remote_code", Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model's repository to run.")], False),
    # vllm (issue 30)
    ("tensor_parallel_size", Annotated[int, typer.Option("--tensor-parallel-size", help="With --backend vllm: GPUs the model is split over.")], 1),
    ("gpu_memory_utilization", Annotated[Optional[float], typer.Option("--gpu-memory-utilization", metavar="FRACTION", help="With --backend vllm: the share of each GPU's memory vLLM may take (weights and KV cache). [default: vLLM's, 0.92]", show_default=False)], None),
    ("max_model_len", Annotated[Optional[int], typer.Option("--max-model-len", metavar="TOKENS", help="With --backend vllm: the context vLLM serves (a conversation plus its reply). [default: the model's]", show_default=False)], None),
    ("quantization", Annotated[Optional[str], typer.Option("--quantization", metavar="METHOD", help="With --backend vllm: the quantization method of the weights (awq, gptq, fp8, ...). [default: what the model's config says]", show_default=False)], None),
    ("engine_arg", Annotated[Optional[list[str]], typer.Option("--engine-arg", metavar="KEY=VALUE", help="With --backend vllm: any other argument of vLLM's engine (EngineArgs), e.g. enforce_eager=true or max_num_seqs=64; repeatable. VALUE is read as JSON where it is JSON.", show_default=False)], None),
]

# What to keep: shared by `generate --judge` and `judge`.
MinPreferenceOpt = Annotated[Optional[float], typer.Option("--min-preference", metavar="P", help="Keep only pairs whose chosen side the judge prefers with probability at least P (0-1); the others go to the filtered file.", show_default=False)]
TrustDisagreeingOpt = Annotated[bool, typer.Option("--trust-disagreeing", help="With --min-preference: take the judge's averaged preference even where its two orders disagree (one prefers the revision, the other the original); by default such a pair counts as a tie, 0.5.")]
SwapOpt = Annotated[bool, typer.Option("--swap", help="Where the judge prefers the original response, write it as chosen and the revision as rejected.")]
ClampOpt = Annotated[Optional[str], typer.Option("--clamp", metavar="LO,HI", help="Soft labels: clamp judge.label into [LO, HI], e.g. 0.4,0.6 as in RL-CAI.", show_default=False)]
KeepFilteredOpt = Annotated[bool, typer.Option("--keep-filtered", help="Write dropped pairs whole, with their reasons, to the filtered file (without it: their ids and reasons only).")]
FilteredOpt = Annotated[Optional[str], typer.Option("--filtered", help="JSONL file of dropped pairs and their reasons [default: OUTPUT.filtered.jsonl]; a rerun skips the ids it holds.", show_default=False)]
NoLockOpt = Annotated[bool, typer.Option("--no-lock", help="Do not lock the output (only where the file system cannot lock and you are sure no other run writes it).")]


def backend_options(command):
    """Give `command` the backend block: typer sees its parameters, the command receives them as
    one BackendSpec argument `spec`."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "spec"]
    names = [name for name, _, _ in BACKEND_OPTIONS]
    block = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in BACKEND_OPTIONS]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        spec = BackendSpec(**{name: kwargs.pop(name) for name in names if name in kwargs})
        return command(*args, spec=spec, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own), *block])
    wrapper.__annotations__ = {**{p.name: p.annotation for p in own}, **{p.name: p.annotation for p in block}}
    del wrapper.__wrapped__          # typer must read the new signature, not the command's
    return wrapper
