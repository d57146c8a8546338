"""The lifelong loop: the only place edits are applied, one batch after another, to one model.

:class:`Stream` runs the loop: take the next batch, ``editor.edit`` it, call the hooks of its callbacks
(:mod:`evaluation.run.callbacks`, :mod:`evaluation.run.stream_signals`), which do everything else;
:func:`run_stream` assembles the default ones, in an order that is part of the behaviour.

Long runs survive: with a :class:`~evaluation.run.checkpoint.CheckpointManager` the loop saves the editor's
state, the position, the curves and the RNG states every ``checkpoint.every`` edits (at batch boundaries)
and at the end of the edit loop. SIGTERM/SIGINT finish the current batch, save a checkpoint and stop with
:class:`~evaluation.run.checkpoint.StreamInterrupted` (a second signal stops at once). ``resume=`` continues
from a checkpoint exactly as if the stream had never stopped.

Every curve point also records how each earlier batch of ``editor.batch_size`` edits is held
(``StreamResult.forgetting``, see :mod:`evaluation.run.forgetting`), from the same evaluation pass; the
record travels in the checkpoints like the curves.

A batch whose loss (or whose resulting editor state) is NaN/inf is handled by ``on_nan``: ``stop`` saves
the state from before the batch and raises :class:`~evaluation.run.checkpoint.NonFiniteLoss` naming the
batch; ``skip`` restores the state from before the batch, records the batch in ``StreamResult.skipped``
and goes on. Running out of memory saves the last good state and raises
:class:`~evaluation.run.checkpoint.EditOutOfMemory`, which says what to lower.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.editor import Editor, check_batch_limit
from evaluation.run.answer_metrics import AnswerScorer, BaseAnswers
from evaluation.run.callbacks import (
    ON_NAN,
    Checkpointing,
    CurvePoints,
    LogMetrics,
    NonFiniteGuard,
    OutOfMemoryGuard,
    ProgressBar,
    Saver,
    is_out_of_memory,
)
from evaluation.run.checkpoint import (
    CheckpointManager,
    StreamCheckpoint,
    data_hash,
    restore_rng,
)
from evaluation.run.loggers import NullLogger
from evaluation.run.metrics import RowPredictions, evaluate_edits
from evaluation.run.stream_signals import SignalGuard as _SignalGuard
from evaluation.run.stream_signals import StopOnSignals
from evaluation.run.stream_state import (
    Callback,
    CallbackList,
    StreamResult,
    StreamState,
)

__all__ = ["ON_NAN", "Stream", "StreamResult", "StreamState", "_SignalGuard", "evaluate_edits", "is_out_of_memory",
           "run_stream"]

log = logging.getLogger(__name__)


class Stream:
    """The edit loop over ``state.requests``; ``callbacks`` (in this order) see every step through their hooks."""

    def __init__(self, state: StreamState, callbacks: Sequence[Callback]) -> None:
        self.state = state
        self.hooks = state.hooks = CallbackList(callbacks)

    def run(self) -> StreamResult:
        state, hooks = self.state, self.hooks
        try:
            state.commit()  # the point a failure before the first batch falls back to
            hooks.on_stream_start(state)
            while state.position < state.n and state.stop is None:
                state.next_batch()
                hooks.on_batch_start(state)
                start = time.perf_counter()
                stats = state.editor.edit(state.batch)
                state.result.edit_seconds += time.perf_counter() - start
                state.position += len(state.batch)
                hooks.on_batch_end(state, stats)
                state.commit()
                hooks.on_boundary(state)
            hooks.on_edits_end(state)
            if state.evaluated is not None:  # its curve point came with the checkpoint
                state.result.metrics = dict(state.evaluated)
                log.info("the stream was evaluated after all %d edits before; using those metrics", state.n)
            else:
                hooks.on_stream_end(state)
        except BaseException as err:
            replacement = hooks.on_exception(state, err)
            if replacement is None:
                raise
            raise replacement from None
        return state.result


def _evaluate_edits(*args: Any, **kwargs: Any) -> dict[str, float]:
    # looked up when called, so that wrapping evaluation.run.stream.evaluate_edits (tests do) takes effect
    return evaluate_edits(*args, **kwargs)


def run_stream(editor: Editor, requests: Sequence[EditRequest], base_locality: Sequence[RowPredictions],
               logger: NullLogger, eval_every: int = 0, eval_batch_size: int = 32,
               progress: bool = True, *, checkpoints: CheckpointManager | None = None,
               resume: StreamCheckpoint | None = None, on_nan: str = "stop",
               handle_signals: bool = True, started: float | None = None, scorer: AnswerScorer | None = None,
               base_answers: BaseAnswers | None = None, edit_time: bool = False,
               eval_at: Sequence[int] = (), evaluation_parts_s: float = 60.0) -> StreamResult:
    """Edit ``requests`` in batches of ``editor.batch_size``; evaluate every ``eval_every`` edits, after the edit
    counts in ``eval_at`` (each at the batch boundary that reaches it) and at the end.

    ``checkpoints``: where and how often to save (None: never, not even on a signal).
    ``resume``: a checkpoint of this stream to continue from. ``on_nan``: ``stop`` or ``skip``.
    ``started``: ``time.perf_counter()`` when the run began (checkpoints keep its wall time so far).
    ``scorer``/``base_answers``: also score generated answers; ``edit_time``: score each batch right after it
    is edited (:class:`~evaluation.run.callbacks.CurvePoints`). ``evaluation_parts_s``: with ``checkpoints``, curve
    points and the final evaluation save the batches done every so many seconds (0: never), and a resumed run
    reads back those of the point it stopped in (evaluation.common.evaluation_parts).
    """
    saver = Saver(checkpoints, requests)
    nan_guard = NonFiniteGuard(saver, on_nan)  # refuses a bad on_nan first
    bs = editor.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:  # the rule where the batch size is used
        raise ConfigError(f"editor.batch_size must be a positive integer, got {bs!r}")
    check_batch_limit(type(editor), getattr(editor, "config", None), len(requests))  # run_experiment: before the model
    state = StreamState(editor, requests)
    if started is not None:
        state.result.wall_start = started
    if resume is not None:
        _restore(state, resume)
        if checkpoints is not None:
            checkpoints.last_saved = state.position
        log.info("resuming the stream after %d of %d edits from %s", state.position, state.n, resume.path)
    # the order is part of the behaviour: e.g. the guards judge a batch before it is logged or evaluated, the
    # signal handlers are up before a resumed run's owed curve point (CurvePoints.on_stream_start), and the end
    # checkpoint is written before the final evaluation's signal handlers are set
    callbacks = [OutOfMemoryGuard(saver, eval_batch_size), ProgressBar(progress), nan_guard, LogMetrics(logger),
                 StopOnSignals(saver, handle_signals),
                 CurvePoints(base_locality, eval_every, eval_batch_size, progress, evaluate=_evaluate_edits,
                             scorer=scorer, base_answers=base_answers, edit_time=edit_time, at=eval_at,
                             parts_root=checkpoints.parts_dir if checkpoints is not None and evaluation_parts_s > 0
                             else None, parts_every_s=evaluation_parts_s),
                 Checkpointing(saver)]
    return Stream(state, callbacks).run()


def _restore(state: StreamState, ckpt: StreamCheckpoint) -> None:
    """Load ``ckpt`` into the editor and the stream's state."""
    n, result = state.n, state.result
    if ckpt.position > n:
        raise ConfigError(f"the checkpoint {ckpt.path} is after {ckpt.position} edits but this stream has only "
                          f"{n}; set dataset.num_edits to at least {ckpt.position}")
    if ckpt.data_hash and ckpt.data_hash != data_hash(state.requests[:ckpt.position]):
        raise ConfigError(f"the first {ckpt.position} edits of this run differ from those in the checkpoint "
                          f"{ckpt.path}: resume with the same dataset (dataset.name, dataset.path)")
    state.editor.load_state_dict(ckpt.editor_state)
    restore_rng(ckpt.rng)
    result.curves = list(ckpt.curves)
    result.forgetting = list(ckpt.forgetting)
    result.answers = list(ckpt.answers)
    result.costs = list(ckpt.costs)
    # a checkpoint made before the record existed (edit-time points add forgetting points without a curve point,
    # so the two counts differ in every checkpoint since: only a record missing outright is news)
    if result.curves and not result.forgetting:
        log.warning("the checkpoint %s holds %d curve points but no forgetting record: the forgetting record of "
                    "this run starts after it", ckpt.path, len(result.curves))
    result.skipped = list(ckpt.skipped)
    result.edit_seconds, result.eval_seconds = ckpt.edit_seconds, ckpt.eval_seconds
    result.resumed_from = state.position = ckpt.position
    result.wall_before = ckpt.wall_seconds
    state.curve_due = ckpt.curve_due
    if ckpt.position == n and ckpt.final_metrics is not None:  # evaluated before: the metrics are kept
        state.evaluated = ckpt.final_metrics
