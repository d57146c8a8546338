"""Faults and hostile input (issue 19): each case stops with one clear line, or is survived, and loses or
falsifies nothing already computed. docs/robustness.md lists every case with the test that holds it.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from data.loaders import DataError, EditDataset
from evaluation.common.errors import ConfigError, HarnessError
from evaluation.common.integrity import CorruptFile, digest_path, file_sha256, seal
from evaluation.reporting.tables import collect_runs
from evaluation.reporting.tables import main as tables_main
from evaluation.run.checkpoint import (
    CheckpointManager,
    StreamCheckpoint,
    checkpoint_name,
)
from evaluation.run.compose import compose_config
from evaluation.run.experiment import run_experiment
from evaluation.run.folder import RunFolderBusy
from evaluation.run.results import BadResults, read_results, write_results
from evaluation.run.resume_rules import resume_checkpoints
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
BASE = ["model=tiny_llama", "editor=grace", "retention=none", "logger=none", "progress=false", "threads=1",
        "dataset.num_edits=4", "checkpoint.every=2"]
RECORD = {"src": "Which river flows through {}?", "alt": "the Rhine", "rephrase": "Through {} flows which river?",
          "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "subject": "x"}


def edits_file(path: Path, n: int = 4, prompt_chars: int = 0) -> Path:
    records = []
    for i in range(n):
        r = {k: v.replace("{}", f"town {i}") for k, v in RECORD.items()}
        if prompt_chars and i == n - 1:
            r["src"] = "a" * prompt_chars + "?"
        records.append(r)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def cfg(*overrides: str) -> Any:
    return compose_config([*BASE, *overrides])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args: list[str], run_dir: Path, env: dict[str, str] = ENV,
            prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(prefix or []), sys.executable, str(REPO / "run.py"), *BASE, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# --- the run folder ----------------------------------------------------------------------------------
def test_a_second_run_in_a_live_folder_stops_at_once_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom evaluation.run.folder import RunFolder\n"
                               "with RunFolder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
         str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        with pytest.raises(RunFolderBusy, match=rf"the run folder {tmp_path} is in use by process {holder.pid} "):
            run_experiment(cfg(), tmp_path, {}, hydra_record={"config.yaml": "second"})
        assert snapshot(tmp_path) == before  # no .hydra, results or checkpoints of the second run
    finally:
        holder.kill()
        holder.wait()
    run_experiment(cfg(), tmp_path, {})  # the kernel released the killed holder's lock
    assert (tmp_path / "results.json").is_file()


def _sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """A one-job ``resume=auto`` sweep of the tiny GRACE run into the fixed folder ``tmp_path/job``."""
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *BASE, "editor.iterations=3", "resume=auto", *args,
           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=job"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_resume_auto_sweep_rerun_with_another_override_is_one_line_exit_2(tmp_path: Path) -> None:
    assert _sweep(tmp_path).returncode == 0
    (tmp_path / "job" / "results.json").unlink()  # stopped before it finished: its checkpoints stay
    proc = _sweep(tmp_path, "editor.lr=0.5")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"error: resume=auto: {tmp_path / 'job'} holds an unfinished run of another config" in proc.stderr
    assert "editor.lr (checkpoint 1.0, now 0.5)" in proc.stderr and "resume=true" not in proc.stderr


def test_a_resume_auto_sweep_skips_a_job_another_process_is_running(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom evaluation.run.folder import RunFolder\n"
                               "with RunFolder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)",
         str(tmp_path / "job")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = _sweep(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"skipped: the run folder {tmp_path / 'job'} is in use" in proc.stderr
    assert not (tmp_path / "job" / "results.json").exists()


def sigterm_here(*args: Any, **kwargs: Any) -> None:
    """Stands in for a step of the run: the step is interrupted as a SIGTERM would interrupt it."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    pytest.fail("the signal did not stop the run")


