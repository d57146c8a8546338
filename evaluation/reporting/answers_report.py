"""Teacher forcing against generation, at edit time and after the stream (docs/answers.md, "Teacher forcing
and generation"): one table per model and dataset, every editor a row, and a bar figure.

    python -m evaluation.tables answers outputs/multirun/answers_smollm2_n100 --out results/answers_smollm2_n100
"""
from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, Stat, fmt
from evaluation.reporting.figures import plot_answers
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    editor_rows,
    failed_list,
    label_for,
    models_for,
    stream_length,
)

#: (column, frame column): each metric teacher-forced (TF) and generated (gen.), at edit time and at the end;
#: "gen. ∋": the target stands in the generated answer
COLUMNS = (
    ("Rel. TF @edit", "at_edit_time.reliability"), ("Rel. gen. @edit", "at_edit_time.reliability_generated"),
    ("Rel. TF end", "reliability"), ("Rel. gen. end", "reliability_generated"),
    ("Rel. gen. ∋ end", "reliability_generated_contains"),
    ("Gen. TF @edit", "at_edit_time.generalization"), ("Gen. gen. @edit", "at_edit_time.generalization_generated"),
    ("Gen. TF end", "generalization"), ("Gen. gen. end", "generalization_generated"),
    ("Gen. gen. ∋ end", "generalization_generated_contains"),
    ("Loc. TF", "locality"), ("Loc. gen.", "locality_generated"),
)
#: the bars of the figure: reliability and generalization, each four ways
BARS = ("TF @edit", "gen. @edit", "TF end", "gen. end")


def _ranking(cells: Cells, model: str, dataset: str, editors: list[str], metric: str) -> str:
    scored = [(s.mean, e) for e in editors if (s := cells.stat((e, model, dataset), metric, 100)) is not None]
    ordered = sorted(scored, key=lambda x: -x[0])
    return " > ".join(f"{label_for(paper.EDITOR_LABELS, e)} {v:.1f}" for v, e in ordered) or "no runs"


def build_answers(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = stream_length(frame, opts, 100)
    report = Report("answers", f"Teacher-forced and generated edit scores (%) after {n_edits} sequential edits, and "
                               f"each batch right after it was edited", notes=common_notes(frame)[1:])
    report.notes.append("TF: teacher-forced exact match (the papers' way); gen.: normalised exact match of the "
                        "model's own greedy answer, cut by the run's stop rule (answers.*); gen. ∋: the target "
                        "stands in that answer; @edit: each batch scored right after it was edited, before the "
                        "next; end: after the whole stream. Loc.: agreement with the unedited model (TF: argmax "
                        "tokens on the locality answer; gen.: the same generated answer). — : not recorded.")
    cells = Cells(frame, ("editor", "model", "dataset"))
    editors = editor_rows((k[0] for k in [*cells.ok, *cells.failed]), opts.editors)
    bars: dict[tuple, list[tuple[str, list[Optional[Stat]]]]] = {}
    for model in models_for(frame, opts):
        for dataset in [d for d in dict.fromkeys((*paper.DATASETS, *paper.READING_DATASETS)) if any(
                k[1:] == (model, d) for k in [*cells.ok, *cells.failed])] or list(paper.DATASETS):
            rows = []
            found = [e for e in editors if cells.status((e, model, dataset)) != "missing"]
            for editor in found:
                key = (editor, model, dataset)
                rows.append([label_for(paper.EDITOR_LABELS, editor),
                             *[fmt(cells.stat(key, col, 100), cells.status(key), 1) for _, col in COLUMNS],
                             fmt(cells.stat(key, "seconds_per_edit"), cells.status(key), 1)])
                if cells.status(key) != "ok":
                    continue
                bars.setdefault((model, dataset), []).append((label_for(paper.EDITOR_LABELS, editor), [
                    cells.stat(key, col, 100) for col in ("at_edit_time.reliability", "at_edit_time.reliability_generated",
                                                          "reliability", "reliability_generated",
                                                          "at_edit_time.generalization",
                                                          "at_edit_time.generalization_generated",
                                                          "generalization", "generalization_generated")]))
            where = f"{label_for(paper.MODEL_LABELS, model)}, {label_for(paper.DATASET_LABELS, dataset)}"
            report.tables.append(Table(where, ["Editor", *[c for c, _ in COLUMNS], "s/edit"], rows))
            for column in ("reliability", "reliability_generated", "at_edit_time.reliability_generated"):
                report.notes.append(f"{where}, ranked by {dict((c, n) for n, c in COLUMNS)[column]}: "
                                    f"{_ranking(cells, model, dataset, found, column)}")
            for editor in editors:
                if cells.status((editor, model, dataset)) not in ("ok", "missing"):
                    report.missing.append(f"{label_for(paper.EDITOR_LABELS, editor)} / {where}: "
                                          f"{cells.status((editor, model, dataset))}")
    if any(any(s is not None and not math.isnan(s.mean) for _, stats in v for s in stats) for v in bars.values()):
        report.figures += plot_answers(bars, BARS, opts.out, report.title)
    report.failed = failed_list(frame)
    return report
