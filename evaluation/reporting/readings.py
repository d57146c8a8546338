"""The readings table: ELDER under each reading of the authors' code, beside GRACE and MELO."""
from __future__ import annotations

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, fmt
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    failed_list,
    label_for,
    models_for,
    reading_order,
    stream_length,
)


def build_readings(frame: pd.DataFrame, opts: Options) -> Report:
    """ELDER under each reading of the authors' code (conf/elder_reading/), and the routed controls
    (GRACE, MELO) under both key positions: reliability, generalization, locality per dataset."""
    frame, n_edits = stream_length(frame, opts, 100)
    report = Report("readings", f"Readings of the authors' code: reliability, generalization and locality (%) "
                                f"after {n_edits} sequential edits", notes=common_notes(frame)[1:])
    report.notes.insert(0, "One run per cell (seed 0). ELDER rows change one reading at a time from the project's "
                           "earlier one (conf/elder_reading/project.yaml); \"all\" takes every reading the "
                           "authors' way (experiment=elder_authors). lr is ELDER's learning rate.")
    cells = Cells(frame, ("editor", "elder_reading", "key_position", "lr", "model", "dataset"))
    found = [k for k in [*cells.ok, *cells.failed]]
    for model in models_for(frame, opts):
        datasets = [d for d in paper.READING_DATASETS if any(k[4] == model and k[5] == d for k in found)]
        datasets = datasets or list(paper.READING_DATASETS)
        columns = ["Editor", "Reading", "key", "lr"]
        for ds in datasets:
            columns += [f"{label_for(paper.DATASET_LABELS, ds)} {m}" for m in ("Rel.", "Gen.", "Loc.")]
        rows = []
        variants = sorted({k[:4] for k in found if k[4] == model}, key=reading_order)
        for editor, reading, key_position, lr in variants:
            row = [label_for(paper.EDITOR_LABELS, editor), label_for(paper.READING_LABELS, reading or "—"),
                   str(key_position), f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)]
            for ds in datasets:
                key = (editor, reading, key_position, lr, model, ds)
                row += [fmt(cells.stat(key, m, 100), cells.status(key), 1)
                        for m in ("reliability", "generalization", "locality")]
            rows.append(row)
        report.tables.append(Table(label_for(paper.MODEL_LABELS, model), columns, rows))
    report.failed = failed_list(frame)
    return report
