"""Experiment loggers: Weights & Biases (offline by default) or nothing."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)


class NullLogger:
    def start(self, run_dir: str, name: str, config: Mapping[str, Any], resume_id: str | None = None) -> str | None:
        return None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log rows (dicts; a key a row lacks is empty there) as one table (W&B: a ``wandb.Table``)."""

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """W&B run under the run's output dir. ``mode=offline`` runs can be uploaded with ``wandb sync``.

    A logging outage never kills an editing run: if an online run cannot start (no login, no network,
    W&B down) the logger falls back to offline and says so; if that fails too (or wandb is not
    installed) it logs nothing and says so. A failure inside ``log``/``summary``/``finish`` is reported
    once and the run goes on. ``start(..., resume_id=...)`` continues an earlier run (same id).
    """

    def __init__(self, project: str = "elder-harness", mode: str = "offline", entity: str | None = None,
                 tags: list[str] | None = None, group: str | None = None) -> None:
        self.project, self.mode, self.entity = project, mode, entity
        self.tags, self.group = list(tags or []), group
        self.run: Any = None
        self.active_mode: str | None = None  # the mode the run actually started in (None: not logging)
        self._warned: set[str] = set()

    def _warn_once(self, what: str, err: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("W&B %s failed (%s: %s); the run goes on (further %s failures are not reported)",
                        what, type(err).__name__, err, what)

    def start(self, run_dir: str, name: str, config: Mapping[str, Any], resume_id: str | None = None) -> str | None:
        try:
            import wandb
        except Exception as err:  # noqa: BLE001 - not installed or broken: edit without logging
            log.warning("W&B is unavailable (%s); this run is not logged to W&B", err)
            return None

        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = dict(project=self.project, entity=self.entity, dir=run_dir, name=name, config=dict(config),
                      tags=self.tags, group=self.group, id=resume_id, resume="allow" if resume_id else None)
        modes = [self.mode] + (["offline"] if self.mode != "offline" else [])
        for mode in modes:
            try:
                self.run = wandb.init(mode=mode, **kwargs)
                self.active_mode = mode
                break
            except Exception as err:  # noqa: BLE001 - any W&B failure must not stop the edit run
                nxt = "logging offline instead" if mode != "offline" else "this run is not logged to W&B"
                log.warning("W&B %s run could not start (%s: %s); %s", mode, type(err).__name__, err, nxt)
                self.run = None
        if self.run is None:
            return None
        if self.active_mode != self.mode:
            log.warning("W&B is logging offline to %s: upload later with `wandb sync %s/wandb/offline-run-*`",
                        run_dir, run_dir)
        try:
            return str(self.run.id)
        except Exception as err:  # noqa: BLE001
            self._warn_once("start", err)
            return resume_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(dict(metrics), step=step)
            except Exception as err:  # noqa: BLE001
                self._warn_once("log", err)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            try:
                for key, value in metrics.items():
                    self.run.summary[key] = value
            except Exception as err:  # noqa: BLE001
                self._warn_once("summary", err)

    def table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.run is not None and rows:
            try:
                import wandb

                columns = list(dict.fromkeys(c for r in rows for c in r))  # rows of several kinds: every key
                data = [[r.get(c) for c in columns] for r in rows]
                self.run.log({key: wandb.Table(columns=columns, data=data, allow_mixed_types=True)})
            except Exception as err:  # noqa: BLE001
                self._warn_once("table", err)

    def finish(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            try:
                folder = Path(run.dir).parent  # offline-run-<time>-<id>/ (run.dir is its files/)
            except Exception:  # noqa: BLE001 - only for the check below
                folder = None
            try:
                run.finish()
            except Exception as err:  # noqa: BLE001
                self._warn_once("finish", err)
            if folder is not None and self.active_mode == "offline" and not any(folder.glob("*.wandb")):
                log.warning("the W&B offline run folder %s was deleted (or emptied) during the run: its logged "
                            "history is lost; results.json still holds the run's metrics", folder)
