"""Concurrent runs sharing one retention cache generate each task once (lock files, evaluation/retention/claims.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evaluation.errors import ConfigError
from evaluation.retention import claims
from evaluation.retention.suite import Gu2024Suite
from tests.test_retention_suite import DATA, Recorder

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA} (set RETENTION_DATA_DIR)")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["rte", "sst2", "boolq", "mutual"]


def _suite(cache: Path, tasks=("rte", "sst2")) -> Gu2024Suite:
    return Gu2024Suite(str(DATA), tasks=list(tasks), limit=3, cache_dir=str(cache), wait_poll_seconds=0.02,
                       heartbeat_seconds=0.05, stale_seconds=5.0)


def _write_lock(lock: str, host: str, pid: int) -> None:
    with open(lock, "w", encoding="utf-8") as f:
        json.dump({"host": host, "pid": pid, "since": time.time()}, f)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_task_claimed_by_a_live_run_is_done_last_and_read_back_not_generated(tmp_path):
    reference = _suite(tmp_path / "ref").evaluate(Recorder(lambda p: " True"), cache_key="m")
    suite = _suite(tmp_path / "cache")
    rte = suite.cache_path(str(tmp_path / "cache"), "m", "rte")
    os.makedirs(os.path.dirname(rte), exist_ok=True)
    _write_lock(rte + ".lock", "elsewhere", 1)  # another machine's run holds rte

    def other_run_finishes() -> None:
        time.sleep(0.3)
        _suite(tmp_path / "cache")._store(rte, "m", "rte", reference.scores["rte"], reference.details["rte"], 1.0)
        os.remove(rte + ".lock")

    other = threading.Thread(target=other_run_finishes)
    other.start()
    gen = Recorder(lambda p: " True")
    report = suite.evaluate(gen, cache_key="m")
    other.join()
    assert [c[0] for c in gen.calls] == ["sst2"] and report.reused == ["rte"]
    assert report.scores == reference.scores and not os.path.exists(rte + ".lock")


def test_a_claim_released_without_a_result_is_taken_over(tmp_path):
    suite = _suite(tmp_path)
    rte = suite.cache_path(str(tmp_path), "m", "rte")
    os.makedirs(os.path.dirname(rte), exist_ok=True)
    _write_lock(rte + ".lock", "elsewhere", 1)
    threading.Timer(0.2, os.remove, args=(rte + ".lock",)).start()  # the holder was stopped before storing
    gen = Recorder(lambda p: " True")
    report = suite.evaluate(gen, cache_key="m")
    assert [c[0] for c in gen.calls] == ["sst2", "rte"] and report.reused == []
    assert os.path.exists(rte) and not os.path.exists(rte + ".lock")


@pytest.mark.parametrize("holder", ["dead process on this host", "silent other host"])
def test_a_stale_claim_is_taken_over_at_once(tmp_path, holder):
    suite = _suite(tmp_path)
    rte = suite.cache_path(str(tmp_path), "m", "rte")
    os.makedirs(os.path.dirname(rte), exist_ok=True)
    lock = rte + ".lock"
    if holder == "dead process on this host":
        _write_lock(lock, socket.gethostname(), _dead_pid())
    else:
        _write_lock(lock, "elsewhere", 1)
        old = time.time() - 60
        os.utime(lock, (old, old))  # no heartbeat for a minute, stale_seconds is 5
    gen = Recorder(lambda p: " True")
    suite.evaluate(gen, cache_key="m")
    assert [c[0] for c in gen.calls] == ["rte", "sst2"] and not os.path.exists(lock)


def test_a_live_claim_is_kept_fresh_and_removed_on_release(tmp_path):
    lock = str(tmp_path / "x.lock")
    held = claims.claim(lock, heartbeat_seconds=0.05)
    assert held is not None and claims.claim(lock) is None  # exclusive while held
    old = time.time() - 60
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert time.time() - os.path.getmtime(lock) < 5 and not claims.is_stale(lock, stale_seconds=5)
    held.release()
    assert not os.path.exists(lock) and claims.claim(lock) is not None


def test_a_stale_lock_replaced_by_another_run_meanwhile_is_put_back(tmp_path):
    """Two runs judge one dead run's lock stale; the first takes it over, the second must not remove
    the first's new lock (before, it did, and both generated the task)."""
    lock = str(tmp_path / "x.lock")
    _write_lock(lock, socket.gethostname(), _dead_pid())
    judged = claims._stale_identity(lock, stale_seconds=5)  # the second run's look
    assert judged is not None
    first = claims.claim(lock, heartbeat_seconds=0.05)  # the first run takes it over
    assert first is not None
    mine = claims.holder(lock)
    assert claims.take_over(lock, judged) is False  # the second run, acting on its old look
    assert claims.holder(lock) == mine and claims.claim(lock) is None
    assert [p.name for p in tmp_path.iterdir()] == ["x.lock"]  # nothing left aside
    first.release()


def test_a_takeover_left_by_a_killed_run_does_not_block_the_task_for_good(tmp_path):
    lock = str(tmp_path / "x.lock")
    _write_lock(lock, socket.gethostname(), _dead_pid())
    Path(lock + ".takeover").touch()
    assert claims.claim(lock) is None  # a takeover under way: wait
    old = time.time() - 2 * claims.TAKEOVER_STALE_SECONDS
    os.utime(lock + ".takeover", (old, old))  # its run died inside the takeover
    assert claims.claim(lock) is None and not os.path.exists(lock + ".takeover")
    held = claims.claim(lock)  # the next poll takes the dead run's lock over
    assert held is not None and claims.holder(lock)["pid"] == os.getpid()
    held.release()


def test_of_many_runs_taking_over_one_stale_lock_exactly_one_holds_it(tmp_path):
    dead = _dead_pid()
    for round_ in range(50):
        lock = str(tmp_path / f"{round_}.lock")
        _write_lock(lock, socket.gethostname(), dead)
        start = threading.Barrier(4)
        held: list[claims.Claim] = []

        def take() -> None:
            start.wait()
            if (c := claims.claim(lock, heartbeat_seconds=0.05)) is not None:
                held.append(c)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(held) == 1, round_
        held[0].release()


WORKER = """
import json, sys, time
from evaluation.retention.suite import Gu2024Suite
data, cache, log = sys.argv[1:4]
suite = Gu2024Suite(data, tasks={tasks!r}, limit=3, cache_dir=cache, wait_poll_seconds=0.02)
def generate(prompts, max_new_tokens, desc=""):
    with open(log, "a") as f:
        f.write(desc + "\\n")
    time.sleep(0.5)
    return [" True"] * len(prompts)
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
    assert not list((tmp_path / "cache").glob("*.lock"))


@pytest.mark.parametrize("bad", [dict(stale_seconds=30, heartbeat_seconds=60), dict(wait_poll_seconds=0),
                                 dict(heartbeat_seconds=-1)])
def test_lock_timing_that_would_break_a_live_claim_is_refused(bad):
    with pytest.raises(ConfigError, match="stale_seconds"):
        Gu2024Suite(str(DATA), tasks=["rte"], **bad)
