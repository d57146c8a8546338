"""Shared fixtures: composed configs and tiny random models of the paper's two architectures."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from data.loaders import EditDataset
from data.requests import EditRequest
from evaluation.editing.models import LoadedModel
from evaluation.run.compose import compose_config

REPO = Path(__file__).resolve().parent.parent
# the data are read where they live (../shared/data beside the repo, as conf/paths/default.yaml), never copied
DATA_DIR = Path(os.environ.get("ELDER_DATA_DIR", REPO.parent / "shared" / "data"))
RETENTION_DATA = Path(os.environ.get("RETENTION_DATA_DIR", DATA_DIR / "retention"))
ZSRE = DATA_DIR / "zsre" / "zsre_mend_eval_portability_gpt4.json"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: extra threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    return lambda *overrides: compose_config(overrides)


def tiny_model(name: str = "tiny_llama", seed: int = 0) -> LoadedModel:
    cfg = compose_config([f"model={name}", f"seed={seed}"])
    return instantiate(cfg.model)


def zsre_requests(n: int) -> list[EditRequest]:
    return EditDataset("zsre", str(ZSRE), n).load()
