"""Sweeps: a two-value multirun runs on a tiny model; every paper preset and the SLURM preset compose."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from evaluation.reporting.tables import Options, build, collect_runs
from evaluation.run.schema import register
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
CONF = REPO / "conf"

# preset -> number of runs in its sweep
PRESETS = {"table1": 12, "table2": 12, "table3": 2, "table4": 6, "figure2": 40, "figure3": 25, "grid": 15, "figure4": 1}


def compose_hydra(overrides: list[str]) -> DictConfig:
    register()
    OmegaConf.register_new_resolver("repo", lambda: str(REPO), replace=True)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@functools.lru_cache(maxsize=None)
def _sweep_jobs(overrides: tuple[str, ...]) -> tuple[DictConfig, list[DictConfig]]:
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(list(overrides)) if not o.is_sweep_override()]
    master = compose_hydra(fixed)  # as Hydra composes the sweep's own config: sweep values left out
    params = [f"{k}={v}" for k, v in (master.hydra.sweeper.params or {}).items()]
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(params + list(overrides)), None)
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        jobs = [compose(config_name="config", overrides=list(job)) for job in batch]
    return master, jobs


def sweep_jobs(overrides: list[str]) -> tuple[DictConfig, list[DictConfig]]:
    """The configs of every job of ``run.py -m <overrides>``, expanded as Hydra's basic sweeper does."""
    return _sweep_jobs(tuple(overrides))


def test_multirun_over_two_values_runs_on_a_tiny_model(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "run.py"), "-m", "editor.top_k=1,2", "model=tiny_llama", "dataset.num_edits=4",
           "editor.iterations=2", "retention=none", "logger=none", "progress=false", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(tmp_path.rglob("results.json"))
    assert len(results) == 2
    payloads = [json.loads(p.read_text()) for p in results]
    assert sorted(p["config"]["editor"]["top_k"] for p in payloads) == [1, 2]
    assert all(p["metrics"]["num_edits"] == 4 for p in payloads)
    # and the runs feed the table builder: the k axis of the hyper-parameter search
    report = build("grid", collect_runs([tmp_path]), Options())
    k_table = report.tables[0]
    assert k_table.title.startswith("k: tiny LLaMA")
    finished = {row[0]: row[-1] for row in k_table.rows}
    assert finished["1"] == "1" and finished["2 (paper)"] == "1" and finished["3"] == "0"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_paper_preset_composes_into_its_sweep(preset: str) -> None:
    master, jobs = sweep_jobs([f"experiment={preset}", "model=smollm2"])
    assert len(jobs) == PRESETS[preset]
    assert all(job.model.name == "smollm2" for job in jobs)
    if preset != "figure2":
        assert {job.dataset.num_edits for job in jobs} == {1000}


def test_presets_set_their_sweep_folder_and_tags() -> None:
    """A preset's own top-level keys win over config.yaml's: `_self_` comes before `experiment` there."""
    for preset in ("table1", "figure3", "grid"):
        master, _ = sweep_jobs([f"experiment={preset}", "model=smollm2"])
        assert f"/multirun/{preset}_smollm2/" in str(master.hydra.sweep.dir), \
            "conf/config.yaml must list `- _self_` before `- experiment: null` so presets can set hydra.* and tags"
        assert list(master.tags) == [preset]
    quick = compose_hydra(["experiment=quick"])
    assert quick.eval_every == 20  # conf/experiment/quick.yaml's own value


