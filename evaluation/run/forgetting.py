"""The forgetting record: how well each earlier edit batch is still held at every curve point.

At every curve point (``eval_every``, and after the whole stream) the stream evaluates the edits made
so far (:func:`evaluation.run.metrics.evaluate_edits`); its per-request scores are grouped here into the
editor's batches, with no extra evaluation pass. ``results.json`` keeps them under ``forgetting``, a
list with one entry per curve point, in stream order::

    {"edits": 12,              # edits done at this point (equals the curve point's "edits")
     "batch_size": 4,          # edits per batch: batch b holds edits b*batch_size+1 .. (b+1)*batch_size
     "reliability": [1.0, 0.5, 0.75],     # per batch: share of its edit prompts held (exact match)
     "generalization": [0.5, 0.25, 0.5]}  # per batch: mean exact match on its held-out paraphrases

The last batch of the final point may be shorter (``num_edits`` not a multiple of the batch size).
Averaged with the batch sizes as weights, a point's lists give the curve point's ``reliability`` and
``generalization`` where every stream entry is its own fact (the default). Under ``dataset.protocol=grouped``
or ``dataset.revisit>1`` a batch's values are over its stream entries (a revisited phrasing counts in every
batch that holds it, with its score at that point), while the curve point counts each distinct phrasing or
fact once (evaluation.run.metrics), so the two averages can differ. Batches are counted from the start of the
stream in groups of ``batch_size`` (the editor's ``batch_size``): the stream's own batches unless
``editor.batch_size`` changed on a resume. A run that scored generated answers adds ``reliability_generated``
and ``generalization_generated`` lists beside them.

**Edit-time points** (``edit_time_eval``): right after a batch is edited, where no curve point is due, the
stream evaluates that batch alone; its entry carries ``"first_batch": b`` and its lists hold batch b only.
:func:`at_edit_time` reads every batch at the first entry that holds it.

From these records this module derives what ``python -m evaluation.tables forgetting`` draws: every
(batch, curve point) pair as a :class:`Cell` with the batch's **age** (edits done since the batch was
edited: ``edits`` minus the batch's last edit), its accuracy **just after editing** (at the first point
that holds it: its edit-time point, or age 0 when ``eval_every`` is the batch size), and averages over batches of the
same age (:func:`age_table`). No torch here: tables and figures read results.json files only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

METRICS = ("reliability", "generalization")
#: the same from the model's generated answers (evaluation.run.answer_metrics), where the run scored them
GENERATED = ("reliability_generated", "generalization_generated")


def batch_means(values: Sequence[float], batch_size: int) -> list[float]:
    """Means of consecutive groups of ``batch_size`` values (the last group may be shorter)."""
    bs = max(1, int(batch_size))
    return [sum(values[i:i + bs]) / len(values[i:i + bs]) for i in range(0, len(values), bs)]


def batch_point(edits: int, batch_size: int, per_request: Mapping[str, Sequence[float]],
                first_batch: int | None = None) -> dict[str, Any]:
    """One entry of the forgetting record from ``evaluate_edits``' ``per_request_out`` after ``edits`` edits.

    ``first_batch``: an edit-time point, whose ``per_request`` covers the batches from that one on (the
    batch just edited) rather than every edit so far."""
    point: dict[str, Any] = {"edits": int(edits), "batch_size": max(1, int(batch_size))}
    if first_batch is not None:
        point["first_batch"] = int(first_batch)
    covered = edits - (first_batch or 0) * point["batch_size"]
    for metric in (*METRICS, *GENERATED):
        if metric not in per_request:
            continue
        values = list(per_request[metric])
        if len(values) != covered:
            raise ValueError(f"per-request {metric} has {len(values)} entries for the {covered} edits of the point "
                             f"after {edits} edits")
        point[metric] = batch_means(values, point["batch_size"])
    return point


def point_ranges(point: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(first, last) edit of each batch a forgetting point holds: every batch so far, or from its
    ``first_batch`` on (an edit-time point)."""
    return batch_ranges(point["edits"], point["batch_size"])[int(point.get("first_batch", 0)):]


def batch_ranges(edits: int, batch_size: int) -> list[tuple[int, int]]:
    """(first, last) edit of each batch after ``edits`` edits, 1-based and inclusive."""
    bs = max(1, int(batch_size))
    return [(start + 1, min(start + bs, edits)) for start in range(0, edits, bs)]


