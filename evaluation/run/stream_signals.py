"""SIGTERM/SIGINT in the lifelong stream: stop at the next batch boundary after a checkpoint.

While editing, a signal is a request: the batch in flight finishes, ``state.good`` is saved and the
stream stops with :class:`~evaluation.run.checkpoint.StreamInterrupted` (a second signal stops at once).
The final evaluation has no boundary: a signal there stops at once, saying where the edits are saved.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from typing import Callable

from evaluation.run.callbacks import Saver
from evaluation.run.checkpoint import StreamInterrupted
from evaluation.run.interrupts import handling_signals, stop_on_signals
from evaluation.run.stream_state import Callback, StreamState


class SignalGuard:
    """SIGTERM/SIGINT become a request to stop at the next batch boundary; a second one stops at once.

    A repeat within ``repeat_window`` seconds is the same stop delivered twice (``timeout`` signals
    its whole process group and ``make`` forwards the signal to its child), so it is ignored.
    ``on_first`` is told the first signal's name (the stream's loop reads it at the next boundary).
    """

    def __init__(self, enabled: bool, repeat_window: float = 1.0,
                 on_first: Callable[[str], object] | None = None) -> None:
        self.enabled = enabled
        self.repeat_window = repeat_window
        self.on_first = on_first
        self.received: str | None = None
        self._received_at = 0.0
        self._handlers = contextlib.ExitStack()

    def __enter__(self) -> "SignalGuard":
        if self.enabled:
            self._handlers.enter_context(handling_signals(self._handle))
        return self

    def __exit__(self, *exc: object) -> None:
        self._handlers.close()

    @staticmethod
    def _say(text: str) -> None:
        # os.write, not logging: the signal may interrupt a write to the same buffered stream, and a
        # second buffered write from the handler would fail as a reentrant call
        os.write(2, f"{text}\n".encode())

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._received_at < self.repeat_window:
                return
            self._say(f"second {name}: stopping now, without a new checkpoint")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = name
        self._received_at = time.monotonic()
        if self.on_first is not None:
            self.on_first(name)
        self._say(f"{name} received: finishing the current batch, saving a checkpoint, then stopping "
                  f"(send it again to stop at once)")


class StopOnSignals(Callback):
    """SIGTERM/SIGINT while editing finish the batch, save ``state.good`` and stop with
    :class:`StreamInterrupted` (a second signal stops at once); during the final evaluation they stop at
    once with a message that says where the edits are saved. ``enabled=False``: handlers stay as they are."""

    def __init__(self, saver: Saver, enabled: bool = True, repeat_window: float = 1.0) -> None:
        self.saver, self.enabled, self.repeat_window = saver, enabled, repeat_window
        self.guard: SignalGuard | None = None
        self._final = contextlib.ExitStack()

    def on_stream_start(self, state: StreamState) -> None:
        # the handler sets state.stop itself: the loop sees a signal at the very next boundary
        self.guard = SignalGuard(self.enabled, self.repeat_window, on_first=functools.partial(setattr, state, "stop"))
        self.guard.__enter__()

    def on_edits_end(self, state: StreamState) -> None:
        received = self.guard.received if self.guard is not None else None
        if received is not None:
            good = state.good
            path = self.saver.saved_at(good.position) or self.saver.save(good, f"signal {received}")
            raise StreamInterrupted(f"stopped by {received} after {good.position} of {state.n} edits. "
                                    f"{self.saver.note(path, good.position)}")
        self._release()  # the end checkpoint is written under the handlers from before the stream, as always

    def on_evaluation_start(self, state: StreamState, upto: int) -> None:
        if self.enabled and upto == state.n:  # only the final evaluation covers every edit
            self._final.enter_context(stop_on_signals(functools.partial(self._final_message, state.n)))

    def on_evaluation_end(self, state: StreamState, upto: int, point: dict[str, float]) -> None:
        self._final.close()

    def on_exception(self, state: StreamState, err: BaseException) -> BaseException | None:
        self._release()
        self._final.close()
        return None

    def _final_message(self, n: int, sig: str) -> str:
        end = self.saver.saved_at(n) if self.saver.every else None
        return f"stopped by {sig} during the final evaluation of {n} edits. {self.saver.note(end, n)}"

    def _release(self) -> None:
        if self.guard is not None:
            self.guard.__exit__(None, None, None)
            self.guard = None
