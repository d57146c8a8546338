"""The model axis: reliability / generalization per model and reading at several stream lengths."""
from __future__ import annotations

import json

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import DASH
from evaluation.reporting.render import Report, Table
from evaluation.reporting.runs import num
from evaluation.reporting.selection import (
    Options,
    common_notes,
    failed_list,
    label_for,
    reading_order,
)

#: the model axis's stream lengths (issue 18: 40, 100 and 200 edits)
MODEL_AXIS_POINTS = (40, 100, 200)


def build_model_axis(frame: pd.DataFrame, opts: Options) -> Report:
    """Reliability / generalization at several stream lengths per model and reading, read from each run's
    curve points (one run of the longest length per cell, ``eval_every`` dividing the shorter ones)."""
    points = list(opts.points or MODEL_AXIS_POINTS)
    report = Report("model_axis", "The model axis: reliability / generalization (%) after "
                    + ", ".join(map(str, points)) + " sequential edits", notes=common_notes(frame)[1:])
    report.notes.insert(0, "Each cell reads one run's curve point after that many edits (the stream edits the "
                           "dataset's first records in order, so it is what a run of that length gives). "
                           "Reading — is the harness's default. s/edit: edit time of the whole stream.")
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    columns = ["Editor", "Model", "Dataset", "Reading", *(f"{n} edits" for n in points), "s/edit"]
    rows = []
    order = lambda r: (str(r["editor"]), str(r["model"]), str(r["dataset"]),  # noqa: E731
                       reading_order(("elder", r.get("elder_reading"), None, None)))
    for run in sorted(ok.to_dict("records"), key=order):
        curve = {int(p["edits"]): p for p in json.loads(run.get("curve") or "[]")}
        cells = []
        for n in points:
            p = curve.get(n)
            cells.append(DASH if p is None else f"{100 * num(p.get('reliability')):.1f} / "
                                                  f"{100 * num(p.get('generalization')):.1f}")
        rows.append([label_for(paper.EDITOR_LABELS, run["editor"]), label_for(paper.MODEL_LABELS, run["model"]),
                     label_for(paper.DATASET_LABELS, run["dataset"]),
                     label_for(paper.READING_LABELS, run.get("elder_reading") or "—"), *cells,
                     f"{num(run['seconds_per_edit']):.2f}"])
    report.tables.append(Table("Reliability / generalization (%) by stream length", columns, rows))
    report.failed = failed_list(frame)
    return report
