"""Compose the harness config outside ``run.py`` (tests, benchmarks, notebooks)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from evaluation.schema import register

REPO = Path(__file__).resolve().parent.parent


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config ``python run.py <overrides>`` would run with."""
    register()
    OmegaConf.register_new_resolver("repo", lambda: str(REPO), replace=True)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
