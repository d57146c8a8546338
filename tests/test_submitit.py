"""Sweeps through Hydra's submitit launcher on this machine (issue 36, "Runs that outgrow one machine").

``hydra/launcher=submitit_local`` runs each job as a cluster does: the launcher and the task function are
pickled into the job's folder under ``SWEEP/.submitit/``, a controller process starts the job in a process
of its own, and its result comes back pickled. The time-limit test sends the job the signal submitit's
controller sends before a time limit (``LocalJobEnvironment._usr_sig()``, SIGUSR2; on SLURM also before a
preemption) at a moment the test picks, once a checkpoint shows the stream is under way, rather than from
the controller's timer (the launcher's shortest limit is a minute, and a loaded machine makes that moment a
guess).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE, LocalJobEnvironment

from evaluation.run.checkpoint import CheckpointManager, StreamInterrupted
from evaluation.run.folder import HOLDER
from tests.conftest import REPO
from tests.test_resume import ENV, comparable, results, wait_for_checkpoint

# tiny GRACE runs: 12 edits of about 0.1 s each here, so a signal sent after the checkpoint at 4 lands mid-stream;
# no generated answers or edit-time points, which cost most of a tiny run's time and are resumed in test_resume
ARGS = ["model=tiny_llama", "editor=grace", "editor.iterations=10", "dataset.num_edits=12", "eval_every=4",
        "checkpoint.every=4", "retention=none", "answers=none", "edit_time_eval=false", "logger=none",
        "progress=false", "threads=1"]
LOCAL = "hydra/launcher=submitit_local"


def sweep_cmd(sweep_dir: Path, *args: str) -> list[str]:
    """``run.py -m`` over ``ARGS`` and ``args``, each job in ``sweep_dir/s<seed>``."""
    return [sys.executable, str(REPO / "run.py"), "-m", *ARGS, *args, f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=s${seed}"]


def run_sweep(sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_cmd(sweep_dir, *args), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def job_logs(sweep_dir: Path) -> list[str]:
    """The stdout and stderr of each submitit job (every attempt of a requeued job is appended to its files)."""
    return [p.read_text() + p.with_suffix(".err").read_text()
            for p in sorted((sweep_dir / ".submitit").glob("*/*_0_log.out"))]


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-job sweep under Hydra's basic launcher: one job after the other, in the sweep's own process."""
    sweep = tmp_path_factory.mktemp("basic")
    run_sweep(sweep, "seed=0,1")
    return sweep


def test_a_submitit_local_sweep_gives_the_basic_launchers_results(basic: Path, tmp_path: Path) -> None:
    run_sweep(tmp_path, "seed=0,1", LOCAL)
    # two jobs, each pickled, run in a process of its own and its result pickled back
    assert len(list((tmp_path / ".submitit").glob("*/*_submitted.pkl"))) == 2
    assert len(list((tmp_path / ".submitit").glob("*/*_0_result.pkl"))) == 2
    for seed in (0, 1):
        assert comparable(results(tmp_path / f"s{seed}")) == comparable(results(basic / f"s{seed}"))
    assert comparable(results(basic / "s0")) != comparable(results(basic / "s1"))  # two runs, not one twice


def test_the_slurm_preset_requeues_a_run_at_its_time_limit_and_resumes_it() -> None:
    from tests.test_sweeps import compose_hydra

    cfg = compose_hydra(["experiment=[table1,cluster_slurm]", "model=smollm2"])
    assert cfg.resume == "auto"  # the requeued job (same overrides) continues, not starts over
    assert cfg.hydra.launcher.max_num_timeout >= 1  # the launcher's default, 0, never requeues at a time limit
    assert cfg.hydra.launcher.signal_delay_s >= 300  # time for a batch, a curve point and the checkpoint


