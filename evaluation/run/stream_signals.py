"""SIGTERM/SIGINT in the lifelong stream: stop at the next batch boundary after a checkpoint.

While editing, a signal is a request: the batch in flight finishes, ``state.good`` is saved and the
stream stops with :class:`~evaluation.run.checkpoint.StreamInterrupted` (a second signal stops at once).
The final evaluation has no boundary: a signal there stops at once, saying where the edits are saved.

In a submitit job the scheduler's notice of a time limit or preemption
(:func:`~evaluation.run.interrupts.preemption_signal`) is the same request, but the stream then hands the
job back to submitit's own handler, which requeues it with the same overrides (with ``resume=auto`` the
next job continues from that checkpoint); a second notice hands it back at once, from the newest checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any, Callable

from evaluation.run.callbacks import Saver
from evaluation.run.checkpoint import StreamInterrupted
from evaluation.run.interrupts import (
    SIGNALS,
    handling_signals,
    preemption_signal,
    requeue_reason,
    stop_on_signals,
)
from evaluation.run.stream_state import Callback, StreamState

log = logging.getLogger(__name__)


class SignalGuard:
    """SIGTERM/SIGINT become a request to stop at the next batch boundary; a second one stops at once.

    A repeat within ``repeat_window`` seconds is the same stop delivered twice (``timeout`` signals
    its whole process group and ``make`` forwards the signal to its child), so it is ignored.
    ``on_first`` is told the first signal's name (the stream's loop reads it at the next boundary).
    In a submitit job the guard also takes submitit's notice (``preemption``) and keeps submitit's handler
    for it, which :meth:`hand_over` calls.
    """

    def __init__(self, enabled: bool, repeat_window: float = 1.0,
                 on_first: Callable[[str], object] | None = None) -> None:
        self.enabled = enabled
        self.repeat_window = repeat_window
        self.on_first = on_first
        self.received: str | None = None
        self._received_at = 0.0
        self._handlers = contextlib.ExitStack()
        self.preemption = preemption_signal() if enabled else None
        self._replaced: dict[int, Any] = {}  # the handlers from before the guard, submitit's among them

    def __enter__(self) -> "SignalGuard":
        if self.enabled:
            signals = SIGNALS if self.preemption is None else (*SIGNALS, self.preemption)
            self._replaced = self._handlers.enter_context(handling_signals(self._handle, signals))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handlers.close()

    @staticmethod
    def _say(text: str) -> None:
        # os.write, not logging: the signal may interrupt a write to the same buffered stream, and a
        # second buffered write from the handler would fail as a reentrant call
        os.write(2, f"{text}\n".encode())

    @property
    def preempted(self) -> bool:
        """The first signal was submitit's notice: the job is to be requeued, not stopped."""
        return self.preemption is not None and self.received == self.preemption.name

    def can_hand_over(self) -> bool:
        return self.preemption is not None and callable(self._replaced.get(self.preemption))

    def hand_over(self) -> None:
        """Restore the handlers from before and call submitit's handler for its notice: it writes the same job
        back to its pickle, requeues it and exits (raises SystemExit), or raises ``UncompletedJobError`` where
        it will not requeue (e.g. after ``max_num_timeout`` time limits)."""
        handler = self._replaced.get(self.preemption) if self.preemption is not None else None
        self.__exit__(None, None, None)  # SIGTERM from the requeue itself is submitit's again, not a second stop
        if callable(handler):
            handler(self.preemption, None)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._received_at < self.repeat_window:
                return
            if signum == self.preemption and self.can_hand_over():
                self._say(f"second {name}: requeueing now, from the newest checkpoint on disk")
                self.hand_over()
            self._say(f"second {name}: stopping now, without a new checkpoint")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = name
        self._received_at = time.monotonic()
        if self.on_first is not None:
            self.on_first(name)
        then, again = ("handing the job back to submitit to requeue", "requeue") if self.preempted else (
            "stopping", "stop")
        self._say(f"{name} received: finishing the current batch, saving a checkpoint, then {then} "
                  f"(send it again to {again} at once)")


class _CurvePointStopped(BaseException):
    """A signal came during a curve point (``started``; raised from the handler), which is given up at once, or
    before it, while the batch before it was edited. A BaseException, as KeyboardInterrupt: no ``except
    Exception`` on the way may take it for an error of its own."""

    def __init__(self, started: bool) -> None:
        super().__init__()
        self.started = started


