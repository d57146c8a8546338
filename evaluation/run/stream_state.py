"""What the lifelong loop shares with its callbacks: the stream's state, the result, the hook interface.

:class:`StreamState` is the one object a callback reads and changes: the position, the batch in
flight, the last good point of the stream (``good``, a :class:`~evaluation.run.checkpoint.StreamCheckpoint`
held in memory: what a stop or a failure saves) and the result so far. :class:`Callback` lists the
hooks, in the order the loop (:class:`evaluation.run.stream.Stream`) calls them; :class:`CallbackList`
calls one hook on every callback, in list order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from data.requests import EditRequest
from evaluation.editing.editor import Editor, EditStats
from evaluation.run.checkpoint import StreamCheckpoint, rng_states, to_cpu


@dataclass
class StreamResult:
    metrics: dict[str, float]
    curves: list[dict[str, Any]] = field(default_factory=list)
    #: one entry per curve point: each batch's reliability and generalization (evaluation.run.forgetting)
    forgetting: list[dict[str, Any]] = field(default_factory=list)
    #: the generated answers of the edit-time points and the final evaluation, one row per prompt
    #: (evaluation.run.metrics.evaluate_edits' ``answers_out`` rows, with "at" and "edits")
    answers: list[dict[str, Any]] = field(default_factory=list)
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0
    #: at each curve point and the end: the edits done and the seconds spent editing and evaluating so far (timings,
    #: so kept apart from ``curves``, which a resumed run reproduces exactly)
    costs: list[dict[str, float]] = field(default_factory=list)
    #: batches skipped under ``on_nan=skip``: their uids, prompts, edit range, loss and what was wrong
    skipped: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None  # position of the checkpoint the stream continued from
    #: the run's wall seconds in its earlier processes (resumed; None: a checkpoint from before this record)
    wall_before: float | None = 0.0
    wall_start: float = field(default_factory=time.perf_counter)  # when this process's run began

    def wall_seconds(self) -> float | None:
        """The run's wall seconds so far, over all its processes (None where an earlier part is unknown)."""
        return None if self.wall_before is None else self.wall_before + time.perf_counter() - self.wall_start


class Callback:
    """One concern of the stream (checkpoints, guards, curve points, signals, logging, progress).

    Every hook does nothing here; a callback overrides the ones it needs. Order of calls: on_stream_start;
    per batch on_batch_start, ``editor.edit``, on_batch_end, (``state.good`` taken) on_boundary;
    on_edits_end; then, unless the resumed stream was evaluated before, on_stream_end. Every evaluation
    (a curve point or the final one) is between on_evaluation_start and on_evaluation_end.
    """

    def on_stream_start(self, state: StreamState) -> None:
        """Before the first batch (a resumed stream is already restored)."""

    def on_batch_start(self, state: StreamState) -> None:
        """``state.batch`` is about to be edited."""

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        """``state.batch`` is edited (``state.position`` counts it): check it, log it, take curve points."""

    def on_boundary(self, state: StreamState) -> None:
        """``state.good`` now holds the stream after the batch: the place to save it."""

    def on_evaluation_start(self, state: StreamState, upto: int) -> None:
        """The first ``upto`` edits are about to be evaluated (``upto == state.n``: the final evaluation)."""

    def on_evaluation_end(self, state: StreamState, upto: int, point: dict[str, float]) -> None:
        """The first ``upto`` edits were evaluated: ``point`` holds their metrics."""

    def on_edits_end(self, state: StreamState) -> None:
        """The edit loop is over: every edit is done, or ``state.stop`` was set."""

    def on_stream_end(self, state: StreamState) -> None:
        """After the edit loop, unless the resumed stream was evaluated before: the final evaluation."""

    def on_exception(self, state: StreamState, err: BaseException) -> BaseException | None:
        """``err`` ends the stream; release what is held. Returns the error to raise instead, if any."""
        return None


class CallbackList(Callback):
    """Calls each hook on every callback, in list order (the order is part of the behaviour)."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def _each(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_stream_start(self, state: StreamState) -> None:
        self._each("on_stream_start", state)

    def on_batch_start(self, state: StreamState) -> None:
        self._each("on_batch_start", state)

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        self._each("on_batch_end", state, stats)

    def on_boundary(self, state: StreamState) -> None:
        self._each("on_boundary", state)

    def on_evaluation_start(self, state: StreamState, upto: int) -> None:
        self._each("on_evaluation_start", state, upto)

    def on_evaluation_end(self, state: StreamState, upto: int, point: dict[str, float]) -> None:
        self._each("on_evaluation_end", state, upto, point)

    def on_edits_end(self, state: StreamState) -> None:
        self._each("on_edits_end", state)

    def on_stream_end(self, state: StreamState) -> None:
        self._each("on_stream_end", state)

    def on_exception(self, state: StreamState, err: BaseException) -> BaseException | None:
        # every callback sees the error (each releases what it holds); the first replacement wins
        replacement = None
        for cb in self.callbacks:
            found = cb.on_exception(state, err)
            replacement = replacement or found
        return replacement


@dataclass
class StreamState:
    """The stream so far, shared by the loop and its callbacks."""

    editor: Editor
    requests: Sequence[EditRequest]
    result: StreamResult = field(default_factory=lambda: StreamResult(metrics={}))
    position: int = 0  # edits done
    batch: Sequence[EditRequest] = ()  # the batch in flight, or just edited
    batch_start: int = 0  # edits done before it
    #: CPU copy of the editor state to keep after the batch (None: the editor's state, copied when needed)
    kept: dict[str, Any] | None = None
    #: the last good point: the state, RNG and record a stop or a failure saves (and on_nan=skip restores)
    good: StreamCheckpoint | None = None
    curve_due: bool = False  # a curve point at ``position`` is owed
    problem: str | None = None  # what was wrong with the batch just edited (set by the NaN/inf guard)
    stop: str | None = None  # set by a callback: stop at the next batch boundary (the callback ends the stream)
    evaluated: dict[str, float] | None = None  # final metrics of a resumed stream that was evaluated before
    evaluating: str | None = None  # the evaluation under way: curve | edit_time | final (None: none)
    #: every callback of the stream: lets a callback announce an evaluation to the others
    hooks: Callback = field(default_factory=Callback)

    @property
    def n(self) -> int:
        return len(self.requests)

    @property
    def batch_size(self) -> int:
        return self.editor.batch_size

    def next_batch(self) -> None:
        self.batch_start, self.batch = self.position, self.requests[self.position:self.position + self.batch_size]
        self.kept, self.problem, self.curve_due = None, None, False

    def keep(self) -> dict[str, Any]:
        """The editor state to keep, copied to the CPU once per batch (a snapshot no later step can alias)."""
        if self.kept is None:
            self.kept = to_cpu(self.editor.state_dict())
        return self.kept

    def snapshot(self, final_metrics: dict[str, float] | None = None) -> StreamCheckpoint:
        """The stream now, as a checkpoint to save (its data hash and reason are set when saved)."""
        r = self.result
        return StreamCheckpoint(position=self.position, editor_state=self.keep(), rng=rng_states(),
                                curves=list(r.curves), edit_seconds=r.edit_seconds, eval_seconds=r.eval_seconds,
                                skipped=list(r.skipped), curve_due=self.curve_due, final_metrics=final_metrics,
                                forgetting=list(r.forgetting), answers=list(r.answers),
                                wall_seconds=r.wall_seconds(), costs=list(r.costs))

    def commit(self) -> None:
        """Make the stream now the last good point."""
        self.good = self.snapshot()
