"""Table 4: the ablation of ELDER's guided loss."""
from __future__ import annotations

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, triple
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    elder_runs,
    failed_list,
    label_for,
    model_heading,
    models_for,
)


def build_table4(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = elder_runs(frame, opts)
    report = Report("table4", f"Table 4: ablation of the guided loss, generalization (%) after {n_edits} edits",
                    notes=common_notes(frame))
    cells = Cells(frame, ("aux_loss", "model", "dataset"))
    for model in models_for(frame, opts):
        heading, ref = model_heading(model, opts)
        columns = ["Variant"]
        for ds in paper.DATASETS:
            columns += [f"{label_for(paper.DATASET_LABELS, ds)} Gen.", "paper", "Δ"]
        rows = []
        for aux in ("guided", "none", "load_balance"):
            row = [label_for(paper.AUX_LOSS_LABELS, aux)]
            for ds in paper.DATASETS:
                key = (aux, model, ds)
                row += triple(cells, key, "generalization", paper.TABLE4.get((aux, ref, ds)) if ref else None)
                if cells.status(key) != "ok":
                    report.missing.append(f"editor.aux_loss={aux} / {model} / {label_for(paper.DATASET_LABELS, ds)}: "
                                          f"{cells.status(key)}")
            rows.append(row)
        report.tables.append(Table(heading, columns, rows))
    report.failed = failed_list(frame)
    return report
