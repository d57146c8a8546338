"""Every bad input stops with a readable message and loses nothing already computed.

Covered elsewhere (not repeated here): k > N, epsilon outside 0..L*N, an unknown layer index, a missing
data file and a hub model without weights via the command line (tests/test_cli.py); a malformed record
and broken JSON in the loader (tests/test_data.py); bad ELDER hyper-parameters (tests/test_elder.py).
"""
from __future__ import annotations

import importlib.machinery
import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from elder.editor import ElderEditor
from evaluation.common.errors import ConfigError
from evaluation.editing.models import ModelLoadError
from evaluation.editing.unedited import Unedited
from evaluation.run.checkpoint import (
    CheckpointManager,
    EditOutOfMemory,
    NonFiniteLoss,
    StreamCheckpoint,
)
from evaluation.run.compose import compose_config
from evaluation.run.experiment import build, run_experiment
from evaluation.run.loggers import NullLogger, WandbLogger
from evaluation.run.metrics import locality_inputs, predict
from evaluation.run.resume_rules import resume_checkpoints
from evaluation.run.stream import run_stream
from tests.conftest import REPO, tiny_model, zsre_requests

LAYERS = [2, 3, 4, 5, 6, 7]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def elder_stream(requests: list, **kwargs: Any) -> tuple[ElderEditor, list]:
    loaded = tiny_model()
    base = predict(Unedited(loaded), *locality_inputs(requests))
    return ElderEditor(loaded, layers=LAYERS, query_layer=1, lr=1e-2, iterations=3, **kwargs), base


