"""The ablation table: runs of one editor on one model and dataset that differ in editor settings, one row each,
labelled by the settings in which they differ (docs/locate_then_edit.md, "Measured": the statistics' corpus, the value
settings).

    python -m evaluation.tables ablation outputs/multirun/corpus_smollm2_n100 --out results/corpus_smollm2_n100
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.answers_report import COLUMNS
from evaluation.reporting.cells import DASH
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    label_for,
    models_for,
    stream_length,
)

#: settings that name where things are kept, not what the editor does
_IGNORED = ("cache_dir", "_target_")


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every config (in the first config's order, then the rest)."""
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in _IGNORED))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _cell(row: pd.Series, column: str, scale: float = 100.0, digits: int = 1) -> str:
    value = pd.to_numeric(row.get(column), errors="coerce")
    return DASH if pd.isna(value) else f"{value * scale:.{digits}f}"


def build_ablation(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = stream_length(frame, opts, 100)
    report = Report("ablation", f"Editor settings compared after {n_edits} sequential edits (%)",
                    notes=common_notes(frame)[1:])
    report.notes.append("Each row is one run, labelled by the editor settings that differ between the runs of that "
                        "editor on that model and dataset. Columns as in the answers table: TF teacher-forced, gen. "
                        "the model's own answer, @edit each batch right after it was edited, end after the stream.")
    ok = frame[frame["status"] == "ok"]
    for model in models_for(ok, opts):
        for (editor, dataset), runs in ok[ok["model"] == model].groupby(["editor", "dataset"], sort=False):
            configs = [json.loads(c) if isinstance(c, str) else {} for c in runs.get("editor_config", [])]
            keys = differing(configs)
            rows = []
            for config, (_, run) in zip(configs, runs.iterrows()):
                label = ", ".join(f"{k}={json.dumps(config.get(k))}" for k in keys) or "(as configured)"
                rows.append([label, *[_cell(run, column) for _, column in COLUMNS],
                             _cell(run, "seconds_per_edit", 1.0, 1)])
            where = (f"{label_for(paper.EDITOR_LABELS, editor)}, {label_for(paper.MODEL_LABELS, model)}, "
                     f"{label_for(paper.DATASET_LABELS, dataset)}")
            report.tables.append(Table(where, ["Settings", *[c for c, _ in COLUMNS], "s/edit"], rows))
    return report