def test_a_signal_while_writing_the_codes_is_one_line_and_keeps_the_results(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from baselines.grace import GraceEditor

    monkeypatch.setattr(GraceEditor, "write_artifacts", sigterm_here)  # the codes dump
    with pytest.raises(HarnessError, match="stopped by SIGTERM while writing the editor's extra files .* the results "
                                           "are whole"):
        run_experiment(cfg(), tmp_path, {})
    assert (tmp_path / "results.json").is_file()


def test_a_signal_before_the_first_edit_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluation.run.experiment as experiment

    monkeypatch.setattr(experiment, "base_locality_predictions", sigterm_here)  # the unedited model's locality
    with pytest.raises(HarnessError, match="stopped by SIGTERM before the first edit .* nothing is lost: rerun the "
                                           "same command"):
        run_experiment(cfg(), tmp_path, {})
    assert not (tmp_path / "results.json").exists()


def test_a_checkpoint_dir_shared_by_two_runs_is_refused_and_keeps_the_first_runs_checkpoints(tmp_path: Path) -> None:
    shared = tmp_path / "shared_checkpoints"
    run_experiment(cfg(f"checkpoint.dir={shared}"), tmp_path / "a", {})
    kept = snapshot(shared)
    assert any(name.startswith("step-") for name in kept)
    with pytest.raises(ConfigError, match=rf"checkpoint.dir {shared} holds the checkpoints of the run in "
                                          rf"{tmp_path / 'a'}; give each run its own checkpoint.dir"):
        run_experiment(cfg(f"checkpoint.dir={shared}"), tmp_path / "b", {})
    assert {k: v for k, v in snapshot(shared).items() if not k.startswith(".run")} == \
        {k: v for k, v in kept.items() if not k.startswith(".run")}
    run_experiment(cfg(f"checkpoint.dir={shared}", "resume=true"), tmp_path / "a", {})  # the first still resumes


def test_a_run_folder_moved_whole_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    """A stopped run's checkpoints carried to another place (another machine, another clone) still belong to
    the run folder they are in: its stream continues there and ends as the uninterrupted one."""
    overrides = ("dataset.num_edits=8", "checkpoint.keep=10")
    whole = run_experiment(cfg(*overrides), tmp_path / "whole", {})
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "whole" / "checkpoints", moved / "checkpoints",  # as if stopped after 4 edits
                    ignore=shutil.ignore_patterns("step-000006*", "step-000008*", "latest.json"))
    resumed = run_experiment(cfg(*overrides, "resume=true"), moved, {})
    stream = json.loads((moved / "results.json").read_text())["stream"]
    timeless = lambda res: ({k: v for k, v in res["metrics"].items() if k != "seconds_per_edit"},  # noqa: E731
                            res["curves"], res["forgetting"])
    assert stream["resumed_from"] == 4 and timeless(resumed) == timeless(whole)


def test_a_refused_resume_changes_nothing_in_the_folder(tmp_path: Path) -> None:
    run_experiment(cfg(), tmp_path, {}, hydra_record={"config.yaml": "first run"})
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="differs from the checkpoint"):
        run_experiment(cfg("resume=true", "editor.lr=0.5"), tmp_path, {}, hydra_record={"config.yaml": "refused"})
    assert snapshot(tmp_path) == before
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "first run"


def test_a_fresh_run_in_a_used_folder_sets_the_old_result_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    record = {"config.yaml": "{}", "hydra.yaml": "hydra: {runtime: {choices: {editor: grace}}}"}
    run_experiment(cfg(), run_dir, {}, hydra_record=record)
    old = (run_dir / "results.json").read_bytes()
    earlier_rows = run_dir / "retention_outputs" / "edited" / "rte.jsonl"  # another model's rows: not this run's
    earlier_rows.parent.mkdir(parents=True)
    earlier_rows.write_text('{"id": "0"}\n')
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(DataError):  # the new run fails after it took the folder
        run_experiment(cfg(f"dataset.path={bad}"), run_dir, {}, hydra_record=record)
    assert not (run_dir / "results.json").exists()
    [kept] = run_dir.glob("results.superseded-*.json")
    assert kept.read_bytes() == old
    assert not (run_dir / "retention_outputs").exists()  # rescore/diff cannot present them as this run's
    [rows] = run_dir.glob("retention_outputs.superseded-*")
    assert (rows / "edited" / "rte.jsonl").read_text() == '{"id": "0"}\n'
    [row] = collect_runs([tmp_path])
    assert row["status"] == "failed"  # not the old run's result passed off as this one's


def test_temporary_files_left_by_a_kill_are_removed_when_the_run_resumes(tmp_path: Path) -> None:
    run_experiment(cfg(), tmp_path, {})
    (tmp_path / ".results.json.k1ll3d.tmp").write_bytes(b"")  # what SIGKILL mid-write leaves
    run_experiment(cfg("resume=true"), tmp_path, {})
    assert not list(tmp_path.glob(".*.tmp"))
    read_results(tmp_path / "results.json")


