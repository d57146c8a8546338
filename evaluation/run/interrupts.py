"""Stop long work that has no batch boundary to save at (the retention suite) at once on SIGTERM/SIGINT,
with a message that says what was kept and how to go on, instead of a bare kill or traceback.

In a submitit job (Hydra's submitit launchers) the scheduler's notice of a time limit or a preemption is
another signal (:func:`preemption_signal`); outside the stream submitit's own handler keeps it (it requeues the
job at once), and the stream takes it like SIGTERM (evaluation.run.stream_signals)."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

from evaluation.common.errors import HarnessError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(HarnessError):
    """Stopped by SIGTERM/SIGINT, keeping what was finished; the message says how to go on."""


class WorkInterrupted(Interrupted):
    """SIGTERM/SIGINT during work that keeps what it finished (e.g. the retention tasks already scored)."""


class SweepStopped(BaseException):
    """A signal stopped one job of a multirun. Raised past Hydra's launchers, which record an ``Exception``
    as a failed job and start the next one, so that the whole sweep stops as whoever sent the signal meant."""


def preemption_signal() -> signal.Signals | None:
    """The signal submitit sends a job before its time limit and, where the cluster is set to, before a
    preemption (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` names another); None outside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # set in every submitit job, by any of its executors
        return None
    from submitit.core.job_environment import JobEnvironment

    return signal.Signals(JobEnvironment._usr_sig())  # submitit's own reading of the name: no second copy


def requeue_reason(signal_name: str) -> str:
    """The reason a checkpoint saved on submitit's notice records (the requeued job looks for it)."""
    return f"requeue on {signal_name}"


@contextlib.contextmanager
def handling_signals(handler: Callable[[int, Any], None],
                     signals: Sequence[signal.Signals] = SIGNALS) -> Iterator[dict[int, Any]]:
    """``handler`` for ``signals`` (SIGTERM/SIGINT) inside the block, the previous handlers after it. Only in
    the main thread (elsewhere signals cannot be caught); yields the handlers it replaced (none elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield dict(previous)
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
