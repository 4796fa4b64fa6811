"""The engine's scheduler over plain data: no model, no torch. A toy "model" (each id is followed
by the next of a 7-id cycle) plays the forwards, so admission, prefix reuse, the root, cache
sizing, prefill grouping, drafts and stops are checked in milliseconds."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cai.backends.scheduler import PAGE, Allocate, Forward, Grow, Move, Scheduler

CYCLE = list(range(10, 17))


def follow(context: list[int]) -> int:
    """The toy model's greedy next id: the next in CYCLE after the last id (10 after anything else)."""
    last = context[-1]
    return CYCLE[(CYCLE.index(last) + 1) % len(CYCLE)] if last in CYCLE else CYCLE[0]


class Driver:
    """Plays the engine's part: runs each planned forward through `follow`, records the storage
    ops and the forwards, and returns the turns that end."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.ops: list = []
        self.forwards: list[tuple[str, list[str], list[str]]] = []   # (kind, decode keys, prefill keys)

    def submit(self, key, tokens, max_new, **kw):
        self.scheduler.submit(key, tokens, max_new, **kw)
        self.ops += self.scheduler.take_ops()

    def release(self, key):
        self.scheduler.release(key)
        self.ops += self.scheduler.take_ops()

    def step(self) -> dict:
        s = self.scheduler
        s.admit()
        self.ops += s.take_ops()
        finished = []
        root = s.root_row()
        if root is not None:
            finished += self._run(s.prepare([], [root]), "root")
            s.root_encoded(root)
        for forward in s.forwards(root):
            self.ops += s.take_ops()
            finished += self._run(forward, "main")
        return dict(finished)

    def _run(self, f: Forward, kind: str) -> list:
        s = self.scheduler
        keys = lambda rows: [s.active[i].key for i in rows]     # noqa: E731
        self.forwards.append((kind, keys(f.decode), keys(f.prefill)))
        assert f.starts == [len(s.active[i].tokens) for i in f.rows]
        greedy = []
        for i, ids in zip(f.decode, f.ids):
            context = s.active[i].tokens + ids[:1]
            for j in range(len(ids)):
                greedy.append(follow(context + ids[1:1 + j]))
        offsets = f.decode_offsets()
        picks = {i: greedy[offsets[k]] for k, i in enumerate(f.decode) if i not in f.drafts}
        encoded = [follow(s.active[i].tokens + s.active[i].pending) for i in f.prefill]
        return s.complete(f, picks, greedy, encoded)

    def run(self) -> dict:
        results = {}
        while self.scheduler.busy:
            results.update(self.step())
        return results


def free_run(prompt: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(follow(prompt + out))
    return out


def test_the_scheduler_needs_no_torch():
    code = "import sys, cai.backends.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_requests_wait_for_a_slot_and_an_idle_conversation_gives_its_up():
    d = Driver(Scheduler(slots=2, stop_ids=[]))
    for key in "abc":
        d.submit(key, [20, 21, 22 + ord(key)], 3)
    d.step()
    assert [s.key for s in d.scheduler.active] == ["a", "b"] and d.scheduler.busy
    results = {}
    while "a" not in results:
        results.update(d.step())
    assert all(not isinstance(op, Move) for op in d.ops)
    # a is done but not released: c takes its slot at the next step, b's moving into a's place
    stored_b = d.scheduler.slot("b").stored
    results.update(d.step())
    assert [s.key for s in d.scheduler.active] == ["b", "c"]
    assert d.ops[-1] == Move(1, 0, stored_b)
    results.update(d.run())
    assert {k: r.tokens for k, r in results.items()} == {
        k: free_run([20, 21, 22 + ord(k)], 3) for k in "abc"}


def test_releasing_moves_the_last_slot_into_the_freed_one():
    d = Driver(Scheduler(slots=3, stop_ids=[]))
    for key in "abc":
        d.submit(key, list(range(30, 40)) + [ord(key)], 2)
    d.run()
    d.ops.clear()
    stored_c = d.scheduler.slot("c").stored
    d.release("a")
    assert d.ops == [Move(2, 0, stored_c)]
    assert [s.key for s in d.scheduler.active] == ["c", "b"] and d.scheduler.slot("c") is d.scheduler.active[0]
    d.release("b")                       # the last slot: nothing moves
    assert d.ops == [Move(2, 0, stored_c)]
    d.release("gone")                    # unknown keys are no error
    assert not d.scheduler.busy


def test_the_first_prompt_is_the_root_and_the_others_read_their_share_of_it():
    root = list(range(100, 140))
    prompts = {"a": root + [1, 2, 3], "b": root[:30] + [4, 5], "c": [7, 8], "d": root + [1, 9]}
    d = Driver(Scheduler(slots=4, stop_ids=[]))
    for key, tokens in prompts.items():
        d.submit(key, tokens, 4)
    results = d.run()
    assert d.forwards[0] == ("root", [], ["a"])              # the root goes alone, first
    assert d.scheduler.root_tokens == prompts["a"]
    shares = {s.key: s.root_shared for s in d.scheduler.active}
    assert shares == {"a": 43, "b": 30, "c": 0, "d": 41}
    assert {k: r.reused_tokens for k, r in results.items()} == {"a": 0, "b": 30, "c": 0, "d": 41}
    assert {k: r.prompt_tokens for k, r in results.items()} == {k: len(p) for k, p in prompts.items()}
    # slots hold only their own positions: the root's share is never stored in them
    assert {s.key: s.stored for s in d.scheduler.active} == {"a": 3, "b": 5, "c": 5, "d": 4}
    assert {k: r.tokens for k, r in results.items()} == {k: free_run(p, 4) for k, p in prompts.items()}


def test_the_cache_is_allocated_once_from_the_hint_less_the_root_share():
    root = list(range(100, 140))
    d = Driver(Scheduler(slots=2, stop_ids=[], capacity=530))
    d.submit("a", root + [1], 8)
    d.submit("b", root[:30] + [2, 3], 8)
    d.run()
    assert d.ops == [Allocate(512)]          # 530 - 30 (the smallest share), in pages of 256
    turn = root[:30] + [2, 3] + d.scheduler.slot("b").generated + [4] * 100
    d.submit("b", turn, 8)
    d.run()
    assert d.ops == [Allocate(512)], "the second turn fits: no grow"


def test_a_turn_that_outgrows_the_cache_grows_it_keeping_what_the_slots_hold():
    d = Driver(Scheduler(slots=2, stop_ids=[]))
    d.submit("a", [50, 51, 52], 4)
    d.submit("b", [60, 61], 4)
    first = d.run()
    assert d.ops == [Allocate(PAGE)]
    held = [s.stored for s in d.scheduler.active]
    long = [50, 51, 52] + first["a"].tokens + [5] * 400
    d.submit("a", long, 4)
    assert d.ops[-1] == Grow(512, held)
    second = d.run()
    assert second["a"].reused_tokens == 3 + 4 - 1       # all but the last generated id, never fed back
    assert second["a"].tokens == free_run(long, 4)


def test_a_next_turn_that_differs_inside_the_root_share_encodes_the_rest():
    root = list(range(100, 140))
    d = Driver(Scheduler(slots=2, stop_ids=[]))
    d.submit("a", root + [1], 3)
    d.submit("b", root + [2], 3)
    first = d.run()
    turn = root[:10] + [3] * 30 + [2] + first["b"].tokens
    d.submit("b", turn, 3)
    second = d.run()
    assert second["b"].reused_tokens == 10 and d.scheduler.slot("b").root_shared == 10
    assert second["b"].tokens == free_run(turn, 3)


def test_prefill_groups_are_of_like_length_and_bounded_in_tokens():
    s = Scheduler(slots=16, stop_ids=[])
    lengths = [10, 40, 11, 12, 41, 1000, 1000, 1000, 1000, 1000]
    for i, n in enumerate(lengths):
        s.submit(f"r{i}", [3] * n, 1)
    s.admit()
    groups = s.prefill_groups(s.rows("prefill"))
    assert [[len(s.active[i].pending) for i in g] for g in groups] == [
        [10, 11, 12], [40, 41], [1000] * 4, [1000]]


def test_the_last_prefill_group_shares_the_forward_of_the_decode_rows():
    d = Driver(Scheduler(slots=4, stop_ids=[]))
    d.submit("a", [20, 21, 22], 6)
    d.step()                                                 # the root alone, then nothing to decode with
    d.submit("b", [20, 21, 99, 98, 97], 6)
    d.submit("c", [5] * 40, 6)
    d.forwards.clear()
    d.step()
    # b (3 ids past its root share) and c (40) are too different for one group: b goes alone,
    # then c rides with the decode rows (a, and b, which its own forward just made a decode row)
    assert d.forwards == [("main", [], ["b"]), ("main", ["a", "b"], ["c"])]


@pytest.mark.parametrize("draft", [True, False])
def test_drafts_give_the_tokens_of_plain_decoding_in_fewer_steps(draft):
    prompt = CYCLE * 3 + [10]
    d = Driver(Scheduler(slots=1, stop_ids=[], draft=draft))
    d.submit("a", prompt, 30)
    result = d.run()["a"]
    assert result.tokens == free_run(prompt, 30) and result.finish_reason == "length"
    stats = d.scheduler.stats
    if draft:
        assert stats.drafted > 0 and stats.accepted > 0 and stats.decode_steps < 29
    else:
        assert stats.drafted == 0 and stats.decode_steps == 29      # the first id comes from the prefill


def test_a_stop_id_ends_the_turn_even_inside_an_accepted_draft():
    prompt = CYCLE * 3 + [10]
    d = Driver(Scheduler(slots=1, stop_ids=[15]))
    d.submit("a", prompt, 30)
    result = d.run()["a"]
    assert result.tokens == [11, 12, 13, 14, 15] and result.finish_reason == "stop"
    assert d.scheduler.slot("a").tokens == prompt + [11, 12, 13, 14]     # the stop id is never stored


def test_sampled_turns_get_no_drafts():
    prompt = CYCLE * 3 + [10]
    d = Driver(Scheduler(slots=1, stop_ids=[]))
    d.submit("a", prompt, 10, temperature=0.7, seed=1)
    d.run()
    assert d.scheduler.stats.drafted == 0


def test_requests_the_engine_cannot_take_are_refused():
    s = Scheduler(slots=1, stop_ids=[], context_length=64)
    with pytest.raises(ValueError, match="empty request"):
        s.submit("a", [], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        s.submit("a", [3] * 60, 8)
    d = Driver(s)
    d.submit("a", [3, 4], 8)
    d.step()
    with pytest.raises(ValueError, match="'a' is still running"):
        d.submit("a", [3, 4, 5], 8)


def test_partial_lists_the_turns_being_decoded():
    d = Driver(Scheduler(slots=2, stop_ids=[]))
    d.submit("a", [20, 21], 5)
    d.step()              # the root's forward gives a its first id, the step's decode its second
    assert d.scheduler.partial() == [("a", [10, 11])]
