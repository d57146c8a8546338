"""Experiment loggers: Weights & Biases (offline by default) or nothing."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

log = logging.getLogger(__name__)


class NullLogger:
    def start(self, run_dir: str, name: str, config: Mapping[str, Any], resume_id: str | None = None) -> str | None:
        return None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """W&B run under the run's output dir. ``mode=offline`` runs can be uploaded with ``wandb sync``.

    If an online run cannot start (no login, no network) the logger falls back to offline and says so:
    a logging outage never kills an editing run.
    """

    def __init__(self, project: str = "elder-harness", mode: str = "offline", entity: str | None = None,
                 tags: list[str] | None = None, group: str | None = None) -> None:
        self.project, self.mode, self.entity = project, mode, entity
        self.tags, self.group = list(tags or []), group
        self.run: Any = None

    def start(self, run_dir: str, name: str, config: Mapping[str, Any], resume_id: str | None = None) -> str | None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = dict(project=self.project, entity=self.entity, dir=run_dir, name=name, config=dict(config),
                      tags=self.tags, group=self.group, id=resume_id, resume="allow" if resume_id else None)
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop the edit run
            if self.mode == "offline":
                raise
            log.warning("W&B %s run could not start (%s); logging offline instead", self.mode, err)
            self.run = wandb.init(mode="offline", **kwargs)
        return self.run.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
