"""Never lose a record: SIGKILL at random moments and resume, Ctrl-C, and a table of bad inputs
that each give one line, exit 2, and leave the output file untouched."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from conftest import DATA, ROOT, plumbing, read_jsonl

EXAMPLES = ROOT / "examples" / "prompts.jsonl"


def cai_command(*args) -> list[str]:
    return [sys.executable, "-m", "cai", *plumbing(("generate", *args))]


def whole_records(path: Path) -> list[dict]:
    """Every line but possibly a torn last one must parse (of a .gz output: every line of its
    whole members); return the whole records."""
    data = _text(path)
    lines = data.split(b"\n")
    records = [json.loads(line) for line in lines[:-1]]
    return records


def _prompts(folder: Path, count: int) -> Path:
    path = folder / f"prompts-{count}.jsonl"
    words = "apple river stone cloud music paper light garden window bridge".split()
    with path.open("w") as fp:
        for i in range(count):
            fp.write(json.dumps({"id": f"p{i:03d}", "prompt": f"Tell me about {words[i % 10]} number {i}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def many_prompts(tmp_path_factory) -> Path:
    """40 prompts: enough for a run to be killed at least three times before it finishes."""
    return _prompts(tmp_path_factory.mktemp("prompts"), 40)


SOME = 12


@pytest.fixture(scope="module")
def some_prompts(tmp_path_factory) -> Path:
    """12 prompts: a run signalled after its first record still has most of them ahead (two in
    flight), and the resume that finishes them is short."""
    return _prompts(tmp_path_factory.mktemp("prompts"), SOME)


def _members(data: bytes) -> tuple[list[bytes], bytes]:
    """(the decompressed text of each whole gzip member, the bytes after them: a member cut off),
    read with zlib alone, as any gzip reader would."""
    import zlib

    whole = []
    while data:
        codec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        text = codec.decompress(data)
        if not codec.eof:
            break
        whole.append(text)
        data = codec.unused_data
    return whole, data


def _text(path: Path) -> bytes:
    """A plain output's bytes; a .gz output's whole members, decompressed."""
    if not path.exists():
        return b""
    return b"".join(_members(path.read_bytes())[0]) if path.suffix == ".gz" else path.read_bytes()


def _lines(path: Path) -> int:
    return _text(path).count(b"\n")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tiny_model, many_prompts, tmp_path):
    """Kill -9 a real run at random moments (after a random number of new records plus a random
    delay, so kills land between and inside batches on fast and slow machines alike), resume,
    repeat until a run finishes by itself."""
    _kill_and_resume(tiny_model, many_prompts, tmp_path / "pairs.jsonl")


@pytest.mark.slow
def test_sigkill_a_gzip_output_at_random_moments_then_resume(tiny_model, many_prompts, tmp_path):
    """Issue 31: the same for -o pairs.jsonl.gz (a gzip member per batch): every member before the
    kill is whole, every record there once, and the file a valid gzip file throughout."""
    out = tmp_path / "pairs.jsonl.gz"
    _kill_and_resume(tiny_model, many_prompts, out)
    whole, rest = _members(out.read_bytes())
    assert rest == b"" and all(text.endswith(b"\n") for text in whole)
    import gzip

    assert gzip.decompress(out.read_bytes()) == b"".join(whole)


def _kill_and_resume(tiny_model, many_prompts, out: Path) -> None:
    seed = int(os.environ.get("CAI_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    args = [many_prompts, "--model", tiny_model, "-o", out, "--batch-size", "2", "--max-new-tokens", "12",
            "--no-few-shot", "-q"]
    kills = 0
    for attempt in range(40):
        start_lines = _lines(out)
        target = start_lines + rng.randint(1, 6)
        proc = subprocess.Popen(cai_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _lines(out) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        # a random delay lands the kill inside a batch or between two, but never past two more
        # records: on a fast machine the delay alone would let a run finish (too few kills)
        settle = time.monotonic() + rng.uniform(0, 0.4)
        while proc.poll() is None and time.monotonic() < settle and _lines(out) < target + 2:
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            whole_records(out)     # every line before the last is whole after any kill
            continue
        assert proc.returncode == 0, f"seed {seed}: {proc.stderr.read().decode()}"
        break
    else:
        pytest.fail(f"seed {seed}: no run finished in 40 attempts")
    records = _read(out)     # whole lines only, ending in a newline
    print(f"sigkill test: seed {seed}, {kills} kills, {len(records)} records")
    assert kills >= 3, f"seed {seed}: only {kills} kills"
    ids = [r["id"] for r in records]
    assert sorted(ids) == [f"p{i:03d}" for i in range(40)], f"seed {seed}: every prompt exactly once"


def _read(path: Path) -> list[dict]:
    """read_jsonl of a plain or a .gz output (whose every member must be whole)."""
    if path.suffix != ".gz":
        return read_jsonl(path)
    whole, rest = _members(path.read_bytes())
    assert rest == b"", "a finished run leaves whole members only"
    text = b"".join(whole).decode()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# --- compressed outputs (issue 31) ------------------------------------------------------------

CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}


def _decompress(path: Path) -> bytes:
    """The whole file decompressed by the format's own library (every member, as its tools do)."""
    import importlib

    data = path.read_bytes()
    if path.suffix != ".zst":
        return importlib.import_module(CODECS[path.suffix]).decompress(data)
    import zstandard

    out = []
    while data:                      # frame by frame: zstandard reads a cut-off frame quietly
        codec = zstandard.ZstdDecompressor().decompressobj()
        out.append(codec.decompress(data))
        if not codec.eof:
            raise ValueError("a zstd frame cut off")
        data = codec.unused_data
    return b"".join(out)


