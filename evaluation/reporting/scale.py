"""The scale report (docs/speed.md, "Scale"): each editor's edit scores, time per edit and parameters against the number of
edits of one long stream (its curve points, e.g. ``eval_at=[1000,2000,5000]`` of a 10,000-edit run), log x.

    python -m evaluation.tables scale outputs/multirun/table1_smollm2_memory --dataset counterfact \
        --out results/scale_smollm2_counterfact
"""
from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import DASH
from evaluation.reporting.render import Report, Table
from evaluation.reporting.runs import num
from evaluation.reporting.selection import (
    Options,
    common_notes,
    datasets_for,
    failed_list,
    label_for,
    models_for,
)

#: (column, the curve point's metric, scale); None: computed from the run's cost record
COLUMNS = (("Rel.", "reliability", 100), ("Gen.", "generalization", 100), ("Loc.", "locality", 100),
           ("Rel. (generated)", "reliability_generated", 100), ("Gen. (generated)", "generalization_generated", 100),
           ("Loc. (generated)", "locality_generated", 100), ("s/edit", "seconds_per_edit", 1),
           ("trainable (M)", "trainable_params", 1e-6), ("stored (M)", "stored_params", 1e-6))


def scale_points(run: dict[str, Any]) -> list[dict[str, float]]:
    """One row per curve point of a finished run: its metrics, and the edit seconds per edit so far (from the
    run's ``costs`` record; NaN for runs made before it)."""
    costs = {int(c["edits"]): c for c in json.loads(run.get("costs") or "[]")}
    points = []
    for point in json.loads(run.get("curve") or "[]"):
        edits = int(point["edits"])
        cost = costs.get(edits)
        points.append({"edits": edits, **{m: num(point.get(m)) for _, m, _ in COLUMNS},
                       "seconds_per_edit": cost["edit_seconds"] / edits if cost else math.nan})
    return points


def _cell(value: float, scale: float) -> str:
    if value is None or math.isnan(value):
        return DASH
    return f"{value * scale:.1f}" if scale == 100 else f"{value * scale:.3g}"


def build_scale(frame: pd.DataFrame, opts: Options) -> Report:
    report = Report("scale", "Scale: edit scores, time per edit and parameters against the number of edits",
                    notes=common_notes(frame))
    report.notes.append("One row per curve point of each editor's longest finished run (eval_at / eval_every): "
                        "scores over all edits made so far, teacher-forced and from generated answers (%); s/edit: "
                        "editing seconds so far per edit (evaluation excluded); trainable/stored: parameters the "
                        "method writes / keeps beside the model (millions).")
    series: dict[tuple[str, str], dict[str, list[dict[str, float]]]] = {}
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    for model in models_for(ok, opts):
        for ds in datasets_for(ok, opts):
            rows = []
            runs = ok[(ok["model"] == model) & (ok["dataset"] == ds)]
            for editor in sorted(runs["editor"].unique(), key=lambda e: label_for(paper.EDITOR_LABELS, e)):
                longest = runs[runs["editor"] == editor].sort_values("num_edits").iloc[-1].to_dict()
                points = scale_points(longest)
                series.setdefault((model, ds), {})[editor] = points
                for p in points:
                    rows.append([label_for(paper.EDITOR_LABELS, editor), str(p["edits"]),
                                 *(_cell(p[m], s) for _, m, s in COLUMNS)])
            if rows:
                report.tables.append(Table(f"{label_for(paper.MODEL_LABELS, model)}, "
                                           f"{label_for(paper.DATASET_LABELS, ds)}",
                                           ["Editor", "edits", *(c for c, _, _ in COLUMNS)], rows))
    report.failed = failed_list(frame)
    if opts.out is not None and series:
        from evaluation.reporting.figures import plot_scale

        report.figures = plot_scale(series, opts.out)
    return report
