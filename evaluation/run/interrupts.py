"""Stop long work that has no batch boundary to save at (the retention suite) at once on SIGTERM/SIGINT,
with a message that says what was kept and how to go on, instead of a bare kill or traceback.

In a submitit job (Hydra's submitit launchers) the scheduler's notice of a time limit or a preemption is
another signal (:func:`preemption_signal`); outside the stream submitit's own handler keeps it (it requeues the
job at once), and the stream takes it like SIGTERM (evaluation.run.stream_signals)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
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
def stop_when_orphaned(poll_s: float = 1.0) -> Iterator[None]:
    """Inside the block, SIGTERM this process as soon as its parent is gone (its parent's process id changes);
    a process left orphaned ends with the block, its line printed.

    For a job in a worker process of a launcher (Hydra's joblib launcher with n_jobs > 1): ``kill`` (SIGTERM) of
    the sweep's main process ends that process alone, and its workers would go on with nobody left to stop them
    or to take their results. This way the job stops as if the signal had reached it (checkpoint, one line) and
    the worker exits; the sweep's rerun with resume=auto continues the job. Not for a job run in the main
    process: a run started with ``nohup`` outlives its shell on purpose."""
    parent = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="stop-when-orphaned", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        if os.getppid() != parent:
            stop = sys.exc_info()[1]
            if stop is not None:
                print(f"error: {stop}\nThe sweep's main process had ended, so this job's worker ends too; rerun the "
                      f"sweep with resume=auto to continue it.", file=sys.stderr)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2 if stop is not None else 0)  # nobody is left to take a result or give another job


class RepeatOfAStop:
    """The handler a stop leaves behind for ``window`` seconds: the same signal again (``timeout`` around ``make``
    signals both, and make passes it on to the run) is the stop already under way and is ignored, so the run
    still says in one line why it stopped; a later one gets the handler from before, as if this were not here."""

    def __init__(self, previous: Any, window: float) -> None:
        self.previous = previous
        self.until = time.monotonic() + window

    def __call__(self, signum: int, frame: Any) -> None:
        if time.monotonic() < self.until:
            return
        signal.signal(signum, self.previous)
        if callable(self.previous):
            self.previous(signum, frame)
        else:  # the default action (or none, where ignored), delivered again under it
            os.kill(os.getpid(), signum)


@contextlib.contextmanager
def stop_on_signals(message: Callable[[str], str], repeat_window: float = 1.0) -> Iterator[None]:
    """Inside the block, SIGTERM/SIGINT raise :class:`WorkInterrupted` with ``message(signal name)``; a repeat
    within ``repeat_window`` seconds is the same stop (:class:`RepeatOfAStop`), also after the block."""
    stopped: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        if stopped:
            return  # the same stop delivered twice, while the first is still unwinding
        stopped.append(signum)
        raise WorkInterrupted(message(signal.Signals(signum).name))

    previous: dict[int, Any] = {}
    try:
        with handling_signals(handle) as previous:
            yield
    finally:
        if stopped:
            for sig, old in previous.items():
                signal.signal(sig, RepeatOfAStop(old if old is not None else signal.SIG_DFL, repeat_window))
