"""Long runs that survive: kill and resume give the uninterrupted metrics; one seed fixes a run.

The killed and terminated runs are real ``run.py`` processes on tiny_llama. Their edits are slowed by a
sleep (a wrapper in the test's own ``python -c``, not a product hook) so the test can act between two
batches on a loaded machine; sleeping changes no number except ``seconds_per_edit``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from evaluation.run.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    StreamCheckpoint,
    checkpoint_name,
)
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
ARGS = ["model=tiny_llama", "dataset.num_edits=16", "retention=none", "progress=false", "eval_every=4",
        "editor.iterations=10", "threads=1", "checkpoint.every=4"]
SLOW_RUN = (  # run.py with every edit batch made 0.4 s slower
    "import runpy, sys, time\n"
    "import elder.editor as m\n"
    "edit = m.ElderEditor.edit\n"
    "m.ElderEditor.edit = lambda self, batch: (time.sleep(0.4), edit(self, batch))[1]\n"
    "sys.argv = ['run.py'] + sys.argv[1:]\n"
    "runpy.run_path('run.py', run_name='__main__')\n"
)


def run_cli(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run.py"), *ARGS, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def start_slow(args: list[str], run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_RUN, *ARGS, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, position: int, timeout: float = 120) -> dict[str, Any]:
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest.is_file():
            info = json.loads(latest.read_text())  # written atomically: never half a file
            if info["position"] >= position:
                return info
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended (rc {proc.returncode}) before a checkpoint at {position} edits:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint at {position} edits within {timeout} s")


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "results.json").read_text())


def comparable(res: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Every metric, curve point and forgetting point except wall-clock time."""
    return {k: v for k, v in res["metrics"].items() if k != "seconds_per_edit"}, res["curves"], res["forgetting"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(["logger=none"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**results(run_dir), "answers.jsonl": (run_dir / "answers.jsonl").read_text()}


def test_terminated_then_killed_stream_resumes_to_exactly_the_uninterrupted_metrics(
        reference: dict, tmp_path: Path) -> None:
    # 1. SIGTERM: the batch in flight finishes, a checkpoint is saved, the process exits with a message
    proc = start_slow(["logger=wandb"], tmp_path)
    wait_for_checkpoint(proc, tmp_path, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert "error: stopped by SIGTERM after" in err and "resume=true" in err
    stopped_at = int(err.split("stopped by SIGTERM after ")[1].split()[0])
    assert stopped_at % 4 == 0 and 4 <= stopped_at <= 8, err[-2000:]
    ckpt = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert ckpt is not None and ckpt.position == stopped_at
    # nothing computed is lost: every curve point up to the stop is kept, or (the one due where it stopped,
    # when the signal came before it was taken) owed and evaluated first on resume. A signal just after the
    # checkpoint at 4 (the point at 4 taken before it) stops at once at 4 with nothing owed.
    done = [c["edits"] for c in ckpt.curves]
    assert done + [stopped_at] * ckpt.curve_due == list(range(4, stopped_at + 1, 4)), (done, ckpt.curve_due)
    run_id = ckpt.run_id
    assert run_id

    # 2. resumed, then SIGKILLed (no handler runs) once a later checkpoint is on disk
    proc = start_slow(["logger=wandb", "resume=true"], tmp_path)
    info = wait_for_checkpoint(proc, tmp_path, stopped_at + 4)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    assert info["position"] < 16, "the run got to the end before it could be killed"

    # 3. resumed to the end: exactly the uninterrupted run's numbers, in the same W&B run
    resumed = run_cli(["logger=wandb", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = results(tmp_path)
    assert res["stream"]["resumed_from"] >= stopped_at + 4
    # the wall time counts the three processes: more than the last one, at least the stopped run's part
    assert res["timings"]["wall_seconds"] > res["timings"]["wall_seconds_this_process"]
    assert res["timings"]["wall_seconds"] > ckpt.wall_seconds > 0
    assert comparable(res) == comparable(reference)  # ==: every metric and every curve point
    assert "reliability_generated" in res["metrics"] and res["metrics"]["at_edit_time"]
    # the generated answers of the final evaluation, word for word
    assert (tmp_path / "answers.jsonl").read_text() == reference["answers.jsonl"]
    assert [c["edits"] for c in res["curves"]] == [4, 8, 12, 16]
    assert res["stream"]["wandb_run_id"] == info["run_id"] == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 3


def test_sigterm_stops_the_whole_sweep_not_only_its_job(tmp_path: Path) -> None:
    """Hydra's launchers record a failed job and start the next; a signal is meant for the sweep, so the
    sweep stops with one line, its stopped job checkpointed and the next one never started."""
    cmd = [sys.executable, "-c", SLOW_RUN, "-m", *ARGS, "logger=none", "seed=0,1", f"hydra.sweep.dir={tmp_path}",
           "hydra.sweep.subdir=s${seed}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, tmp_path / "s0", 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert "error: stopped by SIGTERM after" in err and "The sweep stopped there; rerun it with resume=auto" in err
    assert CheckpointManager(tmp_path / "s0" / "checkpoints").load_latest() is not None
    assert not (tmp_path / "s1").exists()


def test_a_killed_sweep_process_stops_its_workers_whose_jobs_resume_to_the_uninterrupted_metrics(
        reference: dict, tmp_path: Path) -> None:
    """``kill`` of a joblib sweep's main process ends that process alone; its workers, orphaned, must stop their
    jobs as if signalled (checkpoint, one line) and exit, not run on unseen, and the sweep's rerun with
    resume=auto continues the jobs."""
    psutil = pytest.importorskip("psutil")
    hook = tmp_path / "hook"  # the slow edits in every process of the sweep: its workers import sitecustomize too
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RUN.split("sys.argv")[0])
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *ARGS, "logger=none", "resume=auto", "seed=0,1",
           "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           "hydra.sweep.subdir=s${seed}"]
    runs = [tmp_path / "sweep" / f"s{seed}" for seed in (0, 1)]
    with open(tmp_path / "err.txt", "w") as err:  # a file, not a pipe: the workers hold it after the main process
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        for run_dir in runs:
            wait_for_checkpoint(proc, run_dir, 4)
        workers = [p for p in psutil.Process(proc.pid).children() if "popen_loky" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM  # the main process had no say: it ended at once
        _, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, f"workers still running after the sweep's process ended: {alive}"
    err = (tmp_path / "err.txt").read_text()
    assert err.count("The sweep's main process had ended") == 2 and "Traceback" not in err, err[-3000:]
    stops = [json.loads((run_dir / "checkpoints" / "latest.json").read_text()) for run_dir in runs]
    for run_dir, info in zip(runs, stops):
        assert info["reason"] == "signal SIGTERM" and 4 <= info["position"] < 16, info
        assert not (run_dir / "results.json").exists()

    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    res = results(runs[0])
    assert res["stream"]["resumed_from"] == stops[0]["position"]
    assert comparable(res) == comparable(reference)  # seed 0 is the reference's


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment

    overrides = ["model=tiny_llama", "dataset.num_edits=8", "retention=none", "progress=false", "eval_every=4",
                 "editor.iterations=5", "logger=none", "checkpoint.every=0"]
    choices = {"editor": "elder", "model": "tiny_llama", "dataset": "zsre"}
    first = run_experiment(compose_config(overrides), tmp_path / "a", choices)
    second = run_experiment(compose_config(overrides), tmp_path / "b", choices)
    assert comparable(first) == comparable(second)
    assert first["metrics"]["reliability_token"] > 0  # something was learned and measured


def test_resume_auto_keeps_a_finished_run_continues_an_interrupted_one_and_starts_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a sweep rerun after a lost session needs: ``resume=auto`` does no work where the folder holds this
    config's finished run, goes on from a checkpoint where there is one, and starts afresh otherwise."""
    import evaluation.run.experiment as experiment
    from evaluation.common.errors import ConfigError
    from evaluation.run.compose import compose_config

    overrides = ["model=tiny_llama", "dataset.num_edits=8", "retention=none", "progress=false", "eval_every=4",
                 "editor.iterations=5", "logger=none", "checkpoint.every=4", "checkpoint.keep=3", "resume=auto"]
    choices = {"editor": "elder", "model": "tiny_llama", "dataset": "zsre"}
    run_dir = tmp_path / "run"
    fresh = experiment.run_experiment(compose_config(overrides), run_dir, choices)  # nothing there: a fresh run
    assert results(run_dir)["stream"]["resumed_from"] is None
    written = (run_dir / "results.json").read_bytes()

    # finished with this config (threads and progress do not change a result): no model is even built
    with monkeypatch.context() as m:
        m.setattr(experiment, "build", lambda *a, **k: pytest.fail("resume=auto redid a finished run"))
        again = experiment.run_experiment(compose_config([*overrides, "threads=2", "progress=true"]), run_dir, choices)
    assert again == fresh and (run_dir / "results.json").read_bytes() == written
    # nor does taking out-of-scope rows from the unedited pass (the same bit for bit), also for a run made before
    # the key existed (finished runs of a sweep are kept when a later version adds such a key)
    payload = json.loads(written)
    del payload["config"]["answers"]["reuse_unedited"]
    from evaluation.run.resume_rules import same_result
    assert same_result(compose_config([*overrides, "answers.reuse_unedited=false"]), payload)
    assert not same_result(compose_config([*overrides, "answers.max_new_tokens=5"]), payload)

    # interrupted after 4 edits (its results and later checkpoint gone): continues, and ends as the full run
    (run_dir / "results.json").unlink()
    (run_dir / "checkpoints" / checkpoint_name(8)).unlink()
    (run_dir / "checkpoints" / "latest.json").unlink()
    resumed = experiment.run_experiment(compose_config(overrides), run_dir, choices)
    assert results(run_dir)["stream"]["resumed_from"] == 4
    assert comparable(resumed) == comparable(fresh)

    # another config in the same folder: a new run, the earlier result set aside, not taken for this one's
    experiment.run_experiment(compose_config([*overrides, "editor.iterations=2"]), run_dir, choices)
    changed = results(run_dir)
    assert changed["stream"]["resumed_from"] is None and changed["config"]["editor"]["iterations"] == 2
    assert len(list(run_dir.glob("results.superseded-*.json"))) == 1
    with pytest.raises(ConfigError, match="resume must be true, false or auto, got 'later'"):
        experiment.run_experiment(compose_config([*overrides[:-1], "resume=later"]), tmp_path / "bad", choices)


def test_a_key_added_since_a_run_matches_only_where_it_holds_what_that_runs_overrides_give(tmp_path: Path) -> None:
    """A sweep rerun after the code gained a config key: a finished run (or checkpoint) that predates it is kept
    where the key holds what the code now composes from that run's overrides, and redone where this run sets it
    otherwise or the run's overrides are not on record."""
    from evaluation.run.compose import compose_config
    from evaluation.run.resume_rules import (
        added_keys_that_differ,
        run_fingerprint,
        same_result,
    )

    overrides = ["model=tiny_llama", "dataset.num_edits=8", "retention=none", "editor.iterations=5"]
    cfg = compose_config(overrides)
    payload = {"config": OmegaConf.to_container(cfg, resolve=True)}
    del payload["config"]["editor"]["iterations"], payload["config"]["editor"]["lr"]  # "added" since the run
    run_dir = tmp_path / "run"
    assert not same_result(cfg, payload, run_dir=run_dir)  # no record of its overrides: not taken
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    assert same_result(cfg, payload, run_dir=run_dir)
    assert same_result(compose_config([*overrides, "threads=2"]), payload, run_dir=run_dir)
    assert not same_result(compose_config([*overrides[:-1], "editor.iterations=6"]), payload, run_dir=run_dir)
    assert not same_result(compose_config([*overrides, "editor.lr=0.5"]), payload, run_dir=run_dir)

    # a checkpoint's fingerprint likewise (the digests of inputs it did not record are not checked)
    now = run_fingerprint(compose_config([*overrides, "editor.lr=0.5"]), {"dataset_sha256": "abc"})
    recorded = set(now) - {"editor.iterations", "editor.lr", "inputs.dataset_sha256"}
    assert added_keys_that_differ(now, recorded, run_dir, fingerprint=True) == ["editor.lr"]


def test_seed_fixes_preset_allocations_and_initialisation() -> None:
    from elder.editor import ElderEditor
    from tests.conftest import tiny_model

    def build(seed: int) -> ElderEditor:
        return ElderEditor(tiny_model(seed=seed), layers=[2, 3, 4, 5, 6, 7], query_layer=1, seed=seed)

    a, b, c = build(0), build(0), build(1)
    facts = list(range(16))
    assert torch.equal(a.allocator.batch(facts), b.allocator.batch(facts))
    assert not torch.equal(a.allocator.batch(facts), c.allocator.batch(facts))
    for x, y in zip(a.adapters, b.adapters):
        assert torch.equal(x.lora_A, y.lora_A)
    assert not torch.equal(a.adapters[0].lora_A, c.adapters[0].lora_A)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, every=4, keep=2)
    state = {"w": torch.arange(4.0)}
    for position in (4, 8, 12):
        manager.save(StreamCheckpoint(position=position, editor_state=state))
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == [checkpoint_name(8), checkpoint_name(12)]

    def torn_save(obj: Any, fh: Any) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        manager.save(StreamCheckpoint(position=16, editor_state=state))
    monkeypatch.undo()
    assert not (tmp_path / checkpoint_name(16)).exists() and not list(tmp_path.glob(".*.tmp"))
    latest = CheckpointManager(tmp_path).load_latest()
    assert latest is not None and latest.position == 12 and torch.equal(latest.editor_state["w"], state["w"])

    # a damaged newest file (e.g. from another tool): the next older one is used
    (tmp_path / checkpoint_name(12)).write_bytes(b"garbage")
    latest = CheckpointManager(tmp_path).load_latest()
    assert latest is not None and latest.position == 8


def _state_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def resume_pair(overrides: list[str], tmp_path: Path, every: int = 4) -> tuple[Any, Any]:
    """In-process: one stream straight through and one resumed from its checkpoint after ``every`` edits; asserts
    they end with the same metrics, curves and editor state, and returns (straight, resumed) editors."""
    from evaluation.editing.unedited import Unedited
    from evaluation.run.checkpoint import to_cpu
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import locality_inputs, predict
    from evaluation.run.stream import run_stream

    cfg = compose_config(["model=tiny_llama", *overrides])

    def fresh() -> tuple[Any, list, list]:
        seed_everything(0)
        requests, loaded = build(cfg.dataset).load(), build(cfg.model)
        return build(cfg.editor, model=loaded), requests, predict(Unedited(loaded), *locality_inputs(requests))

    full_editor, requests, base = fresh()
    manager = CheckpointManager(tmp_path, every=every, keep=3)
    full = run_stream(full_editor, requests, base, NullLogger(), every, progress=False, checkpoints=manager)
    assert [p for p, _ in manager.files()][0] == every
    resumed_editor, requests, base = fresh()
    resumed = run_stream(resumed_editor, requests, base, NullLogger(), every, progress=False,
                         resume=CheckpointManager.read(tmp_path / checkpoint_name(every)))
    assert resumed.resumed_from == every
    assert (resumed.metrics, resumed.curves) == (full.metrics, full.curves)
    state = to_cpu(full_editor.state_dict())
    assert _state_equal(to_cpu(resumed_editor.state_dict()), state)
    assert not any("base_layer" in k or k.startswith("model.") for k in state)  # the base model stays out
    return full_editor, resumed_editor


@pytest.mark.parametrize("editor, overrides", [
    ("ft_l", ["editor.steps=5"]),
    ("rome", ["editor.v_num_grad_steps=3"]),
    ("defer", ["editor.iterations=10"]),
    ("grace", ["editor.iterations=10"]),
    ("melo", ["editor.iterations=10"]),
])
def test_every_baseline_resumes_exactly_from_its_checkpoint(editor: str, overrides: list[str], tmp_path: Path) -> None:
    """In-process: a stream resumed from its checkpoint after 4 edits ends exactly as the full stream (the newer
    editors' own test files call ``resume_pair`` with their settings)."""
    resume_pair([f"editor={editor}", "dataset.num_edits=8", *overrides], tmp_path)


def test_a_repeated_signal_is_one_stop_and_a_later_one_stops_at_once() -> None:
    """``timeout`` + ``make`` deliver one SIGTERM twice; that must still save, a deliberate second must not."""
    from evaluation.run.stream import _SignalGuard

    guard = _SignalGuard(enabled=False, repeat_window=60.0)
    guard._handle(signal.SIGTERM, None)
    guard._handle(signal.SIGTERM, None)  # within the window: the same stop, no exit
    assert guard.received == "SIGTERM"
    guard.repeat_window = 0.0
    with pytest.raises(SystemExit):
        guard._handle(signal.SIGTERM, None)


def test_a_checkpoint_from_before_editors_were_modules_is_refused_in_one_line() -> None:
    """Format 1 held each editor's own dict; format 2 holds the editor module's torch state_dict."""
    assert FORMAT_VERSION == 2
    with pytest.raises(ValueError, match=r"another version of the harness \(checkpoint format 1, this version reads "
                                         r"format 2\); it cannot resume here: start the run again"):
        StreamCheckpoint.from_payload({"format": 1, "position": 4, "editor_state": {"adapters": []}})


SLOW_POINT_RUN = (  # run.py whose curve point at 8 edits says so on stderr and then takes a minute
    "import runpy, sys, time\n"
    "import evaluation.run.stream as s\n"
    "evaluate = s.evaluate_edits\n"
    "def slow(editor, requests, *args, **kwargs):\n"
    "    if len(requests) == 8:\n"
    "        print('curve point at 8 started', file=sys.stderr, flush=True)\n"
    "        time.sleep(60)\n"
    "    return evaluate(editor, requests, *args, **kwargs)\n"
    "s.evaluate_edits = slow\n"
    "sys.argv = ['run.py'] + sys.argv[1:]\n"
    "runpy.run_path('run.py', run_name='__main__')\n"
)


def _signal_the_slow_point(tmp_path: Path, *extra: str) -> None:
    """Run SLOW_POINT_RUN, SIGTERM it once its point at 8 edits has started: it stops at once, with its line."""
    cmd = [sys.executable, "-c", SLOW_POINT_RUN, *ARGS, "logger=none", f"hydra.run.dir={tmp_path}", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the point has started
        seen.append(line)
        if "curve point at 8 started" in line:
            break
    else:
        pytest.fail("".join(seen)[-3000:])
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 30  # the minute-long point was not waited for
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        "error: stopped by SIGTERM during the curve point at 8 of 16 edits (it is evaluated first when the run goes "
        "on). The state after 8 edits is saved in ")
    ckpt = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert ckpt is not None and (ckpt.position, ckpt.curve_due) == (8, True)
    assert [c["edits"] for c in ckpt.curves] == [4]


def test_a_signal_during_a_curve_point_stops_at_once_and_the_resumed_run_evaluates_it_first(
        reference: dict, tmp_path: Path) -> None:
    _signal_the_slow_point(tmp_path)
    # the resumed run evaluates the owed point before its first edit, under the same guard: a signal there too
    _signal_the_slow_point(tmp_path, "resume=true")
    resumed = run_cli(["logger=none", "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = results(tmp_path)
    assert res["stream"]["resumed_from"] == 8 and [c["edits"] for c in res["curves"]] == [4, 8, 12, 16]
    assert comparable(res) == comparable(reference)
