"""The retention suite inside a run: results.json's shape, per-task reuse on resume, clean interrupts."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from evaluation.common.errors import HarnessError
from evaluation.retention.suite import TASK_NAMES
from evaluation.run.checkpoint import state_digest, to_cpu
from evaluation.run.interrupts import WorkInterrupted, stop_on_signals
from tests.conftest import RETENTION_DATA

DATA = RETENTION_DATA
CHOICES = {"editor": "elder", "model": "tiny_llama", "dataset": "zsre"}
KEYS = set(TASK_NAMES) | {"average"}


def overrides(cache: Path, *extra: str) -> list[str]:
    return ["model=tiny_llama", "dataset.num_edits=4", "progress=false", "editor.iterations=5", "logger=none",
            "checkpoint.every=4", "retention.limit=2", f"retention.cache_dir={cache}", *extra]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA}")
def test_results_hold_all_eight_tasks_and_a_resumed_run_reuses_scored_tasks(
        tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluation.run.stream
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import RETENTION_STORE, run_experiment

    run = tmp_path / "run"
    first = run_experiment(compose_config(overrides(tmp_path / "cache", "retention.tasks=[rte,sst2]")), run, CHOICES)
    assert set(first["metrics"]["retention"]) == {"rte", "sst2", "average"}

    # resumed after the stream with the whole suite: the two scored tasks are read back, six are generated,
    # and the stream's final evaluation is read from the end checkpoint, not run again
    evaluations = []
    real_evaluate = evaluation.run.stream.evaluate_edits
    monkeypatch.setattr(evaluation.run.stream, "evaluate_edits",
                        lambda *a, **k: evaluations.append(1) or real_evaluate(*a, **k))
    full = run_experiment(compose_config(overrides(tmp_path / "cache", "resume=true")), run, CHOICES)
    monkeypatch.undo()
    assert evaluations == []
    assert full["curves"] == first["curves"]
    assert {k: full["metrics"][k] for k in ("reliability", "generalization", "locality")} == \
        {k: first["metrics"][k] for k in ("reliability", "generalization", "locality")}
    results = json.loads((run / "results.json").read_text())
    metrics = results["metrics"]
    for group in ("retention", "retention_base", "retention_ratio"):
        assert set(metrics[group]) == KEYS, group
    assert metrics["retention"]["average"] == pytest.approx(sum(metrics["retention"][t] for t in TASK_NAMES) / 8)
    assert results["retention_tasks"]["edited"]["reused"] == ["rte", "sst2"]
    assert results["retention_tasks"]["unedited"]["reused"] == ["rte", "sst2"]
    assert set(results["retention_tasks"]["edited"]["seconds"]) == set(TASK_NAMES)
    assert len(list((run / RETENTION_STORE).glob("*.json"))) == 8
    for t in ("rte", "sst2"):
        assert full["metrics"]["retention"][t] == first["metrics"]["retention"][t]

    # what was read back equals what a run from scratch generates
    fresh = run_experiment(compose_config(overrides(tmp_path / "cache2")), tmp_path / "fresh", CHOICES)
    assert fresh["metrics"]["retention"] == full["metrics"]["retention"]
    assert fresh["metrics"]["retention_base"] == full["metrics"]["retention_base"]
    assert fresh["metrics"]["retention_details"] == full["metrics"]["retention_details"]

    # a new run in the same folder does not count the old run's tasks
    again = run_experiment(compose_config(overrides(tmp_path / "cache", "retention.tasks=[rte]")), run, CHOICES)
    assert json.loads((run / "results.json").read_text())["retention_tasks"]["edited"]["reused"] == []
    assert again["metrics"]["retention"]["rte"] == full["metrics"]["retention"]["rte"]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA}")
def test_a_run_stopped_in_its_retention_pass_counts_the_tasks_it_finished_in_its_wall_time(
        tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume restores the stream's end checkpoint; the edited tasks finished after it (kept in the run's
    store) took time too, so the run's wall time must not fall back to the stream's end."""
    from evaluation.retention.rte import RTE
    from evaluation.retention.sst2 import SST2
    from evaluation.run.checkpoint import CheckpointManager
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment

    pause = 1.5
    saves: list[tuple[str, float | None]] = []
    real_save, real_score, real_prompts = CheckpointManager.save, RTE.score, SST2.prompts
    monkeypatch.setattr(CheckpointManager, "save",
                        lambda self, ckpt: saves.append((ckpt.reason, ckpt.wall_seconds)) or real_save(self, ckpt))
    monkeypatch.setattr(RTE, "score", lambda self, *a: time.sleep(pause) or real_score(self, *a))

    def stop_in_the_edited_pass(self: SST2, examples: list) -> list[str]:
        if any(reason.startswith("end") for reason, _ in saves):  # the stream is over: RTE's edited task is stored
            raise WorkInterrupted("stopped by SIGTERM during the retention suite")
        return real_prompts(self, examples)

    monkeypatch.setattr(SST2, "prompts", stop_in_the_edited_pass)
    run = tmp_path / "run"
    with pytest.raises(WorkInterrupted):
        run_experiment(compose_config(overrides(tmp_path / "cache", "retention.tasks=[rte,sst2]")), run, CHOICES)
    stream_end = next(wall for reason, wall in saves if reason.startswith("end"))
    assert stream_end is not None
    monkeypatch.undo()

    resumed = run_experiment(compose_config(overrides(tmp_path / "cache", "retention.tasks=[rte,sst2]",
                                                      "resume=true")), run, CHOICES)
    earlier = resumed["timings"]["wall_seconds"] - resumed["timings"]["wall_seconds_this_process"]
    assert earlier >= stream_end + pause  # the first process's edited RTE task is counted
    results = json.loads((run / "results.json").read_text())
    assert results["retention_tasks"]["edited"]["reused"] == ["rte"]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA}")
