"""Concurrent runs sharing one retention cache generate each task once (a ``filelock`` per task,
evaluation/retention/suite.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from evaluation.common.errors import ConfigError
from evaluation.retention.suite import Gu2024Suite, PendingTaskLost
from tests.test_retention_suite import DATA, Recorder

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA} (set RETENTION_DATA_DIR)")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["rte", "sst2", "boolq", "mutual"]


def _suite(cache: Path, tasks=("rte", "sst2")) -> Gu2024Suite:
    return Gu2024Suite(str(DATA), tasks=list(tasks), limit=3, cache_dir=str(cache), wait_poll_seconds=0.02)


def _other_run(path: str, hold_seconds: float, before_release=lambda: None) -> threading.Thread:
    """Another run holding a task's lock for ``hold_seconds`` (its own thread and lock object: flock is
    per open file, so it excludes this thread's lock as another process's would), then calling
    ``before_release`` (storing the task, or not) and letting go."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    held = threading.Event()

    def run() -> None:
        with FileLock(path + ".lock"):
            held.set()
            time.sleep(hold_seconds)
            before_release()

    thread = threading.Thread(target=run)
    thread.start()
    held.wait()
    return thread


def test_a_task_locked_by_a_live_run_is_done_last_and_read_back_not_generated(tmp_path):
    reference = _suite(tmp_path / "ref").evaluate(Recorder(lambda p: " True"), cache_key="m")
    suite = _suite(tmp_path / "cache")
    rte = suite.cache_path(str(tmp_path / "cache"), "m", "rte")
    other = _other_run(rte, 0.3, lambda: _suite(tmp_path / "cache")._store(  # another run generates rte
        rte, "m", "rte", reference.task_fields("rte")))
    gen = Recorder(lambda p: " True")
    report = suite.evaluate(gen, cache_key="m")
    other.join()
    assert [c[0] for c in gen.calls] == ["sst2"] and report.reused == ["rte"]
    assert report.scores == reference.scores


def test_a_lock_released_without_a_result_is_generated_here(tmp_path):
    suite = _suite(tmp_path)
    rte = suite.cache_path(str(tmp_path), "m", "rte")
    other = _other_run(rte, 0.2)  # the holder is stopped before storing
    gen = Recorder(lambda p: " True")
    report = suite.evaluate(gen, cache_key="m")
    other.join()
    assert [c[0] for c in gen.calls] == ["sst2", "rte"] and report.reused == []
    assert os.path.exists(rte)


def test_the_lock_of_a_killed_run_is_gone_with_it(tmp_path):
    suite = _suite(tmp_path)
    rte = suite.cache_path(str(tmp_path), "m", "rte")
    os.makedirs(os.path.dirname(rte), exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom filelock import FileLock\n"
                               "with FileLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               rte + ".lock"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    gen = Recorder(lambda p: " True")
    suite.evaluate(gen, cache_key="m")
    assert [c[0] for c in gen.calls] == ["rte", "sst2"]  # at once, in order: nothing waits for the dead run


def test_deferred_a_task_another_run_is_generating_is_left_pending_then_collected_once_stored(tmp_path):
    """defer_others: the run goes on (its stream) while another run generates a task, and reads it after."""
    reference = _suite(tmp_path / "ref").evaluate(Recorder(lambda p: " True"), cache_key="m")
    suite = _suite(tmp_path / "cache")
    rte = suite.cache_path(str(tmp_path / "cache"), "m", "rte")
    stored = threading.Event()

    def store_rte() -> None:
        _suite(tmp_path / "cache")._store(rte, "m", "rte", reference.task_fields("rte"))
        stored.set()

    stream_done = threading.Event()  # the other run stores rte only once this run has returned
    other = _other_run(rte, 0.0, lambda: stream_done.wait(30) and store_rte())
    gen = Recorder(lambda p: " True")
    report = suite.evaluate(gen, cache_key="m", defer_others=True)
    assert not stored.is_set()
    assert report.pending == ["rte"] and "average" not in report.scores and "rte" not in report.scores
    stream_done.set()
    report = suite.collect(report, cache_key="m")
    other.join()
    assert [c[0] for c in gen.calls] == ["sst2"]  # rte was never generated here
    assert report.pending == [] and report.reused == ["rte"]
    assert report.scores == reference.scores and list(report.scores) == list(reference.scores)
    assert report.outputs == reference.outputs


def test_collect_names_a_task_whose_generating_run_stopped_without_it(tmp_path):
    suite = _suite(tmp_path)
    rte = suite.cache_path(str(tmp_path), "m", "rte")
    other = _other_run(rte, 0.2)  # stopped before storing
    gen = Recorder(lambda p: " True")
    report = suite.evaluate(gen, cache_key="m", defer_others=True)
    with pytest.raises(PendingTaskLost, match="retention task rte was being generated by another run"):
        suite.collect(report, cache_key="m")
    other.join()
    assert [c[0] for c in gen.calls] == ["sst2"]  # collect never generates: the model may be edited by then


def test_a_wait_poll_that_never_looks_is_refused():
    with pytest.raises(ConfigError, match="wait_poll_seconds must be positive"):
        Gu2024Suite(str(DATA), tasks=["rte"], wait_poll_seconds=0)


WORKER = """
import json, sys, time
from evaluation.editing.generation import Continuation
from evaluation.retention.suite import Gu2024Suite, PendingTaskLost
data, cache, log = sys.argv[1:4]
suite = Gu2024Suite(data, tasks={tasks!r}, limit=3, cache_dir=cache, wait_poll_seconds=0.02)
def generate(prompts, max_new_tokens, desc=""):
    with open(log, "a") as f:
        f.write(desc + "\\n")
    time.sleep(0.5)
    return [Continuation(" True", max_new_tokens, "budget")] * len(prompts)
report = suite.evaluate(generate, cache_key="shared-model")
print(json.dumps(report.scores, sort_keys=True))
"""


def test_two_concurrent_runs_generate_each_task_once_and_agree(tmp_path):
    """Two processes start the same suite on one cache at once (a sweep's parallel jobs)."""
    script = WORKER.format(tasks=TASKS)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(DATA), str(tmp_path / "cache"), str(log)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for log in logs]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    generated = [line for log in logs if log.exists() for line in log.read_text().split()]
    assert sorted(generated) == sorted(TASKS)  # each task once, between them
    assert json.loads(outs[0][0]) == json.loads(outs[1][0])
