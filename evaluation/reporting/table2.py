"""Table 2 and appendix C: test retention per task and on average, with its bar figure."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, Stat, fmt, fmt_diff, fmt_paper, triple
from evaluation.reporting.render import Report, Table
from evaluation.reporting.runs import key_value
from evaluation.reporting.selection import (
    Options,
    common_notes,
    editor_rows,
    failed_list,
    label_for,
    model_heading,
    models_for,
    stream_length,
)


def build_table2(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = stream_length(frame, opts, 1000)
    if not frame.empty:
        # runs without a retention suite cannot fill this table: finished ones without scores, and
        # unfinished or failed ones whose config has none (``retention=none``; unknown is kept)
        finished = frame["status"] == "ok"
        scored = frame["retention.average"].notna() if "retention.average" in frame.columns else False
        no_suite = (finished & ~scored) | (~finished & (frame["retention_suite"] == False))  # noqa: E712
        frame = frame[~no_suite]
    report = Report("table2", f"Table 2: test retention (%) after {n_edits} sequential edits",
                    notes=common_notes(frame))
    bars: dict[tuple, list[tuple[str, list[Optional[Stat]]]]] = {}  # per (model, dataset), for the figure
    limits = sorted({str(key_value(v)) for v in frame.loc[frame["status"] == "ok", "retention_limit"]}) \
        if not frame.empty else []
    if limits:
        report.notes.append(f"Retention examples per task (retention.limit): {', '.join(limits)} "
                            f"(None: every example).")
    cells = Cells(frame, ("editor", "model", "dataset"))
    # the unedited model's scores repeat in every run (cached per model): one per seed, not one per editor
    base = Cells(frame.drop_duplicates(subset=["status", "model", "dataset", "seed"]) if not frame.empty else frame,
                 ("model", "dataset"))
    for model in models_for(frame, opts):
        heading, ref = model_heading(model, opts)
        columns = ["Editor"]
        for ds in paper.DATASETS:
            columns += [f"{label_for(paper.DATASET_LABELS, ds)} avg.", "paper", "Δ"]
        editors = editor_rows((k[0] for k in [*cells.ok, *cells.failed]), opts.editors)
        rows = [["Base (unedited)"]]
        for ds in paper.DATASETS:
            stat = base.stat((model, ds), "retention_base.average", 100)
            published = paper.TABLE2_BASE.get(ref) if ref else None
            rows[0] += [fmt(stat, base.status((model, ds)), 1), fmt_paper(published, 1), fmt_diff(stat, published, 1)]
        for editor in editors:
            row = [label_for(paper.EDITOR_LABELS, editor)]
            for ds in paper.DATASETS:
                key = (editor, model, ds)
                published = paper.TABLE2.get((editor, ref, ds)) if ref else None
                row += triple(cells, key, "retention.average", published, 100, 1)
                if cells.status(key) != "ok":
                    report.missing.append(f"{label_for(paper.EDITOR_LABELS, editor)} / {model} / "
                                          f"{label_for(paper.DATASET_LABELS, ds)}: {cells.status(key)}")
            rows.append(row)
        report.tables.append(Table(f"Average over the eight tasks: {heading}", columns, rows,
                                   ["The paper gives exact averages for the base model and ELDER only; FT-L and ROME "
                                    "are reported as collapsing (0.2 to 25)."]))
        # appendix C style: every task, reproduced only
        tasks = [*paper.RETENTION_TASKS, "average"]
        for ds in paper.DATASETS:
            columns = ["Editor", *[label_for(paper.RETENTION_LABELS, t) for t in tasks]]
            base_stats = [base.stat((model, ds), f"retention_base.{t}", 100) for t in tasks]
            rows = [["Base (unedited)", *[fmt(s, base.status((model, ds)), 1) for s in base_stats]]]
            series = [("Base (unedited)", base_stats)] if base.status((model, ds)) == "ok" else []
            for editor in editors:
                key = (editor, model, ds)
                stats = [cells.stat(key, f"retention.{t}", 100) for t in tasks]
                rows.append([label_for(paper.EDITOR_LABELS, editor), *[fmt(s, cells.status(key), 1) for s in stats]])
                if cells.status(key) == "ok":
                    series.append((label_for(paper.EDITOR_LABELS, editor), stats))
            if len(series) > 1:  # something edited to compare with the unedited model
                bars[(model, ds)] = series
            report.tables.append(Table(f"Per task (appendix C): {label_for(paper.MODEL_LABELS, model)}, "
                                       f"{label_for(paper.DATASET_LABELS, ds)}", columns, rows,
                                       ["Reproduced only: the spec does not transcribe the appendix's "
                                        "per-task numbers."]))
    report.failed = failed_list(frame)
    if opts.out is not None and bars:
        from evaluation.reporting.figures import plot_retention

        labels = [label_for(paper.RETENTION_LABELS, t) for t in (*paper.RETENTION_TASKS, "average")]
        report.figures = plot_retention(bars, labels, opts.out,
                                        f"Test retention after {n_edits} edits")
    return report