# Kill -9 a run in the middle of writing its third member: half the member's bytes are in the file.
_KILL_MID_MEMBER = """
import os, signal, sys
from cai.output import RecordWriter
put, members = RecordWriter._put, []
def half_then_kill(self, data):
    if self.target == sys.argv[sys.argv.index("-o") + 1] and data:
        members.append(data)
        if len(members) == 3:
            self._fp.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return put(self, data)
RecordWriter._put = half_then_kill
sys.argv[0] = "cai"
from cai.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("suffix", list(CODECS))
def test_a_compressed_output_killed_mid_member_resumes_with_every_record_once(tiny_model, many_prompts, tmp_path, suffix):
    """-o pairs.jsonl.gz (.bz2, .xz, .zst) is written compressed, a member per batch; kill -9 while
    a member is half written, resume: the half member is cut off, every record is there once, and
    the format's own library reads the file whole."""
    if suffix == ".zst":
        pytest.importorskip("zstandard")
    out = tmp_path / f"pairs.jsonl{suffix}"
    args = plumbing(["generate", many_prompts, "--model", tiny_model, "-o", out, "--limit", "8", "--batch-size", "2",
                     "--max-new-tokens", "6", "--no-few-shot", "-q"])
    killed = subprocess.run([sys.executable, "-c", _KILL_MID_MEMBER, *args], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    cut = out.read_bytes()
    assert any(cut.startswith(sig) for sig in (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))
    with pytest.raises(Exception):
        _decompress(out)                                 # the half member: not a whole file yet
    resumed = CliRunner().invoke(app, [a for a in args if a != "-q"])     # not quiet: says what it cuts off
    assert resumed.exit_code == 0, resumed.output
    assert "cutting a torn" in resumed.stderr and "records already there" in resumed.stderr, resumed.stderr
    data = out.read_bytes()
    text = _decompress(out).decode()
    ids = [json.loads(line)["id"] for line in text.splitlines()]
    assert sorted(ids) == [f"p{i:03d}" for i in range(8)], "every record exactly once"
    assert text.endswith("\n")
    again = CliRunner().invoke(app, args)               # finished: nothing to do, file unchanged
    assert again.exit_code == 0 and out.read_bytes() == data, again.output


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_stats_export_judge_and_merge_read_a_compressed_output(tiny_model, tmp_path, suffix):
    """What generate writes compressed, the other commands read (and write, named so); a file cut
    inside its last member (a run killed mid-batch) is what a torn last line is to each of them."""
    if suffix == ".zst":
        pytest.importorskip("zstandard")
    pairs = tmp_path / f"pairs.jsonl{suffix}"
    made = CliRunner().invoke(app, plumbing(["generate", EXAMPLES, "--model", tiny_model, "-o", pairs, "--limit", "4",
                                             "--batch-size", "2", "--max-new-tokens", "4", "-q"]))
    assert made.exit_code == 0, made.output
    ids = sorted(json.loads(line)["id"] for line in _decompress(pairs).decode().splitlines())
    assert len(ids) == 4
    stats = CliRunner().invoke(app, ["stats", str(pairs), "--json"])
    assert stats.exit_code == 0 and json.loads(stats.stdout)["input"]["kept"] == 4, stats.output
    exported = tmp_path / f"e.jsonl{suffix}"
    result = CliRunner().invoke(app, ["export", str(pairs), "-o", str(exported), "--test-size", "0.5", "--format", "sft"])
    assert result.exit_code == 0, result.output
    parts = [tmp_path / f"e.{part}.jsonl{suffix}" for part in ("train", "test")]
    assert sorted(json.loads(line)["id"] for p in parts for line in _decompress(p).decode().splitlines()) == ids
    folder = tmp_path / "dpo"
    assert CliRunner().invoke(app, ["export", str(pairs), "--to", "trl", str(folder)]).exit_code == 0
    assert len(read_jsonl(folder / "data" / "train.jsonl")) == 4
    judged = tmp_path / f"judged.jsonl{suffix}"
    result = CliRunner().invoke(app, ["judge", str(pairs), "--model", str(tiny_model), "-o", str(judged), "-q"])
    assert result.exit_code == 0, result.output
    assert all("judge" in json.loads(line) for line in _decompress(judged).decode().splitlines())
    merged = tmp_path / f"merged.jsonl{suffix}"
    result = CliRunner().invoke(app, ["merge", str(merged), str(pairs), str(pairs)])
    assert result.exit_code == 0 and "4 records, 4 duplicate ids dropped, 0 torn" in result.stderr, result.output
    assert _decompress(merged) == _decompress(pairs)
    # cut inside the last member, as a kill -9 mid-write leaves it
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(pairs.read_bytes()[:-7])
    stats = CliRunner().invoke(app, ["stats", str(cut), "--json"])
    assert stats.exit_code == 0 and json.loads(stats.stdout)["input"]["torn_lines"] == 1, stats.output
    assert "stops inside its last compressed member" in stats.stderr or "torn last line" in stats.stderr
    result = CliRunner().invoke(app, ["export", str(cut), "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "rerun cai generate to repair it" in result.stderr, result.output
    assert not (tmp_path / "x.jsonl").exists()
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "m2.jsonl"), str(cut)])
    assert result.exit_code == 0 and "1 torn" in result.stderr, result.output