# --- stored results and checkpoints are verified -----------------------------------------------------
@pytest.mark.parametrize("bit", [0, 6], ids=["mantissa", "exponent"])
def test_a_checkpoint_with_flipped_bits_is_named_corrupt_and_the_older_one_used(
        tmp_path: Path, bit: int, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path, every=2, keep=2)
    value = torch.tensor([1.2345678], dtype=torch.float32)
    for position in (2, 4):
        manager.save(StreamCheckpoint(position=position, editor_state={"w": value * position}))
    # byte 0 holds mantissa bits, byte 3 the sign and exponent (little-endian float32)
    needle = (value * 4).numpy().tobytes()
    data = bytearray((tmp_path / checkpoint_name(4)).read_bytes())
    at = data.index(needle) + (0 if bit == 0 else 3)
    data[at] ^= 1 << bit
    (tmp_path / checkpoint_name(4)).write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="is corrupt"):
        CheckpointManager.read(tmp_path / checkpoint_name(4))
    with caplog.at_level(logging.WARNING):
        ckpt = manager.load_latest()
    assert ckpt is not None and ckpt.position == 2 and torch.equal(ckpt.editor_state["w"], value * 2)
    assert f"{checkpoint_name(4)} is corrupt" in caplog.text


def test_when_every_checkpoint_is_corrupt_resume_says_so(tmp_path: Path) -> None:
    run_experiment(cfg(), tmp_path, {})
    for pt in (tmp_path / "checkpoints").glob("step-*.pt"):
        data = bytearray(pt.read_bytes())
        data[len(data) // 2] ^= 0x10
        pt.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"no checkpoint in .* can be used: step-000004\.pt \(corrupt"):
        resume_checkpoints(cfg("resume=true"), tmp_path)


def test_a_crash_between_the_two_renames_of_a_resave_leaves_a_checkpoint_that_verifies(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, every=2)
    manager.save(StreamCheckpoint(position=2, editor_state={"w": torch.ones(3)}, reason="end"))
    old_line = digest_path(tmp_path / checkpoint_name(2)).read_text()
    manager.save(StreamCheckpoint(position=2, editor_state={"w": torch.ones(3)}, reason="end, evaluated"))
    # the digest file as it is between the renames: the new digest and the old one
    digest_path(tmp_path / checkpoint_name(2)).write_text(digest_path(tmp_path / checkpoint_name(2)).read_text()
                                                         + old_line)
    assert CheckpointManager.read(tmp_path / checkpoint_name(2)).reason == "end, evaluated"


def test_results_json_is_verified_and_bad_ones_are_listed_as_failed(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("good", "flipped", "list", "text_metric", "no_seal", "old")}
    for run in runs.values():
        run.mkdir()
        write_results(run, {}, {"reliability": 0.5, "generalization": 0.25, "locality": 1.0}, [], {})
    text = (runs["flipped"] / "results.json").read_text()
    (runs["flipped"] / "results.json").write_text(text.replace('"reliability": 0.5', '"reliability": 0.6'))
    (runs["list"] / "results.json").write_text("[1, 2, 3]")
    blob = json.loads((runs["text_metric"] / "results.json").read_text())
    blob["metrics"]["locality"] = "high"
    (runs["text_metric"] / "results.json").write_text(json.dumps(seal(blob)))
    blob = json.loads((runs["no_seal"] / "results.json").read_text())
    blob["metrics"]["reliability"] = 0.99
    del blob["content_sha256"]  # edited, and its digest deleted to pass: this version always writes one
    (runs["no_seal"] / "results.json").write_text(json.dumps(blob))
    del blob["sealed_format"]  # a file from before digests: read as before
    (runs["old"] / "results.json").write_text(json.dumps(blob))

    rows = {Path(r["source"]).name: r for r in collect_runs([tmp_path])}
    assert rows["good"]["status"] == rows["old"]["status"] == "ok"
    assert rows["no_seal"]["status"] == "failed" and "corrupt results.json" in rows["no_seal"]["reason"]
    assert rows["flipped"]["status"] == "failed" and "corrupt results.json" in rows["flipped"]["reason"]
    assert rows["list"]["status"] == "failed" and "holds a JSON list" in rows["list"]["reason"]
    assert rows["text_metric"]["status"] == "failed" and "locality='high'" in rows["text_metric"]["reason"]
    with pytest.raises(BadResults, match="corrupt"):
        read_results(runs["flipped"] / "results.json")


