"""The stream's concerns, one callback each (hooks: :class:`evaluation.run.stream_state.Callback`).

- :class:`Checkpointing`: saves every ``checkpoint.every`` edits at batch boundaries and at the end;
- :class:`NonFiniteGuard`: a NaN/inf loss or editor state stops the stream (``on_nan=stop``) or is undone;
- :class:`OutOfMemoryGuard`: out of memory while editing or evaluating saves the last good point and
  says what to lower;
- :class:`CurvePoints`: evaluates every ``eval_every`` edits and at the end (curves, forgetting record);
- :class:`StopOnSignals`: SIGTERM/SIGINT stop at the next batch boundary after a checkpoint;
- :class:`LogMetrics` and :class:`ProgressBar`: per-batch stats and curve points to the logger, the bar.

:class:`Saver` writes the checkpoints for those that save, and words where they are for messages.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.common.evaluation_parts import EvaluationParts
from evaluation.editing.editor import EditStats
from evaluation.run.answer_metrics import AnswerScorer, BaseAnswers
from evaluation.run.checkpoint import (
    CheckpointManager,
    EditOutOfMemory,
    NonFiniteLoss,
    StreamCheckpoint,
    checkpoint_name,
    data_hash,
    non_finite,
    restore_rng,
    state_digest,
    to_cpu,
)
from evaluation.run.forgetting import batch_point
from evaluation.run.loggers import NullLogger
from evaluation.run.metrics import RowPredictions, evaluate_edits
from evaluation.run.stream_state import Callback, StreamState

# the stream's records keep the logger name they have always had in run.log
log = logging.getLogger("evaluation.run.stream")

ON_NAN = ("stop", "skip")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS out-of-memory errors, and CPU allocation failures."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _describe(batch: Sequence[EditRequest], start: int) -> str:
    prompts = "; ".join(repr(r.prompt[:80]) for r in batch[:4]) + ("; ..." if len(batch) > 4 else "")
    return (f"edits {start + 1}..{start + len(batch)} (uids {[r.uid for r in batch]}, prompts: {prompts})")


def _problem(stats: EditStats) -> str | None:
    if stats.iterations > 0 and not math.isfinite(stats.loss):  # 0 iterations: nothing trained, no loss
        return f"non-finite loss ({stats.loss})"
    return None


class Saver:
    """Saves stream checkpoints through ``manager`` (None: never, not even on a stop) and words where
    they are. Where the disk refuses it says so and the stream goes on: the state is still in memory, the
    next save tries again, and the checkpoints already on disk are untouched (atomic writes)."""

    def __init__(self, manager: CheckpointManager | None, requests: Sequence[EditRequest]) -> None:
        self.manager, self.requests = manager, requests
        self.failed: str | None = None  # why the last save could not be written (a full disk, a read-only folder)

    @property
    def every(self) -> int:
        return self.manager.every if self.manager is not None else 0

    def save(self, point: StreamCheckpoint, reason: str) -> Path | None:
        if self.manager is None:
            return None
        ckpt = dataclasses.replace(point, data_hash=data_hash(self.requests[:point.position]), reason=reason)
        try:
            path = self.manager.save(ckpt)
        except OSError as err:
            self.failed = (f"Saving the state after {point.position} edits failed ({err.strerror}: "
                           f"{err.filename or self.manager.directory})")
            log.warning("%s; the stream goes on and the next checkpoint tries again", self.failed)
            return None
        self.failed = None
        return path

    def saved_at(self, position: int) -> Path | None:
        """The checkpoint on disk after ``position`` edits, where the newest save (or the resume) is there."""
        if self.manager is None or self.manager.last_saved != position:
            return None
        return self.manager.directory / checkpoint_name(position)

    def note(self, path: Path | None, position: int) -> str:
        """One sentence for a message: where the state after ``position`` edits is, and how to go on."""
        m = self.manager
        if path is None and self.failed:
            newest = m.last_saved if m is not None else None
            kept = (f"the newest checkpoint on disk is after {newest} edits; to continue from it, "
                    f"{m.resume_hint}" if newest is not None and m is not None
                    else "no checkpoint of this run is on disk")
            return f"{self.failed}: {kept}."
        if path is None:
            return "No checkpoint was saved (checkpointing is off)."
        hint = m.resume_hint if m is not None else ""
        return f"The state after {position} edits is saved in {path}; to continue, {hint}."


class Checkpointing(Callback):
    """Saves ``state.good`` at the batch boundary that crosses a multiple of ``every`` and at the end of the
    edits (before the final evaluation, so a kill there keeps every edit), then once more with the metrics."""

    def __init__(self, saver: Saver) -> None:
        self.saver = saver

    def on_boundary(self, state: StreamState) -> None:
        manager = self.saver.manager
        if manager is not None and manager.due(state.batch_start, state.position):
            self.saver.save(state.good, "periodic")

    def on_edits_end(self, state: StreamState) -> None:
        if self.saver.every and state.evaluated is None and self.saver.saved_at(state.position) is None:
            self.saver.save(state.good, "end")

    def on_stream_end(self, state: StreamState) -> None:
        if self.saver.every:  # with its metrics, so a later resume=true (more retention tasks) skips the evaluation
            self.saver.save(state.snapshot(final_metrics=dict(state.result.metrics)), "end, evaluated")


class NonFiniteGuard(Callback):
    """A batch whose loss, or resulting editor state, is NaN/inf. ``stop`` saves the state from before the
    batch and raises :class:`NonFiniteLoss` naming it; ``skip`` restores that state, records the batch in
    ``StreamResult.skipped`` and goes on."""

    def __init__(self, saver: Saver, on_nan: str = "stop") -> None:
        if on_nan not in ON_NAN:
            raise ConfigError(f"on_nan must be one of {ON_NAN}, got {on_nan!r}")
        self.saver, self.on_nan = saver, on_nan

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        good = state.good
        problem = _problem(stats)
        if problem is not None:
            state.kept = good.editor_state  # no state worth copying: the stream goes on from the one before
        else:
            bad_key = non_finite(state.keep())
            if bad_key is not None:
                problem = f"non-finite values in the editor state ({bad_key}; loss {stats.loss})"
        state.problem = problem
        if problem is None:
            return
        batch, before = state.batch, state.batch_start
        if self.on_nan == "stop":
            path = self.saver.save(good, "nan")
            raise NonFiniteLoss(
                f"{problem} in the batch of {_describe(batch, before)}. Check these records, or "
                f"lower the learning rate (editor.lr, in a new run); on_nan=skip skips such batches "
                f"instead (it may be added when resuming). {self.saver.note(path, good.position)}")
        state.editor.load_state_dict(to_cpu(good.editor_state))  # a fresh copy: loading may alias the tensors
        state.kept = good.editor_state  # the stream goes on from the restored state, not the non-finite copy
        restore_rng(good.rng)
        state.result.skipped.append({"edits": [before + 1, state.position], "uids": [r.uid for r in batch],
                                     "prompts": [r.prompt for r in batch], "loss": str(stats.loss),
                                     "problem": problem})
        log.warning("skipped %s: %s (on_nan=skip)", _describe(batch, before), problem)


class OutOfMemoryGuard(Callback):
    """Out of memory while editing or evaluating: saves ``state.good`` and raises :class:`EditOutOfMemory`,
    which says what to lower. Only there: an allocation failure elsewhere stays what it is."""

    def __init__(self, saver: Saver, eval_batch_size: int) -> None:
        self.saver, self.eval_batch_size = saver, eval_batch_size
        self.during: str | None = None  # what is running, for the message (None: nothing watched)

    def on_batch_start(self, state: StreamState) -> None:
        self.during = f"while editing {_describe(state.batch, state.batch_start)}"

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        self.during = None

    def on_evaluation_start(self, state: StreamState, upto: int) -> None:
        self.during = f"while evaluating the first {upto} edits"

    def on_evaluation_end(self, state: StreamState, upto: int, point: dict[str, float]) -> None:
        self.during = None

    def on_exception(self, state: StreamState, err: BaseException) -> BaseException | None:
        if self.during is None or not is_out_of_memory(err):
            return None
        _free_memory()
        good = state.good
        path = self.saver.save(good, "oom")
        device = next(state.editor.model.parameters()).device
        return EditOutOfMemory(
            f"out of memory on {device} {self.during}. Lower what it needs: eval_batch_size (now "
            f"{self.eval_batch_size}) or editor.batch_size (now {state.batch_size}), both of which may change "
            f"when resuming; or, in a new run, model.dtype=bfloat16 or fewer edited layers (editor.layers). "
            f"{self.saver.note(path, good.position)}")


Evaluate = Callable[..., dict[str, float]]  # evaluation.run.metrics.evaluate_edits' signature


class CurvePoints(Callback):
    """Evaluates the first ``position`` edits every ``every`` edits (at the batch boundary that crosses a
    multiple), after each edit count in ``at`` (at the boundary that reaches it) and all of them at the end:
    curve points with the parameter counts (Figure 2 plots them against the stream length) and, from the same
    pass, the forgetting record and the cost record (seconds editing and evaluating so far).

    ``edit_time``: also evaluate each batch right after it is edited, before the next one (reliability and
    generalization, teacher-forced and, with a ``scorer``, generated), where no curve point is taken: a
    forgetting point that holds that batch alone (``first_batch``; evaluation.run.forgetting), through the
    same evaluation. ``scorer``/``base_answers``: the generated-answer metrics (evaluation.run.answer_metrics);
    the answers of the edit-time points and of the final evaluation are kept in ``StreamResult.answers``.

    ``parts_root``/``parts_every_s``: curve points and the final evaluation save the batches they have done there
    every ``parts_every_s`` seconds, and read back those of the same point and editor state saved by a run that
    stopped during it (evaluation.common.evaluation_parts; None: nothing saved)."""

    def __init__(self, base_locality: Sequence[RowPredictions], every: int = 0, eval_batch_size: int = 32,
                 progress: bool = True, evaluate: Evaluate = evaluate_edits, *, scorer: AnswerScorer | None = None,
                 base_answers: BaseAnswers | None = None, edit_time: bool = False, at: Sequence[int] = (),
                 parts_root: Path | None = None, parts_every_s: float = 60.0) -> None:
        self.base_locality, self.every, self.eval_batch_size = base_locality, every, eval_batch_size
        self.at = tuple(sorted(set(at)))
        self.progress, self.evaluate = progress, evaluate
        self.scorer, self.base_answers, self.edit_time = scorer, base_answers, edit_time
        self.parts_root, self.parts_every_s = parts_root, parts_every_s

    def on_stream_start(self, state: StreamState) -> None:
        if state.curve_due and state.position < state.n:  # owed by the run that saved the checkpoint
            self._curve_point(state)
            state.commit()

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        state.curve_due = self._due(state.batch_start, state.position)
        if state.curve_due and state.position < state.n:  # at the end, the final evaluation is the point
            state.commit()  # a failure while evaluating saves the edits done, their curve point owed
            self._curve_point(state)
        elif self.edit_time and state.position < state.n and state.batch_start % state.batch_size == 0:
            # not committed first: a failure here resumes before the batch, which is edited again, exactly
            self._edit_time_point(state)

    def on_stream_end(self, state: StreamState) -> None:
        state.result.metrics = self.evaluate_upto(state, state.n, progress=self.progress, kind="final")
        state.result.curves.append({"edits": state.n, **state.result.metrics, **self._sizes(state)})
        self._cost(state, state.n)
        state.curve_due = False

    def _due(self, before: int, after: int) -> bool:
        """Whether a batch that took the stream from ``before`` to ``after`` edits ends at a curve point."""
        crossed = bool(self.every) and after // self.every > before // self.every
        return crossed or any(before < n <= after for n in self.at)

    def _curve_point(self, state: StreamState) -> None:
        # with bars: on a 10,000-edit stream the point at 5,000 edits takes an hour of one CPU thread
        point = self.evaluate_upto(state, state.position, progress=self.progress)
        state.result.curves.append({"edits": state.position, **point, **self._sizes(state)})
        self._cost(state, state.position)
        state.curve_due = False

    def _parts(self, state: StreamState, upto: int, kind: str) -> dict[str, EvaluationParts]:
        """Where a curve point or the final evaluation saves its batches (an edit-time point is one batch's)."""
        if self.parts_root is None or kind == "edit_time":
            return {}
        return {"parts": EvaluationParts(self.parts_root, upto, state_digest(state.keep()),
                                         self.parts_every_s)}

    @staticmethod
    def _cost(state: StreamState, edits: int) -> None:
        r = state.result
        r.costs.append({"edits": edits, "edit_seconds": r.edit_seconds, "eval_seconds": r.eval_seconds})

    def _edit_time_point(self, state: StreamState) -> None:
        self.evaluate_upto(state, state.position, kind="edit_time", start=state.batch_start)

    def evaluate_upto(self, state: StreamState, upto: int, progress: bool = False, kind: str = "curve",
                      start: int = 0) -> dict[str, float]:
        """The metrics of edits ``start+1..upto`` (``start`` a batch boundary); also appends their per-batch
        scores to the forgetting record. ``kind``: curve | final | edit_time (no locality: the batch alone)."""
        state.evaluating = kind
        state.hooks.on_evaluation_start(state, upto)
        began = time.perf_counter()
        per_request: dict[str, list[float]] = {}
        rows: list[dict[str, Any]] | None = [] if kind != "curve" and self.scorer is not None else None
        point = self.evaluate(state.editor, state.requests[start:upto], self.base_locality[start:upto],
                              self.eval_batch_size, progress=progress and f"after {upto} edits: ",
                              per_request_out=per_request,
                              **self._generated(start, upto, kind == "edit_time", rows), **self._parts(state, upto, kind))
        state.result.eval_seconds += time.perf_counter() - began
        state.result.forgetting.append(batch_point(upto, state.batch_size, per_request,
                                                   first_batch=start // state.batch_size if kind == "edit_time" else None))
        if rows:
            state.result.answers += [{"at": kind, "edits": upto, **row} for row in rows]
        state.hooks.on_evaluation_end(state, upto, point)
        state.evaluating = None
        return point

    def _generated(self, start: int, upto: int, edit_time: bool, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The keyword arguments of ``evaluate`` beyond the teacher-forced metrics' (none where both are off)."""
        kwargs: dict[str, Any] = {"locality": False} if edit_time else {}
        if self.scorer is not None:
            kwargs.update(scorer=self.scorer, answers_out=rows,
                          base_answers=self.base_answers[start:upto] if self.base_answers is not None else None)
        return kwargs

    @staticmethod
    def _sizes(state: StreamState) -> dict[str, int]:
        return {"trainable_params": state.editor.trainable_params(), "stored_params": state.editor.stored_params()}


class LogMetrics(Callback):
    """Each batch's loss and extra stats (or the count of skipped edits) and each curve point on the way
    to the logger; the final metrics go to results.json instead."""

    def __init__(self, logger: NullLogger) -> None:
        self.logger = logger

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        done, result = state.position, state.result
        if state.problem is not None:
            self.logger.log({"edit/skipped_edits": sum(len(s["uids"]) for s in result.skipped)}, step=done)
        else:
            self.logger.log({"edit/loss": stats.loss, **{f"edit/{k}": v for k, v in stats.extra.items()},
                             "edit/seconds_per_edit": result.edit_seconds / done}, step=done)
            # run.log keeps them too: W&B's offline files need a tool to read
            log.info("edits %d-%d: loss %.4g, %d iterations%s", state.batch_start + 1, done, stats.loss,
                     stats.iterations, "".join(f", {k} {v:.4g}" for k, v in stats.extra.items()))

    def on_evaluation_end(self, state: StreamState, upto: int, point: dict[str, float]) -> None:
        if state.evaluating in ("curve", "edit_time"):
            self.logger.log({f"{state.evaluating}/{k}": v for k, v in point.items()}, step=upto)


class ProgressBar(Callback):
    """The edit loop's tqdm bar (``enabled=False``: none shown)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.loss = math.nan  # of the batch just edited

    def on_stream_start(self, state: StreamState) -> None:
        self.bar = tqdm(total=state.n, initial=state.position, desc="editing", unit="edit", disable=not self.enabled)

    def on_batch_end(self, state: StreamState, stats: EditStats) -> None:
        self.bar.update(len(state.batch))
        self.loss = stats.loss

    def on_boundary(self, state: StreamState) -> None:
        if state.problem is None:  # known here: the NaN/inf guard runs after this bar's on_batch_end
            self.bar.set_postfix(loss=f"{self.loss:.3f}")

    def on_edits_end(self, state: StreamState) -> None:
        self._close()  # before any message that stops the stream

    def on_exception(self, state: StreamState, err: BaseException) -> BaseException | None:
        self._close()
        return None

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