def test_preset_grids_hold_the_papers_cells() -> None:
    _, t1 = sweep_jobs(["experiment=table1", "model=smollm2"])
    assert {(j.editor._target_.rsplit(".", 1)[-1], j.dataset.name) for j in t1} == {
        (e, d) for e in ("ElderEditor", "FTLEditor", "ROMEEditor", "DeferEditor", "MeloEditor", "GraceEditor")
        for d in ("zsre", "counterfact")}
    _, t2 = sweep_jobs(["experiment=table2", "model=smollm2"])
    assert all(j.retention._target_.endswith("Gu2024Suite") for j in t2)
    _, t4 = sweep_jobs(["experiment=table4", "model=smollm2"])
    assert {(j.editor.aux_loss, j.dataset.name) for j in t4} == {
        (a, d) for a in ("guided", "none", "load_balance") for d in ("zsre", "counterfact")}
    _, f2 = sweep_jobs(["experiment=figure2", "model=smollm2"])
    assert {(j.dataset.num_edits, j.seed) for j in f2} == {(n, s) for n in (1000, 2000, 3000, 4000) for s in range(5)}
    assert {j.dataset.name for j in f2} == {"zsre"}
    _, f3 = sweep_jobs(["experiment=figure3", "model=smollm2"])
    assert {(len(j.editor.layers), j.editor.epsilon) for j in f3} == {(L, 2 * L) for L in (1, 2, 4, 6, 8)}
    assert all(j.editor.layers[0] == j.editor.query_layer + 1 == 20 for j in f3)
    _, grid = sweep_jobs(["experiment=grid", "model=smollm2"])
    points = {(j.editor.top_k, j.editor.num_loras, j.editor.guide_lambda, j.editor.epsilon) for j in grid}
    assert len(points) == 15
    assert {(2, 4, 0.01, 12), (1, 4, 0.01, 12), (2, 16, 0.01, 12), (2, 4, 10.0, 12), (2, 4, 0.01, 0)} <= points
    assert all(j.retention._target_.endswith("Gu2024Suite") for j in grid)
    # a command-line value replaces the swept one
    _, one_seed = sweep_jobs(["experiment=figure2", "model=smollm2", "seed=0", "dataset=counterfact"])
    assert len(one_seed) == 8 and {j.dataset.name for j in one_seed} == {"counterfact"}


@pytest.mark.parametrize("model, num_layers", [("smollm2", 30), ("llama2", 32), ("gpt2xl", 48)])
def test_figure3_layer_lists_fit_each_model(model: str, num_layers: int) -> None:
    files = [f"L{L}" for L in (1, 2, 4, 6, 8)]
    _, jobs = sweep_jobs(["experiment=figure3", f"model={model}", "seed=0", f"+experiment/figure3_L={','.join(files)}"])
    assert [len(j.editor.layers) for j in jobs] == [1, 2, 4, 6, 8]
    ref = compose_hydra([f"model={model}", "editor=elder"]).editor  # conf/editor_model/elder_<model>.yaml
    for job in jobs:
        n = min(6, len(job.editor.layers))  # the same layers as the model's ELDER default, as far as they go
        assert job.editor.query_layer == ref.query_layer and list(job.editor.layers)[:n] == list(ref.layers)[:n]
        assert max(job.editor.layers) < num_layers and job.editor.epsilon <= len(job.editor.layers) * 4


def test_slurm_preset_composes_with_the_submitit_launcher() -> None:
    cfg = compose_hydra(["experiment=[table1,cluster_slurm]", "model=smollm2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition is None  # the user fills it in (None: the cluster's default partition)
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 720
    assert cfg.model.device == "cuda" and cfg.hydra.sweeper.params.editor  # table1's sweep is kept
    big = compose_hydra(["experiment=[table1,cluster_slurm]", "model=llama2", "model.device_map=auto",
                         "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2"])
    assert big.model.device_map == "auto"
    assert big.hydra.launcher.partition == "gpu" and big.hydra.launcher.gpus_per_node == 2


def test_slurm_preset_on_the_command_line() -> None:
    cmd = [sys.executable, str(REPO / "run.py"), "experiment=[table1,cluster_slurm]", "model=llama2",
           "hydra.launcher.partition=gpu", "--cfg", "hydra", "--package", "hydra.launcher"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "submitit_launcher.SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout


def test_joblib_launcher_composes() -> None:
    cfg = compose_hydra(["experiment=table1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
