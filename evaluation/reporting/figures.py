"""Figures of the paper, drawn with matplotlib (Agg backend) to PNG and PDF.

``plot_curves`` draws Figures 2 and 3 (reliability/generalization and trainable parameters against the
stream length or the number of ELDER layers, mean ± std over seeds); ``plot_retention`` draws Table 2's
per-task scores as grouped bars (unedited beside each editor); ``plot_answers`` the teacher-forced and
generated edit scores at edit time and at the end; ``plot_codes`` draws Figure 4 (a t-SNE
map of the allocation codes that :func:`elder.codes_dump.dump_codes` saved after a stream).
Called by ``python -m evaluation.tables``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from evaluation.reporting import paper


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> list[str]:
    """``out`` + .png and .pdf, each written atomically (a temporary file renamed over the name)."""
    from evaluation.common.atomic import write_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    names = []
    for suffix in (".png", ".pdf"):
        path = out.with_suffix(suffix)
        write_atomic(path, lambda f: fig.savefig(f, format=suffix[1:], dpi=150, bbox_inches="tight"),
                     binary=True)
        names.append(path.name)
    _pyplot().close(fig)
    return names


def _errorbar(ax: Any, xs: Sequence[float], stats: Sequence[Any], **kwargs: Any) -> None:
    means = [s.mean for s in stats]
    stds = [0.0 if math.isnan(s.std) else s.std for s in stats]
    ax.errorbar(xs, means, yerr=stds, capsize=3, marker="o", **kwargs)


def _editor_colours(names: Iterable[str]) -> dict[str, str]:
    """One colour per editor, in first-seen order: the same in every panel of a figure, so a panel that
    lacks an editor does not recolour the others."""
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}


def plot_curves(curves: Mapping[tuple, Mapping[str, Sequence[tuple]]], xlabel: str, out: Path, title: str) -> list[str]:
    """One row of panels per (model, dataset): reliability and generalization (%), parameters (M).

    ``curves[(model, dataset)][editor]`` is a list of ``(x, reliability, generalization, params)`` with
    :class:`evaluation.reporting.tables.Stat` values (mean, std, n), and optionally a fifth, the reliability
    from the model's generated answers (drawn dotted).
    """
    plt = _pyplot()
    keys = [k for k, series in curves.items() if any(series.values())] or list(curves)[:1]
    colours = _editor_colours(sorted({editor for series in curves.values() for editor in series}))
    fig, axes = plt.subplots(max(1, len(keys)), 2, figsize=(10, 3.6 * max(1, len(keys))), squeeze=False)
    for row, key in enumerate(keys):
        model, dataset = key
        ax_rel, ax_par = axes[row]
        for editor, points in sorted(curves.get(key, {}).items()):
            if not points:
                continue
            color = colours[editor]
            label = paper.EDITOR_LABELS.get(editor, editor)
            xs = [p[0] for p in points]
            _errorbar(ax_rel, xs, [p[1] for p in points], color=color, label=f"{label} reliability")
            gens = [(p[0], p[2]) for p in points if p[2] is not None]
            if gens:
                _errorbar(ax_rel, [g[0] for g in gens], [g[1] for g in gens], color=color, linestyle="--",
                          label=f"{label} generalization")
            generated = [(p[0], p[4]) for p in points if len(p) > 4 and p[4] is not None]
            if generated:
                _errorbar(ax_rel, [g[0] for g in generated], [g[1] for g in generated], color=color, linestyle=":",
                          label=f"{label} reliability (generated)")
            params = [(p[0], p[3]) for p in points if p[3] is not None]
            if params:
                _errorbar(ax_par, [q[0] for q in params], [q[1] for q in params], color=color, label=label)
        where = f"{paper.MODEL_LABELS.get(model, model)}, {paper.DATASET_LABELS.get(dataset, dataset)}"
        ax_rel.set(xlabel=xlabel, ylabel="%", title=f"{title}: edit success ({where})", ylim=(-2, 102))
        ax_par.set(xlabel=xlabel, ylabel="trainable parameters (M)", title=f"{title}: parameters ({where})")
        for ax in (ax_rel, ax_par):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


# --- Table 2 --------------------------------------------------------------------------------------
def plot_retention(bars: Mapping[tuple, Sequence[tuple[str, Sequence[Any]]]], labels: Sequence[str], out: Path,
                   title: str) -> list[str]:
    """One panel per (model, dataset): a group of bars per task, one bar per editor (mean ± std over seeds).

    ``bars[(model, dataset)]`` lists ``(editor, stats)`` with one :class:`evaluation.reporting.tables.Stat` (or None,
    drawn as no bar) per entry of ``labels`` (the tasks, then the average); the first is the unedited model.
    """
    plt = _pyplot()
    keys = list(bars)
    colours = _editor_colours(editor for series in bars.values() for editor, _ in series[1:])
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.8 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        model, dataset = key
        series = bars[key]
        width = 0.8 / len(series)
        xs = np.arange(len(labels))
        for i, (editor, stats) in enumerate(series):
            heights = [s.mean if s is not None else np.nan for s in stats]
            errors = [0.0 if s is None or math.isnan(s.std) else s.std for s in stats]
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar(xs + offset, heights, width, yerr=errors if any(errors) else None, capsize=2,
                   color="0.6" if i == 0 else colours[editor], label=editor)
        where = f"{paper.MODEL_LABELS.get(model, model)}, {paper.DATASET_LABELS.get(dataset, dataset)}"
        ax.set(ylabel="score (%)", title=f"{title} ({where})", xticks=xs, xticklabels=list(labels))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=min(4, len(series)))
    fig.tight_layout()
    return _save(fig, out)


def plot_answers(bars: Mapping[tuple, Sequence[tuple[str, Sequence[Any]]]], ways: Sequence[str], out: Path,
                 title: str) -> list[str]:
    """Teacher forcing against generation: one row of panels per (model, dataset), reliability left and
    generalization right, a group of bars per editor, one bar per way of scoring (``ways``: teacher-forced
    and generated, at edit time and at the end; solid: teacher-forced, hatched: generated).

    ``bars[(model, dataset)]`` lists ``(editor label, stats)`` with ``2 * len(ways)`` :class:`Stat` (or None):
    the reliability ways, then the generalization ways.
    """
    plt = _pyplot()
    keys = list(bars)
    fig, axes = plt.subplots(len(keys), 2, figsize=(13, 3.6 * len(keys)), squeeze=False)
    shades = ["#9ecae1", "#9ecae1", "#3182bd", "#3182bd"]
    for row, key in enumerate(keys):
        model, dataset = key
        series = bars[key]
        xs = np.arange(len(series))
        width = 0.8 / len(ways)
        for col, metric in enumerate(("reliability", "generalization")):
            ax = axes[row, col]
            for i, way in enumerate(ways):
                stats = [s[col * len(ways) + i] for _, s in series]
                heights = [s.mean if s is not None else np.nan for s in stats]
                ax.bar(xs + (i - (len(ways) - 1) / 2) * width, heights, width, color=shades[i % len(shades)],
                       hatch="//" if "gen" in way else None, edgecolor="black", linewidth=0.4, label=way)
            where = f"{paper.MODEL_LABELS.get(model, model)}, {paper.DATASET_LABELS.get(dataset, dataset)}"
            ax.set(ylabel=f"{metric} (%)", ylim=(0, 105), title=f"{metric}: {where}", xticks=xs,
                   xticklabels=[label for label, _ in series])
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()  # one legend for all panels, under them
    fig.legend(handles, labels, loc="upper center", ncol=len(ways), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return _save(fig, out)


# --- Figure 4 -------------------------------------------------------------------------------------
def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, None, :] != b[None, :, :]).sum(-1)


def code_summary(path: str | Path) -> dict[str, Any]:
    """Distances between the saved codes and the share of inputs the deferral switches off."""
    d = _load(Path(path))
    codes, group, kind = d["codes"].astype(bool), d["group"], d["kind"].astype(str)
    deferred = d["deferred"].astype(bool)
    labelled = group >= 0
    dist = _hamming(codes, codes)
    same = (group[:, None] == group[None, :]) & labelled[:, None] & labelled[None, :]
    off_diag = ~np.eye(len(group), dtype=bool)
    diff = (group[:, None] != group[None, :]) & labelled[:, None] & labelled[None, :]
    tasks = kind == "task"

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else math.nan

    def share(mask: np.ndarray) -> float:
        return float(deferred[mask].mean()) if mask.any() else math.nan

    return {
        "groups": int(len(set(group[labelled].tolist()))),
        "within_group": mean(dist[same & off_diag]),
        "between_groups": mean(dist[diff]),
        "task_to_stored": mean(d["min_distance"][tasks].astype(float)),
        "edit_deferred": share(kind == "edit"),
        "paraphrase_deferred": share(kind == "paraphrase"),
        "task_deferred": share(tasks),
        "epsilon": int(d["epsilon"]),
    }


def embed_codes(codes: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D t-SNE of boolean codes under the Hamming metric (PCA if scikit-learn is missing)."""
    x = codes.astype(float)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA (install scikit-learn for t-SNE)"
    perplexity = float(min(5.0, max(1.0, len(x) - 1.0)))
    tsne = TSNE(n_components=2, metric="hamming", init="random", perplexity=perplexity, random_state=seed)
    return tsne.fit_transform(x), "t-SNE (Hamming)"


