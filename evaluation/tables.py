"""Regenerate the paper's tables and figures from finished runs.

    python -m evaluation.tables table1 outputs/multirun/table1_smollm2 --out results/table1_smollm2
    python -m evaluation.tables figure2 outputs/multirun/figure2_smollm2 --out results/figure2_smollm2
    python -m evaluation.tables table1 --wandb ENTITY/PROJECT          # runs uploaded to W&B

Every ``results.json`` under the given folders (searched recursively) becomes one row of a pandas
frame (the run's Hydra choices, seed, ELDER hyper-parameters and metrics). A folder with a ``.hydra``
sub-folder but no ``results.json`` is kept as a row with status ``unfinished`` when it saved a stream
checkpoint (stopped or still running: ``resume=true`` continues it) and ``failed`` otherwise. Rows are
grouped by the table's keys and averaged over seeds (mean ± sample standard deviation where a cell has
more than one run). The output is ``<out>.md`` and ``<out>.tex`` (reproduced
| paper | difference), ``<out>.csv`` (the per-run frame) and, for figures, ``<out>.png`` and ``<out>.pdf``.
Cells with no run say ``missing``, cells whose only runs failed or have not finished say ``failed`` or
``unfinished``; all are listed under the table together with those run folders, so nothing is dropped
silently.

Names: table1 table2 table3 table4 figure2 figure3 grid figure4 (see results/README.md), and
``forgetting`` (each edit batch's accuracy at every curve point, from the runs' ``forgetting`` record:
a heatmap of batch x edits done and accuracy against the age of the edit, with the numbers as CSV):

    python -m evaluation.tables forgetting outputs/real/elder_smollm2_zsre_1000 --out results/forgetting_smollm2
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pandas as pd

from evaluation import paper
from evaluation.results import BadResults, read_results

NAMES = ("table1", "table2", "table3", "table4", "figure2", "figure3", "grid", "figure4", "forgetting", "readings",
         "model_axis")
SCALAR_METRICS = ("reliability", "generalization", "reliability_token", "generalization_token", "locality",
                  "seconds_per_edit", "trainable_params", "stored_params", "skipped_edits")
KEY_COLUMNS = ("source", "status", "reason", "editor", "model", "dataset", "experiment", "seed", "num_edits",
               "top_k", "num_loras", "guide_lambda", "epsilon", "aux_loss", "L", "layers", "retention_limit",
               "retention_suite", "elder_reading", "key_position", "lr", "device", "git_commit")
DASH = "—"
#: the model axis's stream lengths (issue 18: 40, 100 and 200 edits)
MODEL_AXIS_POINTS = (40, 100, 200)


class TablesError(Exception):
    """Bad input to the table builder (reported as one line, exit status 2)."""


# ---------------------------------------------------------------------------------------------------
# reading runs
# ---------------------------------------------------------------------------------------------------
def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _settings(choices: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The grouping columns of one run, from its Hydra choices and resolved config."""
    editor_cfg = cfg.get("editor") or {}
    dataset_cfg = cfg.get("dataset") or {}
    retention_cfg = cfg.get("retention") or {}
    layers = editor_cfg.get("layers")
    experiment = choices.get("experiment")
    return {
        "editor": choices.get("editor"),
        "model": choices.get("model"),
        "dataset": choices.get("dataset"),
        "experiment": ",".join(map(str, experiment)) if isinstance(experiment, list) else experiment,
        "seed": cfg.get("seed"),
        "num_edits": dataset_cfg.get("num_edits"),
        "top_k": editor_cfg.get("top_k"),
        "num_loras": editor_cfg.get("num_loras"),
        "guide_lambda": editor_cfg.get("guide_lambda"),
        "epsilon": editor_cfg.get("epsilon"),
        "aux_loss": editor_cfg.get("aux_loss"),
        "L": len(layers) if isinstance(layers, list) else None,
        "layers": ",".join(map(str, layers)) if isinstance(layers, list) else None,
        "retention_limit": retention_cfg.get("limit") if "tasks" in retention_cfg else None,
        # whether the run measures test retention at all (retention=none has no tasks); None: unknown
        "retention_suite": ("tasks" in retention_cfg) if retention_cfg else None,
        # the readings table's keys: ELDER's reading of the authors' code, the key token, the lr
        "elder_reading": choices.get("elder_reading"),
        "key_position": editor_cfg.get("key_position"),
        "lr": editor_cfg.get("lr"),
    }


