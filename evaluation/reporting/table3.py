"""Table 3: editing time and trainable parameters, ELDER against GRACE."""
from __future__ import annotations

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, fmt, triple
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    failed_list,
    label_for,
    model_heading,
    models_for,
    only,
    stream_length,
)


def build_table3(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = stream_length(frame, opts, 1000)
    dataset = opts.dataset or "zsre"
    frame = only(frame, dataset=dataset)
    report = Report("table3", f"Table 3: editing time and trainable parameters after {n_edits} "
                              f"{label_for(paper.DATASET_LABELS, dataset)} edits", notes=common_notes(frame))
    devices = sorted({str(d) for d in frame.loc[frame["status"] == "ok", "device"].dropna()}) if not frame.empty else []
    if devices:
        report.notes.append(f"Measured on: {', '.join(devices)} (the paper: one NVIDIA A40).")
    cells = Cells(frame, ("editor", "model"))
    for model in models_for(frame, opts):
        heading, ref = model_heading(model, opts)
        columns = ["Editor", "s/edit", "paper", "Δ", "params (M)", "paper", "Δ", "stored (M)"]
        rows = []
        for editor in ("grace", "elder"):
            key = (editor, model)
            published = paper.TABLE3.get((editor, ref)) if ref else None
            row = [label_for(paper.EDITOR_LABELS, editor)]
            row += triple(cells, key, "seconds_per_edit", published[0] if published else None, 1.0)
            row += triple(cells, key, "trainable_params", published[1] if published else None, 1e-6)
            row.append(fmt(cells.stat(key, "stored_params", 1e-6), cells.status(key)))
            rows.append(row)
            if cells.status(key) != "ok":
                report.missing.append(f"{label_for(paper.EDITOR_LABELS, editor)} / {model}: {cells.status(key)}")
        report.tables.append(Table(heading, columns, rows, [paper.TABLE3_NOTE]))
    report.failed = failed_list(frame)
    return report