def plot_codes(files: Sequence[str | Path], out: Path) -> list[str]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(files), figsize=(5.5 * len(files), 4.8), squeeze=False)
    for ax, path in zip(axes[0], files):
        d = _load(Path(path))
        xy, method = embed_codes(d["codes"])
        group, kind = d["group"], d["kind"].astype(str)
        for g in sorted(set(group[group >= 0].tolist())):
            for k, marker in (("edit", "o"), ("paraphrase", "^")):
                m = (group == g) & (kind == k)
                ax.scatter(xy[m, 0], xy[m, 1], color=f"C{g % 10}", marker=marker, s=60,
                           label=f"group {g + 1} ({k})" if k == "edit" else None, edgecolor="black", linewidth=0.5)
        m = kind == "task"
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], color="gray", marker="x", s=40, label="NQ task inputs")
        ax.set(title=f"{method}: {Path(path).parent.name}", xticks=[], yticks=[])
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Allocation codes: circles edit prompts, triangles their paraphrases, crosses NQ inputs", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


# --- forgetting (python -m evaluation.tables forgetting) ------------------------------------------
_METRIC_LABELS = {"reliability": "reliability", "generalization": "generalization"}


def _ticks(n: int, most: int = 8) -> list[int]:
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step))


def plot_forgetting_heatmap(runs: Sequence[tuple[str, Mapping[str, tuple]]], out: Path) -> list[str]:
    """Per run, two panels (reliability, generalization): edit batch (y, first batch on top) against
    edits done (x, one column per curve point); colour = the batch's exact-match accuracy there; grey
    where the batch was not edited yet.

    ``runs`` lists ``(label, {metric: (edits, batch_ranges, matrix)})`` as
    :func:`evaluation.run.forgetting.heatmap` returns them.
    """
    import matplotlib

    plt = _pyplot()
    pairs = 1 if len(runs) <= 2 else 2
    rows = max(1, math.ceil(len(runs) / pairs))
    tall = max((len(m["reliability"][1]) for _, m in runs), default=1)
    height = 2.2 + min(2.6, 0.02 * tall)
    fig, axes = plt.subplots(rows, 2 * pairs, figsize=(4.6 * 2 * pairs, height * rows + 0.6), squeeze=False,
                             layout="constrained")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.88")
    image = None
    for i, (label, by_metric) in enumerate(runs):
        for j, metric in enumerate(("reliability", "generalization")):
            ax = axes[i // pairs, (i % pairs) * 2 + j]
            xs, ranges, matrix = by_metric[metric]
            data = np.ma.masked_invalid(np.array(matrix, dtype=float).reshape(len(ranges), len(xs)))
            image = ax.imshow(data, aspect="auto", origin="upper", cmap=cmap, vmin=0.0, vmax=1.0,
                              interpolation="nearest")
            xt, yt = _ticks(len(xs)), _ticks(len(ranges))
            ax.set_xticks(xt, [str(xs[k]) for k in xt], fontsize=7)
            names = [f"{first}–{last}" if last > first else str(first) for first, last in ranges]
            ax.set_yticks(yt, [names[k] for k in yt], fontsize=7)
            ax.set_xlabel("edits done", fontsize=8)
            if j == 0:
                ax.set_ylabel("edit batch (its edits)", fontsize=8)
            ax.set_title(f"{label}: {_METRIC_LABELS[metric]}", fontsize=9)
    for k in range(len(runs), rows * pairs):  # unused panel pairs
        for j in range(2):
            axes[k // pairs, (k % pairs) * 2 + j].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                     label="share of the batch's edits held (exact match)")
    fig.suptitle("Forgetting: each edit batch's accuracy at every curve point (grey: not edited yet)", fontsize=10)
    return _save(fig, out)


def plot_forgetting_by_age(series: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], out: Path,
                           normalise: bool, bin_width: int) -> list[str]:
    """Reliability and generalization of an edit batch against its age (edits done since it was edited),
    averaged over the batches of each age bin; one line per run. ``normalise``: divided by the same
    batches' accuracy just after editing (the retained fraction).

    ``series`` lists ``(label, rows)`` with rows from :func:`evaluation.run.forgetting.age_table`.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for i, (label, rows) in enumerate(series):
        for ax, metric in zip(axes[0], ("reliability", "generalization")):
            key = f"{metric}_retained" if normalise else metric
            points = [(r["age_mean"], r[key]) for r in rows if not math.isnan(r[key])]
            if not points:
                continue
            scale = 1.0 if normalise else 100.0
            ax.plot([p[0] for p in points], [p[1] * scale for p in points], marker="o", markersize=3,
                    color=f"C{i % 10}", linestyle=styles[(i // 10) % len(styles)], label=label)
    for ax, metric in zip(axes[0], ("reliability", "generalization")):
        ylabel = (f"{metric}: retained fraction (÷ just after editing)" if normalise
                  else f"{metric} of the batch (%)")
        ax.set(xlabel=f"age of the edit batch: edits done since it was edited (bins of {bin_width})",
               ylabel=ylabel)
        if normalise:
            ax.axhline(1.0, color="0.5", linewidth=0.8)
            ax.set_ylim(bottom=0)
        else:
            ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0, 1].get_legend_handles_labels()
    if handles:
        if len(handles) > 6:
            fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        else:
            axes[0, 0].legend(fontsize=8)
    what = "retained fraction" if normalise else "accuracy"
    fig.suptitle(f"Forgetting by age: {what} of an edit batch, averaged over batches of the same age", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_scale(series: Mapping[tuple, Mapping[str, Sequence[Mapping[str, float]]]], out: Path) -> list[str]:
    """One row of five panels per (model, dataset), against the number of edits (log x): reliability,
    generalization and locality (%; teacher-forced solid, generated dotted), editing seconds per edit, and the
    parameters written (solid) and kept beside the model (dotted). ``series[(model, dataset)][editor]``: the
    points of :func:`evaluation.reporting.scale.scale_points`."""
    plt = _pyplot()
    keys = list(series)
    colours = _editor_colours(sorted({editor for by_editor in series.values() for editor in by_editor}))
    fig, axes = plt.subplots(len(keys), 5, figsize=(22, 3.8 * len(keys)), squeeze=False)
    panels = (("reliability", "%"), ("generalization", "%"), ("locality", "%"), ("seconds_per_edit", "s per edit"),
              ("trainable_params", "parameters (M)"))
    for row, key in enumerate(keys):
        model, dataset = key
        where = f"{paper.MODEL_LABELS.get(model, model)}, {paper.DATASET_LABELS.get(dataset, dataset)}"
        for ax, (metric, unit) in zip(axes[row], panels):
            for editor, points in sorted(series[key].items()):
                label, color = paper.EDITOR_LABELS.get(editor, editor), colours[editor]
                xs = [p["edits"] for p in points]
                scale = 100.0 if unit == "%" else (1e-6 if metric.endswith("params") else 1.0)
                ax.plot(xs, [p[metric] * scale for p in points], marker="o", color=color, label=label)
                dotted = {"reliability": "reliability_generated", "generalization": "generalization_generated",
                          "locality": "locality_generated", "trainable_params": "stored_params"}.get(metric)
                if dotted and any(not math.isnan(p[dotted]) for p in points):
                    ax.plot(xs, [p[dotted] * scale for p in points], marker=".", linestyle=":", color=color)
            ax.set_xscale("log")
            ax.set(xlabel="number of edits (log)", ylabel=unit, title=f"{metric.replace('_', ' ')} ({where})")
            if unit == "%":
                ax.set_ylim(-2, 102)
            else:  # from zero: a change of a hundredth of a second must not look like a trend
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3, which="both")
        axes[row][0].legend(fontsize=8, title="solid: teacher-forced, dotted: generated", title_fontsize=7)
        axes[row][4].set_title(f"parameters: written (solid), kept (dotted) ({where})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)