def test_a_submitit_job_signalled_before_its_time_limit_saves_is_requeued_and_resumes_to_the_same_results(
        basic: Path, tmp_path: Path) -> None:
    """The time-limit signal finishes the batch, saves a checkpoint there and hands the job to submitit, which
    requeues it with the same overrides; it goes on from there, also without resume=auto (a plain launcher)."""
    proc = subprocess.Popen(sweep_cmd(tmp_path, "seed=0", LOCAL), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = tmp_path / "s0"
    wait_for_checkpoint(proc, job, 4)
    pid = json.loads((job / HOLDER).read_text())["pid"]  # the job's own process holds its run folder
    os.kill(pid, LocalJobEnvironment._usr_sig())  # as submitit's controller does (local.Controller.wait)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    [log] = job_logs(tmp_path)
    assert "SIGUSR2 received: finishing the current batch, saving a checkpoint, then handing the job back" in log
    stopped_at = int(log.split("stopped by SIGUSR2 after ")[1].split()[0])
    assert 4 <= stopped_at <= 12, log[-3000:]
    assert "Requeued job" in log  # submitit's own requeue (the controller starts the job again)
    assert "this submitit job was requeued after saving" in log
    res = results(job)
    assert res["stream"]["resumed_from"] == stopped_at  # from the checkpoint the signal saved, not an older one
    assert comparable(res) == comparable(results(basic / "s0"))  # every metric and curve point
    assert [c["edits"] for c in res["curves"]] == [4, 8, 12]


class Requeueable:
    """A submitted callable that submitit can requeue: ``checkpoint`` resubmits the same call, as Hydra's
    submitit launcher does (``BaseSubmititLauncher.checkpoint``)."""

    def __call__(self) -> None:
        return None

    def checkpoint(self) -> DelayedSubmission:
        return DelayedSubmission(self)


@pytest.fixture
def submitit_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobPaths]:
    """This process as a local submitit job with a one-minute limit, under submitit's own signal handlers
    (the pytest process's handlers come back after)."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "1")
    usr = LocalJobEnvironment._usr_sig()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGCONT, usr)}
    paths = JobPaths(tmp_path / "job", job_id="1", task_id=0)
    paths.folder.mkdir()
    yield paths
    for sig, handler in before.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def install_submitit_handlers(paths: JobPaths, requeues_left: int) -> None:
    """submitit's handlers, as a job installs them when it starts, for a job with a one-minute limit (any
    signal counts as reaching it) that may be requeued ``requeues_left`` more times after a time limit."""
    delayed = DelayedSubmission(Requeueable())
    delayed.set_timeout(1, requeues_left)
    LocalJobEnvironment()._handle_signals(paths, delayed)


def run_signalled_stream(paths: JobPaths, requeues_left: int, checkpoints: CheckpointManager) -> Any:
    """A 4-edit tiny GRACE stream in this process, which gets submitit's signal while editing its second edit,
    under submitit's handlers (``install_submitit_handlers``)."""
    from evaluation.editing.unedited import Unedited
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import locality_inputs, predict
    from evaluation.run.stream import run_stream

    cfg = compose_config(["model=tiny_llama", "editor=grace", "editor.iterations=3", "dataset.num_edits=4"])
    seed_everything(0)
    requests, loaded = build(cfg.dataset).load(), build(cfg.model)
    editor = build(cfg.editor, model=loaded)
    edit = editor.edit

    def signalled(batch: Any) -> Any:  # the signal arrives while the second batch is edited
        if batch[0].uid == requests[1].uid:
            os.kill(os.getpid(), LocalJobEnvironment._usr_sig())
        return edit(batch)

    editor.edit = signalled
    install_submitit_handlers(paths, requeues_left)
    base = predict(Unedited(loaded), *locality_inputs(requests))
    return run_stream(editor, requests, base, NullLogger(), progress=False, checkpoints=checkpoints)


def test_at_a_time_limit_the_stream_saves_at_the_boundary_then_submitit_requeues_it(
        submitit_job: JobPaths, tmp_path: Path, one_thread: None) -> None:
    checkpoints = CheckpointManager(tmp_path / "checkpoints", every=0)
    with pytest.raises(SystemExit) as stop:
        run_signalled_stream(submitit_job, 1, checkpoints)
    assert stop.value.code == LOCAL_REQUEUE_RETURN_CODE  # submitit's requeue: its controller starts the job again
    saved = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert saved is not None and (saved.position, saved.reason) == (2, "requeue on SIGUSR2")  # the batch finished
    requeued = DelayedSubmission.load(submitit_job.submitted_pickle)  # the same call, one time limit used up
    assert isinstance(requeued.function, Requeueable) and requeued._timeout_countdown == 0
    # the stream gave the signals back: submitit's handlers again (SIGTERM from the requeue itself is ignored)
    assert signal.getsignal(signal.SIGTERM).__func__ is SignalHandler.bypass
    assert signal.getsignal(LocalJobEnvironment._usr_sig()).__func__ is SignalHandler.checkpoint_and_try_requeue


def test_after_its_last_allowed_time_limit_the_stream_saves_and_says_submitit_did_not_requeue_it(
        submitit_job: JobPaths, tmp_path: Path, one_thread: None) -> None:
    checkpoints = CheckpointManager(tmp_path / "checkpoints", every=0)
    with pytest.raises(StreamInterrupted, match=r"stopped by SIGUSR2 after 2 of 4 edits\. The state after 2 edits "
                                                r"is saved in .*resume=true.* submitit did not requeue the job: Job "
                                                r"not requeued because: timed-out too many times\."):
        run_signalled_stream(submitit_job, 0, checkpoints)
    saved = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert saved is not None and saved.position == 2


def test_a_second_submitit_signal_hands_the_job_to_submitit_at_once(submitit_job: JobPaths) -> None:
    """The first signal waits for the batch boundary; a later one (the limit is close) hands over at once:
    submitit requeues the job, which resumes from the newest checkpoint on disk."""
    from evaluation.run.stream_signals import SignalGuard

    install_submitit_handlers(submitit_job, 1)
    usr = LocalJobEnvironment._usr_sig()
    with SignalGuard(enabled=True, repeat_window=0.0) as guard:
        os.kill(os.getpid(), usr)
        assert guard.received == "SIGUSR2" and guard.preempted  # a request: nothing stops yet
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), usr)
    assert stop.value.code == LOCAL_REQUEUE_RETURN_CODE
    assert DelayedSubmission.load(submitit_job.submitted_pickle)._timeout_countdown == 0


def test_without_resume_only_a_submitit_job_goes_on_from_a_checkpoint_saved_for_its_requeue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluation.run.resume_rules import saved_for_a_requeue

    manager = CheckpointManager(tmp_path / "checkpoints", every=0)
    manager.directory.mkdir()
    latest = manager.directory / "latest.json"
    pointer = {"file": "step-000002.pt", "position": 2, "run_id": "r"}
    latest.write_text(json.dumps({**pointer, "reason": "requeue on SIGUSR2"}))
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not saved_for_a_requeue(manager)  # a run started by hand in that folder starts afresh
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert saved_for_a_requeue(manager)
    for reason in ("signal SIGTERM", "periodic", "requeue on SIGTERM"):  # stopped, not requeued; another signal
        latest.write_text(json.dumps({**pointer, "reason": reason}))
        assert not saved_for_a_requeue(manager)
