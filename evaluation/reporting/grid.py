"""The hyper-parameter search table: one ELDER hyper-parameter at a time."""
from __future__ import annotations

from typing import Any

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, fmt
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    datasets_for,
    elder_runs,
    failed_list,
    label_for,
    models_for,
    only,
)


def _grid_expected(param: str) -> list[Any]:
    """The searched values of one hyper-parameter that are valid with the others at the paper's choice."""
    d = paper.PAPER_HPARAMS
    values = list(paper.GRID[param])
    if param == "top_k":
        return [v for v in values if v <= d["num_loras"]]
    if param == "num_loras":
        return [v for v in values if v >= d["top_k"] and 6 * v >= d["epsilon"]]
    if param == "epsilon":
        return [v for v in values if v <= 6 * d["num_loras"]]
    return values


def build_grid(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = elder_runs(frame, opts)
    report = Report("grid", f"Hyper-parameter search (ELDER, {n_edits} edits): one parameter at a time, the "
                            f"others at the paper's choice", notes=common_notes(frame))
    report.notes.append("k = top_k, N = num_loras, lambda = guide_lambda, epsilon = deferral threshold; the paper "
                        "chose k=2, N=4, lambda=1e-2 by generalization and epsilon=12 by test retention. k=5 is not "
                        "run: it needs N >= 5 (k <= N).")
    has_retention = "retention.average" in frame.columns
    defaults = paper.PAPER_HPARAMS
    for model in models_for(frame, opts):
        for ds in datasets_for(frame, opts):
            sub = only(frame, model=model, dataset=ds)
            for param in ("top_k", "num_loras", "guide_lambda", "epsilon"):
                others = {p: v for p, v in defaults.items() if p != param}
                slice_ = sub
                for p, v in others.items():
                    if not slice_.empty:
                        slice_ = slice_[slice_[p].isna() | (pd.to_numeric(slice_[p], errors="coerce") == v)]
                cells = Cells(slice_, (param,))
                values = sorted(set(_grid_expected(param)) | {v for v in cells.values(param)})
                columns = [paper.HPARAM_LABELS[param], "Rel.", "Gen.", "Loc.",
                           *(["Retention avg."] if has_retention else []), "n"]
                rows = []
                for value in values:
                    key = (value,)
                    label = f"{value:g}" + (" (paper)" if value == defaults[param] else "")
                    row = [label, *(fmt(cells.stat(key, m, 100), cells.status(key))
                                    for m in ("reliability", "generalization", "locality"))]
                    if has_retention:
                        row.append(fmt(cells.stat(key, "retention.average", 100), cells.status(key), 1))
                    row.append(str(len(cells.seeds(key))))
                    rows.append(row)
                    if cells.status(key) != "ok":
                        report.missing.append(f"{paper.HPARAM_LABELS[param]}={value:g} / {model} / "
                                              f"{label_for(paper.DATASET_LABELS, ds)}: {cells.status(key)}")
                report.tables.append(Table(f"{paper.HPARAM_LABELS[param]}: {label_for(paper.MODEL_LABELS, model)}, "
                                           f"{label_for(paper.DATASET_LABELS, ds)} (%)", columns, rows))
    report.failed = failed_list(frame)
    return report
