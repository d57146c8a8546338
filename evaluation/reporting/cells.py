"""Cells: runs grouped by a table's keys and averaged over seeds, and how a cell is printed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pandas as pd

from evaluation.reporting.runs import key_value

DASH = "—"


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


class Cells:
    """Runs grouped by ``keys`` (pandas groupby): a cell's mean/std/count, its status and its seeds."""

    def __init__(self, frame: pd.DataFrame, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self.ok: dict[tuple, pd.DataFrame] = {}
        self.failed: dict[tuple, pd.DataFrame] = {}
        if frame.empty:
            return
        for status, target in (("ok", self.ok), ("failed", self.failed)):
            part = frame[(frame["status"] == "ok") == (status == "ok")]
            if part.empty:
                continue
            for key, sub in part.groupby(list(self.keys), dropna=False, sort=False):
                key = self._key(key if isinstance(key, tuple) else (key,))
                target[key] = pd.concat([target[key], sub]) if key in target else sub

    @staticmethod
    def _key(key: Sequence[Any]) -> tuple:
        return tuple(key_value(v) for v in key)

    def status(self, key: Sequence[Any]) -> str:
        """``ok`` where a run finished; else ``running`` where a run of the cell is in progress and none
        failed, ``unfinished`` where every run saved a checkpoint and stopped, ``failed`` where one stopped
        without, ``missing`` where there is none."""
        key = self._key(key)
        if key in self.ok:
            return "ok"
        if key not in self.failed:
            return "missing"
        statuses = set(self.failed[key]["status"])
        if "failed" in statuses:
            return "failed"
        return "running" if "running" in statuses else "unfinished"

    def stat(self, key: Sequence[Any], metric: str, scale: float = 1.0) -> Optional[Stat]:
        sub = self.ok.get(self._key(key))
        if sub is None or metric not in sub.columns:
            return None
        values = pd.to_numeric(sub[metric], errors="coerce").dropna() * scale
        if values.empty:
            return None
        return Stat(float(values.mean()), float(values.std()) if len(values) > 1 else math.nan, int(values.count()))

    def seeds(self, key: Sequence[Any], status: str = "ok") -> list[int]:
        """The seeds of the cell's runs with this status (ok, failed or unfinished)."""
        sub = (self.ok if status == "ok" else self.failed).get(self._key(key))
        if sub is not None and status != "ok":
            sub = sub[sub["status"] == status]
        return [] if sub is None else sorted(int(s) for s in pd.to_numeric(sub["seed"], errors="coerce").dropna())

    def values(self, column: str) -> list[Any]:
        i = self.keys.index(column)
        return sorted({k[i] for k in [*self.ok, *self.failed] if k[i] is not None})


def fmt(stat: Optional[Stat], status: str = "ok", digits: int = 2) -> str:
    if stat is None:
        return status if status != "ok" else DASH
    if stat.n > 1 and not math.isnan(stat.std):
        return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"
    return f"{stat.mean:.{digits}f}"


def fmt_paper(value: Optional[float], digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_diff(stat: Optional[Stat], value: Optional[float], digits: int = 2) -> str:
    if stat is None or value is None:
        return ""
    diff = round(stat.mean - value, digits) + 0.0  # + 0.0: no "-0.00"
    return f"{diff:+.{digits}f}"


def triple(cells: Cells, key: Sequence[Any], metric: str, paper_value: Optional[float], scale: float = 100.0,
           digits: int = 2) -> list[str]:
    stat = cells.stat(key, metric, scale)
    return [fmt(stat, cells.status(key), digits), fmt_paper(paper_value, digits), fmt_diff(stat, paper_value, digits)]
