"""The command line: a tiny run writes results.json; bad input stops with a readable message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
TINY = ["model=tiny_llama", "dataset.num_edits=8", "retention=none", "progress=false"]


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={tmp_path}"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def test_tiny_run_writes_results_and_an_offline_wandb_run(tmp_path: Path) -> None:
    proc = run_cli([*TINY, "logger=wandb", "eval_every=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["metrics"]
    for key in ("reliability", "generalization", "reliability_token", "generalization_token", "locality"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["seconds_per_edit"] > 0
    assert metrics["trainable_params"] == 6 * (4 * 8 * (128 + 64) + 128 * 4 + 4)
    assert [c["edits"] for c in results["curves"]] == [4, 8]
    assert results["curves"][0]["reliability"] == 1.0  # the first batch is learned when evaluated
    assert results["choices"]["editor"] == "elder" and results["config"]["dataset"]["num_edits"] == 8
    assert results["git_commit"] and results["versions"]["torch"]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run written"


@pytest.mark.parametrize("override, needle", [
    ("editor.top_k=5", "editor.top_k=5 must be between 1 and editor.num_loras=4"),
    ("editor.epsilon=30", "editor.epsilon=30 must lie in 0..L*N"),
    ("editor.layers=[2,3,40]", "layer index 40 is out of range"),
    ("dataset.path=/nonexistent/zsre.json", "data file not found: /nonexistent/zsre.json"),
])
def test_bad_values_stop_with_a_message_and_no_traceback(override: str, needle: str, tmp_path: Path) -> None:
    proc = run_cli([*TINY, "logger=none", override], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, needle", [
    ("editor.rnak=4", "rnak"),
    ("editor.rank=four", "rank"),
    ("model=gpt3", "gpt3"),
])
def test_bad_keys_fail_at_composition(override: str, needle: str, tmp_path: Path) -> None:
    proc = run_cli([*TINY, "logger=none", override], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_missing_weights_say_how_to_supply_them(tmp_path: Path) -> None:
    proc = run_cli(["model=gpt2xl", "dataset.num_edits=8", "retention=none", "logger=none"], tmp_path)
    assert proc.returncode == 2
    assert "could not load model 'gpt2xl'" in proc.stderr and "model.path=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bfloat16_autocast_runs_and_learns(tmp_path: Path) -> None:
    proc = run_cli(["model=tiny_llama", "dataset.num_edits=4", "retention=none", "progress=false", "logger=none",
                    "autocast=bfloat16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["autocast"] == "bfloat16"
    assert results["metrics"]["reliability_token"] > 0.5


def test_compiled_run_matches_the_eager_run(tmp_path: Path) -> None:
    args = ["model=tiny_llama", "dataset.num_edits=4", "retention=none", "progress=false", "logger=none",
            "threads=1"]
    results = []
    for name, extra in (("eager", []), ("compiled", ["compile.enabled=true", "compile.backend=eager"])):
        proc = run_cli(args + extra, tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert results[1]["config"]["compile"]["enabled"] is True
    for key in ("reliability", "reliability_token", "generalization", "locality"):
        assert results[1]["metrics"][key] == results[0]["metrics"][key], key