def row_from_payload(payload: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One frame row from a results.json payload (or a W&B run shaped like one)."""
    cfg = payload.get("config") or {}
    metrics = payload.get("metrics") or {}
    row: dict[str, Any] = {"source": source, "status": "ok", "reason": "",
                           **_settings(payload.get("choices") or {}, cfg)}
    if metrics.get("num_edits") is not None:
        row["num_edits"] = int(metrics["num_edits"])
    for key in SCALAR_METRICS:
        row[key] = _num(metrics.get(key))
    for block in ("retention", "retention_base"):
        for task, value in (metrics.get(block) or {}).items():
            row[f"{block}.{task}"] = _num(value)
    versions = payload.get("versions") or {}
    cuda = versions.get("cuda")
    row["device"] = cuda if cuda and cuda != "none" else versions.get("processor")
    row["git_commit"] = payload.get("git_commit")
    row["curve"] = json.dumps(payload.get("curves") or [])  # for --from-curves
    return row


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-200:] if lines else ""


def _checkpoint_state(run_dir: Path, cfg: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The run's ``latest.json`` (edits done, why it was saved), or None where it saved no checkpoint."""
    from evaluation.checkpoint import CheckpointManager  # torch: only for folders without results.json

    ckpt = cfg.get("checkpoint")
    sub = ckpt.get("dir") if isinstance(ckpt, Mapping) else None
    directory = sub if isinstance(sub, str) and not sub.startswith("${") else "checkpoints"
    return CheckpointManager(run_dir / directory).pointer()


def failed_row(run_dir: Path, reason: str) -> dict[str, Any]:
    """A run folder that has Hydra's record of the job but no (readable) results.json: ``unfinished``
    where it saved a stream checkpoint, ``failed`` where it did not."""
    from omegaconf import OmegaConf

    choices: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    try:
        hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
        choices = OmegaConf.to_container(OmegaConf.select(hydra_cfg, "hydra.runtime.choices") or {}, resolve=False)
    except Exception:  # noqa: BLE001 - a half-written folder is still listed
        pass
    try:
        loaded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        cfg = OmegaConf.to_container(loaded, resolve=False)  # type: ignore[assignment]
    except Exception:  # noqa: BLE001
        pass
    status = "failed"
    state = _checkpoint_state(run_dir, cfg)
    if state is not None:
        status = "unfinished"
        dataset = cfg.get("dataset")
        total = dataset.get("num_edits") if isinstance(dataset, Mapping) else None
        done = f"{state['position']}/{total}" if isinstance(total, int) else str(state["position"])
        reason += (f"; checkpoint after {done} edits ({state.get('reason', 'periodic')}): "
                   f"resume=true hydra.run.dir={run_dir} continues it")
    logs = sorted(run_dir.glob("*.log"))
    last = _last_line(logs[0]) if logs else ""
    if last:
        reason += f"; last log line: {last}"
    row = {"source": str(run_dir), "status": status, "reason": reason, **_settings(choices, cfg)}
    # unresolved interpolations (``${...}``) are not settings we can group on
    return {k: (None if isinstance(v, str) and v.startswith("${") else v) for k, v in row.items()}


def frame_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a per-run frame this module wrote (``<out>.csv``), as :func:`collect_runs` gives them.

    ``outputs/`` is not kept from one machine to the next; the committed frames are, so a table can
    put new runs beside runs whose folders are gone.
    """
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise TablesError(f"{path}: not a per-run frame written by evaluation.tables ({err})") from None
    missing = {"source", "status", "editor", "model", "dataset"} - set(frame.columns)
    if missing:
        raise TablesError(f"{path}: not a per-run frame written by evaluation.tables (no column {sorted(missing)[0]!r})")
    frame = frame.astype(object).where(frame.notna(), None)
    return [{k: v for k, v in row.items()} for row in frame.to_dict("records")]


def collect_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows for every results.json under ``paths`` and every run folder that has none."""
    rows: dict[str, dict[str, Any]] = {}
    for root in map(Path, paths):
        if not root.exists():
            raise TablesError(f"no such file or folder: {root}")
        if root.suffix == ".csv":  # a committed per-run frame (<out>.csv): its runs' folders may be gone
            for row in frame_rows(root):
                rows[f"{root}:{row['source']}"] = row
            continue
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for file in files:
            key = str(file.parent.resolve())
            try:
                payload = read_results(file)
            except BadResults as err:
                rows[key] = {**failed_row(file.parent, str(err)), "status": "failed"}
                continue
            rows[key] = row_from_payload(payload, str(file.parent))
        if root.is_dir():
            for hydra_dir in sorted(root.rglob(".hydra")):
                run_dir = hydra_dir.parent
                key = str(run_dir.resolve())
                if key not in rows and not (run_dir / "results.json").exists():
                    rows[key] = failed_row(run_dir, "no results.json (the run failed or has not finished)")
    return list(rows.values())


def collect_wandb(path: str) -> list[dict[str, Any]]:
    """Rows for the runs of a W&B project ``ENTITY/PROJECT`` (needs ``wandb`` and a login)."""
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - wandb is a dependency
        raise TablesError(f"--wandb needs the wandb package ({err})") from None
    try:
        runs = list(wandb.Api().runs(path))
    except Exception as err:  # noqa: BLE001 - network, login, unknown project
        raise TablesError(f"could not read W&B runs of {path}: {err}") from None
    rows = []
    for run in runs:
        config = dict(run.config)
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        metrics: dict[str, Any] = {k: v for k, v in summary.items() if "/" not in k}
        metrics["retention"] = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("retention/")}
        source = f"wandb:{path}/{run.id}"
        payload = {"config": config.get("config", {}), "choices": config.get("choices", {}), "metrics": metrics}
        if run.state == "finished" and "reliability" in metrics:
            rows.append(row_from_payload(payload, source))
        else:
            row = {"source": source, "status": "failed", "reason": f"W&B state {run.state}",
                   **_settings(payload["choices"], payload["config"])}
            rows.append(row)
    return rows


#: columns that say where or when a run ran, not what it computed: runs differing only in these are repeats
_PROVENANCE = ("source", "status", "reason", "device", "git_commit")


def shared_seed_warnings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Finished runs with the same settings and the same seed: a table would average them as if they
    were seeds (a rerun, or the same run read twice through a folder and a frame)."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        if row.get("status") == "ok":
            key = tuple((c, str(_key_value(row.get(c)))) for c in KEY_COLUMNS if c not in _PROVENANCE)
            groups.setdefault(key, []).append(str(row.get("source")))
    return [f"{len(sources)} finished runs share seed {dict(key).get('seed')} and every setting; a cell averages "
            f"them as if they were different seeds: {', '.join(sources)}"
            for key, sources in groups.items() if len(sources) > 1]


def runs_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    for col in (*KEY_COLUMNS, *SCALAR_METRICS):
        if col not in frame.columns:
            frame[col] = None if col in KEY_COLUMNS else math.nan
    return frame


# ---------------------------------------------------------------------------------------------------
# cells: grouping and averaging over seeds
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


