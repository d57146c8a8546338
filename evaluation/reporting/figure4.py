"""Figure 4: ELDER's allocation codes (t-SNE) and their distances, from codes.npz."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import Options, failed_list


def build_figure4(frame: pd.DataFrame, opts: Options) -> Report:
    from evaluation.reporting.figures import code_summary, plot_codes

    report = Report("figure4", "Figure 4: allocation codes of paraphrase groups and NQ task inputs (t-SNE)",
                    notes=["Each run's codes come from `codes.npz` (written by elder.codes_dump after the "
                           "stream): for five edits, the edit prompt and its held-out paraphrase; and twenty NQ "
                           "retention prompts. Distances are Hamming distances between L*N-bit codes; an input is "
                           "deferred (ELDER off) when its nearest stored code is at least epsilon away."])
    files: list[Path] = []
    for root in map(Path, opts.paths):
        files += sorted(root.rglob("codes.npz")) if root.is_dir() else ([root] if root.name == "codes.npz" else [])
    ok_elder = frame[(frame["status"] == "ok") & (frame["editor"] == "elder")] if not frame.empty else frame
    have = {str(f.parent.resolve()) for f in files}
    for row in ok_elder.itertuples():
        if str(Path(row.source).resolve()) not in have:
            report.missing.append(f"`{row.source}`: finished ELDER run without codes.npz (run it with the "
                                  f"dump_codes hook in evaluation/run/experiment.py)")
    readable = []
    for file in files:  # e.g. a file cut short by a kill before writes were atomic: named, not a crash
        try:
            with np.load(file) as archive:
                archive["codes"]
            readable.append(file)
        except Exception as err:  # noqa: BLE001 - zip, pickle and key errors all mean the same here
            report.missing.append(f"`{file}`: damaged ({type(err).__name__}: {err}); dump the codes again "
                                  f"(elder.codes_dump) or delete the file")
    if not files:
        report.missing.append("no codes.npz found under the given folders")
    files = readable
    rows = []
    for file in files:
        s = code_summary(file)
        rows.append([f"`{file.parent}`", str(s["groups"]), f"{s['within_group']:.2f}", f"{s['between_groups']:.2f}",
                     f"{s['task_to_stored']:.2f}", f"{s['edit_deferred']:.0%}", f"{s['paraphrase_deferred']:.0%}",
                     f"{s['task_deferred']:.0%}", str(s["epsilon"])])
    report.tables.append(Table("Code distances and deferral", ["run", "groups", "edit↔paraphrase", "between groups",
                                                               "NQ→nearest stored", "edits deferred",
                                                               "paraphrases deferred", "NQ deferred", "epsilon"], rows))
    report.failed = failed_list(frame)
    if opts.out is not None and files:
        report.figures = plot_codes(files, opts.out)
    return report