def test_one_writer_per_compressed_output(tiny_model, tmp_path):
    from cai.locks import OutputLock

    out = tmp_path / "pairs.jsonl.gz"
    with OutputLock(str(out)):
        result = CliRunner().invoke(app, plumbing(["generate", EXAMPLES, "--model", tiny_model, "-o", out,
                                                   "--limit", "2", "--max-new-tokens", "4"]))
    assert result.exit_code == 2 and "another cai run is writing it" in result.stderr, result.output
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_on_a_gzip_output_writes_what_is_in_flight_then_resumes(tiny_model, some_prompts, tmp_path):
    """A graceful stop writes the records in flight as a last whole member; the resume finishes."""
    out = tmp_path / "pairs.jsonl.gz"
    args = [some_prompts, "--model", tiny_model, "-o", out, "--batch-size", "2", "--max-new-tokens", "12",
            "--no-few-shot"]
    proc = _start_and_wait_for_records(args, out)
    proc.send_signal(signal.SIGTERM)
    written_then = _lines(out)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143, stderr
    records = _read(out)                          # whole members only: nothing cut off
    assert written_then <= len(records) <= written_then + 2 < SOME
    assert f"interrupted (SIGTERM): {len(records)} records written" in " ".join(stderr.split())
    resumed = subprocess.run(cai_command(*args, "-q"), capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert sorted(r["id"] for r in _read(out)) == [f"p{i:03d}" for i in range(SOME)]


def _default_signals() -> None:
    """The run starts with SIGINT and SIGHUP at their defaults even when the tests run under
    nohup (cai respects an ignored SIGHUP, which would make the SIGHUP test meaningless)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _wait_for_stderr(proc: subprocess.Popen, text: str) -> None:
    """Read the run's stderr until a line holds `text` (or the run ends)."""
    while (line := proc.stderr.readline()) and text not in line.decode(errors="replace"):
        pass


def _start_and_wait_for_records(args, out: Path) -> subprocess.Popen:
    """Start a run and return once it has written a record of its own (so it is in its loop)."""
    before = _lines(out)
    proc = subprocess.Popen(cai_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_default_signals)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _lines(out) <= before and proc.poll() is None:
        time.sleep(0.05)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_first_signal_finishes_what_is_in_flight_and_says_how_to_resume(tiny_model, some_prompts, tmp_path, signum, code):
    """Ctrl-C, and what schedulers send (SIGTERM: Kubernetes, Slurm, systemd; SIGHUP: a closed
    ssh session): no new prompt starts, those in flight finish, one line says how to resume."""
    out = tmp_path / "pairs.jsonl"
    args = [some_prompts, "--model", tiny_model, "-o", out, "--batch-size", "2", "--max-new-tokens", "12",
            "--no-few-shot"]
    proc = _start_and_wait_for_records(args, out)
    proc.send_signal(signum)
    written_then = out.read_bytes().count(b"\n")
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == code, stderr
    assert f"{signal.Signals(signum).name}: stopping: finishing the conversations in flight" in stderr
    assert "Run the same command again to continue" in stderr
    records = read_jsonl(out)
    # No new prompt starts after the signal; the (at most 2) conversations in flight finish.
    assert written_then <= len(records) <= written_then + 2 < SOME
    assert not Path(f"{out}.lock").exists()
    resumed = subprocess.run(cai_command(*args, "-q"), capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert sorted(r["id"] for r in read_jsonl(out)) == [f"p{i:03d}" for i in range(SOME)]


@pytest.mark.slow
def test_second_signal_or_the_grace_period_stops_at_once_with_whole_lines(tiny_model, many_prompts, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = [many_prompts, "--model", tiny_model, "-o", out, "--batch-size", "8", "--max-new-tokens", "64",
            "--no-few-shot", "--grace", "0.5"]
    proc = _start_and_wait_for_records(args, out)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143, stderr
    assert time.monotonic() - started < 20
    assert "Traceback" not in stderr and "interrupted (SIGTERM)" in stderr
    records = read_jsonl(out)                 # every line whole
    proc = _start_and_wait_for_records([*args[:-2], "--grace", "30"], out)
    proc.send_signal(signal.SIGTERM)
    # Two signals sent too close together arrive as one (POSIX does not queue them): the second
    # goes once the run has said it is stopping, so it is a second signal.
    _wait_for_stderr(proc, "SIGTERM: stopping")
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143, stderr
    assert len(read_jsonl(out)) >= len(records)


@pytest.mark.slow
def test_two_runs_on_one_output_the_second_exits_2_naming_the_first(tiny_model, many_prompts, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = [many_prompts, "--model", tiny_model, "-o", out, "--batch-size", "2", "--max-new-tokens", "12",
            "--no-few-shot", "-q"]
    first = _start_and_wait_for_records(args, out)
    # paused while the second runs start (it still holds the output): a fast first run could
    # otherwise finish before they look, and the test would race the machine's speed
    first.send_signal(signal.SIGSTOP)
    try:
        for extra in ([], ["--overwrite"]):      # a resume and a fresh run alike
            second = subprocess.run(cai_command(*args, *extra), capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"another cai run is writing it (pid {first.pid} on " in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == [f"p{i:03d}" for i in range(40)]


def test_a_full_disk_is_one_line_not_a_traceback(tiny_model, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    result = CliRunner().invoke(app, plumbing(["generate", EXAMPLES, "--model", tiny_model, "-o", "/dev/full",
                                               "--limit", "2", "--max-new-tokens", "4"]))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/dev/full: cannot write: No space left on device" in errors[0], result.stderr
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r", "meta": {}}) + "\n")
    exported = CliRunner().invoke(app, ["export", str(pairs), "-o", "/dev/full"])
    assert exported.exit_code == 1 and "No space left on device" in exported.stderr


def test_a_disk_full_when_the_run_starts_is_one_line_and_leaves_no_lock_file(tiny_model, tmp_path, monkeypatch):
    """Issue 31: a disk already full when the run starts fails on the lock's holder line, before
    anything loads: one line naming the output, exit 2, no lock file, the output untouched."""
    import errno

    real_write = os.write

    def full_for_locks(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd")
    monkeypatch.setattr(os, "write", full_for_locks)
    kept = tmp_path / "kept.jsonl"
    kept.write_text('{"id": "keep-me", "meta": {"seed": 0}}\n')
    for out in (tmp_path / "pairs.jsonl", kept):
        before = out.read_bytes() if out.exists() else None
        result = CliRunner().invoke(app, plumbing(["generate", EXAMPLES, "--model", tiny_model, "-o", out,
                                                   "--limit", "2", "--max-new-tokens", "4"]))
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{out}: " in errors[0] and "No space left on device" in errors[0], result.stderr
        assert not Path(f"{out}.lock").exists(), "no lock file left behind"
        assert (out.read_bytes() if out.exists() else None) == before, "the output untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl"]


def test_a_really_full_disk_leaves_no_file_behind(tiny_model, tmp_path):
    """The same on a real full file system (a tiny tmpfs, where this machine lets the tests mount
    one): refused before the model loads; with --no-lock the first record's write fails, and the
    output it would have made is not left behind empty."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        resumed = disk / "resumed.jsonl"      # a whole page, so that appending needs a new one
        line = '{"id": "keep-me", "meta": {"seed": 0}, "pad": ""}'
        resumed.write_text(line.replace('""', '"' + "x" * (4095 - len(line)) + '"') + "\n")
        assert resumed.stat().st_size == 4096
        with open(disk / "fill", "wb", buffering=0) as fp:
            try:
                while True:
                    fp.write(b"\0" * 4096)
            except OSError:
                pass
        base = ["generate", EXAMPLES, "--model", tiny_model, "--limit", "2", "--max-new-tokens", "4"]
        for out, extra, code in ((disk / "pairs.jsonl", [], 2), (disk / "pairs.jsonl", ["--no-lock"], 1),
                                 (resumed, ["--no-lock", "--force"], 1)):
            before = out.read_bytes() if out.exists() else None
            result = CliRunner().invoke(app, plumbing([*base, "-o", out, *extra]))
            assert result.exit_code == code, result.output
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr
            assert (out.read_bytes() if out.exists() else None) == before
            assert sorted(p.name for p in disk.iterdir()) == ["fill", "resumed.jsonl"]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)     # even with a file left open


def test_ctrl_c_after_the_last_prompt_started_ends_a_whole_run(tiny_model, many_prompts, tmp_path, monkeypatch):
    """A graceful stop that leaves nothing undone (every prompt was in flight, and each finished)
    is a finished run: exit 0 and the summary, not 'interrupted … run again' with nothing to run."""
    from cai.pipeline import Pipeline

    run = Pipeline.run

    def ctrl_c_at_the_first_record(self, jobs, **kwargs):
        for k, made in enumerate(run(self, jobs, **kwargs)):
            if k == 0:
                os.kill(os.getpid(), signal.SIGINT)       # the CLI's handler takes it: a graceful stop
            yield made

    monkeypatch.setattr(Pipeline, "run", ctrl_c_at_the_first_record)
    # as at a terminal, even when the tests themselves run where SIGINT is ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "pairs.jsonl"
    try:
        result = CliRunner().invoke(app, plumbing(["generate", many_prompts, "--model", tiny_model, "-o", out,
                                                   "--limit", "3", "--batch-size", "3", "--max-new-tokens", "12",
                                                   "--no-few-shot"]))
    finally:
        signal.signal(signal.SIGINT, previous)
    stderr = " ".join(result.stderr.split())
    assert result.exit_code == 0, result.output
    assert "stopping: finishing the conversations in flight" in stderr
    assert "every prompt finished" in stderr and "interrupted" not in stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == ["p000", "p001", "p002"]


# --- bad inputs ------------------------------------------------------------------------------

def _write(name: str, content: bytes | str):
    def make(tmp: Path) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)
    return make


def _nopad_model(kind: str):
    def make(tmp: Path, tiny: Path) -> str:
        copy = tmp / f"model-{kind}"
        shutil.copytree(tiny, copy)
        if kind == "no-template":
            for name in ("chat_template.jinja",):
                (copy / name).unlink(missing_ok=True)
            config = json.loads((copy / "tokenizer_config.json").read_text())
            config.pop("chat_template", None)
            (copy / "tokenizer_config.json").write_text(json.dumps(config))
        if kind == "pickle":
            import torch
            from safetensors.torch import load_file

            state = load_file(copy / "model.safetensors")
            (copy / "model.safetensors").unlink()
            torch.save(state, copy / "pytorch_model.bin")
        if kind == "truncated":
            weights = copy / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        if kind == "no-config":
            (copy / "config.json").unlink()
        if kind == "no-system":
            (copy / "chat_template.jinja").write_text(
                "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
        return str(copy)
    return make


EX = str(EXAMPLES)
# (id, prompts (path or factory), extra args, message in stderr)
BAD_INPUTS = [
    ("missing-file", "nope.jsonl", [], "nope.jsonl: no such file"),
    ("directory", lambda tmp: str(tmp), [], "is a directory, not a prompts file"),
    ("empty-file", _write("e.jsonl", ""), [], "e.jsonl: no prompts found"),
    ("blank-lines-only", _write("b.txt", "\n  \n"), [], "b.txt: no prompts found"),
    ("invalid-json", _write("p.jsonl", '{"prompt": "a"}\n{"prompt": \n'), [], "p.jsonl:2: invalid JSON"),
    ("not-an-object", _write("p.jsonl", '"just a string"\n'), [], "p.jsonl:1: expected a JSON object, got str"),
    ("missing-field", _write("p.jsonl", '{"text": "a"}\n'), [], "p.jsonl:1: prompt: missing (fields present: text"),
    ("wrong-field-name", EX, ["--prompt-field", "question"], "prompts.jsonl:1: question: missing"),
    ("prompt-not-string", _write("p.jsonl", '{"prompt": ["a"]}\n'), [], "p.jsonl:1: prompt[0]: expected a chat message object, got str"),
    ("prompt-null", _write("p.jsonl", '{"prompt": null}\n'), [], "p.jsonl:1: prompt: expected a string or a list of chat messages, got null"),
    ("empty-prompt", _write("p.jsonl", '{"prompt": ""}\n'), [], "p.jsonl:1: prompt: empty prompt"),
    ("whitespace-prompt", _write("p.jsonl", '{"prompt": "a"}\n{"prompt": " \\t "}\n'), [], "p.jsonl:2: prompt: empty prompt"),
    ("bad-id-type", _write("p.jsonl", '{"id": [1], "prompt": "a"}\n'), [], "p.jsonl:1: id: expected a non-empty string or integer"),
    ("duplicate-id", _write("p.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n'), [], "p.jsonl:2: id: duplicate id '1' (first on line 1)"),
    ("non-utf8-text", _write("p.txt", b"ok\n\xff\xfe bad\n"), [], "p.txt:2: not valid UTF-8 text"),
    ("non-utf8-jsonl", _write("p.jsonl", b'{"prompt": "caf\xe9"}\n'), [], "p.jsonl:1: not valid UTF-8 text"),
    ("batch-size-0", EX, ["--batch-size", "0"], "--batch-size: must be at least 1 (got 0)"),
    ("negative-temperature", EX, ["--temperature", "-0.5"], "--temperature: must be 0 (greedy) or more (got -0.5)"),
    ("top-p-zero", EX, ["--top-p", "0"], "--top-p: must be greater than 0 and at most 1 (got 0)"),
    ("top-p-above-one", EX, ["--top-p", "1.5"], "--top-p: must be greater than 0 and at most 1 (got 1.5)"),
    ("max-new-tokens-0", EX, ["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1 (got 0)"),
    ("revisions-0", EX, ["--revisions", "0"], "--revisions: must be at least 1 (got 0)"),
    ("unknown-device", EX, ["--device", "tpu"], "--device: unknown value 'tpu'; choose from auto, cpu, cuda, mps"),
    ("unknown-dtype", EX, ["--dtype", "int3"], "--dtype: unknown value 'int3'"),
    ("unknown-sampling", EX, ["--sampling", "sometimes"], "--sampling: unknown value 'sometimes'; choose from random, all, cycle"),
    ("resume-and-overwrite", EX, ["--resume", "--overwrite"], "--resume: contradicts --overwrite"),
    ("resume-to-stdout", EX, ["--resume", "-o", "-"], "--resume: needs an output file"),
    ("unknown-constitution", EX, ["-c", "harmles"], "no such constitution; did you mean 'harmless'?"),
    ("broken-constitution", EX, ["-c", str(DATA / "bad" / "zero-weight.yaml")], "zero-weight.yaml:7:13: principles[0].weight: must be greater than 0"),
    ("missing-constitution-file", EX, ["-c", "nope.yaml"], "nope.yaml: no such file"),
    ("unknown-templates", EX, ["--templates", "fancy"], "fancy: no such template folder"),
    ("missing-model-folder", EX, ["--model", "./no/such/model"], "./no/such/model: no such model folder"),
    ("model-folder-without-config", EX, ["--model", "@no-config", "--force"], "not a model folder (no config.json)"),
    ("model-not-gguf-file", EX, ["--model", str(EXAMPLES)], "a model is a folder (config.json + weights), a .gguf file or a Hub id"),
    ("no-chat-template", EX, ["--model", "@no-template", "--force"], "the tokenizer has no chat template; use a chat model, or pass --plain-chat-format"),
    ("pickle-checkpoint", EX, ["--model", "@pickle", "--force"], "--allow-pickle"),
    ("output-is-directory", EX, ["-o", "@dir"], "is a directory"),
    ("output-dir-missing", EX, ["-o", "@missing/out.jsonl"], "cannot write output: No such file or directory"),
    ("output-of-another-run", EX, ["-o", "@other-run", "--seed", "3"], "seed: 0 → 3"),
    ("output-broken-mid-file", EX, ["-o", "@broken"], "not a whole cai record; cannot resume from this file"),
    # what users bring, and what their machines do (issue: nothing lost without a word)
    ("csv-header-is-not-a-prompt", _write("p.csv", "text,id\nhello,1\n"), [], "p.csv:1: prompt: missing (columns present: text, id"),
    ("csv-empty-prompt", _write("p.csv", "prompt,id\nhello,1\n\"\",2\n"), [], "p.csv:3: prompt: empty prompt"),
    ("gzip-jsonl-corrupt", _write("p.jsonl.gz", b"not gzip at all"), [], "p.jsonl.gz: not a valid gzip file"),
    ("nul-byte-in-text", _write("p.txt", b"fine\nbad\x00line\n"), [], "p.txt:2: contains a NUL byte"),
    ("nul-byte-in-jsonl", _write("p.jsonl", '{"prompt": "a\\u0000b"}\n'), [], "p.jsonl:1: prompt: contains a NUL byte"),
    ("output-is-the-prompts-file", _write("same.jsonl", '{"prompt": "a"}\n'), ["-o", "@same", "--overwrite"], "is the prompts file; writing it would destroy the input"),
    ("bfloat16-on-cpu", EX, ["--dtype", "bfloat16", "--device", "cpu", "--force"], "--dtype: bfloat16 on a CPU without bf16 hardware"),
    ("truncated-weights", EX, ["--model", "@truncated", "--force"], "model.safetensors is truncated or corrupt"),
    ("template-include", EX, ["--templates", "@tpl:{% include 'x.jinja' %}"], "critique.jinja:1: {% include %} is not supported"),
    ("template-huge-range", EX, ["--templates", "@tpl:{% for i in range(10**9) %}x{% endfor %}"], "critique.jinja:1: cannot render: range() of 1,000,000,000 items"),
    ("concurrency-0", EX, ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "-m", "m", "--concurrency", "0"],
     "--concurrency: must be at least 1 (got 0)"),
    ("concurrency-of-hf", EX, ["--concurrency", "4"], "--concurrency: is for --backend openai"),
    ("negative-grace", EX, ["--grace", "-1"], "--grace: must be 0 or more seconds"),
    # issue 31 (runs)
    ("template-refuses-every-conversation", EX, ["--model", "@no-system", "--force"],
     "its chat template refuses the conversations this run makes (system, user, assistant, user, …): System role not supported"),
    ("no-filter-over-a-filtered-output", EX, ["-o", "@other-run"], "filters: 'on' → 'off'"),
    ("endless-line", "/dev/zero", [], "/dev/zero:1: a line longer than 64 MiB; is this a text file?"),
    ("output-dangling-symlink", EX, ["-o", "@dangling"], "dangling.jsonl: cannot write output: No such file or directory"),
    ("lone-surrogate-in-jsonl", _write("p.jsonl", '{"prompt": "a\\ud800b"}\n'), [],
     "p.jsonl:1: prompt: contains a lone surrogate (\\ud800), which is not text"),
    # issue 31 (inputs)
    ("infinite-weight", EX, ["-c", str(DATA / "bad" / "infinite-weight.yaml")], "infinite-weight.yaml:7:13: principles[0].weight: must be a finite number (got .inf)"),
    ("nan-weight", EX, ["-c", str(DATA / "bad" / "nan-weight.yaml")], "nan-weight.yaml:7:13: principles[0].weight: must be a finite number (got .nan)"),
    ("overflowing-weights", EX, ["-c", str(DATA / "bad" / "overflowing-weights.yaml")], "overflowing-weights.yaml:11:13: principles[1].weight: the weights add up to more than the largest number"),
    ("deeply-nested-constitution", EX, ["-c", str(DATA / "bad" / "deep-nesting.yaml")], "deep-nesting.yaml:2:65: YAML nested too deeply"),
    ("constitution-merge-key-not-a-mapping", EX, ["-c", str(DATA / "bad" / "merge-key-not-a-mapping.yaml")], "merge-key-not-a-mapping.yaml:8:5: principles[1].<<: a merge key (<<) takes a mapping"),
    ("api-key-env-unset", EX, ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--api-key-env", "CAI_TEST_UNSET_KEY_31"], "--api-key-env: the environment variable CAI_TEST_UNSET_KEY_31 is not set"),
    ("base-url-not-a-url-password-hidden", EX, ["--backend", "openai", "--base-url", "http://user:s3cret@", "--model", "m"], "--base-url: 'http://***@' is not an http(s) URL"),
    ("prompt-field-on-text", _write("p.txt", "one\ntwo\n"), ["--prompt-field", "question"], "--prompt-field: does not apply to"),
    ("response-field-on-text", _write("p.txt", "one\n"), ["--response-field", "answer"], "--response-field: does not apply to"),
    ("prompt-field-on-input-format-text", _write("p.jsonl", '{"q": "a"}\n'), ["--input-format", "text", "--prompt-field", "q"], "--prompt-field: does not apply to"),
    ("input-format-unknown", EX, ["--input-format", "xml"], "--input-format: unknown value 'xml'; choose from jsonl, csv, tsv, text, parquet, arrow"),
    ("input-format-parquet-on-stdin", "-", ["--input-format", "parquet"], "--input-format: parquet is read from a file, not from stdin"),
    ("input-format-csv-missing-column", _write("p.data", "text\nhello\n"), ["--input-format", "csv"], "p.data:1: prompt: missing (columns present: text"),
    # issue 31 (files)
    ("output-one-line-not-cai", EX, ["-o", "@write:notes.jsonl:my notes\n"], "notes.jsonl:1: not a whole cai record"),
    ("filtered-not-cai", EX, ["--filtered", "@write:notes.txt:my notes\n"], "--filtered: " + "{tmp}/notes.txt exists and is not a cai filtered file (line 1 is not a cai record); use another file, or --overwrite to replace it"),
    ("failures-not-cai", EX, ["--failures", "@write:scores.jsonl:{\"id\": \"a\", \"score\": 3}\n"], "--failures: {tmp}/scores.jsonl exists and is not a cai failures file (its first line has no stage or error field)"),
    ("skipped-not-cai", EX, ["--skipped", "@write:table.csv:a,b\n1,2\n"], "--skipped: {tmp}/table.csv exists and is not a cai skipped file (line 1 is not a cai record)"),
    ("skipped-is-the-failures-kind", EX, ["--skipped", "@write:f.jsonl:{\"id\": \"a\", \"stage\": \"response\", \"error\": \"e\"}\n"], "--skipped: {tmp}/f.jsonl exists and is not a cai skipped file (its first line has no kind or reason field)"),
    ("filtered-of-another-run", EX, ["--filtered", "@write:dropped.jsonl:{\"id\": \"a\", \"meta\": {\"seed\": 0}, \"filter\": {\"reasons\": [\"empty\"]}}\n"], "--filtered: {tmp}/dropped.jsonl holds records of a different run (model: None →"),
    ("failures-is-a-directory", EX, ["--failures", "@dir"], "--failures: {tmp} is a directory"),
    ("output-gz-holding-plain-jsonl", EX, ["-o", "@write:old.jsonl.gz:{\"id\": \"a\", \"meta\": {}}\n"], "{tmp}/old.jsonl.gz: not a valid gzip file (it does not start with the gzip signature); it is plain JSON text under a compressed name: rename it without the suffix, or compress it"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_line_exit_2_and_an_untouched_output(case, tiny_model, tmp_path, monkeypatch):
    name, prompts, extra, message = case
    if name == "bfloat16-on-cpu":           # what a CPU without bf16 units is told, on any CPU
        from cai.backends import quant

        monkeypatch.setattr(quant, "cpu_has_bf16", lambda: False)
    prompts = prompts(tmp_path) if callable(prompts) else prompts
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "keep-me", "meta": {"seed": 0}}\n')
    args = []
    written = {}            # files a case brings (@write:NAME:CONTENT): each must be left as it was
    for arg in extra:
        if arg.startswith("@"):
            key = arg[1:]
            if key.startswith("write:"):
                name, content = key[len("write:"):].split(":", 1)
                arg = _write(name, content)(tmp_path)
                written[arg] = Path(arg).read_bytes()
            elif key.startswith("tpl:"):
                folder = tmp_path / "templates"
                shutil.copytree(ROOT / "prompts" / "default", folder)
                (folder / "critique.jinja").write_text(key[4:])
                arg = str(folder)
            elif key == "same":
                arg = str(tmp_path / "same.jsonl")
            elif key in ("no-config", "no-template", "pickle", "truncated", "no-system"):
                arg = _nopad_model(key)(tmp_path, tiny_model)
            elif key == "dir":
                arg = str(tmp_path)
            elif key == "dangling":
                (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "no" / "such" / "x.jsonl")
                arg = str(tmp_path / "dangling.jsonl")
            elif key == "missing/out.jsonl":
                arg = str(tmp_path / "missing" / "out.jsonl")
            elif key == "other-run":
                arg = str(out)
            elif key == "broken":
                out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
                arg = str(out)
        args.append(arg)
    if "--model" not in args:
        args += ["--model", str(tiny_model)]
    if "-o" not in args:
        args += ["-o", str(out)]
    before = out.read_bytes()
    if "--max-new-tokens" not in args:
        args += ["--max-new-tokens", "4"]
    result = CliRunner().invoke(app, plumbing(["generate", prompts, *args]))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert out.read_bytes() == before, "a bad input never touches the output file"
    for path, content in written.items():
        assert Path(path).read_bytes() == content, f"{path} is left as it was"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    message = message.replace("{tmp}", str(tmp_path))
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_side_files_named_explicitly_cai_own_are_continued_others_need_overwrite(tiny_model, tmp_path):
    """Issue 31: --filtered/--failures/--skipped FILE that holds cai's own lines (a previous run's)
    work as before (continued, or replaced by a fresh run); another file is refused before anything
    loads and left as it was, unless --overwrite."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about number {i}."}) + "\n"
                               for i in range(3)) + "not json\n")
    out, filtered, failures, skipped = (tmp_path / name for name in ("out.jsonl", "dropped.jsonl", "failed.jsonl",
                                                                       "skips.jsonl"))
    failures.write_text(json.dumps({"id": "p9", "prompt": "x", "line": 9, "stage": "response", "error": "timeout",
                                    "time": "2025-01-01T00:00:00+00:00"}) + "\n")      # a failures file of cai's
    args = ["generate", prompts, "--model", tiny_model, "-o", out, "--max-new-tokens", "4", "--skip-invalid",
            "--filter", "--repairs", "0", "--filtered", filtered, "--failures", failures, "--skipped", skipped]
    first = CliRunner().invoke(app, plumbing(args))
    assert first.exit_code == 1, first.output            # the invalid line was skipped
    assert not failures.exists(), "a fresh run replaces cai's own failures file, as before"
    assert [s["kind"] for s in read_jsonl(skipped)] == ["invalid"]
    assert {r["id"] for r in read_jsonl(out)} | {r["id"] for r in read_jsonl(filtered)} == {"p0", "p1", "p2"}
    again = CliRunner().invoke(app, plumbing(args))     # every side file is cai's own: the run continues
    assert again.exit_code == 1 and "nothing to do" in again.stderr, again.output
    failures.write_text("id,score\na,3\n")
    refused = CliRunner().invoke(app, plumbing(args))
    assert refused.exit_code == 2 and "--failures: " in refused.stderr and "is not a cai failures file" in refused.stderr
    assert failures.read_text() == "id,score\na,3\n"
    replaced = CliRunner().invoke(app, plumbing([*args, "--overwrite"]))
    assert replaced.exit_code == 1, replaced.output
    assert not failures.exists() or failures.read_text() != "id,score\na,3\n"


def test_there_are_at_least_50_bad_inputs():
    assert len(BAD_INPUTS) >= 50


def test_skip_invalid_counts_and_carries_on(tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"prompt": "one"}\nnot json\n{"prompt": ""}\n\xff\n{"prompt": "two"}\n')
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, plumbing(["generate", str(prompts), "--model", str(tiny_model), "-o", str(out),
                                      "--skip-invalid", "--max-new-tokens", "4"]))
    # skipped lines are data not made: exit 1, one line naming the count and the file
    assert result.exit_code == 1, result.output
    assert sorted(r["prompt"] for r in read_jsonl(out)) == ["one", "two"]
    assert "p.jsonl:2: invalid JSON" in result.stderr
    assert "invalid input lines skipped" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 skipped as invalid input lines" in errors[0] and "out.jsonl.skipped.jsonl" in errors[0]
    skipped = read_jsonl(f"{out}.skipped.jsonl")
    assert [(s["line"], s["kind"]) for s in skipped] == [(2, "invalid"), (3, "invalid"), (4, "invalid")]