# --- data and model ----------------------------------------------------------------------------------
def test_broken_json_data_file_is_located_on_the_command_line(tmp_path: Path) -> None:
    bad = tmp_path / "zsre.json"
    bad.write_text('[{"src": "a", "alt": "b",\n  "rephrase": oops}]')
    cmd = [sys.executable, str(REPO / "run.py"), "model=tiny_llama", "retention=none", "logger=none",
           "dataset.num_edits=4", f"dataset.path={bad}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"error: {bad}: not valid JSON (line 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_module_name_names_the_close_matches() -> None:
    cfg = compose_config(["model=tiny_llama"])
    cfg.model.ffn_template = "model.layers.{i}.mlp.down_prj"
    with pytest.raises(ConfigError, match=r"module 'model\.layers\.7\.mlp\.down_prj' not found in the model\. "
                                          r"The model has 8 layers.*Close names: model\.layers\.7\.mlp\.down_proj"):
        build(cfg.model)


@pytest.mark.parametrize("content, needle", [
    ("empty", "exists but has no config.json"),
    ("config_only", "has a config.json but no weights (model.safetensors or pytorch_model.bin"),
])
def test_model_folder_without_weights_says_what_is_missing(content: str, needle: str, tmp_path: Path) -> None:
    if content == "config_only":
        (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    cfg = compose_config(["model=llama2", f"model.path={tmp_path}"])
    with pytest.raises(ModelLoadError) as err:
        build(cfg.model)
    assert needle in str(err.value) and f"model.path={tmp_path}" in str(err.value)


def test_no_hub_access_says_how_to_supply_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(["model=gpt2xl"])
    with pytest.raises(ModelLoadError) as err:
        build(cfg.model)
    message = str(err.value)
    assert "could not load model 'gpt2xl' from 'openai-community/gpt2-xl'" in message
    assert "HF_HUB_OFFLINE is set" in message and "model.path=/path/to/gpt2xl" in message


# --- run settings ------------------------------------------------------------------------------------
def test_resume_without_a_checkpoint_or_with_another_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume=true but there is no checkpoint in .*hydra.run.dir=DIR"):
        resume_checkpoints(compose_config(["model=tiny_llama", "resume=true"]), tmp_path)
    manager, _ = resume_checkpoints(compose_config(["model=tiny_llama"]), tmp_path)
    manager.save(StreamCheckpoint(position=4, editor_state={}))
    with pytest.raises(ConfigError, match=r"differs from the checkpoint .* in editor\.lr \(checkpoint 0\.01, now 0\.5\)"):
        resume_checkpoints(compose_config(["model=tiny_llama", "resume=true", "editor.lr=0.5"]), tmp_path)
    with pytest.raises(ConfigError, match="on_nan must be one of stop|skip, got 'ignore'"):
        resume_checkpoints(compose_config(["model=tiny_llama", "on_nan=ignore"]), tmp_path)


# --- failures during the stream ----------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
])
def test_out_of_memory_during_an_edit_saves_the_last_good_state(error: Exception, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    requests = zsre_requests(12)
    editor, base = elder_stream(requests)
    real_edit, calls, after_first = editor.edit, [], {}

    def edit(batch: list) -> Any:
        calls.append(batch)
        if len(calls) == 2:
            raise error
        stats = real_edit(batch)
        after_first.update(adapter=editor.adapters[0].lora_A.detach().clone())
        return stats

    monkeypatch.setattr(editor, "edit", edit)
    manager = CheckpointManager(tmp_path, every=100)
    with pytest.raises(EditOutOfMemory) as err:
        run_stream(editor, requests, base, NullLogger(), progress=False, checkpoints=manager)
    message = str(err.value)
    assert "out of memory on cpu while editing edits 5..8 (uids [4, 5, 6, 7]" in message
    for hint in ("editor.batch_size (now 4)", "eval_batch_size (now 32)", "model.dtype=bfloat16", "editor.layers"):
        assert hint in message
    assert "The state after 4 edits is saved in" in message
    ckpt = manager.load_latest()
    assert ckpt is not None and ckpt.position == 4 and ckpt.reason == "oom"
    assert torch.equal(ckpt.editor_state["experts.0.lora_A"], after_first["adapter"])


def _diverge_on_second_batch(editor: ElderEditor, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the second batch's optimizer steps on, lr=1e37: Adam overflows and the loss turns NaN."""
    real_edit, calls = editor.edit, []

    def edit(batch: list) -> Any:
        calls.append(batch)
        if len(calls) == 2:
            for group in editor.optimizer.param_groups:
                group["lr"] = 1e37
        return real_edit(batch)

    monkeypatch.setattr(editor, "edit", edit)


def test_nan_loss_stops_with_the_batch_named_and_the_state_before_it_saved(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    requests = zsre_requests(12)
    editor, base = elder_stream(requests)
    _diverge_on_second_batch(editor, monkeypatch)
    manager = CheckpointManager(tmp_path, every=100)
    with pytest.raises(NonFiniteLoss) as err:
        run_stream(editor, requests, base, NullLogger(), progress=False, checkpoints=manager, on_nan="stop")
    message = str(err.value)
    assert "non-finite loss (nan) in the batch of edits 5..8 (uids [4, 5, 6, 7], prompts: " in message
    assert repr(requests[4].prompt[:80]) in message and "on_nan=skip" in message
    ckpt = manager.load_latest()
    assert ckpt is not None and ckpt.position == 4 and ckpt.reason == "nan"
    assert all(bool(torch.isfinite(v).all()) for k, v in ckpt.editor_state.items() if k.endswith("lora_A"))
    assert ckpt.editor_state["_extra_state"]["optimizer"]["param_groups"][0]["lr"] == 1e-2  # the state before the bad batch


def test_nan_loss_skip_undoes_the_batch_exactly_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    requests = zsre_requests(12)
    editor, base = elder_stream(requests)
    _diverge_on_second_batch(editor, monkeypatch)
    result = run_stream(editor, requests, base, NullLogger(), progress=False, on_nan="skip")
    assert [s["uids"] for s in result.skipped] == [[4, 5, 6, 7]]
    assert "non-finite loss" in result.skipped[0]["problem"]
    assert 0.0 <= result.metrics["reliability_token"] <= 1.0

    # the same stream without the bad batch ends in exactly the same editor state
    kept = requests[:4] + requests[8:]
    clean, clean_base = elder_stream(kept)
    run_stream(clean, kept, clean_base, NullLogger(), progress=False)
    for a, b in zip(editor.adapters, clean.adapters):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    assert torch.equal(editor.stored_codes, clean.stored_codes)


# --- W&B outage ----------------------------------------------------------------------------------------
class _BrokenSummary(dict):
    def __setitem__(self, key: str, value: Any) -> None:
        raise ConnectionError("summary upload failed")


class _FlakyRun:
    id = "fake0001"
    summary = _BrokenSummary()

    def log(self, metrics: dict, step: int) -> None:
        raise ConnectionError("W&B is down (503)")

    def finish(self) -> None:
        raise ConnectionError("W&B is down (503)")


def _fake_wandb(monkeypatch: pytest.MonkeyPatch, fail_modes: tuple[str, ...]) -> list[str]:
    calls: list[str] = []

    def init(mode: str, **kwargs: Any) -> _FlakyRun:
        calls.append(mode)
        if mode in fail_modes:
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
        return _FlakyRun()

    # a module spec like a real import's: libraries that probe for wandb (accelerate, via transformers) on
    # their own first import would otherwise fail where this test runs before anything imported them
    spec = importlib.machinery.ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, __spec__=spec))
    return calls


def test_wandb_outage_or_missing_login_falls_back_and_never_kills_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = _fake_wandb(monkeypatch, fail_modes=("online",))
    overrides = ["model=tiny_llama", "dataset.num_edits=4", "retention=none", "progress=false", "logger=wandb",
                 "logger.mode=online", "editor.iterations=2", "checkpoint.every=0"]
    with caplog.at_level(logging.WARNING):
        result = run_experiment(compose_config(overrides), tmp_path, {"editor": "elder"})
    assert calls == ["online", "offline"]
    assert "W&B online run could not start (RuntimeError: api_key not configured" in caplog.text
    assert "logging offline instead" in caplog.text
    for what in ("log", "summary", "finish"):  # each failure is reported once, the run goes on
        assert caplog.text.count(f"W&B {what} failed") == 1, what
    assert (tmp_path / "results.json").is_file() and result["metrics"]["num_edits"] == 4

    # nothing works at all (offline fails too, or wandb cannot be imported): no logging, no crash
    _fake_wandb(monkeypatch, fail_modes=("online", "offline"))
    assert WandbLogger(mode="online").start(str(tmp_path), "run", {}) is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    logger = WandbLogger()
    assert logger.start(str(tmp_path), "run", {}) is None
    logger.log({"x": 1.0}, step=1)
    logger.finish()
