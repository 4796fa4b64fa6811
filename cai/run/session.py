"""A run's lifecycle, the same for every run module (generate, judge, preview): the files it
writes checked writable before anything is created, then locked; a stop (the caller's, or
SIGINT / SIGTERM / SIGHUP through StopSignals); the backend opened, or accepted open from a Python
caller; and on the way out, whatever ends the run, the backend closed, the locks released and the
signal handlers restored, in that order.

    with RunSession(files, lock=options.lock, stop=stop, grace=options.grace) as session:
        backend = session.backend(options)
        with session.stoppable():          # a StopNow (a second Ctrl-C) ends the work, not the session
            ...
    session.stopped_by                     # why it stopped, or None
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from cai.output import check_writable
from cai.signals import StopNow, StopSignals


def never() -> bool:
    """A stop that never comes: for runs that leave Ctrl-C to raise (cai preview)."""
    return False


class RunSession:
    def __init__(self, files: Iterable[str | None], *, lock: bool = True, stop: Callable[[], bool] | None = None,
                 grace: float = 0.0, on_signal=None):
        self.files = [f for f in dict.fromkeys(files) if f and f != "-"]
        self.lock = lock
        # without a stop of the caller's, SIGINT, SIGTERM and SIGHUP ask the run to stop
        self.stop = stop if stop is not None else StopSignals(grace, on_signal=on_signal)
        self._owns_stop = stop is None
        self.stopped_by: str | None = None
        self.stop_exit = 130
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunSession:
        from cai.locks import Locks

        for target in self.files:
            check_writable(target)          # before the lock: an unwritable output creates nothing
        try:
            if self._owns_stop:
                self._stack.enter_context(self.stop)
            self._stack.enter_context(Locks(self.files, enabled=self.lock))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()                 # last in, first out: the backend, the locks, the handlers

    def backend(self, options, resolved: tuple | None = None):
        """The run's backend: `options.model` when a Python caller passed one open (it stays
        open: the caller closes it), else the one `options` names, opened now and closed when
        the session ends."""
        from cai.backends.spec import is_open_backend, open_backend

        if is_open_backend(options.model):
            return options.model
        backend = open_backend(options.backend_spec(), resolved)
        self._stack.callback(backend.close)
        return backend

    @contextlib.contextmanager
    def stoppable(self):
        """The run's work: a StopNow (stop at once: a second signal, or the grace period over)
        ends it here, recorded as `stopped_by` and `stop_exit`, and the session goes on to its
        cleanup."""
        try:
            yield
        except StopNow as exc:
            self.stopped_by, self.stop_exit = str(exc), exc.exit_code

    def note_stop(self) -> None:
        """After the work: a stop asked for (and heeded) is the run's end too, if nothing else
        ended it."""
        if self.stopped_by is None and self.stop():
            self.stopped_by = getattr(self.stop, "name", None) or "stop"
            self.stop_exit = getattr(self.stop, "exit_code", 130)
