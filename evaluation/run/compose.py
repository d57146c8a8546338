"""Compose the harness config outside ``run.py`` (tests, benchmarks, notebooks)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from evaluation.run.schema import CONF_DIR, register

REPO = CONF_DIR.parent


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False,
                   config_dirs: Sequence[str | Path] = ()) -> DictConfig:
    """The config ``python run.py <overrides>`` would run with. ``config_dirs``: more folders laid out like
    conf/ (e.g. ``editor/my_editor.yaml``, ``model/my_model.yaml``), searched after it (Hydra's searchpath). Called
    inside a running Hydra app, it composes on that app's search path."""
    register(*map(Path, config_dirs))
    if GlobalHydra.instance().is_initialized() and not config_dirs:
        # inside a running app (run.py, a launcher's worker): its search path, the run's own, already holds conf/
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    extra = [f"hydra.searchpath=[{','.join(f'file://{Path(d).resolve()}' for d in config_dirs)}]"] if config_dirs else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides], return_hydra_config=return_hydra_config)
