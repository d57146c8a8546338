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

and ``answers`` (each editor's edits scored teacher-forced and from its generated answers, at edit time and
after the stream; docs/answers.md, "Teacher forcing and generation"):

    python -m evaluation.tables answers outputs/multirun/answers_smollm2_n100 --out results/answers_smollm2_n100
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import pandas as pd

from data.protocol import PROTOCOLS
from evaluation.reporting import paper
from evaluation.reporting.ablation import build_ablation
from evaluation.reporting.answers_report import build_answers
from evaluation.reporting.cells import (
    DASH,
    Cells,
    Stat,
    fmt,
    fmt_diff,
    fmt_paper,
    triple,
)
from evaluation.reporting.curves import build_figure2, build_figure3, curve_rows
from evaluation.reporting.figure4 import build_figure4
from evaluation.reporting.forgetting_report import build_forgetting
from evaluation.reporting.grid import build_grid
from evaluation.reporting.model_axis import MODEL_AXIS_POINTS, build_model_axis
from evaluation.reporting.readings import build_readings
from evaluation.reporting.render import Report, Table, latex_escape
from evaluation.reporting.runs import (
    KEY_COLUMNS,
    SCALAR_METRICS,
    TablesError,
    collect_runs,
    collect_wandb,
    failed_row,
    frame_rows,
    row_from_payload,
    runs_frame,
    shared_seed_warnings,
)
from evaluation.reporting.scale import build_scale
from evaluation.reporting.selection import Options
from evaluation.reporting.table1 import build_table1
from evaluation.reporting.table2 import build_table2
from evaluation.reporting.table3 import build_table3
from evaluation.reporting.table4 import build_table4
from evaluation.run.interrupts import WorkInterrupted, stop_on_signals

# what callers import from here (tests, benchmarks.width_sweep, evaluation.tables) besides the CLI itself
__all__ = ("BUILDERS", "DASH", "KEY_COLUMNS", "MODEL_AXIS_POINTS", "NAMES", "SCALAR_METRICS", "Cells", "Options",
           "Report", "Stat", "Table", "TablesError", "build", "build_figure2", "build_figure3", "build_figure4",
           "build_forgetting", "build_grid", "build_model_axis", "build_readings", "build_table1", "build_table2",
           "build_table3", "build_table4", "collect_runs", "collect_wandb", "curve_rows", "failed_row", "fmt",
           "fmt_diff", "fmt_paper", "frame_rows", "latex_escape", "main", "row_from_payload", "runs_frame",
           "shared_seed_warnings", "triple", "write")

#: the table registry: name -> builder (read-only; the CLI's choices, in this order)
BUILDERS: Mapping[str, Callable[[pd.DataFrame, Options], Report]] = MappingProxyType({
    "table1": build_table1, "table2": build_table2, "table3": build_table3, "table4": build_table4,
    "figure2": build_figure2, "figure3": build_figure3, "grid": build_grid, "figure4": build_figure4,
    "forgetting": build_forgetting, "readings": build_readings, "model_axis": build_model_axis,
    "answers": build_answers, "ablation": build_ablation, "scale": build_scale,
})
NAMES = tuple(BUILDERS)


def build(name: str, rows: Sequence[Mapping[str, Any]], opts: Options) -> Report:
    if name not in BUILDERS:
        raise TablesError(f"unknown table {name!r}; choose one of {', '.join(NAMES)}")
    return BUILDERS[name](runs_frame(rows), opts)


def write(report: Report, frame: pd.DataFrame, out: Path, command: str) -> list[Path]:
    from evaluation.common.atomic import write_texts_together

    out.parent.mkdir(parents=True, exist_ok=True)
    commits = sorted({str(c) for c in frame["git_commit"].dropna()}) if not frame.empty else []
    provenance = [f"Made by: `{command}`"]
    if commits:
        provenance.append(f"Runs made at commit(s): {', '.join(commits)}")
    paths = [out.with_suffix(".md"), out.with_suffix(".tex"), out.with_suffix(".csv")]
    # the three replaced together: a signal never leaves a .md that lists other runs than its .tex and .csv
    write_texts_together({paths[0]: report.markdown(provenance), paths[1]: report.latex(provenance),
                          paths[2]: frame.to_csv(index=False)})
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
    parser.add_argument("--protocol", choices=PROTOCOLS,
                        help="keep only runs of this stream protocol (needed where runs of several were found; "
                             "the readings table keeps them all)")
    parser.add_argument("--revisit", type=int, metavar="R", help="keep only runs whose facts came back R times")
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
    parser.add_argument("--editors", type=lambda v: [e for e in v.split(",") if e], default=[], metavar="A,B",
                        help="table1/table2/answers: editors that get a row even without a finished run (a sweep's "
                             "editors: one not run yet shows as missing, not as absent)")
    parser.add_argument("--only-editor", action="append", default=[], metavar="EDITOR",
                        help="keep only the runs of this editor (repeatable; e.g. one editor's rows out of a "
                             "committed .csv that holds every editor's)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the table even when no run under the given folders has finished")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb:
        parser.error("give at least one run folder or --wandb ENTITY/PROJECT")
    out = Path(args.out or f"results/{args.name}")
    stopped = (lambda sig: f"stopped by {sig}: {out}'s files are all the earlier ones or all new ones, never a mix")
    try:
        with stop_on_signals(stopped):
            return _build_and_write(args, argv, out)
    except (TablesError, WorkInterrupted) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _build_and_write(args: argparse.Namespace, argv: Optional[Sequence[str]], out: Path) -> int:
    rows = collect_runs(args.runs)
    for project in args.wandb:
        rows += collect_wandb(project)
    if args.only_editor:
        rows = [row for row in rows if row.get("editor") in args.only_editor]
    finished = sum(1 for row in rows if row.get("status") == "ok")
    if not finished and not args.allow_empty:
        raise TablesError(f"no finished run under {' '.join(args.runs + args.wandb)} ({len(rows)} failed or "
                          f"unfinished): writing would replace {out}.md/.tex/.csv with a table of empty cells; "
                          f"pass --allow-empty to write it anyway")
    for warning in shared_seed_warnings(rows):
        print(f"warning: {warning}", file=sys.stderr)
    opts = Options(models=args.model, paper_model=args.paper_model, num_edits=args.num_edits, dataset=args.dataset,
                   out=out, paths=args.runs, from_curves=args.from_curves, age_bin=args.age_bin,
                   normalise=args.normalise, points=args.points or (),
                   protocol=args.protocol, revisit=args.revisit, editors=args.editors)
    frame = runs_frame(rows)
    report = BUILDERS[args.name](frame, opts)
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m evaluation.tables " + " ".join(shlex.quote(a) for a in given)
    written = write(report, frame, out, command)
    print(report.markdown())
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
