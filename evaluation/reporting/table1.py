"""Table 1: reliability and generalization of every editor against the paper."""
from __future__ import annotations

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, fmt, triple
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    editor_rows,
    failed_list,
    label_for,
    model_heading,
    models_for,
    reading_order,
    stream_length,
)


def build_table1(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = stream_length(frame, opts, 1000)
    report = Report("table1", f"Table 1: reliability and generalization (%) after {n_edits} sequential edits",
                    notes=common_notes(frame))
    report.notes.append("Rel./Gen. are teacher-forced exact match, as the paper scores them; \"(generated)\": exact "
                        "match of the model's own greedy answer (docs/answers.md, \"Teacher forcing and generation\"), "
                        "— for runs made before it was recorded.")
    cells = Cells(frame, ("editor", "elder_reading", "model", "dataset"))
    found = [*cells.ok, *cells.failed]
    # ROME's own CounterFact records are the paper's CounterFact: a column of their own, same paper numbers
    extra = [d for d in paper.READING_DATASETS if d not in paper.DATASETS and any(k[3] == d for k in found)]
    if extra:
        report.notes.append("CounterFact (ROME's records) is compared with the paper's CounterFact numbers: the paper "
                            "used ROME's counterfact.json. Its stream is as long as the 500-record subset allows.")
    for model in models_for(frame, opts):
        heading, ref = model_heading(model, opts)
        datasets = [*paper.DATASETS, *extra]
        columns = ["Editor"]
        for ds in datasets:
            for metric in ("Rel.", "Gen."):
                columns += [f"{label_for(paper.DATASET_LABELS, ds)} {metric}", "paper", "Δ"]
            # the model's own answers (issue 33): no paper number, the paper scores teacher-forced only
            columns += [f"{label_for(paper.DATASET_LABELS, ds)} {m} (generated)" for m in ("Rel.", "Gen.")]
        readings = sorted({k[1] for k in found if k[0] == "elder" and k[2] == model and k[1] is not None},
                          key=lambda r: reading_order(("elder", r, None, None)))
        rows = []
        for editor, reading in [*((e, None) for e in editor_rows((k[0] for k in found), opts.editors)), *(("elder", r) for r in readings)]:
            label = label_for(paper.EDITOR_LABELS, editor)
            if reading is not None:
                label += f" ({label_for(paper.READING_LABELS, reading)})"
            row = [label]
            for ds in datasets:
                key = (editor, reading, model, ds)
                published = paper.TABLE1.get((editor, ref, paper.PAPER_DATASET.get(ds, ds))) if ref else None
                for i, metric in enumerate(("reliability", "generalization")):
                    row += triple(cells, key, metric, published[i] if published else None)
                row += [fmt(cells.stat(key, f"{m}_generated", 100), cells.status(key))
                        for m in ("reliability", "generalization")]
                status = cells.status(key)
                if status != "ok" and (reading is None and ds in paper.DATASETS or status != "missing"):
                    report.missing.append(f"{label} / {model} / {label_for(paper.DATASET_LABELS, ds)}: {status}")
            rows.append(row)
        report.tables.append(Table(heading, columns, rows))
    report.failed = failed_list(frame)
    return report
