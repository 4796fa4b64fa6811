"""Stopping a run the way schedulers do: SIGINT (Ctrl-C), SIGTERM (Kubernetes, Slurm, systemd)
and SIGHUP (a closed ssh session) all mean "finish what is in flight, then stop". No new prompt
starts; conversations in flight get `grace` seconds; then, or at a second signal, the run stops
at once (every line already written stays whole)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
received: list[int] = []           # every stop signal this process has handled, in order


class StopNow(KeyboardInterrupt):
    """Raised in the main thread to stop a run at once (a second signal, or the grace period
    over). A KeyboardInterrupt, so code that catches Exception does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 130)


class StopSignals:
    """A stop predicate (call it: True once a stop was asked for) that installs handlers for
    SIGINT, SIGTERM and SIGHUP while in a `with` block (main thread only; elsewhere it is a plain
    flag that `request()` sets). Until `arm()`, a signal stops at once: nothing is in flight to
    finish (a model still loading)."""

    def __init__(self, grace: float = 15.0, on_signal: Callable[[str, float], None] | None = None,
                 keep: bool = False):
        """`keep`: leave the handlers installed after the block, noting (not obeying) later
        signals: for a command line that exits right after, so a scheduler's second SIGTERM
        during the exit does not turn a clean 143 into a kill."""
        self.grace = grace
        self.on_signal = on_signal
        self.keep = keep
        self.signum: int | None = None
        self.armed = False
        self.finished = False
        self._previous: dict[int, object] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def arm(self) -> None:
        self.armed = True

    def finish(self) -> None:
        """The loop is over: cancel the grace timer, and let a signal during the cleanup that
        follows (closing files, the backend) be noted rather than cut it short."""
        self.finished = True
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a graceful stop (what the first signal does)."""
        if self.signum is None:
            self.signum = signum

    def _handler(self, signum, frame) -> None:
        received.append(signum)
        if self.finished:
            self.signum = self.signum or signum
            return
        if self.signum is not None or not self.armed:
            self.signum = self.signum or signum
            raise StopNow(signum)
        self.signum = signum
        if self.on_signal:
            try:
                self.on_signal(signal.Signals(signum).name, self.grace)
            except BaseException:       # a closed stderr (a dead ssh tty) must not end the run here
                pass
        if self.grace > 0:
            signal.setitimer(signal.ITIMER_REAL, self.grace)
        else:
            raise StopNow(signum)

    def _expired(self, signum, frame) -> None:
        if not self.finished:
            raise StopNow(self.signum or signal.SIGINT)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (*EXIT_CODES, signal.SIGALRM):
                if signal.getsignal(signum) is signal.SIG_IGN and signum != signal.SIGALRM:
                    continue            # `nohup cai …` ignores SIGHUP: keep it so
                handler = self._expired if signum == signal.SIGALRM else self._handler
                self._previous[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous and self.keep:
            self.finish()
            return
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()
