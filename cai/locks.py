"""One writer per output: an exclusive `flock` on a sidecar `OUTPUT.lock`, held for a run's whole
life. The kernel drops the lock with the process (kill -9 included), so a crashed run never
leaves a stale lock; the file records who holds it (pid, host, since) for the message a second
run prints."""

from __future__ import annotations

import errno
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from cai.errors import OutputError

# errors that mean "this file system does not do locks" (some NFS setups, FUSE, SMB mounts)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}




def owner(target: str) -> str:
    """The file whose lock covers `target`: itself, or the output a side file is named after
    (OUT.filtered.jsonl is covered by OUT.lock, whichever run names it, and so are the run's
    manifest OUT.runs.jsonl and the reviewer's OUT.review.jsonl), symlinks resolved."""
    from cai.output import REVIEW_SUFFIX, RUNS_FILE, SIDE_FILES

    real = os.path.realpath(target)
    for suffix in (*SIDE_FILES.values(), RUNS_FILE, REVIEW_SUFFIX):
        if real.endswith(suffix) and len(real) > len(suffix):
            return real[: -len(suffix)]
    return real


def lock_path(target: str) -> Path:
    return Path(f"{owner(target)}.lock")


def lockable(target: str | None) -> bool:
    """Regular files (existing or to be made) are locked; stdout, devices and pipes are not."""
    if not target or target == "-":
        return False
    path = Path(target)
    return not path.exists() or path.is_file()


class OutputLock:
    """Hold `OUTPUT.lock` exclusively, or fail at once (exit 2) naming the run that holds it.

    The lock file is removed on release, while still locked; a run that opened the old file
    before that sees it is no longer the file at that path and tries again (the usual way to
    make unlink-on-release safe)."""

    def __init__(self, target: str):
        self.target = target
        self.path = lock_path(target)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(self.target, f"cannot create the lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputError(self.target, f"another cai run is writing it ({holder or 'holder unknown'}); "
                                  "wait for it to end, or use another -o", exit_code=2) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_LOCKS:
                    raise OutputError(self.target, f"cannot lock {self.path}: this file system does not support "
                                      f"locks ({exc.strerror}); some network file systems do not. Pass `lock=False` "
                                      "if you are sure no other run writes this output", exit_code=2) from None
                raise OutputError(self.target, f"cannot lock {self.path}: {exc.strerror}", exit_code=2) from None
            try:
                here, now = os.fstat(fd), os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if (here.st_dev, here.st_ino) != (now.st_dev, now.st_ino):
                os.close(fd)            # released and removed by its holder after we opened it
                continue
            break
        since = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        except OSError as exc:
            # a disk already full (or a quota met) when the run starts: nothing is written yet,
            # so say so before anything loads, and leave no lock file behind (removed while held)
            self._fd = fd
            self.release()
            raise OutputError(self.target, f"cannot write the lock file {self.path}: "
                              f"{exc.strerror or exc}; nothing was written", exit_code=2) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    for _ in range(5):           # the holder writes its line just after locking
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 512).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.02)
    return ""


class Locks:
    """The locks of one run: its output and each side file that is not named after it."""

    def __init__(self, targets: list[str | None], enabled: bool = True):
        self.targets = [t for t in dict.fromkeys(targets) if enabled and lockable(t)]
        self._held: list[OutputLock] = []

    def __enter__(self) -> Locks:
        try:
            for target in self.targets:
                if any(held.path == lock_path(target) for held in self._held):
                    continue            # OUT.filtered.jsonl is covered by OUT's lock
                self._held.append(OutputLock(target).acquire())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._held:
            self._held.pop().release()