def _key_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class Cells:
    """Runs grouped by ``keys`` (pandas groupby): a cell's mean/std/count, its status and its seeds."""

    def __init__(self, frame: pd.DataFrame, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self.ok: dict[tuple, pd.DataFrame] = {}
        self.failed: dict[tuple, pd.DataFrame] = {}
        if frame.empty:
            return
        for status, target in (("ok", self.ok), ("failed", self.failed)):
            part = frame[(frame["status"] == "ok") == (status == "ok")]
            if part.empty:
                continue
            for key, sub in part.groupby(list(self.keys), dropna=False, sort=False):
                key = self._key(key if isinstance(key, tuple) else (key,))
                target[key] = pd.concat([target[key], sub]) if key in target else sub

    @staticmethod
    def _key(key: Sequence[Any]) -> tuple:
        return tuple(_key_value(v) for v in key)

    def status(self, key: Sequence[Any]) -> str:
        """``ok`` where a run finished; else ``unfinished`` where every run of the cell saved a checkpoint
        and stopped (or is still going), ``failed`` where one did not, ``missing`` where there is none."""
        key = self._key(key)
        if key in self.ok:
            return "ok"
        if key not in self.failed:
            return "missing"
        return "unfinished" if (self.failed[key]["status"] == "unfinished").all() else "failed"

    def stat(self, key: Sequence[Any], metric: str, scale: float = 1.0) -> Optional[Stat]:
        sub = self.ok.get(self._key(key))
        if sub is None or metric not in sub.columns:
            return None
        values = pd.to_numeric(sub[metric], errors="coerce").dropna() * scale
        if values.empty:
            return None
        return Stat(float(values.mean()), float(values.std()) if len(values) > 1 else math.nan, int(values.count()))

    def seeds(self, key: Sequence[Any], status: str = "ok") -> list[int]:
        """The seeds of the cell's runs with this status (ok, failed or unfinished)."""
        sub = (self.ok if status == "ok" else self.failed).get(self._key(key))
        if sub is not None and status != "ok":
            sub = sub[sub["status"] == status]
        return [] if sub is None else sorted(int(s) for s in pd.to_numeric(sub["seed"], errors="coerce").dropna())

    def values(self, column: str) -> list[Any]:
        i = self.keys.index(column)
        return sorted({k[i] for k in [*self.ok, *self.failed] if k[i] is not None})


def fmt(stat: Optional[Stat], status: str = "ok", digits: int = 2) -> str:
    if stat is None:
        return status if status != "ok" else DASH
    if stat.n > 1 and not math.isnan(stat.std):
        return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"
    return f"{stat.mean:.{digits}f}"


def fmt_paper(value: Optional[float], digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_diff(stat: Optional[Stat], value: Optional[float], digits: int = 2) -> str:
    if stat is None or value is None:
        return ""
    diff = round(stat.mean - value, digits) + 0.0  # + 0.0: no "-0.00"
    return f"{diff:+.{digits}f}"


def triple(cells: Cells, key: Sequence[Any], metric: str, paper_value: Optional[float], scale: float = 100.0,
           digits: int = 2) -> list[str]:
    stat = cells.stat(key, metric, scale)
    return [fmt(stat, cells.status(key), digits), fmt_paper(paper_value, digits), fmt_diff(stat, paper_value, digits)]


# ---------------------------------------------------------------------------------------------------
# output: Markdown and LaTeX
# ---------------------------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"{note}" for note in self.notes]
        return "\n".join(lines)

    def latex(self, caption_prefix: str = "") -> str:
        spec = "l" + "r" * (len(self.columns) - 1)
        caption = f"{caption_prefix}: {self.title}" if caption_prefix else self.title
        lines = ["\\begin{table}[ht]", "\\centering", "\\small", f"\\caption{{{latex_escape(caption)}}}",
                 f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
                 " & ".join(latex_escape(c) for c in self.columns) + " \\\\", "\\midrule"]
        lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in self.rows]
        lines += ["\\bottomrule", "\\end{tabular}"]
        lines += [f"\\par\\footnotesize {latex_escape(note)}" for note in self.notes]
        lines += ["\\end{table}"]
        return "\n".join(lines)


_LATEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
          "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "±": "$\\pm$", "Δ": "$\\Delta$",
          "—": "---", "≥": "$\\geq$", "≤": "$\\leq$", "λ": "$\\lambda$", "ε": "$\\epsilon$", "`": "",
          "→": "$\\rightarrow$", "÷": "$\\div$", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(text))


@dataclass
class Report:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def markdown(self, provenance: Sequence[str] = ()) -> str:
        parts = [f"# {self.title}", ""]
        parts += [*self.notes, ""] if self.notes else []
        for table in self.tables:
            parts += [table.markdown(), ""]
        for fig in self.figures:
            if fig.endswith(".png"):
                parts += [f"![{self.name}]({fig}) ([PDF]({fig[:-4]}.pdf))", ""]
        parts += ["## Missing cells", ""]
        parts += [f"- {m}" for m in self.missing] if self.missing else ["none"]
        parts += ["", "## Failed or unfinished runs", ""]
        parts += [f"- {f}" for f in self.failed] if self.failed else ["none"]
        if provenance:
            parts += ["", "## Provenance", "", *provenance]
        return "\n".join(parts).rstrip() + "\n"

    def latex(self, provenance: Sequence[str] = ()) -> str:
        parts = [f"% {self.title}", "% generated by evaluation/tables.py; needs \\usepackage{booktabs}"]
        parts += [f"% {line}" for line in provenance]
        parts += [table.latex(self.title) for table in self.tables]
        parts += [f"% missing: {m}" for m in self.missing]
        parts += [f"% failed: {f}" for f in self.failed]
        return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------------
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


def _label(mapping: Mapping[str, str], key: Any) -> str:
    return mapping.get(str(key), str(key))


def _models(frame: pd.DataFrame, opts: Options) -> list[str]:
    if opts.models:
        return list(opts.models)
    found = sorted({m for m in frame["model"].dropna()}) if not frame.empty else []
    return found or ["smollm2"]


def _model_heading(model: str, opts: Options) -> tuple[str, Optional[str]]:
    ref = paper.paper_model_for(model, opts.paper_model)
    ref_text = f"paper: {_label(paper.MODEL_LABELS, ref)}" if ref else "no paper numbers for this model"
    return f"{_label(paper.MODEL_LABELS, model)} ({ref_text})", ref


def _failed_list(frame: pd.DataFrame) -> list[str]:
    out = []
    if frame.empty:
        return out
    for _, row in frame[frame["status"] != "ok"].iterrows():
        settings = " ".join(f"{k}={_key_value(row[k])}" for k in ("editor", "model", "dataset", "seed", "num_edits")
                            if _key_value(row[k]) is not None)
        out.append(f"`{row['source']}` ({settings}; {row['status']}): {row['reason']}")
    return out


def _stream_length(frame: pd.DataFrame, opts: Options,
                   default: Optional[int] = None) -> tuple[pd.DataFrame, Optional[int]]:
    """Keep one stream length: ``--num-edits`` or the single one found (several found: an error). A run
    over a whole dataset shorter than that length (paper.DATASET_RECORDS) counts as that length."""
    if frame.empty:
        return frame, opts.num_edits or default
    length = pd.to_numeric(frame["num_edits"], errors="coerce")
    whole = frame["dataset"].map(lambda d: paper.DATASET_RECORDS.get(d, math.inf))
    if opts.num_edits is not None:
        keep = frame["num_edits"].isna() | (length == opts.num_edits) | ((length == whole) & (whole < opts.num_edits))
        return frame[keep], opts.num_edits
    found = sorted({int(n) for n in length[(frame["status"] == "ok") & (length != whole)].dropna()})
    found = found or sorted({int(n) for n in length[frame["status"] == "ok"].dropna()})
    if len(found) > 1:
        raise TablesError(f"the runs have several stream lengths ({', '.join(map(str, found))} edits); "
                          f"choose one with --num-edits N")
    return frame, (found[0] if found else default)


