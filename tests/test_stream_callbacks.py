"""Each of the stream's callbacks alone, on a tiny fake editor (no model, no real evaluation)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
from torch import nn

from data.requests import EditRequest
from evaluation.editing.editor import EditStats
from evaluation.run.callbacks import (
    Checkpointing,
    CurvePoints,
    LogMetrics,
    NonFiniteGuard,
    OutOfMemoryGuard,
    Saver,
)
from evaluation.run.checkpoint import (
    CheckpointManager,
    EditOutOfMemory,
    NonFiniteLoss,
    StreamInterrupted,
    checkpoint_name,
)
from evaluation.run.stream import Stream
from evaluation.run.stream_signals import StopOnSignals
from evaluation.run.stream_state import Callback, StreamState


class FakeEditor(nn.Module):
    """Adds random numbers to a weight per batch (so RNG restores show); a NaN loss or an error on chosen calls."""

    def __init__(self, batch_size: int = 3, nan_on: Sequence[int] = (), fail_on: dict[int, BaseException] | None = None,
                 signal_on: Sequence[int] = (), inf_on: Sequence[int] = ()) -> None:
        super().__init__()
        self.inf_on = inf_on  # calls whose loss is finite but whose state becomes non-finite
        self.model = nn.Linear(1, 1)  # where the out-of-memory message finds the device
        self.w = nn.Parameter(torch.zeros(2), requires_grad=False)
        self._batch_size, self.nan_on, self.fail_on, self.signal_on = batch_size, nan_on, fail_on or {}, signal_on
        self.calls: list[list[int]] = []

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        self.calls.append([r.uid for r in requests])
        if len(self.calls) in self.fail_on:
            raise self.fail_on[len(self.calls)]
        if len(self.calls) in self.signal_on:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the batch is in flight
        self.w += torch.rand(2)
        if len(self.calls) in self.inf_on:
            self.w += float("inf")
        return EditStats(loss=float("nan") if len(self.calls) in self.nan_on else 0.5, iterations=1)

    def trainable_params(self) -> int:
        return 2

    def stored_params(self) -> int:
        return len(self.calls)


class Evaluations:
    """Stands in for evaluate_edits: records how many edits each evaluation covered."""

    def __init__(self) -> None:
        self.upto: list[int] = []

    def __call__(self, editor: Any, requests: Sequence[EditRequest], base: Sequence[Any], batch_size: int,
                 progress: bool = False, per_request_out: dict[str, list[float]] | None = None) -> dict[str, float]:
        self.upto.append(len(requests))
        if per_request_out is not None:
            per_request_out.update(reliability=[1.0] * len(requests), generalization=[0.5] * len(requests))
        return {"reliability": 1.0, "generalization": 0.5}


class RecordingLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((dict(metrics), step))


def requests(n: int) -> list[EditRequest]:
    return [EditRequest(uid=i, prompt=f"prompt {i}", target=f"t{i}", paraphrase=f"p{i}", locality_prompt="l",
                        locality_answer="a") for i in range(n)]


def run(editor: FakeEditor, n: int, callbacks: list[Callback]) -> StreamState:
    state = StreamState(editor, requests(n))
    Stream(state, callbacks).run()
    return state


def test_checkpointing_saves_at_the_boundaries_crossing_every_and_at_the_end(tmp_path: Path) -> None:
    editor = FakeEditor(batch_size=3)
    manager = CheckpointManager(tmp_path, every=4, keep=10)
    weights: dict[int, torch.Tensor] = {}

    class Watch(Callback):  # the editor's weight after each batch, to compare with what was saved
        def on_boundary(self, state: StreamState) -> None:
            weights[state.position] = editor.w.detach().clone()

    run(editor, 10, [Watch(), Checkpointing(Saver(manager, requests(10)))])
    assert [p for p, _ in manager.files()] == [6, 9, 10]  # 3 -> 6 crosses 4, 6 -> 9 crosses 8, then the end
    for position in (6, 9, 10):
        ckpt = CheckpointManager.read(tmp_path / checkpoint_name(position))
        assert torch.equal(ckpt.editor_state["w"], weights[position])
    assert CheckpointManager.read(tmp_path / checkpoint_name(10)).reason == "end, evaluated"


def test_the_nan_guard_with_skip_undoes_the_batch_exactly_and_records_it() -> None:
    torch.manual_seed(0)
    editor = FakeEditor(batch_size=2, nan_on=[2])
    state = run(editor, 6, [NonFiniteGuard(Saver(None, requests(6)), "skip")])
    assert [s["uids"] for s in state.result.skipped] == [[2, 3]]
    assert state.result.skipped[0]["edits"] == [3, 4] and "non-finite loss" in state.result.skipped[0]["problem"]

    after = torch.rand(2)

    # the editor and the random numbers are as if the bad batch had never been edited
    torch.manual_seed(0)
    clean = FakeEditor(batch_size=2)
    run(clean, 4, [])
    assert torch.equal(editor.w, clean.w) and torch.equal(after, torch.rand(2))


def test_after_skipping_a_non_finite_state_the_stream_goes_on_from_the_restored_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    editor = FakeEditor(batch_size=2, inf_on=[2])
    manager = CheckpointManager(tmp_path, every=2, keep=10)
    saver = Saver(manager, requests(6))
    state = run(editor, 6, [NonFiniteGuard(saver, "skip"), Checkpointing(saver)])
    assert "non-finite values in the editor state" in state.result.skipped[0]["problem"]
    for position, _ in manager.files():  # no checkpoint after the skip holds the non-finite state
        assert bool(torch.isfinite(CheckpointManager.read(tmp_path / checkpoint_name(position)).editor_state["w"]).all())
    assert bool(torch.isfinite(state.good.editor_state["w"]).all())


def test_the_nan_guard_with_stop_saves_the_state_before_the_batch_and_names_it(tmp_path: Path) -> None:
    editor = FakeEditor(batch_size=2, nan_on=[2])
    manager = CheckpointManager(tmp_path, every=0)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss \(nan\) in the batch of edits 3\.\.4 \(uids \[2, 3\]"):
        run(editor, 6, [NonFiniteGuard(Saver(manager, requests(6)), "stop")])
    ckpt = manager.load_latest()
    assert ckpt is not None and ckpt.position == 2 and ckpt.reason == "nan"
    assert len(editor.calls) == 2


def test_the_out_of_memory_guard_saves_the_last_good_point_and_says_what_to_lower(tmp_path: Path) -> None:
    editor = FakeEditor(batch_size=3, fail_on={2: torch.OutOfMemoryError("CUDA out of memory")})
    manager = CheckpointManager(tmp_path, every=100)
    with pytest.raises(EditOutOfMemory) as err:
        run(editor, 9, [OutOfMemoryGuard(Saver(manager, requests(9)), eval_batch_size=8)])
    assert "out of memory on cpu while editing edits 4..6 (uids [3, 4, 5]" in str(err.value)
    assert "eval_batch_size (now 8)" in str(err.value) and "editor.batch_size (now 3)" in str(err.value)
    ckpt = manager.load_latest()
    assert ckpt is not None and ckpt.position == 3 and ckpt.reason == "oom"


def test_memory_errors_outside_editing_and_evaluating_stay_what_they_are(tmp_path: Path) -> None:
    class FailAtBoundary(Callback):
        def on_boundary(self, state: StreamState) -> None:
            raise MemoryError("not while editing")

    manager = CheckpointManager(tmp_path, every=100)
    with pytest.raises(MemoryError, match="not while editing"):
        run(FakeEditor(), 6, [OutOfMemoryGuard(Saver(manager, requests(6)), 8), FailAtBoundary()])
    assert manager.files() == []


def test_curve_points_are_evaluated_where_a_batch_crosses_every_and_once_at_the_end() -> None:
    evaluations, logger = Evaluations(), RecordingLogger()
    state = run(FakeEditor(batch_size=3), 10, [LogMetrics(logger), CurvePoints([None] * 10, every=4, evaluate=evaluations)])
    assert evaluations.upto == [6, 9, 10]
    assert [c["edits"] for c in state.result.curves] == [6, 9, 10]
    assert [f["edits"] for f in state.result.forgetting] == [6, 9, 10]
    assert state.result.curves[-1] == {"edits": 10, "reliability": 1.0, "generalization": 0.5,
                                       "trainable_params": 2, "stored_params": 4}
    assert state.result.metrics == {"reliability": 1.0, "generalization": 0.5}
    # the points on the way go to the logger, the final one to the results
    assert [step for metrics, step in logger.calls if "curve/reliability" in metrics] == [6, 9]


def test_curve_points_at_given_edit_counts_fall_on_the_batch_boundary_that_reaches_each() -> None:
    evaluations = Evaluations()
    state = run(FakeEditor(batch_size=3), 20, [CurvePoints([None] * 20, at=[2, 9, 10, 20], evaluate=evaluations)])
    assert evaluations.upto == [3, 9, 12, 20]  # 2 -> the batch ending at 3, 9 on a boundary, 10 -> 12, 20: the end
    assert [c["edits"] for c in state.result.curves] == [3, 9, 12, 20]
    both = Evaluations()
    run(FakeEditor(batch_size=3), 20, [CurvePoints([None] * 20, every=6, at=[10], evaluate=both)])
    assert both.upto == [6, 12, 18, 20]  # 10 falls in the batch that also crosses 12: one point


def test_a_point_due_at_the_end_is_the_final_evaluation_and_is_owed_until_it_is_done() -> None:
    evaluations = Evaluations()
    owed: list[bool] = []

    class Watch(Callback):
        def on_boundary(self, state: StreamState) -> None:
            owed.append(state.good.curve_due)

    run(FakeEditor(batch_size=4), 8, [CurvePoints([None] * 8, every=4, evaluate=evaluations), Watch()])
    assert evaluations.upto == [4, 8]
    assert owed == [False, True]  # a kill before the final evaluation leaves the point at 8 owed


def test_a_signal_stops_the_stream_at_the_next_batch_boundary_after_saving(tmp_path: Path) -> None:
    editor = FakeEditor(batch_size=2, signal_on=[2])
    manager = CheckpointManager(tmp_path, every=0)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StreamInterrupted, match=r"stopped by SIGTERM after 4 of 10 edits\. The state after 4 edits "
                                                r"is saved in .*step-000004\.pt"):
        run(editor, 10, [StopOnSignals(Saver(manager, requests(10)))])
    assert len(editor.calls) == 2  # the batch in flight finished, no later one started
    ckpt = manager.load_latest()
    assert ckpt is not None and ckpt.position == 4 and ckpt.reason == "signal SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_a_curve_point_gives_it_up_at_once_and_saves_the_edits_with_the_point_owed(
        tmp_path: Path) -> None:
    """On a long stream a point on the way can take hours: a signal does not wait for it."""
    class SignalledAt(Evaluations):
        def __call__(self, editor: Any, requests: Sequence[EditRequest], *args: Any, **kwargs: Any) -> dict[str, float]:
            if len(requests) == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here: the point never returns
                raise AssertionError("the curve point went on after the signal")
            return super().__call__(editor, requests, *args, **kwargs)

    evaluations, manager = SignalledAt(), CheckpointManager(tmp_path, every=0)
    before = signal.getsignal(signal.SIGTERM)
    editor = FakeEditor(batch_size=2)
    callbacks = [CurvePoints([None] * 8, every=4, evaluate=evaluations), StopOnSignals(Saver(manager, requests(8)))]
    with pytest.raises(StreamInterrupted, match=r"stopped by SIGTERM during the curve point at 4 of 8 edits \(it is "
                                                r"evaluated first when the run goes on\)\. The state after 4 edits is "
                                                r"saved in .*step-000004\.pt"):
        run(editor, 8, callbacks)
    assert len(editor.calls) == 2 and evaluations.upto == []
    ckpt = manager.load_latest()
    assert ckpt is not None and (ckpt.position, ckpt.reason, ckpt.curve_due) == (4, "signal SIGTERM", True)
    assert ckpt.curves == [] and signal.getsignal(signal.SIGTERM) == before


def test_a_signal_while_editing_the_batch_before_a_curve_point_stops_before_the_point(tmp_path: Path) -> None:
    evaluations, manager = Evaluations(), CheckpointManager(tmp_path, every=0)
    editor = FakeEditor(batch_size=2, signal_on=[2])
    callbacks = [CurvePoints([None] * 8, every=4, evaluate=evaluations), StopOnSignals(Saver(manager, requests(8)))]
    with pytest.raises(StreamInterrupted, match=r"stopped by SIGTERM after 4 of 8 edits \(the curve point due there "
                                                r"is owed: it is evaluated first when the run goes on\)"):
        run(editor, 8, callbacks)
    assert evaluations.upto == []  # not started: the signal was there first
    ckpt = manager.load_latest()
    assert ckpt is not None and (ckpt.position, ckpt.curve_due) == (4, True)