def test_prompts_too_long_for_the_context_are_skipped_or_truncated(tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    long = " ".join(["apple river stone"] * 1500)
    prompts.write_text(json.dumps({"id": "short", "prompt": "hi"}) + "\n" + json.dumps({"id": "long", "prompt": long}) + "\n")
    out = tmp_path / "out.jsonl"
    base = ["generate", str(prompts), "--model", str(tiny_model), "--max-new-tokens", "8"]
    skipped = CliRunner().invoke(app, plumbing([*base, "-o", str(out)]))
    assert skipped.exit_code == 1, skipped.output
    assert [r["id"] for r in read_jsonl(out)] == ["short"]
    assert "p.jsonl:2: the whole conversation needs about" in " ".join(skipped.stderr.split())
    assert "prompts too long for the context" in skipped.stderr
    assert "try --no-few-shot or --truncate-long" in skipped.stderr.splitlines()[-1]
    assert [(s["id"], s["kind"]) for s in read_jsonl(f"{out}.skipped.jsonl")] == [("long", "too long")]
    # --quiet hides the summary, never the line that says data was not made
    quiet = CliRunner().invoke(app, plumbing([*base, "-o", str(tmp_path / "q.jsonl"), "--quiet"]))
    assert quiet.exit_code == 1
    assert [line for line in quiet.stderr.splitlines() if line.strip()] == [
        line for line in quiet.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    assert "1 skipped as too long" in quiet.stderr
    truncated = CliRunner().invoke(app, plumbing([*base, "-o", str(tmp_path / "t.jsonl"), "--truncate-long"]))
    assert truncated.exit_code == 0, truncated.output
    records = {r["id"]: r for r in read_jsonl(tmp_path / "t.jsonl")}
    assert records["long"]["meta"]["prompt_truncated"] is True
    assert long.startswith(records["long"]["prompt"]) and len(records["long"]["prompt"]) < len(long)
    assert "prompt_truncated" not in records["short"]["meta"]


def test_plain_chat_format_and_allow_pickle_are_opt_in(tiny_model, tmp_path):
    for kind, flag in (("no-template", "--plain-chat-format"), ("pickle", "--allow-pickle")):
        model = _nopad_model(kind)(tmp_path, tiny_model)
        out = tmp_path / f"{kind}.jsonl"
        result = CliRunner().invoke(app, plumbing(["generate", str(EXAMPLES), "--model", model, "-o", str(out),
                                          "--limit", "2", "--max-new-tokens", "4", flag]))
        assert result.exit_code == 0, result.output
        assert len(read_jsonl(out)) == 2
