"""Several endpoints of one OpenAI-compatible model behind one backend: each attempt of a request
goes to the endpoint with the fewest requests outstanding among those up and below their own
limit. An endpoint whose attempts fail TAKE_OUT times in a row for reasons of its own (no reply
at all, a timeout, a 5xx) is taken out: no attempt goes there, and a probe asks it every few
seconds (`GET /models`; any HTTP answer below 500 brings it back). The attempts it had in
flight fail over there and are tried again on the others, at once; a request is only lost
(to the failures file) when every endpoint kept failing it.

Each endpoint keeps its own figures (attempts, errors, completion tokens, latency of the
attempts that succeeded) for the run's summary and manifest. Everything here runs on the
backend's event loop thread; nothing imports httpx."""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cai.backends.openai_wire import Endpoint

log = logging.getLogger("cai")

TAKE_OUT = 3                # attempts failed in a row, for the endpoint's own reasons, that take it out
PROBE_FIRST = 1.0           # seconds before the first probe of an endpoint taken out (doubling…)
PROBE_MOST = 15.0           # … up to this


@dataclass(eq=False)
class Member:
    """One endpoint of the fleet and what it has done."""

    endpoint: Endpoint
    limit: int                          # attempts in flight at most
    outstanding: int = 0
    in_row: int = 0                     # attempts failed in a row for the endpoint's own reasons
    down: str | None = None             # why it is out (None: up)
    attempts: int = 0
    errors: int = 0
    tokens: int = 0                     # completion tokens of the replies it gave
    latencies: list[float] = field(default_factory=list, repr=False)
    taken_out: int = 0                  # times it was taken out

    @property
    def shown(self) -> str:
        return self.endpoint.shown()

    def report(self) -> dict:
        """Its figures, for summaries and the run's manifest."""
        return {"url": self.shown, "requests": self.attempts, "errors": self.errors, "tokens": self.tokens,
                "median_latency": round(statistics.median(self.latencies), 3) if self.latencies else None,
                "taken_out": self.taken_out, "down": self.down}


class NoEndpoint(Exception):
    """Every endpoint is out: `reason` names each and why."""


class Fleet:
    """The endpoints of one backend. `acquire()` waits for room on an endpoint that is up (the
    one with the fewest outstanding; ties to the one listed first) and raises NoEndpoint when
    every one is out; `done(member, …)` hands it back with how the attempt went."""

    def __init__(self, members: list[Member], probe: Callable[[Member], Awaitable[bool]]):
        self.members = members
        self._probe = probe
        self._changed: asyncio.Condition | None = None      # made on the loop thread, at first use
        self._probes: set[asyncio.Task] = set()

    @property
    def several(self) -> bool:
        return len(self.members) > 1

    def up(self) -> list[Member]:
        return [m for m in self.members if m.down is None]

    def why_down(self) -> str:
        return "; ".join(f"{m.shown}: {m.down}" for m in self.members if m.down)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, avoid: Member | None = None) -> Member:
        """`avoid`: where the request's last attempt failed, taken only if no other has room."""
        changed = self._condition()
        async with changed:
            while True:
                up = self.up()
                if not up:
                    raise NoEndpoint(f"no endpoint is up ({self.why_down()})")
                free = [m for m in up if m.outstanding < m.limit]
                if free:
                    others = [m for m in free if m is not avoid] or free
                    member = min(others, key=lambda m: m.outstanding)    # min keeps the first of a tie
                    member.outstanding += 1
                    member.attempts += 1
                    return member
                await changed.wait()

    async def done(self, member: Member, *, ok: bool, its_fault: bool = False, reason: str = "",
                   latency: float | None = None, tokens: int = 0) -> bool:
        """Hand `member` back. `ok`: the attempt succeeded; `its_fault`: it failed for the
        endpoint's own reasons (no reply, a timeout, a 5xx), which count toward taking it out.
        True when the endpoint was taken out just now or is out (the attempt should be tried
        again elsewhere, without waiting)."""
        changed = self._condition()
        async with changed:
            member.outstanding -= 1
            if ok:
                member.in_row = 0
                member.tokens += tokens
                if latency is not None:
                    member.latencies.append(latency)
            else:
                member.errors += 1
                member.in_row = member.in_row + 1 if its_fault else 0
                if its_fault and member.down is None and member.in_row >= TAKE_OUT and self.several:
                    self._take_out(member, reason)
            changed.notify_all()
            return member.down is not None

    def take_out(self, member: Member, reason: str) -> None:
        """Out from the start (the pre-run check could not reach it), probed until it answers."""
        self._take_out(member, reason)

    def _take_out(self, member: Member, reason: str) -> None:
        member.down, member.taken_out = reason, member.taken_out + 1
        log.warning("endpoint %s taken out (%s); its requests go to the others, and it is asked every few "
                    "seconds whether it is back", member.shown, reason)
        task = asyncio.get_running_loop().create_task(self._watch(member))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _watch(self, member: Member) -> None:
        wait = PROBE_FIRST
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 2, PROBE_MOST)
            if await self._probe(member):
                changed = self._condition()
                async with changed:
                    member.down, member.in_row = None, 0
                    changed.notify_all()
                log.warning("endpoint %s answers again; back in", member.shown)
                return

    def report(self) -> list[dict]:
        return [m.report() for m in self.members]