def _only(frame: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """Rows whose columns equal the given values (rows where the value is unknown, e.g. failed runs, are kept)."""
    if frame.empty:
        return frame
    keep = pd.Series(True, index=frame.index)
    for col, value in equal.items():
        keep &= frame[col].isna() | (frame[col] == value)
    return frame[keep]


def _datasets(frame: pd.DataFrame, opts: Options) -> list[str]:
    if opts.dataset:
        return [opts.dataset]
    found = sorted({d for d in frame["dataset"].dropna()}) if not frame.empty else []
    return found or ["zsre"]


def _common_notes(frame: pd.DataFrame) -> list[str]:
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    notes = ["Reproduced values are means over the runs (seeds) of each cell, ± the sample standard deviation "
             "where a cell has more than one run; \"paper\" is the number printed in the ELDER paper "
             "(arXiv 2408.11869, see docs/ELDER_SPEC section 7); Δ = reproduced − paper."]
    if not ok.empty:
        notes.append(f"{len(ok)} finished run(s).")
        skipped = ok[pd.to_numeric(ok["skipped_edits"], errors="coerce").fillna(0) > 0]
        for row in skipped.itertuples():
            notes.append(f"Warning: `{row.source}` skipped {int(row.skipped_edits)} edit(s) (non-finite loss).")
    return notes


def _elder_runs(frame: pd.DataFrame, opts: Options) -> tuple[pd.DataFrame, int]:
    """The ELDER runs of one stream length (Table 4, the grid and Figure 3 vary only ELDER)."""
    frame, n_edits = _stream_length(frame, opts, 1000)
    return _only(frame, editor="elder"), n_edits


def build_table1(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = _stream_length(frame, opts, 1000)
    report = Report("table1", f"Table 1: reliability and generalization (%) after {n_edits} sequential edits",
                    notes=_common_notes(frame))
    cells = Cells(frame, ("editor", "elder_reading", "model", "dataset"))
    found = [*cells.ok, *cells.failed]
    # ROME's own CounterFact records are the paper's CounterFact: a column of their own, same paper numbers
    extra = [d for d in paper.READING_DATASETS if d not in paper.DATASETS and any(k[3] == d for k in found)]
    if extra:
        report.notes.append("CounterFact (ROME's records) is compared with the paper's CounterFact numbers: the paper "
                            "used ROME's counterfact.json. Its stream is as long as the 500-record subset allows.")
    for model in _models(frame, opts):
        heading, ref = _model_heading(model, opts)
        datasets = [*paper.DATASETS, *extra]
        columns = ["Editor"]
        for ds in datasets:
            for metric in ("Rel.", "Gen."):
                columns += [f"{_label(paper.DATASET_LABELS, ds)} {metric}", "paper", "Δ"]
        readings = sorted({k[1] for k in found if k[0] == "elder" and k[2] == model and k[1] is not None},
                          key=lambda r: _reading_order(("elder", r, None, None)))
        rows = []
        for editor, reading in [*((e, None) for e in paper.EDITORS), *(("elder", r) for r in readings)]:
            label = _label(paper.EDITOR_LABELS, editor)
            if reading is not None:
                label += f" ({_label(paper.READING_LABELS, reading)})"
            row = [label]
            for ds in datasets:
                key = (editor, reading, model, ds)
                published = paper.TABLE1.get((editor, ref, paper.PAPER_DATASET.get(ds, ds))) if ref else None
                for i, metric in enumerate(("reliability", "generalization")):
                    row += triple(cells, key, metric, published[i] if published else None)
                status = cells.status(key)
                if status != "ok" and (reading is None and ds in paper.DATASETS or status != "missing"):
                    report.missing.append(f"{label} / {model} / {_label(paper.DATASET_LABELS, ds)}: {status}")
            rows.append(row)
        report.tables.append(Table(heading, columns, rows))
    report.failed = _failed_list(frame)
    return report


def build_table2(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = _stream_length(frame, opts, 1000)
    if not frame.empty:
        # runs without a retention suite cannot fill this table: finished ones without scores, and
        # unfinished or failed ones whose config has none (``retention=none``; unknown is kept)
        finished = frame["status"] == "ok"
        scored = frame["retention.average"].notna() if "retention.average" in frame.columns else False
        no_suite = (finished & ~scored) | (~finished & (frame["retention_suite"] == False))  # noqa: E712
        frame = frame[~no_suite]
    report = Report("table2", f"Table 2: test retention (%) after {n_edits} sequential edits",
                    notes=_common_notes(frame))
    bars: dict[tuple, list[tuple[str, list[Optional[Stat]]]]] = {}  # per (model, dataset), for the figure
    limits = sorted({str(_key_value(v)) for v in frame.loc[frame["status"] == "ok", "retention_limit"]}) \
        if not frame.empty else []
    if limits:
        report.notes.append(f"Retention examples per task (retention.limit): {', '.join(limits)} "
                            f"(None: every example).")
    cells = Cells(frame, ("editor", "model", "dataset"))
    # the unedited model's scores repeat in every run (cached per model): one per seed, not one per editor
    base = Cells(frame.drop_duplicates(subset=["status", "model", "dataset", "seed"]) if not frame.empty else frame,
                 ("model", "dataset"))
    for model in _models(frame, opts):
        heading, ref = _model_heading(model, opts)
        columns = ["Editor"]
        for ds in paper.DATASETS:
            columns += [f"{_label(paper.DATASET_LABELS, ds)} avg.", "paper", "Δ"]
        rows = [["Base (unedited)"]]
        for ds in paper.DATASETS:
            stat = base.stat((model, ds), "retention_base.average", 100)
            published = paper.TABLE2_BASE.get(ref) if ref else None
            rows[0] += [fmt(stat, base.status((model, ds)), 1), fmt_paper(published, 1), fmt_diff(stat, published, 1)]
        for editor in paper.EDITORS:
            row = [_label(paper.EDITOR_LABELS, editor)]
            for ds in paper.DATASETS:
                key = (editor, model, ds)
                published = paper.TABLE2.get((editor, ref, ds)) if ref else None
                row += triple(cells, key, "retention.average", published, 100, 1)
                if cells.status(key) != "ok":
                    report.missing.append(f"{_label(paper.EDITOR_LABELS, editor)} / {model} / "
                                          f"{_label(paper.DATASET_LABELS, ds)}: {cells.status(key)}")
            rows.append(row)
        report.tables.append(Table(f"Average over the eight tasks: {heading}", columns, rows,
                                   ["The paper gives exact averages for the base model and ELDER only; FT-L and ROME "
                                    "are reported as collapsing (0.2 to 25)."]))
        # appendix C style: every task, reproduced only
        tasks = [*paper.RETENTION_TASKS, "average"]
        for ds in paper.DATASETS:
            columns = ["Editor", *[_label(paper.RETENTION_LABELS, t) for t in tasks]]
            base_stats = [base.stat((model, ds), f"retention_base.{t}", 100) for t in tasks]
            rows = [["Base (unedited)", *[fmt(s, base.status((model, ds)), 1) for s in base_stats]]]
            series = [("Base (unedited)", base_stats)] if base.status((model, ds)) == "ok" else []
            for editor in paper.EDITORS:
                key = (editor, model, ds)
                stats = [cells.stat(key, f"retention.{t}", 100) for t in tasks]
                rows.append([_label(paper.EDITOR_LABELS, editor), *[fmt(s, cells.status(key), 1) for s in stats]])
                if cells.status(key) == "ok":
                    series.append((_label(paper.EDITOR_LABELS, editor), stats))
            if len(series) > 1:  # something edited to compare with the unedited model
                bars[(model, ds)] = series
            report.tables.append(Table(f"Per task (appendix C): {_label(paper.MODEL_LABELS, model)}, "
                                       f"{_label(paper.DATASET_LABELS, ds)}", columns, rows,
                                       ["Reproduced only: the spec does not transcribe the appendix's "
                                        "per-task numbers."]))
    report.failed = _failed_list(frame)
    if opts.out is not None and bars:
        from evaluation.figures import plot_retention

        labels = [_label(paper.RETENTION_LABELS, t) for t in (*paper.RETENTION_TASKS, "average")]
        report.figures = plot_retention(bars, labels, opts.out,
                                        f"Test retention after {n_edits} edits")
    return report


def build_table3(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = _stream_length(frame, opts, 1000)
    dataset = opts.dataset or "zsre"
    frame = _only(frame, dataset=dataset)
    report = Report("table3", f"Table 3: editing time and trainable parameters after {n_edits} "
                              f"{_label(paper.DATASET_LABELS, dataset)} edits", notes=_common_notes(frame))
    devices = sorted({str(d) for d in frame.loc[frame["status"] == "ok", "device"].dropna()}) if not frame.empty else []
    if devices:
        report.notes.append(f"Measured on: {', '.join(devices)} (the paper: one NVIDIA A40).")
    cells = Cells(frame, ("editor", "model"))
    for model in _models(frame, opts):
        heading, ref = _model_heading(model, opts)
        columns = ["Editor", "s/edit", "paper", "Δ", "params (M)", "paper", "Δ", "stored (M)"]
        rows = []
        for editor in ("grace", "elder"):
            key = (editor, model)
            published = paper.TABLE3.get((editor, ref)) if ref else None
            row = [_label(paper.EDITOR_LABELS, editor)]
            row += triple(cells, key, "seconds_per_edit", published[0] if published else None, 1.0)
            row += triple(cells, key, "trainable_params", published[1] if published else None, 1e-6)
            row.append(fmt(cells.stat(key, "stored_params", 1e-6), cells.status(key)))
            rows.append(row)
            if cells.status(key) != "ok":
                report.missing.append(f"{_label(paper.EDITOR_LABELS, editor)} / {model}: {cells.status(key)}")
        report.tables.append(Table(heading, columns, rows, [paper.TABLE3_NOTE]))
    report.failed = _failed_list(frame)
    return report


def build_table4(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = _elder_runs(frame, opts)
    report = Report("table4", f"Table 4: ablation of the guided loss, generalization (%) after {n_edits} edits",
                    notes=_common_notes(frame))
    cells = Cells(frame, ("aux_loss", "model", "dataset"))
    for model in _models(frame, opts):
        heading, ref = _model_heading(model, opts)
        columns = ["Variant"]
        for ds in paper.DATASETS:
            columns += [f"{_label(paper.DATASET_LABELS, ds)} Gen.", "paper", "Δ"]
        rows = []
        for aux in ("guided", "none", "load_balance"):
            row = [_label(paper.AUX_LOSS_LABELS, aux)]
            for ds in paper.DATASETS:
                key = (aux, model, ds)
                row += triple(cells, key, "generalization", paper.TABLE4.get((aux, ref, ds)) if ref else None)
                if cells.status(key) != "ok":
                    report.missing.append(f"editor.aux_loss={aux} / {model} / {_label(paper.DATASET_LABELS, ds)}: "
                                          f"{cells.status(key)}")
            rows.append(row)
        report.tables.append(Table(heading, columns, rows))
    report.failed = _failed_list(frame)
    return report


def build_readings(frame: pd.DataFrame, opts: Options) -> Report:
    """ELDER under each reading of the authors' code (conf/elder_reading/), and the routed controls
    (GRACE, MELO) under both key positions: reliability, generalization, locality per dataset."""
    frame, n_edits = _stream_length(frame, opts, 100)
    report = Report("readings", f"Readings of the authors' code: reliability, generalization and locality (%) "
                                f"after {n_edits} sequential edits", notes=_common_notes(frame)[1:])
    report.notes.insert(0, "One run per cell (seed 0). ELDER rows change one reading at a time from the project's "
                           "earlier one (conf/elder_reading/project.yaml); \"all\" takes every reading the "
                           "authors' way (experiment=elder_authors). lr is ELDER's learning rate.")
    cells = Cells(frame, ("editor", "elder_reading", "key_position", "lr", "model", "dataset"))
    found = [k for k in [*cells.ok, *cells.failed]]
    for model in _models(frame, opts):
        datasets = [d for d in paper.READING_DATASETS if any(k[4] == model and k[5] == d for k in found)]
        datasets = datasets or list(paper.READING_DATASETS)
        columns = ["Editor", "Reading", "key", "lr"]
        for ds in datasets:
            columns += [f"{_label(paper.DATASET_LABELS, ds)} {m}" for m in ("Rel.", "Gen.", "Loc.")]
        rows = []
        variants = sorted({k[:4] for k in found if k[4] == model}, key=_reading_order)
        for editor, reading, key_position, lr in variants:
            row = [_label(paper.EDITOR_LABELS, editor), _label(paper.READING_LABELS, reading or "—"),
                   str(key_position), f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)]
            for ds in datasets:
                key = (editor, reading, key_position, lr, model, ds)
                row += [fmt(cells.stat(key, m, 100), cells.status(key), 1)
                        for m in ("reliability", "generalization", "locality")]
            rows.append(row)
        report.tables.append(Table(_label(paper.MODEL_LABELS, model), columns, rows))
    report.failed = _failed_list(frame)
    return report


def build_model_axis(frame: pd.DataFrame, opts: Options) -> Report:
    """Reliability / generalization at several stream lengths per model and reading, read from each run's
    curve points (one run of the longest length per cell, ``eval_every`` dividing the shorter ones)."""
    points = list(opts.points or MODEL_AXIS_POINTS)
    report = Report("model_axis", "The model axis: reliability / generalization (%) after "
                    + ", ".join(map(str, points)) + " sequential edits", notes=_common_notes(frame)[1:])
    report.notes.insert(0, "Each cell reads one run's curve point after that many edits (the stream edits the "
                           "dataset's first records in order, so it is what a run of that length gives). "
                           "Reading — is the harness's default. s/edit: edit time of the whole stream.")
    ok = frame[frame["status"] == "ok"] if not frame.empty else frame
    columns = ["Editor", "Model", "Dataset", "Reading", *(f"{n} edits" for n in points), "s/edit"]
    rows = []
    order = lambda r: (str(r["editor"]), str(r["model"]), str(r["dataset"]),  # noqa: E731
                       _reading_order(("elder", r.get("elder_reading"), None, None)))
    for run in sorted(ok.to_dict("records"), key=order):
        curve = {int(p["edits"]): p for p in json.loads(run.get("curve") or "[]")}
        cells = []
        for n in points:
            p = curve.get(n)
            cells.append(DASH if p is None else f"{100 * _num(p.get('reliability')):.1f} / "
                                                  f"{100 * _num(p.get('generalization')):.1f}")
        rows.append([_label(paper.EDITOR_LABELS, run["editor"]), _label(paper.MODEL_LABELS, run["model"]),
                     _label(paper.DATASET_LABELS, run["dataset"]),
                     _label(paper.READING_LABELS, run.get("elder_reading") or "—"), *cells,
                     f"{_num(run['seconds_per_edit']):.2f}"])
    report.tables.append(Table("Reliability / generalization (%) by stream length", columns, rows))
    report.failed = _failed_list(frame)
    return report


def _reading_order(variant: tuple) -> tuple:
    editor, reading, key_position, lr = variant
    readings = list(paper.READING_LABELS)
    return (paper.EDITORS.index(editor) if editor in paper.EDITORS else len(paper.EDITORS),
            readings.index(reading) if reading in readings else len(readings), str(key_position),
            -(lr or 0) if isinstance(lr, (int, float)) else 0)


def _grid_expected(param: str) -> list[Any]:
    """The searched values of one hyper-parameter that are valid with the others at the paper's choice."""
    d = paper.PAPER_HPARAMS
    values = list(paper.GRID[param])
    if param == "top_k":
        return [v for v in values if v <= d["num_loras"]]
    if param == "num_loras":
        return [v for v in values if v >= d["top_k"] and 6 * v >= d["epsilon"]]
    if param == "epsilon":
        return [v for v in values if v <= 6 * d["num_loras"]]
    return values


def build_grid(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = _elder_runs(frame, opts)
    report = Report("grid", f"Hyper-parameter search (ELDER, {n_edits} edits): one parameter at a time, the "
                            f"others at the paper's choice", notes=_common_notes(frame))
    report.notes.append("k = top_k, N = num_loras, lambda = guide_lambda, epsilon = deferral threshold; the paper "
                        "chose k=2, N=4, lambda=1e-2 by generalization and epsilon=12 by test retention. k=5 is not "
                        "run: it needs N >= 5 (k <= N).")
    has_retention = "retention.average" in frame.columns
    defaults = paper.PAPER_HPARAMS
    for model in _models(frame, opts):
        for ds in _datasets(frame, opts):
            sub = _only(frame, model=model, dataset=ds)
            for param in ("top_k", "num_loras", "guide_lambda", "epsilon"):
                others = {p: v for p, v in defaults.items() if p != param}
                slice_ = sub
                for p, v in others.items():
                    if not slice_.empty:
                        slice_ = slice_[slice_[p].isna() | (pd.to_numeric(slice_[p], errors="coerce") == v)]
                cells = Cells(slice_, (param,))
                values = sorted(set(_grid_expected(param)) | {v for v in cells.values(param)})
                columns = [paper.HPARAM_LABELS[param], "Rel.", "Gen.", "Loc.",
                           *(["Retention avg."] if has_retention else []), "n"]
                rows = []
                for value in values:
                    key = (value,)
                    label = f"{value:g}" + (" (paper)" if value == defaults[param] else "")
                    row = [label, *(fmt(cells.stat(key, m, 100), cells.status(key))
                                    for m in ("reliability", "generalization", "locality"))]
                    if has_retention:
                        row.append(fmt(cells.stat(key, "retention.average", 100), cells.status(key), 1))
                    row.append(str(len(cells.seeds(key))))
                    rows.append(row)
                    if cells.status(key) != "ok":
                        report.missing.append(f"{paper.HPARAM_LABELS[param]}={value:g} / {model} / "
                                              f"{_label(paper.DATASET_LABELS, ds)}: {cells.status(key)}")
                report.tables.append(Table(f"{paper.HPARAM_LABELS[param]}: {_label(paper.MODEL_LABELS, model)}, "
                                           f"{_label(paper.DATASET_LABELS, ds)} (%)", columns, rows))
    report.failed = _failed_list(frame)
    return report


def _curve_table(report: Report, frame: pd.DataFrame, opts: Options, x: str, x_label: str, expected_x: Sequence[int],
                 editors: Sequence[str], expected_seeds: Sequence[int], own_x_only: bool = False
                 ) -> dict[tuple, dict[str, list]]:
    """Rows per (editor, x) with seeds counted; returns the curves for the plot keyed (model, dataset).

    ``own_x_only``: an editor's rows are the x values it has runs for (curve points fall where each
    editor's batches end), not every x seen or expected.
    """
    curves: dict[tuple, dict[str, list]] = {}
    cells = Cells(frame, ("editor", "model", "dataset", x))
    for model in _models(frame, opts):
        for ds in _datasets(frame, opts):
            xs = sorted(set(expected_x) | {v for v in cells.values(x)})
            columns = ["Editor", x_label, "Rel.", "Gen.", "params (M)", "seeds"]
            rows = []
            for editor in editors:
                series = curves.setdefault((model, ds), {}).setdefault(editor, [])
                for value in xs:
                    key = (editor, model, ds, value)
                    if own_x_only and cells.status(key) == "missing":
                        continue
                    rel, gen = cells.stat(key, "reliability", 100), cells.stat(key, "generalization", 100)
                    params = cells.stat(key, "trainable_params", 1e-6)
                    seeds = cells.seeds(key)
                    rows.append([_label(paper.EDITOR_LABELS, editor), f"{value:g}", fmt(rel, cells.status(key)),
                                 fmt(gen, cells.status(key)), fmt(params, cells.status(key)), str(len(seeds))])
                    failed, unfinished = set(cells.seeds(key, "failed")), set(cells.seeds(key, "unfinished"))
                    lacking = [s for s in expected_seeds if s not in seeds]
                    parts = [f"seed(s) {', '.join(map(str, group))} {what}"
                             for what, group in (("missing", [s for s in lacking if s not in failed | unfinished]),
                                                 ("failed", [s for s in lacking if s in failed]),
                                                 ("unfinished", [s for s in lacking if s in unfinished - failed]))
                             if group]
                    if parts:
                        report.missing.append(f"{_label(paper.EDITOR_LABELS, editor)} / {model} / "
                                              f"{_label(paper.DATASET_LABELS, ds)} / {x_label}={value:g}: "
                                              f"{'; '.join(parts)}")
                    if rel is not None:
                        series.append((value, rel, gen, params))
            report.tables.append(Table(f"{_label(paper.MODEL_LABELS, model)}, {_label(paper.DATASET_LABELS, ds)}",
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
            rows.append({**run, "num_edits": int(point["edits"]), "reliability": _num(point.get("reliability")),
                         "generalization": _num(point.get("generalization")), "trainable_params": _num(params),
                         "stored_params": _num(point.get("stored_params"))})
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
                               "(ELDER vs GRACE)", notes=_common_notes(frame))
    report.notes.append("The paper: ZsRE, LLaMA2-7B, five seeds (numbers only as a plot). The ZsRE file holds 1,037 "
                        "records, so streams longer than 1,037 edits can only run on CounterFact here.")
    if opts.from_curves:
        report.notes.append("--from-curves: each point is a curve point (eval_every) of a longer run: the reliability "
                            "and generalization on the edits made so far, which a run of that length also gives.")
    expected = () if opts.from_curves else paper.FIGURE2_NUM_EDITS
    curves = _curve_table(report, frame, opts, "num_edits", "edits", expected, paper.FIGURE2_EDITORS,
                          paper.FIGURE2_SEEDS, own_x_only=opts.from_curves)
    report.failed = _failed_list(frame)
    if opts.out is not None:
        from evaluation.figures import plot_curves

        report.figures = plot_curves(curves, "number of edits", opts.out, "Figure 2")
    return report


def build_figure3(frame: pd.DataFrame, opts: Options) -> Report:
    frame, n_edits = _elder_runs(frame, opts)
    report = Report("figure3", f"Figure 3: ELDER against the number of ELDER layers L ({n_edits} edits)",
                    notes=_common_notes(frame))
    report.notes.append("epsilon = 2L in every run (the paper's 12 at L=6, N=4, k=2: half the code's bits).")
    if not frame.empty:
        layouts = sorted({(int(L), str(layers)) for L, layers in zip(frame["L"], frame["layers"])
                          if _key_value(L) is not None and layers})
        if layouts:
            report.notes.append("Layers: " + "; ".join(f"L={n}: {lay}" for n, lay in layouts) + ".")
    curves = _curve_table(report, frame, opts, "L", "L", paper.FIGURE3_LAYERS, ("elder",), (0, 1, 2, 3, 4))
    report.failed = _failed_list(frame)
    if opts.out is not None:
        from evaluation.figures import plot_curves

        report.figures = plot_curves(curves, "number of ELDER layers L", opts.out, "Figure 3")
    return report


def build_figure4(frame: pd.DataFrame, opts: Options) -> Report:
    from evaluation.figures import code_summary, plot_codes

    report = Report("figure4", "Figure 4: allocation codes of paraphrase groups and NQ task inputs (t-SNE)",
                    notes=["Each run's codes come from `codes.npz` (written by evaluation.codes_dump after the "
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
                                  f"dump_codes hook in evaluation/experiment.py)")
    if not files:
        report.missing.append("no codes.npz found under the given folders")
    rows = []
    for file in files:
        s = code_summary(file)
        rows.append([f"`{file.parent}`", str(s["groups"]), f"{s['within_group']:.2f}", f"{s['between_groups']:.2f}",
                     f"{s['task_to_stored']:.2f}", f"{s['edit_deferred']:.0%}", f"{s['paraphrase_deferred']:.0%}",
                     f"{s['task_deferred']:.0%}", str(s["epsilon"])])
    report.tables.append(Table("Code distances and deferral", ["run", "groups", "edit↔paraphrase", "between groups",
                                                               "NQ→nearest stored", "edits deferred",
                                                               "paraphrases deferred", "NQ deferred", "epsilon"], rows))
    report.failed = _failed_list(frame)
    if opts.out is not None and files:
        report.figures = plot_codes(files, opts.out)
    return report


def _run_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A short label per run: the editor, plus whichever of model, dataset, reading, key position, lr,
    stream length and seed vary (the key position only where no ELDER reading names it)."""
    fields = [("model", lambda v, r: _label(paper.MODEL_LABELS, v)),
              ("dataset", lambda v, r: _label(paper.DATASET_SHORT, v)),
              ("elder_reading", lambda v, r: _label(paper.READING_SHORT, v)),
              ("key_position", lambda v, r: None if _key_value(r.get("elder_reading")) else f"key {v}"),
              ("lr", lambda v, r: f"lr {v:g}" if isinstance(v, (int, float)) else None),
              ("num_edits", lambda v, r: f"{v} edits"), ("seed", lambda v, r: f"seed {v}")]
    varying = [(f, show) for f, show in fields if len({_key_value(r.get(f)) for r in rows}) > 1]
    labels = []
    for row in rows:
        parts = [_label(paper.EDITOR_LABELS, row.get("editor"))]
        for f, show in varying:
            value = _key_value(row.get(f))
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
    from evaluation import forgetting as fg
    from evaluation.results import write_text_atomic

    report = Report("forgetting", "Forgetting: how well each earlier edit batch is held as the stream goes on",
                    notes=["Each run's `forgetting` record (results.json) holds, at every curve point (`eval_every` "
                           "and the end), the exact-match reliability and generalization of each batch of "
                           "`editor.batch_size` edits. Age = edits done since the batch was edited. \"Just after "
                           "editing\" = the batch's value at the first curve point that holds it (age 0 when "
                           "eval_every equals the batch size). Values in %."])
    if not frame.empty and opts.models:
        frame = frame[frame["model"].isin(opts.models) | frame["model"].isna()]
    if not frame.empty and opts.dataset:
        frame = _only(frame, dataset=opts.dataset)
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
    report.failed = _failed_list(frame)
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
                "dataset": row.get("dataset"), "seed": _key_value(row.get("seed"))}
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
        from evaluation.figures import plot_forgetting_by_age, plot_forgetting_heatmap

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


BUILDERS: dict[str, Callable[[pd.DataFrame, Options], Report]] = {
    "table1": build_table1, "table2": build_table2, "table3": build_table3, "table4": build_table4,
    "figure2": build_figure2, "figure3": build_figure3, "grid": build_grid, "figure4": build_figure4,
    "forgetting": build_forgetting, "readings": build_readings, "model_axis": build_model_axis,
}


def build(name: str, rows: Sequence[Mapping[str, Any]], opts: Options) -> Report:
    if name not in BUILDERS:
        raise TablesError(f"unknown table {name!r}; choose one of {', '.join(NAMES)}")
    return BUILDERS[name](runs_frame(rows), opts)


def write(report: Report, frame: pd.DataFrame, out: Path, command: str) -> list[Path]:
    from evaluation.results import write_text_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    commits = sorted({str(c) for c in frame["git_commit"].dropna()}) if not frame.empty else []
    provenance = [f"Made by: `{command}`"]
    if commits:
        provenance.append(f"Runs made at commit(s): {', '.join(commits)}")
    paths = [out.with_suffix(".md"), out.with_suffix(".tex"), out.with_suffix(".csv")]
    write_text_atomic(paths[0], report.markdown(provenance))
    write_text_atomic(paths[1], report.latex(provenance))
    write_text_atomic(paths[2], frame.to_csv(index=False))
    return paths + [Path(f) if Path(f).is_absolute() else out.parent / f for f in report.figures]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.tables", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("runs", nargs="*", help="run or multirun folders (searched recursively for results.json), "
                                                "or per-run frames written before (<out>.csv) whose folders are gone")
    parser.add_argument("--out", help="output path without suffix (default: results/<name>)")
    parser.add_argument("--wandb", action="append", default=[], metavar="ENTITY/PROJECT",
                        help="also read the runs of this W&B project (online; needs `wandb login`)")
    parser.add_argument("--model", action="append", default=[], help="model(s) to tabulate (default: those found)")
    parser.add_argument("--paper-model", choices=paper.PAPER_MODELS,
                        help="paper column to compare with (default: gpt2xl for GPT-2 models, llama2 for LLaMA ones)")
    parser.add_argument("--num-edits", type=int, help="keep only runs with this stream length")
    parser.add_argument("--dataset", help="dataset for table3/grid/figures (default: zsre / those found)")
    parser.add_argument("--from-curves", action="store_true",
                        help="figure2: take the stream lengths from the runs' curve points (eval_every) "
                             "instead of one run per length")
    parser.add_argument("--age-bin", type=int, metavar="EDITS",
                        help="forgetting: width of the age bins in edits (default: about 20 bins, a multiple of "
                             "every run's batch size)")
    parser.add_argument("--normalise", action="store_true",
                        help="forgetting: plot and tabulate the retained fraction (÷ the accuracy just after editing)")
    parser.add_argument("--points", type=int, nargs="+", metavar="EDITS",
                        help=f"model_axis: the stream lengths to read from the curves (default: "
                             f"{' '.join(map(str, MODEL_AXIS_POINTS))})")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the table even when no run under the given folders has finished")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb:
        parser.error("give at least one run folder or --wandb ENTITY/PROJECT")
    out = Path(args.out or f"results/{args.name}")
    try:
        rows = collect_runs(args.runs)
        for project in args.wandb:
            rows += collect_wandb(project)
        finished = sum(1 for row in rows if row.get("status") == "ok")
        if not finished and not args.allow_empty:
            raise TablesError(f"no finished run under {' '.join(args.runs + args.wandb)} ({len(rows)} failed or "
                              f"unfinished): writing would replace {out}.md/.tex/.csv with a table of empty cells; "
                              f"pass --allow-empty to write it anyway")
        for warning in shared_seed_warnings(rows):
            print(f"warning: {warning}", file=sys.stderr)
        opts = Options(models=args.model, paper_model=args.paper_model, num_edits=args.num_edits, dataset=args.dataset,
                       out=out, paths=args.runs, from_curves=args.from_curves, age_bin=args.age_bin,
                       normalise=args.normalise, points=args.points or ())
        frame = runs_frame(rows)
        report = BUILDERS[args.name](frame, opts)
    except TablesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m evaluation.tables " + " ".join(shlex.quote(a) for a in given)
    written = write(report, frame, out, command)
    print(report.markdown())
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