def test_a_run_goes_on_with_its_stream_while_another_run_generates_an_unedited_task_it_needs(
        tmp_path: Path, one_thread: None) -> None:
    """Parallel runs share the unedited tasks through locks; one whose task another run holds edits meanwhile
    and reads that task after its stream, instead of idling before it; where that run stops without storing
    the task, the run says so in one line and a resume generates it on the unedited model."""
    import shutil
    import threading

    from filelock import FileLock

    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment

    tasks = "retention.tasks=[rte,sst2]"
    reference = run_experiment(compose_config(overrides(tmp_path / "ref", tasks)), tmp_path / "ref_run", CHOICES)
    [rte_file] = (tmp_path / "ref").glob("*-rte-*.json")  # the unedited task, named by model key and settings
    cache = tmp_path / "cache"
    cache.mkdir()
    held, edited_meanwhile = threading.Event(), threading.Event()

    def other_run() -> None:  # holds rte, and stores it only once this run's stream has saved a checkpoint
        with FileLock(str(cache / rte_file.name) + ".lock"):
            held.set()
            latest = tmp_path / "run" / "checkpoints" / "latest.json"
            deadline = time.monotonic() + 120
            while not latest.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if latest.exists():
                edited_meanwhile.set()
            shutil.copy(rte_file, cache / rte_file.name)

    thread = threading.Thread(target=other_run)
    thread.start()
    held.wait()
    result = run_experiment(compose_config(overrides(cache, tasks)), tmp_path / "run", CHOICES)
    thread.join()
    assert edited_meanwhile.is_set()
    assert result["metrics"]["retention_base"] == reference["metrics"]["retention_base"]
    assert result["metrics"]["retention"] == reference["metrics"]["retention"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["retention_tasks"]["unedited"]["reused"] == ["rte"]

    # the other run stops without storing its task: one line says how to go on, and the resume generates
    # the task on the unedited model, then takes the saved stream's end
    lost_cache, lost_run = tmp_path / "lost_cache", tmp_path / "lost_run"
    lost_cache.mkdir()

    def stopped_run() -> None:
        with FileLock(str(lost_cache / rte_file.name) + ".lock"):
            held.set()
            deadline = time.monotonic() + 120
            while not (lost_run / "checkpoints" / "latest.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    held.clear()
    thread = threading.Thread(target=stopped_run)
    thread.start()
    held.wait()
    with pytest.raises(HarnessError, match=r"retention task rte was being generated by another run, which stopped "
                                           r"without storing it; the stream's end is saved: .*resume=true"):
        run_experiment(compose_config(overrides(lost_cache, tasks)), lost_run, CHOICES)
    thread.join()
    resumed = run_experiment(compose_config(overrides(lost_cache, tasks, "resume=true")), lost_run, CHOICES)
    assert resumed["metrics"]["retention_base"] == reference["metrics"]["retention_base"]
    assert resumed["metrics"]["retention"] == reference["metrics"]["retention"]


def test_a_signal_during_uninterruptible_work_raises_a_message_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(lambda sig: f"stopped by {sig}"):
        pass
    assert signal.getsignal(signal.SIGTERM) is before  # no signal: exactly the handler from before
    seen: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(WorkInterrupted, match="stopped by SIGTERM; kept 3 tasks"):
            with stop_on_signals(lambda sig: f"stopped by {sig}; kept 3 tasks", repeat_window=0.5):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10_000_000):  # the handler runs at the next bytecode
                    pass
        # the same signal again at once (timeout around make sends it twice) is the stop already made ...
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == []
        time.sleep(0.6)
        # ... a later one is the earlier handler's again
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is not before
    finally:
        signal.signal(signal.SIGTERM, before)


def test_state_digest_names_a_state_and_survives_a_round_trip(tmp_path: Path) -> None:
    state = {"adapters": [torch.randn(4, 3), torch.zeros(0)], "codebook": {"keys": torch.arange(6)}, "n": 3}
    torch.save(state, tmp_path / "s.pt")
    assert state_digest(torch.load(tmp_path / "s.pt")) == state_digest(to_cpu(state))
    changed = to_cpu(state)
    changed["adapters"][0][1, 2] += 1e-6
    assert state_digest(changed) != state_digest(state)
    assert state_digest({**state, "n": 4}) != state_digest(state)
