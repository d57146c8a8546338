"""Options and the frame filters, labels and notes that the table builders share."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import pandas as pd

from evaluation.reporting import paper
from evaluation.reporting.runs import TablesError, key_value


@dataclass
class Options:
    models: Sequence[str] = ()
    paper_model: Optional[str] = None
    num_edits: Optional[int] = None
    dataset: Optional[str] = None
    out: Optional[Path] = None
    paths: Sequence[str] = ()
    from_curves: bool = False
    age_bin: Optional[int] = None  # forgetting: width of the age bins in edits (None: about 20 bins)
    normalise: bool = False  # forgetting: plot the retained fraction (÷ accuracy just after editing)
    points: Sequence[int] = ()  # model_axis: the stream lengths to read (default MODEL_AXIS_POINTS)
    protocol: Optional[str] = None  # keep only runs of this stream protocol (data/protocol.py)
    revisit: Optional[int] = None  # ... and this revisit count
    editors: Sequence[str] = ()  # editors given a row even without a run (their cells read "missing")


def label_for(mapping: Mapping[str, str], key: Any) -> str:
    return mapping.get(str(key), str(key))


def models_for(frame: pd.DataFrame, opts: Options) -> list[str]:
    if opts.models:
        return list(opts.models)
    found = sorted({m for m in frame["model"].dropna()}) if not frame.empty else []
    return found or ["smollm2"]


def model_heading(model: str, opts: Options) -> tuple[str, Optional[str]]:
    ref = paper.paper_model_for(model, opts.paper_model)
    ref_text = f"paper: {label_for(paper.MODEL_LABELS, ref)}" if ref else "no paper numbers for this model"
    return f"{label_for(paper.MODEL_LABELS, model)} ({ref_text})", ref


def failed_list(frame: pd.DataFrame) -> list[str]:
    out = []
    if frame.empty:
        return out
    for _, row in frame[frame["status"] != "ok"].iterrows():
        settings = " ".join(f"{k}={key_value(row[k])}" for k in ("editor", "model", "dataset", "seed", "num_edits")
                            if key_value(row[k]) is not None)
        out.append(f"`{row['source']}` ({settings}; {row['status']}): {row['reason']}")
    return out


def stream_length(frame: pd.DataFrame, opts: Options, default: Optional[int] = None,
                  one_protocol: bool = True) -> tuple[pd.DataFrame, Optional[int]]:
    """Keep one stream length: ``--num-edits`` or the single one found (several found: an error). A run
    over a whole dataset shorter than that length (paper.DATASET_RECORDS) counts as that length.
    ``one_protocol``: keep one stream protocol too (:func:`stream_protocol`); the readings table, whose rows
    name their protocol, keeps them all."""
    if one_protocol:
        frame = stream_protocol(frame, opts)
    if frame.empty:
        return frame, opts.num_edits or default
    length = pd.to_numeric(frame["num_edits"], errors="coerce")
    whole = frame["dataset"].map(lambda d: paper.DATASET_RECORDS.get(d, math.inf))
    if opts.num_edits is not None:
        keep = frame["num_edits"].isna() | (length == opts.num_edits) | ((length == whole) & (whole < opts.num_edits))
        return frame[keep], opts.num_edits
    found = lengths_found(frame)
    if len(found) > 1:
        raise TablesError(f"the runs have several stream lengths ({', '.join(map(str, found))} edits); "
                          f"choose one with --num-edits N")
    return frame, (found[0] if found else default)


def stream_protocol(frame: pd.DataFrame, opts: Options) -> pd.DataFrame:
    """Keep one stream protocol (protocol, revisit): ``--protocol``/``--revisit`` or the single one found;
    several found is an error, since runs that differ only in how the stream was built would otherwise be
    averaged into one cell. Rows that record no protocol (failed runs) are kept."""
    if frame.empty:
        return frame
    if opts.protocol is not None or opts.revisit is not None:
        chosen = {"protocol": opts.protocol, "revisit": opts.revisit}
        return only(frame, **{k: v for k, v in chosen.items() if v is not None})
    ok = frame[frame["status"] == "ok"]
    found = sorted({(str(p), int(r)) for p, r in zip(ok["protocol"], pd.to_numeric(ok["revisit"], errors="coerce"))
                    if key_value(p) is not None and not math.isnan(r)})
    if len(found) > 1:
        shown = ", ".join(f"{p} revisit {r}" for p, r in found)
        raise TablesError(f"the runs have several stream protocols ({shown}); choose one with --protocol P "
                          f"[--revisit R], or tabulate them side by side with the readings table")
    return frame


def lengths_found(frame: pd.DataFrame) -> list[int]:
    """The finished runs' stream lengths; a run over a whole dataset (it counts as any longer length) is left
    out unless only such runs finished."""
    if frame.empty:
        return []
    length = pd.to_numeric(frame["num_edits"], errors="coerce")
    whole = frame["dataset"].map(lambda d: paper.DATASET_RECORDS.get(d, math.inf))
    found = sorted({int(n) for n in length[(frame["status"] == "ok") & (length != whole)].dropna()})
    return found or sorted({int(n) for n in length[frame["status"] == "ok"].dropna()})


def only(frame: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """Rows whose columns equal the given values (rows where the value is unknown, e.g. failed runs, are kept)."""
    if frame.empty:
        return frame
    keep = pd.Series(True, index=frame.index)
    for col, value in equal.items():
        keep &= frame[col].isna() | (frame[col] == value)
    return frame[keep]


def datasets_for(frame: pd.DataFrame, opts: Options) -> list[str]:
    if opts.dataset:
        return [opts.dataset]
    found = sorted({d for d in frame["dataset"].dropna()}) if not frame.empty else []
    return found or ["zsre"]


def common_notes(frame: pd.DataFrame) -> list[str]:
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    notes = ["Reproduced values are means over the runs (seeds) of each cell, ± the sample standard deviation "
             "where a cell has more than one run; \"paper\" is the number printed in the ELDER paper "
             "(arXiv 2408.11869, its tables as constants in evaluation/reporting/paper.py); Δ = reproduced − paper."]
    if not ok.empty:
        notes.append(f"{len(ok)} finished run(s).")
        skipped = ok[pd.to_numeric(ok["skipped_edits"], errors="coerce").fillna(0) > 0]
        for row in skipped.itertuples():
            notes.append(f"Warning: `{row.source}` skipped {int(row.skipped_edits)} edit(s) (non-finite loss).")
    return notes


def elder_runs(frame: pd.DataFrame, opts: Options) -> tuple[pd.DataFrame, int]:
    """The ELDER runs of one stream length (Table 4, the grid and Figure 3 vary only ELDER)."""
    frame, n_edits = stream_length(frame, opts, 1000)
    return only(frame, editor="elder"), n_edits


def editor_rows(editors_found: Iterable[str], expected: Iterable[str] = ()) -> list[str]:
    """The paper's editors in its order, then every other editor that has runs or is ``expected`` (``--editors``:
    a sweep's editors, so one not run yet shows as missing rather than not at all; a new editor needs no list)."""
    return [*paper.EDITORS, *sorted({*editors_found, *expected} - set(paper.EDITORS) - {"none"})]


def reading_order(variant: tuple) -> tuple:
    editor, reading, key_position, lr = variant
    readings = list(paper.READING_LABELS)
    return (paper.EDITORS.index(editor) if editor in paper.EDITORS else len(paper.EDITORS),
            readings.index(reading) if reading in readings else len(readings), str(key_position),
            -(lr or 0) if isinstance(lr, (int, float)) else 0)