class StopOnSignals(Callback):
    """SIGTERM/SIGINT while editing finish the batch, save ``state.good`` and stop with
    :class:`StreamInterrupted` (a second signal stops at once). During a curve point on the way (on a long
    stream one can take hours) they stop at once: the edits before it are saved with the point owed, and the
    resumed run evaluates it first. During the final evaluation they stop at once with a message that says
    where the edits are saved. ``enabled=False``: handlers stay as they are. submitit's notice to a job (time
    limit, preemption) saves the same way, then submitit requeues the job."""

    def __init__(self, saver: Saver, enabled: bool = True, repeat_window: float = 1.0) -> None:
        self.saver, self.enabled, self.repeat_window = saver, enabled, repeat_window
        self.guard: SignalGuard | None = None
        self._final = contextlib.ExitStack()

    def on_stream_start(self, state: StreamState) -> None:
        # the handler sets state.stop itself: the loop sees a signal at the very next boundary
        self.guard = SignalGuard(self.enabled, self.repeat_window, on_first=self._stop_at_boundary(state))
        self.guard.__enter__()

    def on_edits_end(self, state: StreamState) -> None:
        guard = self.guard
        if guard is not None and guard.received is not None:
            raise self._stopped(state, guard, f"after {state.good.position} of {state.n} edits")
        self._release()  # the end checkpoint is written under the handlers from before the stream, as always

    def on_evaluation_start(self, state: StreamState, upto: int) -> None:
        if self.enabled and upto == state.n:  # only the final evaluation covers every edit
            self._final.enter_context(stop_on_signals(functools.partial(self._final_message, state.n)))
        elif state.evaluating == "curve" and self.guard is not None:
            if self.guard.received is not None:  # the signal came while the batch before the point was edited
                raise _CurvePointStopped(started=False)
            self.guard.on_first = functools.partial(self._stop_point, state)

    def on_evaluation_end(self, state: StreamState, upto: int, point: dict[str, float]) -> None:
        self._final.close()
        if self.guard is not None:
            self.guard.on_first = self._stop_at_boundary(state)

    def on_exception(self, state: StreamState, err: BaseException) -> BaseException | None:
        guard = self.guard
        stopped = None
        if isinstance(err, _CurvePointStopped) and guard is not None and guard.received is not None:
            # state.good is the boundary before the point, the point owed (CurvePoints commits it so)
            at, owed = f"{state.good.position} of {state.n} edits", "it is evaluated first when the run goes on"
            stopped = self._stopped(state, guard, f"during the curve point at {at} ({owed})" if err.started else
                                    f"after {at} (the curve point due there is owed: {owed})")
        self._release()
        self._final.close()
        return stopped

    @staticmethod
    def _stop_at_boundary(state: StreamState) -> Callable[[str], None]:
        """The guard's first-signal action while editing: the loop sees ``state.stop`` at the next boundary."""
        return functools.partial(setattr, state, "stop")

    def _stop_point(self, state: StreamState, name: str) -> None:
        state.stop = name
        SignalGuard._say(f"{name} received during a curve point: giving it up, saving the edits before it")
        raise _CurvePointStopped(started=True)

    def _stopped(self, state: StreamState, guard: SignalGuard, when: str) -> StreamInterrupted:
        """Save ``state.good`` (for a requeue where submitit's notice came) and say where it is."""
        good, name = state.good, str(guard.received)
        if guard.preempted:  # saved even where a periodic save is there: the reason tells the requeued job
            path = self.saver.save(good, requeue_reason(name))
        else:
            path = self.saver.saved_at(good.position) or self.saver.save(good, f"signal {name}")
        message = f"stopped by {name} {when}. {self.saver.note(path, good.position)}"
        if guard.preempted and guard.can_hand_over():
            message = self._requeue(guard, message)  # returns only where submitit does not requeue
        return StreamInterrupted(message)

    def _requeue(self, guard: SignalGuard, message: str) -> str:
        """submitit requeues the job with the same overrides (it exits here); the message where it will not."""
        # only reached in a submitit job
        from submitit.core.utils import UncompletedJobError

        self.guard = None
        log.warning("%s Handing the job back to submitit to requeue: the requeued job continues from this "
                    "checkpoint (evaluation.run.resume_rules.saved_for_a_requeue)", message)
        try:
            guard.hand_over()
        except UncompletedJobError as err:  # e.g. more time limits than hydra.launcher.max_num_timeout
            return f"{message} submitit did not requeue the job: {err}"
        return message

    def _final_message(self, n: int, sig: str) -> str:
        end = self.saver.saved_at(n) if self.saver.every else None
        return f"stopped by {sig} during the final evaluation of {n} edits. {self.saver.note(end, n)}"

    def _release(self) -> None:
        if self.guard is not None:
            self.guard.__exit__(None, None, None)
            self.guard = None