def test_a_retention_cache_entry_edited_with_its_digest_deleted_is_generated_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from hydra.utils import instantiate

    suite = instantiate(compose_config(["retention=gu2024", "retention.tasks=[rte]", "retention.limit=2"]).retention)
    path = suite.cache_path(str(tmp_path), "model-key", "rte")
    suite._store(path, "model-key", "rte", {"score": 0.5, "details": {}, "seconds": 1.0, "outputs": ["a", "b"],
                                            "stops": ["budget"] * 2, "tokens": [1, 1], "routed": None,
                                            "reused_rows": [False, False]})
    assert suite._load_cached(path, "model-key", "rte")["score"] == 0.5
    blob = json.loads(Path(path).read_text())
    blob["score"] = 0.99  # a tampered unedited score would become every later run's baseline
    del blob["content_sha256"]
    Path(path).write_text(json.dumps(blob))
    with caplog.at_level("WARNING"):
        assert suite._load_cached(path, "model-key", "rte") is None
    assert "the digest is gone; generating the task again" in caplog.text


def test_resume_auto_redoes_a_finished_run_whose_data_file_changed(tmp_path: Path) -> None:
    data = edits_file(tmp_path / "edits.json")
    overrides = [f"dataset.path={data}", "resume=auto", f"paths.cache_dir={tmp_path / 'cache'}"]
    run_experiment(cfg(*overrides), tmp_path / "run", {})
    before = json.loads((tmp_path / "run" / "results.json").read_text())
    assert before["inputs"]["dataset_sha256"] == file_sha256(data)
    run_experiment(cfg(*overrides), tmp_path / "run", {})  # unchanged: nothing to do
    assert not list((tmp_path / "run").glob("results.superseded-*.json"))
    data.write_text(data.read_text().replace("the Rhine", "the Rhone"))  # new targets, the same config
    run_experiment(cfg(*overrides), tmp_path / "run", {})
    after = json.loads((tmp_path / "run" / "results.json").read_text())
    assert after["inputs"]["dataset_sha256"] == file_sha256(data) != before["inputs"]["dataset_sha256"]
    assert len(list((tmp_path / "run").glob("results.superseded-*.json"))) == 1


def _save_tiny_gpt2(folder: Path, seed: int) -> None:
    import shutil as sh

    from tests.conftest import tiny_model

    if folder.exists():
        sh.rmtree(folder)
    loaded = tiny_model("tiny_gpt2", seed=seed)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def test_other_weights_at_the_same_model_path_are_another_model(tmp_path: Path) -> None:
    """Two tiny GPT-2s copied in turn to one model.path: each run's caches and results name its own weights, and
    resume=auto does not take the first model's finished run for the second's."""
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    overrides = [*BASE[1:], "model=gpt2xl", f"model.path={model_dir}", "model.num_layers=8", "editor.layer=5",
                 "editor.iterations=3", "resume=auto",
                 "retention=gu2024", "retention.tasks=[rte]", "retention.limit=2", f"paths.cache_dir={cache}"]
    _save_tiny_gpt2(model_dir, seed=0)
    run_experiment(cfg(*overrides), tmp_path / "a", {"model": "gpt2xl"})
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    _save_tiny_gpt2(model_dir, seed=1)  # other weights, the same path and config text
    run_experiment(cfg(*overrides), tmp_path / "a", {"model": "gpt2xl"})  # resume=auto: not "done"
    b = json.loads((tmp_path / "a" / "results.json").read_text())
    assert a["inputs"]["model_weights"].startswith("sha256:") and a["inputs"]["model_weights"] != b["inputs"]["model_weights"]
    assert a["inputs"]["dataset_sha256"] == b["inputs"]["dataset_sha256"]
    assert b["stream"]["resumed_from"] is None and list((tmp_path / "a").glob("results.superseded-*.json"))
    # the unedited retention pass was generated for each model, not read from the first one's cache
    assert len(list((cache / "retention").glob("*rte*.json"))) == 2


