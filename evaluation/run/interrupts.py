"""Stop long work that has no batch boundary to save at (the retention suite) at once on SIGTERM/SIGINT,
with a message that says what was kept and how to go on, instead of a bare kill or traceback."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

from evaluation.common.errors import HarnessError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(HarnessError):
    """Stopped by SIGTERM/SIGINT, keeping what was finished; the message says how to go on."""


class WorkInterrupted(Interrupted):
    """SIGTERM/SIGINT during work that keeps what it finished (e.g. the retention tasks already scored)."""


class SweepStopped(BaseException):
    """A signal stopped one job of a multirun. Raised past Hydra's launchers, which record an ``Exception``
    as a failed job and start the next one, so that the whole sweep stops as whoever sent the signal meant."""


@contextlib.contextmanager
def handling_signals(handler: Callable[[int, Any], None]) -> Iterator[bool]:
    """``handler`` for SIGTERM/SIGINT inside the block, the previous handlers after it. Only in the main
    thread (elsewhere signals cannot be caught); yields whether the handler was installed."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signals(message: Callable[[str], str]) -> Iterator[None]:
    """Inside the block, SIGTERM/SIGINT raise :class:`WorkInterrupted` with ``message(signal name)``."""

    def handle(signum: int, frame: Any) -> None:
        raise WorkInterrupted(message(signal.Signals(signum).name))

    with handling_signals(handle):
        yield
