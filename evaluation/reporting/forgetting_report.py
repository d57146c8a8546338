"""The forgetting report: each edit batch's accuracy at every curve point, by age of the edit."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.cells import DASH
from evaluation.reporting.render import Report, Table
from evaluation.reporting.runs import key_value
from evaluation.reporting.selection import Options, failed_list, label_for, only
from evaluation.run.results import BadResults, read_results


def _run_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A short label per run: the editor, plus whichever of model, dataset, reading, key position, lr,
    stream length and seed vary (the key position only where no ELDER reading names it)."""
    fields = [("model", lambda v, r: label_for(paper.MODEL_LABELS, v)),
              ("dataset", lambda v, r: label_for(paper.DATASET_SHORT, v)),
              ("elder_reading", lambda v, r: label_for(paper.READING_SHORT, v)),
              ("key_position", lambda v, r: None if key_value(r.get("elder_reading")) else f"key {v}"),
              ("lr", lambda v, r: f"lr {v:g}" if isinstance(v, (int, float)) else None),
              ("num_edits", lambda v, r: f"{v} edits"), ("seed", lambda v, r: f"seed {v}")]
    varying = [(f, show) for f, show in fields if len({key_value(r.get(f)) for r in rows}) > 1]
    labels = []
    for row in rows:
        parts = [label_for(paper.EDITOR_LABELS, row.get("editor"))]
        for f, show in varying:
            value = key_value(row.get(f))
            text = show(value, row) if value is not None else None
            parts += [text] if text else []
        labels.append(", ".join(parts))
    for label in {x for x in labels if labels.count(x) > 1}:  # still ambiguous: name the folder
        labels = [f"{x} ({Path(str(r['source'])).name})" if x == label else x for x, r in zip(labels, rows)]
    return labels


def _pct(value: float) -> str:
    return DASH if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _fraction(value: float) -> str:
    return DASH if value is None or math.isnan(value) else f"{value:.2f}"


def build_forgetting(frame: pd.DataFrame, opts: Options) -> Report:
    """Each edit batch's accuracy at every curve point (results.json ``forgetting``), per run."""
    from evaluation.common.atomic import write_text_atomic
    from evaluation.run import forgetting as fg

    report = Report("forgetting", "Forgetting: how well each earlier edit batch is held as the stream goes on",
                    notes=["Each run's `forgetting` record (results.json) holds, at every curve point (`eval_every` "
                           "and the end), the exact-match reliability and generalization of each batch of "
                           "`editor.batch_size` edits, and (`edit_time_eval`) each batch alone right after it was "
                           "edited. Age = edits done since the batch was edited. \"Just after editing\" = the "
                           "batch's value at the first point that holds it (age 0 with edit-time points, or when "
                           "eval_every equals the batch size). Values in %."])
    if not frame.empty and opts.models:
        frame = frame[frame["model"].isin(opts.models) | frame["model"].isna()]
    if not frame.empty and opts.dataset:
        frame = only(frame, dataset=opts.dataset)
    if not frame.empty and opts.num_edits is not None:
        length = pd.to_numeric(frame["num_edits"], errors="coerce")
        frame = frame[frame["num_edits"].isna() | (length == opts.num_edits)]
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    for row in ok.to_dict("records"):
        path = Path(str(row["source"])) / "results.json"
        if str(row["source"]).startswith("wandb:") or not path.is_file():
            report.missing.append(f"`{row['source']}`: no results.json on disk (W&B runs carry no forgetting record)")
            continue
        try:
            points = read_results(path).get("forgetting") or []
        except BadResults as err:
            report.missing.append(f"`{row['source']}`: {err}")
            continue
        if not points:
            report.missing.append(f"`{row['source']}`: no forgetting record (made before runs recorded one)")
            continue
        runs.append((row, points))
    report.failed = failed_list(frame)
    if not runs:
        report.missing.append("no finished run with a forgetting record under the given folders")
        return report
    labels = _run_labels([r for r, _ in runs])
    all_cells = [fg.cells(points) for _, points in runs]
    width = opts.age_bin or fg.auto_age_bin(all_cells)
    report.notes.append(f"Age bins of {width} edits. Retained fraction = the bin's accuracy ÷ the same batches' "
                        f"accuracy just after editing (over batches held at all just after editing).")

    summary, heat_rows, age_rows, ages = [], [], [], {}
    for label, (row, points), run_cells in zip(labels, runs, all_cells):
        last = max(p["edits"] for p in points)
        at_end = [c for c in run_cells if c.edits == last]
        size = sum(c.size for c in at_end)
        first = fg.first_edits_accuracy(points, max(p["batch_size"] for p in points))

        def mean(attr: str, cs: Sequence[Any] = at_end) -> float:
            return sum(getattr(c, attr) * c.size for c in cs) / size if size else math.nan

        summary.append([label, str(last), str(points[-1]["batch_size"]), str(len(points)),
                        _pct(mean("reliability_just_after")), _pct(mean("reliability")),
                        f"{_pct(first['just_after']['reliability'])} → {_pct(first['end']['reliability'])}",
                        _pct(mean("generalization_just_after")), _pct(mean("generalization"))])
        meta = {"run": label, "source": row["source"], "editor": row.get("editor"), "model": row.get("model"),
                "dataset": row.get("dataset"), "seed": key_value(row.get("seed"))}
        heat_rows += [{**meta, **c.as_row()} for c in run_cells]
        table = fg.age_table(run_cells, width)
        ages[label] = table
        age_rows += [{**meta, "bin_width": width, **r} for r in table]
    report.tables.append(Table("Per run (%)", ["Run", "edits", "batch", "points", "Rel. just after editing",
                                               "Rel. at the end", "first batch: just after → end",
                                               "Gen. just after editing", "Gen. at the end"], summary))
    bins = sorted({(r["age_from"], r["age_to"]) for table in ages.values() for r in table})
    for metric in ("reliability", "generalization"):
        key = f"{metric}_retained" if opts.normalise else metric
        rows_out = []
        for lo, hi in bins:
            nothing = {key: math.nan}
            cells_here = [next((r for r in ages[label] if r["age_from"] == lo), nothing) for label in labels]
            rows_out.append([f"{lo}–{hi}", *(_fraction(r[key]) if opts.normalise else _pct(r[key])
                                             for r in cells_here)])
        what = "retained fraction" if opts.normalise else "%"
        report.tables.append(Table(f"{metric.capitalize()} by age of the edit batch ({what})",
                                   ["age (edits)", *labels], rows_out))

    if opts.out is not None:
        from evaluation.reporting.figures import (
            plot_forgetting_by_age,
            plot_forgetting_heatmap,
        )

        out = Path(opts.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        maps = [(label, {m: fg.heatmap(points, m) for m in fg.METRICS}) for label, (_, points) in zip(labels, runs)]
        report.figures += plot_forgetting_heatmap(maps, out.with_name(out.name + "_heatmap"))
        report.figures += plot_forgetting_by_age([(label, ages[label]) for label in labels],
                                                 out.with_name(out.name + "_age"), opts.normalise, width)
        for suffix, rows_csv in (("_heatmap.csv", heat_rows), ("_age.csv", age_rows)):
            path = out.with_name(out.name + suffix)
            write_text_atomic(path, pd.DataFrame(rows_csv).to_csv(index=False))
            report.figures.append(path.name)
        report.notes.append(f"Numbers: `{out.name}_heatmap.csv` (one row per batch and curve point) and "
                            f"`{out.name}_age.csv` (one row per run and age bin).")
    return report