def weighted_mean(point: Mapping[str, Any], metric: str) -> float:
    """A point's per-batch ``metric`` averaged with the batch sizes: the curve point's value."""
    sizes = [last - first + 1 for first, last in point_ranges(point)]
    values = point[metric]
    return sum(v * n for v, n in zip(values, sizes)) / sum(sizes) if sizes else math.nan


@dataclass(frozen=True)
class Cell:
    """One batch at one curve point."""

    batch: int  # 0-based, in stream order
    first_edit: int  # 1-based, inclusive
    last_edit: int
    edits: int  # edits done at the curve point
    age: int  # edits done since the batch's last edit
    size: int  # edits in the batch
    reliability: float
    generalization: float
    reliability_just_after: float  # the batch's value at the first curve point holding it
    generalization_just_after: float
    just_after_edits: int  # that curve point

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def cells(points: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """Every (batch, curve point) of a forgetting record, in point order then batch order."""
    raw: list[tuple[int, int, int, int, float, float]] = []
    first_seen: dict[tuple[int, int], tuple[float, float, int]] = {}
    for point in sorted(points, key=lambda p: p["edits"]):
        ranges = point_ranges(point)
        offset = int(point.get("first_batch", 0))
        if len(ranges) != len(point["reliability"]) or len(ranges) != len(point["generalization"]):
            raise ValueError(f"the forgetting point after {point['edits']} edits has {len(point['reliability'])} "
                             f"batch values for {len(ranges)} batches of {point['batch_size']}")
        for k, (first, last) in enumerate(ranges):
            rel, gen = float(point["reliability"][k]), float(point["generalization"][k])
            first_seen.setdefault((first, last), (rel, gen, point["edits"]))
            raw.append((offset + k, first, last, point["edits"], rel, gen))
    out = []
    for b, first, last, edits, rel, gen in raw:
        rel0, gen0, at = first_seen[(first, last)]
        out.append(Cell(b, first, last, edits, edits - last, last - first + 1, rel, gen, rel0, gen0, at))
    return out


def heatmap(points: Sequence[Mapping[str, Any]], metric: str = "reliability"
            ) -> tuple[list[int], list[tuple[int, int]], list[list[float]]]:
    """(curve points' edits, batch ranges, matrix[batch][point]) with NaN where a batch was not yet edited.

    Only the curve points (every batch so far) are columns: edit-time points hold one batch each. Batches are those of the last point (the longest); a batch cut short at an earlier point (a final
    partial batch) is matched by its first edit.
    """
    ordered = sorted((p for p in points if "first_batch" not in p), key=lambda p: p["edits"])
    if not ordered:
        return [], [], []
    xs = [int(p["edits"]) for p in ordered]
    ranges = batch_ranges(ordered[-1]["edits"], ordered[-1]["batch_size"])
    row_of = {first: i for i, (first, _) in enumerate(ranges)}
    matrix = [[math.nan] * len(xs) for _ in ranges]
    for j, point in enumerate(ordered):
        for (first, _), value in zip(point_ranges(point), point[metric]):
            if first in row_of:
                matrix[row_of[first]][j] = float(value)
    return xs, ranges, matrix


def at_edit_time(points: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Each metric as the batches scored it just after they were edited: per batch its value at the first
    point that holds it (its edit-time point, or the curve point or final evaluation right after it), the
    mean over batches weighted by their sizes. Metrics that not every such value has are left out."""
    first: dict[tuple[int, int], Mapping[str, Any]] = {}
    values: dict[tuple[int, int], dict[str, float]] = {}
    for point in sorted(points, key=lambda p: p["edits"]):
        for k, batch in enumerate(point_ranges(point)):
            if batch not in first:
                first[batch] = point
                values[batch] = {m: float(point[m][k]) for m in (*METRICS, *GENERATED) if m in point}
    if not values:
        return {}
    shared = set.intersection(*(set(v) for v in values.values()))
    weights = {b: b[1] - b[0] + 1 for b in values}
    total = sum(weights.values())
    return {m: sum(values[b][m] * weights[b] for b in values) / total
            for m in (*METRICS, *GENERATED) if m in shared}


def nice_bin(raw: float, unit: int = 1) -> int:
    """The smallest of unit x {1, 2, 5} x 10^k at least ``raw`` (age bins in whole batches)."""
    unit = max(1, int(unit))
    target = max(1.0, raw / unit)
    k = 0
    while True:
        for m in (1, 2, 5):
            if m * 10 ** k >= target:
                return unit * m * 10 ** k
        k += 1


def auto_age_bin(all_cells: Sequence[Sequence[Cell]], target_bins: int = 20) -> int:
    """A bin width in edits: a multiple of every run's batch size, about ``target_bins`` bins."""
    unit = 1
    for bs in {max(c.size for c in run) for run in all_cells if run}:  # each run's batch size
        unit = unit * bs // math.gcd(unit, bs)
    top = max((c.age for run in all_cells for c in run), default=0)
    return nice_bin((top + 1) / target_bins, unit)


def age_table(run_cells: Sequence[Cell], bin_width: int) -> list[dict[str, Any]]:
    """Accuracy against age, averaged over the (batch, point) cells whose age falls in each bin.

    Per bin: ``age_mean`` is the mean age of its cells; ``reliability``/``generalization`` are the
    edit-weighted means over its cells (batch sizes as weights); ``*_retained`` is the same mean
    divided by the same batches' accuracy just after editing (a ratio of sums), over the cells whose
    batch was held at all just after editing (``*_cells_normalised`` of them; NaN where none was). A
    retained fraction can exceed 1 where a batch got better later.
    """
    width = max(1, int(bin_width))
    bins: dict[int, list[Cell]] = {}
    for cell in run_cells:
        bins.setdefault(cell.age // width, []).append(cell)
    rows = []
    for k in sorted(bins):
        group = bins[k]
        row: dict[str, Any] = {"age_from": k * width, "age_to": (k + 1) * width - 1,
                               "age_mean": sum(c.age for c in group) / len(group), "cells": len(group),
                               "edits": sum(c.size for c in group)}
        for metric in METRICS:
            weight = sum(c.size for c in group)
            row[metric] = sum(getattr(c, metric) * c.size for c in group) / weight
            held = [c for c in group if getattr(c, f"{metric}_just_after") > 0]
            den = sum(getattr(c, f"{metric}_just_after") * c.size for c in held)
            row[f"{metric}_retained"] = sum(getattr(c, metric) * c.size for c in held) / den if den else math.nan
            row[f"{metric}_cells_normalised"] = len(held)
        rows.append(row)
    return rows


def first_edits_accuracy(points: Sequence[Mapping[str, Any]], first_edits: int) -> dict[str, Any]:
    """How the first ``first_edits`` edits fare: their accuracy just after editing and at every later point.

    Only whole batches inside the first ``first_edits`` edits count (``edits_counted`` says how many
    edits that is). Returns ``just_after`` (per metric: edit-weighted mean of those batches' values at
    their first point), ``by_point`` (list of {edits, reliability, generalization}) and ``end`` (the
    values at the last point), plus ``retained`` (end / just_after per metric, NaN where just_after is 0).
    """
    chosen = [c for c in cells(points) if c.last_edit <= first_edits and c.size == _full(points, c)]
    out: dict[str, Any] = {"first_edits": int(first_edits), "edits_counted": 0, "just_after": {}, "by_point": [],
                           "end": {}, "retained": {}}
    if not chosen:
        for metric in METRICS:
            out["just_after"][metric] = out["end"][metric] = out["retained"][metric] = math.nan
        return out
    batches = {(c.first_edit, c.last_edit): c for c in chosen}
    out["edits_counted"] = sum(last - first + 1 for first, last in batches)
    weight = out["edits_counted"]
    for metric in METRICS:
        out["just_after"][metric] = sum(getattr(c, f"{metric}_just_after") * c.size for c in batches.values()) / weight
    for edits in sorted({c.edits for c in chosen}):
        here = [c for c in chosen if c.edits == edits]
        if {(c.first_edit, c.last_edit) for c in here} != set(batches):
            continue  # a point that does not hold all of them yet
        out["by_point"].append({"edits": edits, **{m: sum(getattr(c, m) * c.size for c in here) / weight
                                                   for m in METRICS}})
    end = out["by_point"][-1] if out["by_point"] else {m: math.nan for m in METRICS}
    for metric in METRICS:
        out["end"][metric] = end[metric]
        base = out["just_after"][metric]
        out["retained"][metric] = end[metric] / base if base else math.nan
    return out


def _full(points: Sequence[Mapping[str, Any]], cell: Cell) -> int:
    """The batch size of the point ``cell`` was read at (a batch cut short by the stream's end is not whole)."""
    for point in points:
        if point["edits"] == cell.edits:
            return int(point["batch_size"])
    return cell.size
