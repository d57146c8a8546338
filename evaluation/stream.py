"""The lifelong loop: the only place edits are applied, one batch after another, to one model.

Long runs survive: with a :class:`~evaluation.checkpoint.CheckpointManager` the loop saves the editor's
state, the position, the curves and the RNG states every ``checkpoint.every`` edits (at batch boundaries)
and at the end of the edit loop. SIGTERM/SIGINT finish the current batch, save a checkpoint and stop with
:class:`~evaluation.checkpoint.StreamInterrupted` (a second signal stops at once). ``resume=`` continues
from a checkpoint exactly as if the stream had never stopped.

Every curve point also records how each earlier batch of ``editor.batch_size`` edits is held
(``StreamResult.forgetting``, see :mod:`evaluation.forgetting`), from the same evaluation pass; the
record travels in the checkpoints like the curves.

A batch whose loss (or whose resulting editor state) is NaN/inf is handled by ``on_nan``: ``stop`` saves
the state from before the batch and raises :class:`~evaluation.checkpoint.NonFiniteLoss` naming the
batch; ``skip`` restores the state from before the batch, records the batch in ``StreamResult.skipped``
and goes on. Running out of memory saves the last good state and raises
:class:`~evaluation.checkpoint.EditOutOfMemory`, which says what to lower.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from data.requests import EditRequest
from evaluation.checkpoint import (
    CheckpointManager,
    EditOutOfMemory,
    NonFiniteLoss,
    StreamCheckpoint,
    StreamInterrupted,
    checkpoint_name,
    data_hash,
    non_finite,
    restore_rng,
    rng_states,
    to_cpu,
)
from evaluation.editor import EditStats, Editor
from evaluation.errors import ConfigError
from evaluation.forgetting import batch_point
from evaluation.interrupts import handling_signals, stop_on_signals
from evaluation.loggers import NullLogger
from evaluation.metrics import RowPredictions, evaluate_edits

log = logging.getLogger(__name__)

ON_NAN = ("stop", "skip")


@dataclass
class StreamResult:
    metrics: dict[str, float]
    curves: list[dict[str, Any]] = field(default_factory=list)
    #: one entry per curve point: each batch's reliability and generalization (evaluation.forgetting)
    forgetting: list[dict[str, Any]] = field(default_factory=list)
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0
    #: batches skipped under ``on_nan=skip``: their uids, prompts, edit range, loss and what was wrong
    skipped: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None  # position of the checkpoint the stream continued from


@dataclass
class _Snapshot:
    """The last good point of the stream: editor state (CPU copy), RNG states, and the record so far."""

    position: int
    state: dict[str, Any]
    rng: dict[str, Any]
    curves: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    edit_seconds: float
    eval_seconds: float
    curve_due: bool = False
    final_metrics: dict[str, float] | None = None
    forgetting: list[dict[str, Any]] = field(default_factory=list)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS out-of-memory errors, and CPU allocation failures."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _SignalGuard:
    """SIGTERM/SIGINT become a request to stop at the next batch boundary; a second one stops at once.

    A repeat within ``repeat_window`` seconds is the same stop delivered twice (``timeout`` signals
    its whole process group and ``make`` forwards the signal to its child), so it is ignored.
    """

    def __init__(self, enabled: bool, repeat_window: float = 1.0) -> None:
        self.enabled = enabled
        self.repeat_window = repeat_window
        self.received: str | None = None
        self._received_at = 0.0
        self._handlers = contextlib.ExitStack()

    def __enter__(self) -> "_SignalGuard":
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
        self._say(f"{name} received: finishing the current batch, saving a checkpoint, then stopping "
                  f"(send it again to stop at once)")


def _describe(batch: Sequence[EditRequest], start: int) -> str:
    prompts = "; ".join(repr(r.prompt[:80]) for r in batch[:4]) + ("; ..." if len(batch) > 4 else "")
    return (f"edits {start + 1}..{start + len(batch)} (uids {[r.uid for r in batch]}, prompts: {prompts})")


def _problem(stats: EditStats) -> str | None:
    if stats.iterations > 0 and not math.isfinite(stats.loss):  # 0 iterations: nothing trained, no loss
        return f"non-finite loss ({stats.loss})"
    return None


def run_stream(editor: Editor, requests: Sequence[EditRequest], base_locality: Sequence[RowPredictions],
               logger: NullLogger, eval_every: int = 0, eval_batch_size: int = 32,
               progress: bool = True, *, checkpoints: CheckpointManager | None = None,
               resume: StreamCheckpoint | None = None, on_nan: str = "stop",
               handle_signals: bool = True) -> StreamResult:
    """Edit ``requests`` in batches of ``editor.batch_size``; evaluate every ``eval_every`` edits and at the end.

    ``checkpoints``: where and how often to save (None: never, not even on a signal).
    ``resume``: a checkpoint of this stream to continue from. ``on_nan``: ``stop`` or ``skip``.
    """
    if on_nan not in ON_NAN:
        raise ConfigError(f"on_nan must be one of {ON_NAN}, got {on_nan!r}")
    n = len(requests)
    bs = editor.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:  # the rule where the batch size is used
        raise ConfigError(f"editor.batch_size must be a positive integer, got {bs!r}")
    result = StreamResult(metrics={})
    done, curve_due = 0, False
    if resume is not None:
        done, curve_due = _restore(editor, requests, resume, result), resume.curve_due
        if checkpoints is not None:
            checkpoints.last_saved = done
        log.info("resuming the stream after %d of %d edits from %s", done, n, resume.path)

    def snapshot(position: int, state: dict[str, Any], due: bool = False,
                 final_metrics: dict[str, float] | None = None) -> _Snapshot:
        return _Snapshot(position, state, rng_states(), list(result.curves), list(result.skipped),
                         result.edit_seconds, result.eval_seconds, due, final_metrics, list(result.forgetting))

    save_failed: list[str] = []  # why the last save could not be written (a full disk, a read-only folder)

    def save(snap: _Snapshot, reason: str) -> Path | None:
        """Save a checkpoint; where the disk refuses, say so and go on: the state is still in memory, the
        next save tries again, and the checkpoints already on disk are untouched (atomic writes)."""
        if checkpoints is None:
            return None
        ckpt = StreamCheckpoint(position=snap.position, editor_state=snap.state, rng=snap.rng,
                                curves=snap.curves, edit_seconds=snap.edit_seconds,
                                eval_seconds=snap.eval_seconds, skipped=snap.skipped,
                                data_hash=data_hash(requests[:snap.position]), reason=reason,
                                curve_due=snap.curve_due, final_metrics=snap.final_metrics,
                                forgetting=snap.forgetting)
        try:
            path = checkpoints.save(ckpt)
        except OSError as err:
            save_failed[:] = [f"Saving the state after {snap.position} edits failed ({err.strerror}: "
                              f"{err.filename or checkpoints.directory})"]
            log.warning("%s; the stream goes on and the next checkpoint tries again", save_failed[0])
            return None
        save_failed.clear()
        return path

    def saved_note(path: Path | None, position: int) -> str:
        if path is None and save_failed:
            newest = checkpoints.last_saved if checkpoints is not None else None
            kept = (f"the newest checkpoint on disk is after {newest} edits; to continue from it, "
                    f"{checkpoints.resume_hint}" if newest is not None and checkpoints is not None
                    else "no checkpoint of this run is on disk")
            return f"{save_failed[0]}: {kept}."
        if path is None:
            return "No checkpoint was saved (checkpointing is off)."
        hint = checkpoints.resume_hint if checkpoints is not None else ""
        return f"The state after {position} edits is saved in {path}; to continue, {hint}."

    def out_of_memory(snap: _Snapshot, during: str) -> EditOutOfMemory:
        _free_memory()
        path = save(snap, "oom")
        device = next(editor.model.parameters()).device
        return EditOutOfMemory(
            f"out of memory on {device} {during}. Lower what it needs: eval_batch_size (now {eval_batch_size}) "
            f"or editor.batch_size (now {bs}), both of which may change when resuming; or, in a new run, "
            f"model.dtype=bfloat16 or fewer edited layers (editor.layers). {saved_note(path, snap.position)}")

    def evaluate(upto: int, snap: Callable[[], _Snapshot], progress_bar: bool = False) -> dict[str, float]:
        """The metrics of the first ``upto`` edits; also appends their per-batch scores to the forgetting record."""
        start = time.perf_counter()
        per_request: dict[str, list[float]] = {}
        try:
            point = evaluate_edits(editor, requests[:upto], base_locality[:upto], eval_batch_size,
                                   progress=progress_bar, per_request_out=per_request)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            raise out_of_memory(snap(), f"while evaluating the first {upto} edits") from None
        result.eval_seconds += time.perf_counter() - start
        result.forgetting.append(batch_point(upto, bs, per_request))
        return point

    def sizes() -> dict[str, int]:  # Figure 2 plots the parameter count against the stream length
        return {"trainable_params": editor.trainable_params(), "stored_params": editor.stored_params()}

    def curve_point(position: int, state: dict[str, Any]) -> None:
        point = evaluate(position, lambda: snapshot(position, state, due=True))
        result.curves.append({"edits": position, **point, **sizes()})
        logger.log({f"curve/{k}": v for k, v in point.items()}, step=position)

    good = snapshot(done, to_cpu(editor.state_dict()), due=curve_due)
    if curve_due and eval_every and done < n:  # a curve point owed by the run that saved the checkpoint
        curve_point(done, good.state)
        good = snapshot(done, good.state)

    bar = tqdm(total=n, initial=done, desc="editing", unit="edit", disable=not progress)
    with _SignalGuard(handle_signals) as guard, contextlib.closing(bar):
        while done < n and guard.received is None:
            batch = requests[done:done + bs]
            start = time.perf_counter()
            try:
                stats = editor.edit(batch)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                raise out_of_memory(good, f"while editing {_describe(batch, done)}") from None
            result.edit_seconds += time.perf_counter() - start
            before, done = done, done + len(batch)
            bar.update(len(batch))

            problem = _problem(stats)
            state = good.state
            if problem is None:
                state = to_cpu(editor.state_dict())
                bad_key = non_finite(state)
                if bad_key is not None:
                    problem = f"non-finite values in the editor state ({bad_key}; loss {stats.loss})"
            if problem is not None:
                record = {"edits": [before + 1, done], "uids": [r.uid for r in batch],
                          "prompts": [r.prompt for r in batch], "loss": str(stats.loss), "problem": problem}
                if on_nan == "stop":
                    path = save(good, "nan")
                    raise NonFiniteLoss(
                        f"{problem} in the batch of {_describe(batch, before)}. Check these records, or "
                        f"lower the learning rate (editor.lr, in a new run); on_nan=skip skips such batches "
                        f"instead (it may be added when resuming). {saved_note(path, good.position)}")
                editor.load_state_dict(to_cpu(good.state))  # a fresh copy: loading may alias the tensors
                restore_rng(good.rng)
                result.skipped.append(record)
                log.warning("skipped %s: %s (on_nan=skip)", _describe(batch, before), problem)
                logger.log({"edit/skipped_edits": sum(len(s["uids"]) for s in result.skipped)}, step=done)
            else:
                bar.set_postfix(loss=f"{stats.loss:.3f}")
                logger.log({"edit/loss": stats.loss, **{f"edit/{k}": v for k, v in stats.extra.items()},
                            "edit/seconds_per_edit": result.edit_seconds / done}, step=done)

            due = bool(eval_every) and done // eval_every > before // eval_every
            if due and done < n:
                curve_point(done, state)
            good = snapshot(done, state, due=due and done == n)
            if checkpoints is not None and checkpoints.due(before, done):
                save(good, "periodic")
        bar.close()  # before the message below
        if guard.received is not None:
            if checkpoints is not None and checkpoints.last_saved == good.position:
                path: Path | None = checkpoints.directory / checkpoint_name(good.position)  # just saved
            else:
                path = save(good, f"signal {guard.received}")
            raise StreamInterrupted(f"stopped by {guard.received} after {good.position} of {n} edits. "
                                    f"{saved_note(path, good.position)}")

    if resume is not None and resume.position == n and resume.final_metrics is not None:
        result.metrics = dict(resume.final_metrics)  # evaluated before; its curve point came with the checkpoint
        log.info("the stream was evaluated after all %d edits before; using those metrics", n)
        return result
    end_path = None
    if checkpoints is not None and checkpoints.every:
        if checkpoints.last_saved != n:
            end_path = save(good, "end")  # a kill during the final evaluation keeps every edit
        else:
            end_path = checkpoints.directory / checkpoint_name(n)
    final_signals = (stop_on_signals(lambda sig: f"stopped by {sig} during the final evaluation of {n} edits. "
                                                 f"{saved_note(end_path, n)}")
                     if handle_signals else contextlib.nullcontext())
    with final_signals:
        result.metrics = evaluate(n, lambda: good, progress_bar=progress)
    result.curves.append({"edits": n, **result.metrics, **sizes()})
    if checkpoints is not None and checkpoints.every:
        # with its metrics, so a later resume=true (more retention tasks) skips the evaluation
        save(snapshot(n, good.state, final_metrics=dict(result.metrics)), "end, evaluated")
    return result


def _restore(editor: Editor, requests: Sequence[EditRequest], ckpt: StreamCheckpoint, result: StreamResult) -> int:
    """Load ``ckpt`` into the editor and the result; returns the number of edits already done."""
    n = len(requests)
    if ckpt.position > n:
        raise ConfigError(f"the checkpoint {ckpt.path} is after {ckpt.position} edits but this stream has only "
                          f"{n}; set dataset.num_edits to at least {ckpt.position}")
    if ckpt.data_hash and ckpt.data_hash != data_hash(requests[:ckpt.position]):
        raise ConfigError(f"the first {ckpt.position} edits of this run differ from those in the checkpoint "
                          f"{ckpt.path}: resume with the same dataset (dataset.name, dataset.path)")
    editor.load_state_dict(ckpt.editor_state)
    restore_rng(ckpt.rng)
    result.curves = list(ckpt.curves)
    result.forgetting = list(ckpt.forgetting)
    if len(result.forgetting) != len(result.curves):  # a checkpoint made before the record existed
        log.warning("the checkpoint %s holds %d curve points but %d forgetting points: the forgetting record of "
                    "this run starts after it", ckpt.path, len(result.curves), len(result.forgetting))
    result.skipped = list(ckpt.skipped)
    result.edit_seconds, result.eval_seconds = ckpt.edit_seconds, ckpt.eval_seconds
    result.resumed_from = ckpt.position
    return ckpt.position
