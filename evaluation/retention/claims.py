"""Lock files that let concurrent runs share one retention cache without generating a task twice.

A sweep's parallel jobs (Hydra's joblib or submitit launchers) all start with the unedited model's
suite. Before generating a task, a run claims it by creating ``<task file>.lock`` exclusively; a run
that finds the task claimed does its other tasks first and then reads the claimed one back once
its holder has stored it. A live holder refreshes its lock's modification time every
``heartbeat_seconds``; a lock whose holder died (same host, process gone) or whose heartbeat is older
than ``stale_seconds`` (another host) is taken over, by one run at a time (``<lock>.takeover``), which
checks that the lock is still the one it judged stale: when two runs judge one lock stale at once,
the second would otherwise delete the first's new lock, and both would generate the task.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0
TAKEOVER_STALE_SECONDS = 30.0  # a takeover takes microseconds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder(lock: str) -> dict[str, Any] | None:
    """The lock's content (host, pid, since), or None when there is no lock or it cannot be read."""
    try:
        with open(lock, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _identity(path: str) -> tuple[int, int, Any]:
    """What tells one lock file from a later one at the same path: inode, heartbeat time and content."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, holder(path)


def _stale_identity(lock: str, stale_seconds: float) -> tuple[int, int, Any] | None:
    """The lock's identity when its holder is known dead or its heartbeat is older than ``stale_seconds``."""
    try:
        ident = _identity(lock)
    except FileNotFoundError:
        return None
    info = ident[2]
    if isinstance(info, dict) and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if not _pid_alive(info["pid"]):
            return ident
    return ident if time.time() - ident[1] / 1e9 > stale_seconds else None


def is_stale(lock: str, stale_seconds: float = STALE_SECONDS) -> bool:
    """True when the lock's holder is known dead or its heartbeat is older than ``stale_seconds``."""
    return _stale_identity(lock, stale_seconds) is not None


def take_over(lock: str, judged: tuple[int, int, Any]) -> bool:
    """Remove ``lock`` if it is still the file judged stale (``judged``: its identity then).

    Runs under ``<lock>.takeover``, created exclusively, so that of several runs that judged one lock
    stale only one removes it, and a run acting on an old look cannot remove the lock created since.
    False when another run is taking it over, or has replaced it: the caller treats the task as held.
    """
    mutex = lock + ".takeover"
    try:
        fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:  # held for microseconds; an old one was left by a run killed while holding it
            if time.time() - os.path.getmtime(mutex) > TAKEOVER_STALE_SECONDS:
                os.remove(mutex)
        except FileNotFoundError:
            pass
        return False
    os.close(fd)
    try:
        try:
            if _identity(lock) != judged:
                return False
            os.remove(lock)
        except FileNotFoundError:
            pass  # released meanwhile: the exclusive create decides who holds it
        return True
    finally:
        os.remove(mutex)


class Claim:
    """A held lock; refreshes its heartbeat in a daemon thread until :meth:`release`."""

    def __init__(self, lock: str, heartbeat_seconds: float):
        self.lock = lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_seconds,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.lock)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            os.remove(self.lock)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(lock: str, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
          stale_seconds: float = STALE_SECONDS) -> Claim | None:
    """Create ``lock`` exclusively and return its :class:`Claim`; None while another live run holds it."""
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            judged = _stale_identity(lock, stale_seconds)
            if judged is None or not take_over(lock, judged):
                return None
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        return Claim(lock, heartbeat_seconds)
    return None
