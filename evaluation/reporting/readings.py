"""The readings table: ELDER under each reading of the authors' code, beside GRACE and MELO, and under each
stream protocol (data/protocol.py): runs that differ in protocol or stream length are rows of their own."""
from __future__ import annotations

from typing import Any, Optional

import pandas as pd

from data.protocol import PROTOCOLS
from evaluation.reporting import paper
from evaluation.reporting.cells import DASH, Cells, fmt
from evaluation.reporting.render import Report, Table
from evaluation.reporting.selection import (
    Options,
    common_notes,
    failed_list,
    label_for,
    lengths_found,
    models_for,
    reading_order,
    stream_length,
    stream_protocol,
)

#: a row's settings: the reading's (editor, reading, key token, lr), then the stream's (protocol, revisit, entries)
ROW_KEYS = ("editor", "elder_reading", "key_position", "lr", "protocol", "revisit", "edits")
METRICS = ("reliability", "generalization", "locality")
PROTOCOL_NOTE = (
    "Protocol is dataset.protocol (data/protocol.py; docs/configuration.md, \"Data\"): one_per_fact edits each "
    "fact once, by its prompt; grouped makes each of a fact's trained phrasings an entry (on ROME's CounterFact "
    "its prompt and first paraphrase; on ZsRE, one paraphrase per record, only its prompt, so grouping only "
    "shuffles) and shuffles them; revisit R puts each trained phrasing R times at random positions. Edits "
    "counts stream entries, Facts the distinct facts the stream edits on that dataset; runs that record no "
    "protocol count as one_per_fact, one fact per edit. Wall (s) is the run's time end to end "
    "(timings.wall_seconds: loading, editing and evaluation; a resumed run's processes summed, — where it was "
    "resumed before that was recorded), comparable only between runs on the same machine under the same load.")


def protocol_label(protocol: Any, revisit: Any) -> str:
    return str(protocol) if revisit in (None, 1) else f"{protocol}, revisit {revisit}"


def row_order(variant: tuple) -> tuple:
    """By editor, then protocol (one_per_fact first) and revisit, then stream length, then the reading's order."""
    editor_rank, *reading = reading_order(variant[:4])
    protocol, revisit, edits = variant[4:]
    rank = PROTOCOLS.index(protocol) if protocol in PROTOCOLS else len(PROTOCOLS)
    return (editor_rank, rank, str(protocol), revisit or 1, edits or 0, *reading)


def streams(frame: pd.DataFrame, opts: Options) -> tuple[pd.DataFrame, list[Optional[int]]]:
    """The runs with their row's stream length (column ``edits``) and the lengths in the table: ``--num-edits``
    or the single length found, as the other tables keep; or, where runs of several lengths finished, each."""
    if opts.protocol is not None or opts.revisit is not None:
        frame = stream_protocol(frame, opts)
    if opts.num_edits is None and len(lengths_found(frame)) > 1:
        ok = pd.to_numeric(frame.loc[frame["status"] == "ok", "num_edits"], errors="coerce").dropna()
        return frame.assign(edits=frame["num_edits"]), sorted({int(n) for n in ok})
    frame, n_edits = stream_length(frame, opts, 100, one_protocol=False)
    return frame.assign(edits=n_edits), [n_edits]


def is_plain(frame: pd.DataFrame) -> bool:
    """Every run edited the default stream: one_per_fact, each phrasing once."""
    revisit = pd.to_numeric(frame["revisit"], errors="coerce")
    return bool(((frame["protocol"] == "one_per_fact") & (revisit == 1)).all())


def build_readings(frame: pd.DataFrame, opts: Options) -> Report:
    """ELDER under each reading of the authors' code (conf/elder_reading/), and the routed controls
    (GRACE, MELO) under both key positions: reliability, generalization, locality per dataset. Where a run
    edited another stream protocol or length, each row also says its protocol and number of edits, and each
    dataset its facts and the run's wall time."""
    frame, lengths = streams(frame, opts)
    detailed = len(lengths) > 1 or not is_plain(frame)
    report = Report("readings", f"Readings of the authors' code: reliability, generalization and locality (%) "
                                f"after {', '.join(map(str, lengths))} sequential edits",
                    notes=common_notes(frame)[1:])
    report.notes.insert(0, "One run per cell (seed 0). ELDER rows change one reading at a time from the project's "
                           "earlier one (conf/elder_reading/project.yaml); \"all\" takes every reading the "
                           "authors' way (experiment=elder_authors). lr is ELDER's learning rate.")
    if detailed:
        report.notes.insert(1, PROTOCOL_NOTE)
    cells = Cells(frame, (*ROW_KEYS, "model", "dataset"))
    found = [*cells.ok, *cells.failed]
    for model in models_for(frame, opts):
        datasets = [d for d in paper.READING_DATASETS if any(k[-2:] == (model, d) for k in found)]
        datasets = datasets or list(paper.READING_DATASETS)
        columns = ["Editor", "Reading", "key", "lr", *(["Protocol", "Edits"] if detailed else [])]
        measures = ("Facts", "Rel.", "Gen.", "Loc.", "Wall (s)") if detailed else ("Rel.", "Gen.", "Loc.")
        for ds in datasets:
            columns += [f"{label_for(paper.DATASET_LABELS, ds)} {m}" for m in measures]
        rows = []
        for variant in sorted({k[:-2] for k in found if k[-2] == model}, key=row_order):
            editor, reading, key_position, lr, protocol, revisit, edits = variant
            row = [label_for(paper.EDITOR_LABELS, editor), label_for(paper.READING_LABELS, reading or DASH),
                   str(key_position), f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)]
            if detailed:
                row += [protocol_label(protocol, revisit), DASH if edits is None else str(edits)]
            for ds in datasets:
                key = (*variant, model, ds)
                status = cells.status(key)
                scores = [fmt(cells.stat(key, m, 100), status, 1) for m in METRICS]
                if detailed:
                    scores = [fmt(cells.stat(key, "num_facts"), status, 0), *scores,
                              fmt(cells.stat(key, "wall_seconds"), status, 0)]
                row += scores
            rows.append(row)
        report.tables.append(Table(label_for(paper.MODEL_LABELS, model), columns, rows))
    report.failed = failed_list(frame)
    return report
