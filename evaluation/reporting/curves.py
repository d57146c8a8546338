"""Figures 2 and 3: curves against the number of edits or of ELDER layers, with their tables."""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import Cells, fmt
from evaluation.reporting.render import Report, Table
from evaluation.reporting.runs import TablesError, key_value, num
from evaluation.reporting.selection import (
    Options,
    common_notes,
    datasets_for,
    elder_runs,
    failed_list,
    label_for,
    models_for,
)


def _curve_table(report: Report, frame: pd.DataFrame, opts: Options, x: str, x_label: str, expected_x: Sequence[int],
                 editors: Sequence[str], expected_seeds: Sequence[int], own_x_only: bool = False
                 ) -> dict[tuple, dict[str, list]]:
    """Rows per (editor, x) with seeds counted; returns the curves for the plot keyed (model, dataset).

    ``own_x_only``: an editor's rows are the x values it has runs for (curve points fall where each
    editor's batches end), not every x seen or expected.
    """
    curves: dict[tuple, dict[str, list]] = {}
    cells = Cells(frame, ("editor", "model", "dataset", x))
    for model in models_for(frame, opts):
        for ds in datasets_for(frame, opts):
            xs = sorted(set(expected_x) | {v for v in cells.values(x)})
            columns = ["Editor", x_label, "Rel.", "Gen.", "Rel. (generated)", "params (M)", "seeds"]
            rows = []
            for editor in editors:
                series = curves.setdefault((model, ds), {}).setdefault(editor, [])
                for value in xs:
                    key = (editor, model, ds, value)
                    if own_x_only and cells.status(key) == "missing":
                        continue
                    rel, gen = cells.stat(key, "reliability", 100), cells.stat(key, "generalization", 100)
                    params = cells.stat(key, "trainable_params", 1e-6)
                    generated = cells.stat(key, "reliability_generated", 100)  # the model's own answers (issue 33)
                    seeds = cells.seeds(key)
                    rows.append([label_for(paper.EDITOR_LABELS, editor), f"{value:g}", fmt(rel, cells.status(key)),
                                 fmt(gen, cells.status(key)), fmt(generated, cells.status(key)),
                                 fmt(params, cells.status(key)), str(len(seeds))])
                    failed, unfinished = set(cells.seeds(key, "failed")), set(cells.seeds(key, "unfinished"))
                    lacking = [s for s in expected_seeds if s not in seeds]
                    parts = [f"seed(s) {', '.join(map(str, group))} {what}"
                             for what, group in (("missing", [s for s in lacking if s not in failed | unfinished]),
                                                 ("failed", [s for s in lacking if s in failed]),
                                                 ("unfinished", [s for s in lacking if s in unfinished - failed]))
                             if group]
                    if parts:
                        report.missing.append(f"{label_for(paper.EDITOR_LABELS, editor)} / {model} / "
                                              f"{label_for(paper.DATASET_LABELS, ds)} / {x_label}={value:g}: "
                                              f"{'; '.join(parts)}")
                    if rel is not None:
                        series.append((value, rel, gen, params, generated))
            report.tables.append(Table(f"{label_for(paper.MODEL_LABELS, model)}, {label_for(paper.DATASET_LABELS, ds)}",
                                       columns, rows))
    return curves


def curve_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per curve point of every finished run (``eval_every``), as if it were a run of that length.

    The stream edits the dataset's first records in file order, so the point after t edits of a longer
    stream is what a run of t edits gives (tests/test_tables.py checks this on a tiny ELDER). Points seen
    in several runs of one seed (e.g. the first 100 edits of a 100- and a 200-edit run) are kept once.
    """
    rows: list[dict[str, Any]] = []
    for run in frame.to_dict("records"):
        points = json.loads(run.get("curve") or "[]") if run["status"] == "ok" else []
        if not points:
            rows.append(run)  # failed runs (listed as such) and runs without curves stay as they are
        for point in points:
            params = point.get("trainable_params", run["trainable_params"] if point["edits"] == run["num_edits"]
                               else math.nan)
            rows.append({**run, "num_edits": int(point["edits"]), "reliability": num(point.get("reliability")),
                         "generalization": num(point.get("generalization")), "trainable_params": num(params),
                         "reliability_generated": num(point.get("reliability_generated")),
                         "stored_params": num(point.get("stored_params"))})
    out = pd.DataFrame(rows, columns=frame.columns)
    ok = out["status"] == "ok"
    deduped = out[ok].drop_duplicates(subset=["editor", "model", "dataset", "seed", "num_edits"])
    return pd.concat([deduped, out[~ok]], ignore_index=True)


def build_figure2(frame: pd.DataFrame, opts: Options) -> Report:
    if opts.num_edits is not None:
        raise TablesError("figure2 plots every stream length; do not pass --num-edits")
    frame = frame[frame["editor"].isin(paper.FIGURE2_EDITORS) | frame["editor"].isna()] if not frame.empty else frame
    if opts.from_curves and not frame.empty:
        frame = curve_rows(frame)
    report = Report("figure2", "Figure 2: reliability and trainable parameters against the number of edits "
                               "(ELDER vs GRACE)", notes=common_notes(frame))
    report.notes.append("The paper: ZsRE, LLaMA2-7B, five seeds (numbers only as a plot). The ZsRE file holds 1,037 "
                        "records, so streams longer than 1,037 edits can only run on CounterFact here.")
    if opts.from_curves:
        report.notes.append("--from-curves: each point is a curve point (eval_every) of a longer run: the reliability "
                            "and generalization on the edits made so far, which a run of that length also gives.")
    expected = () if opts.from_curves else paper.FIGURE2_NUM_EDITS
    curves = _curve_table(report, frame, opts, "num_edits", "edits", expected, paper.FIGURE2_EDITORS,
                          paper.FIGURE2_SEEDS, own_x_only=opts.from_curves)
    report.failed = failed_list(frame)
    if opts.out is not None:
        from evaluation.reporting.figures import plot_curves

        report.figures = plot_curves(curves, "number of edits", opts.out, "Figure 2")
    return report


def build_figure3(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = elder_runs(frame, opts)
    report = Report("figure3", f"Figure 3: ELDER against the number of ELDER layers L ({n_edits} edits)",
                    notes=common_notes(frame))
    report.notes.append("epsilon = 2L in every run (the paper's 12 at L=6, N=4, k=2: half the code's bits).")
    if not frame.empty:
        layouts = sorted({(int(L), str(layers)) for L, layers in zip(frame["L"], frame["layers"])
                          if key_value(L) is not None and layers})
        if layouts:
            report.notes.append("Layers: " + "; ".join(f"L={n}: {lay}" for n, lay in layouts) + ".")
    curves = _curve_table(report, frame, opts, "L", "L", paper.FIGURE3_LAYERS, ("elder",), (0, 1, 2, 3, 4))
    report.failed = failed_list(frame)
    if opts.out is not None:
        from evaluation.reporting.figures import plot_curves

        report.figures = plot_curves(curves, "number of ELDER layers L", opts.out, "Figure 3")
    return report