def test_a_wandb_offline_folder_deleted_mid_run_is_warned_about(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("wandb")
    from evaluation.run.loggers import WandbLogger

    kept = WandbLogger(mode="offline")
    assert kept.start(str(tmp_path / "a"), "run", {}) is not None
    kept.log({"edit/loss": 1.0}, step=1)
    kept.finish()
    assert "was deleted" not in caplog.text  # an intact run says nothing
    logger = WandbLogger(mode="offline")
    assert logger.start(str(tmp_path / "b"), "run", {}) is not None
    logger.log({"edit/loss": 1.0}, step=1)
    shutil.rmtree(tmp_path / "b" / "wandb")  # e.g. a clean-up script, mid-run
    with caplog.at_level("WARNING"):
        logger.finish()
    assert "W&B offline run folder" in caplog.text and "was deleted (or emptied) during the run" in caplog.text


def test_the_data_cache_never_serves_a_file_whose_content_changed(tmp_path: Path) -> None:
    data = edits_file(tmp_path / "edits.json")
    stat = data.stat()
    first = EditDataset("zsre", str(data), 4, cache_dir=str(tmp_path / "cache")).load()
    data.write_text(data.read_text().replace("the Rhine", "the Rhone"))  # same size ...
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the same time
    second = EditDataset("zsre", str(data), 4, cache_dir=str(tmp_path / "cache")).load()
    assert first[0].target == "the Rhine" and second[0].target == "the Rhone"


# --- the table builder -------------------------------------------------------------------------------
def test_tables_refuse_to_replace_a_table_with_an_empty_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results" / "table1"
    out.parent.mkdir()
    out.with_suffix(".md").write_text("the committed table")
    empty = tmp_path / "runs"
    (empty / "run" / ".hydra").mkdir(parents=True)  # a run that never finished
    assert tables_main(["table1", str(empty), "--out", str(out)]) == 2
    assert "no finished run" in capsys.readouterr().err
    assert out.with_suffix(".md").read_text() == "the committed table"
    assert tables_main(["table1", str(empty), "--out", str(out), "--allow-empty"]) == 0
    assert "missing" in out.with_suffix(".md").read_text() or "failed" in out.with_suffix(".md").read_text()


def test_a_tables_files_are_replaced_together_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from evaluation.common import atomic
    from evaluation.run.interrupts import WorkInterrupted, stop_on_signals

    files = {tmp_path / f"t.{ext}": "old" for ext in ("md", "tex", "csv")}
    for path, text in files.items():
        path.write_text(text)
    # a failure while the temporaries are written changes nothing and leaves no temporary
    with pytest.raises(TypeError):  # the last file's text cannot be written: the first two were, to temporaries
        atomic.write_texts_together({**{p: "new" for p in files}, tmp_path / "t.bad": None})  # type: ignore[dict-item]
    assert all(p.read_text() == "old" for p in files) and not list(tmp_path.glob(".*.tmp"))
    # a SIGTERM that arrives during the renames is held back until all three are done
    real_replace, calls = atomic.os.replace, []

    def replace_then_signal(src: str, dst: Path) -> None:
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    with pytest.raises(WorkInterrupted), stop_on_signals(lambda sig: f"stopped by {sig}"):
        atomic.write_texts_together({p: "new" for p in files})
    assert len(calls) == 3 and all(p.read_text() == "new" for p in files) and not list(tmp_path.glob(".*.tmp"))


def test_a_signal_while_tables_are_built_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    import signal
    import time

    from evaluation.reporting import tables

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    write_results(run, {}, {"reliability": 0.5, "generalization": 0.5, "locality": 1.0}, [], {},
                  {"choices": {"editor": "grace", "model": "tiny_llama", "dataset": "zsre"}})

    def killed(*args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(tables, "write", killed)
    assert tables_main(["table1", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 2
    assert "error: stopped by SIGTERM" in capsys.readouterr().err and not list(tmp_path.glob("t.*"))


def test_tables_warn_when_runs_sharing_a_seed_would_be_averaged(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_results(tmp_path / name, {"seed": 0}, {"reliability": 0.5, "generalization": 0.5, "locality": 1.0},
                      [], {}, {"choices": {"editor": "grace", "model": "tiny_llama", "dataset": "zsre"}})
    assert tables_main(["table1", str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "2 finished runs share seed 0" in err and str(tmp_path / "a") in err


# --- bad input: one clear line -----------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("eval_batch_size=0", "eval_batch_size must be a positive integer, got 0"),
    ("editor.batch_size=0", "editor.batch_size must be a positive integer, got 0"),
    ("editor.batch_size=-3", "editor.batch_size must be a positive integer, got -3"),
    ("retention=gu2024", "retention.limit must be null or a positive integer, got 'abc'"),
    ("eval_at=[1000,0]", r"eval_at must be a list of positive edit counts, got \[1000, 0\]"),
])
def test_bad_counts_are_refused_before_any_work(tmp_path: Path, override: str, message: str) -> None:
    extra = ["retention.limit=abc"] if override.startswith("retention") else []
    with pytest.raises(HarnessError, match=message):
        run_experiment(cfg(override, *extra), tmp_path / "run", {})
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["editor=elder", "editor.lr=nan"], "editor.lr must be positive, got nan"),
    (["editor=ft_l", "editor.lr=-0.1"], "editor.lr must be positive, got -0.1"),
    (["editor=grace", "editor.lr=inf"], "editor.lr must be positive, got inf"),
    (["seed=-1"], r"seed must be an integer from 0 to 4294967295 \(numpy's range\), got -1"),
    (["seed=99999999999"], "seed must be an integer from 0 to 4294967295"),
])
def test_bad_learning_rates_and_seeds_are_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        run_experiment(cfg(*overrides), tmp_path / "run", {})
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("run_dir", ["/tmp/runs/plain", "/tmp/my runs/a run", "/tmp/a,b/x=1", "/tmp/it's/r",
                                     "/tmp/end\\"])
def test_the_printed_resume_command_is_one_shell_word_hydra_reads_back(run_dir: str) -> None:
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from evaluation.run.folder import run_dir_override

    (word,) = shlex.split(f"resume=true {run_dir_override(run_dir)}")[1:]
    override = OverridesParser.create().parse_override(word)
    assert override.key_or_group == "hydra.run.dir" and override.value() == run_dir


@pytest.mark.parametrize("content, message", [
    (b'[{"src": "caf\xe9"}]', r"not valid UTF-8 \(byte 13"),
    (None, "is a folder, not a data file"),
])
def test_unreadable_data_files_say_what_is_wrong(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "data"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        EditDataset("zsre", str(path), 4).load()


@pytest.mark.parametrize("model, overrides, limit", [
    ("tiny_llama", [], "limit of 512 (dataset.max_tokens"),
    ("tiny_gpt2", ["dataset.max_tokens=100000"], "(the model's context"),
])
def test_an_over_long_record_is_named_before_any_work(tmp_path: Path, model: str, overrides: list[str],
                                                      limit: str) -> None:
    data = edits_file(tmp_path / "long.json", prompt_chars=20_000)
    config = cfg(f"model={model}", f"dataset.path={data}", *overrides)
    with pytest.raises(DataError, match=r"long\.json: edit 3 is too long: its prompt \+ target is \d+ tokens") as err:
        run_experiment(config, tmp_path / "run", {})
    assert limit in str(err.value)


def test_schemas_are_not_choices(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    groups = [line for line in proc.stdout.split("== Config ==")[0].splitlines()
              if line.startswith(("editor:", "model:", "dataset:"))]
    assert len(groups) == 3 and not any("schema" in line for line in groups)
    with pytest.raises(Exception, match="elder_schema"):
        compose_config(["editor=elder_schema"])


# --- the machine fails -------------------------------------------------------------------------------
def test_a_full_disk_at_a_checkpoint_loses_nothing_and_at_the_results_says_how_to_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real_save = CheckpointManager.save

    def full_at_two(self: CheckpointManager, ckpt: StreamCheckpoint) -> Path:
        if ckpt.position == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / checkpoint_name(2)))
        return real_save(self, ckpt)

    monkeypatch.setattr(CheckpointManager, "save", full_at_two)
    with caplog.at_level(logging.WARNING):
        finished = run_experiment(cfg(), tmp_path / "a", {})
    assert "Saving the state after 2 edits failed (No space left on device" in caplog.text
    reference = run_experiment(cfg("checkpoint.every=0"), tmp_path / "b", {})
    assert finished["metrics"]["reliability"] == reference["metrics"]["reliability"]

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("evaluation.run.experiment.write_results", full)
    with pytest.raises(HarnessError, match=r"could not write .*results\.json: No space left on device; the stream's "
                                           r"end is saved \(checkpoint after 4 edits\).*resume=true"):
        run_experiment(cfg(), tmp_path / "c", {})


def _unprivileged() -> list[str]:
    """A command prefix that runs the child as `nobody` where the tests run as root (root writes into
    read-only folders)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): a read-only folder cannot be made")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # a clone in a folder only its owner can read (e.g. under root's 0700 home): nobody cannot run the harness
    probe = subprocess.run([*prefix, sys.executable, "-c", "import sys; open(sys.argv[1]).read()", str(REPO / "run.py")],
                           cwd="/", capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"the checkout {REPO} (or its Python) cannot be read by the unprivileged user `nobody`, which "
                    f"this test runs as: {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'refused'}")
    return prefix


def test_a_read_only_run_folder_is_one_line(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="ro-run-"))  # not under pytest's private tmp folder
    try:
        home, run_dir = base / "home", base / "run"
        home.mkdir()
        run_dir.mkdir()
        os.chmod(base, 0o755)
        os.chmod(home, 0o777)
        os.chmod(run_dir, 0o555)
        proc = run_cli([f"paths.cache_dir={home}/cache"], run_dir, env={**ENV, "HOME": str(home)},
                       prefix=_unprivileged())
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write in {run_dir}: Permission denied")
        assert "Traceback" not in proc.stderr and not list(run_dir.iterdir())
    finally:
        os.chmod(run_dir, 0o755)
        subprocess.run(["rm", "-rf", str(base)], check=False)


SLOW_FINAL_EVAL = (  # run.py whose evaluations each take 3 s longer (a wrapper here, not a product hook)
    "import runpy, sys, time\n"
    "import evaluation.run.stream as s\n"
    "ev = s.evaluate_edits\n"
    "s.evaluate_edits = lambda *a, **k: (time.sleep(3), ev(*a, **k))[1]\n"
    "sys.argv = ['run.py'] + sys.argv[1:]\n"
    "runpy.run_path('run.py', run_name='__main__')\n"
)


def test_sigterm_in_the_final_evaluation_says_how_to_go_on_in_one_line_also_in_run_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FINAL_EVAL, *BASE, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["position"] == 4:  # every edit is saved
            break
        time.sleep(0.1)
    time.sleep(0.5)  # inside the (slowed) final evaluation
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stopped by SIGTERM during the final evaluation of 4 edits. The state after 4 "
                           "edits is saved in") and f"resume=true hydra.run.dir={run_dir}" in line
    assert line in (run_dir / "run.log").read_text()
    resumed = run_cli(["resume=true"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    read_results(run_dir / "results.json")


def test_a_machine_failure_is_named_as_what_it_is_with_its_own_fix() -> None:
    import errno

    from run import machine_failure

    full = machine_failure(OSError(errno.ENOSPC, "No space left on device", "/out/results.json"), "/out")
    assert str(full).startswith("cannot write /out/results.json: No space left on device. Free space")
    denied = machine_failure(PermissionError(errno.EACCES, "Permission denied", "/data/edits.json"), "/out")
    assert str(denied).startswith("cannot open /data/edits.json: Permission denied. Give this user access to it")
    assert "resume=true hydra.run.dir=/out" in str(full) and "resume=true hydra.run.dir=/out" in str(denied)
    assert machine_failure(FileNotFoundError(errno.ENOENT, "No such file", "/x"), "/out") is None  # a bug: raised


PAUSE_BEFORE_EDITS = (  # run.py that says when it reads the unedited model's locality, then takes a minute there
    "import runpy, sys, time\n"
    "import evaluation.run.experiment as e\n"
    "def pause(*args, **kwargs):\n"
    "    print('reading the unedited locality', file=sys.stderr, flush=True)\n"
    "    time.sleep(60)\n"
    "e.base_locality_predictions = pause\n"
    "sys.argv = ['run.py'] + sys.argv[1:]\n"
    "runpy.run_path('run.py', run_name='__main__')\n"
)


def test_the_same_signal_twice_as_timeout_around_make_sends_it_is_one_stop_with_its_line(tmp_path: Path) -> None:
    """``timeout 60 make run`` signals make and the run, and make passes it on: the run gets SIGTERM twice."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_BEFORE_EDITS, *BASE, f"hydra.run.dir={tmp_path}"], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "reading the unedited locality" in line:
            break
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)  # the second lands once the first has stopped the work
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM before the first edit")
