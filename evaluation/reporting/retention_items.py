"""Per-example retention outputs of finished runs: compare two runs item by item, or re-score one.

    python -m evaluation.retention_items diff RUN_A RUN_B [--pass edited] [--task nq] [--show 20]
    python -m evaluation.retention_items rescore RUN [--pass edited] [--data-dir DIR]

``diff`` prints, per task both runs stored, the items whose continuations differ (and how many), and
names the items only one of the runs holds.
``rescore`` scores the stored continuations again with the scorers as they are now, without
generating, and prints them beside the scores the run stored (results.json), the headline and the
authors'-code score each, with the number of items whose stored score changed: after a scorer
changes, old outputs get new scores; with the same scorers, the columns agree and no item changed.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from evaluation.common.errors import HarnessError
from evaluation.reporting.saved_run import run_config
from evaluation.retention.outputs import PASSES, read_items, stored_tasks
from evaluation.retention.suite import Gu2024Suite
from evaluation.run.results import read_results

STORED_SCORES = {"edited": "retention", "unedited": "retention_base"}  # results.json metrics per pass
STORED_DETAILS = {"edited": "retention_details", "unedited": "retention_base_details"}


def _stored(run_dir: Path, pass_name: str) -> dict[str, Path]:
    found = dict(stored_tasks(run_dir, pass_name))
    if not found:
        raise HarnessError(f"{run_dir} holds no per-example retention outputs for the {pass_name} pass "
                           f"(retention_outputs/{pass_name}/*.jsonl): pass the folder of a run made with the "
                           f"retention suite on")
    return found


def diff_runs(run_a: Path, run_b: Path, pass_name: str = "edited",
              tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per task stored by both runs: the rows (same id) whose continuations differ, the counts, and the
    ids only one run holds (``only_a``, ``only_b``: e.g. a run with another retention.limit)."""
    a, b = _stored(run_a, pass_name), _stored(run_b, pass_name)
    out: dict[str, dict[str, Any]] = {}
    for task in sorted(set(a) & set(b)):
        if tasks and task not in tasks:
            continue
        rows_a = read_items(a[task])
        rows_b = {r["id"]: r for r in read_items(b[task])}
        ids_a = {r["id"] for r in rows_a}
        common = [(r, rows_b[r["id"]]) for r in rows_a if r["id"] in rows_b]
        out[task] = {"compared": len(common),
                     "differ": [(ra, rb) for ra, rb in common if ra["continuation"] != rb["continuation"]],
                     "only_a": [r["id"] for r in rows_a if r["id"] not in rows_b],
                     "only_b": [i for i in rows_b if i not in ids_a]}
    return out


def rescore_run(run_dir: Path, pass_name: str = "edited", data_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """Score the stored continuations of every task of one pass again; with the stored score beside."""
    files = _stored(run_dir, pass_name)
    cfg = run_config(run_dir)
    retention = cfg.get("retention") or {}
    data_dir = data_dir or retention.get("data_dir")
    if not data_dir:
        raise HarnessError(f"{run_dir}'s config names no retention.data_dir: pass --data-dir DIR")
    suite = Gu2024Suite(data_dir, tasks=list(files), limit=retention.get("limit"))
    stored, stored_details = {}, {}
    if (run_dir / "results.json").is_file():
        metrics = read_results(run_dir / "results.json")["metrics"]
        stored, stored_details = metrics.get(STORED_SCORES[pass_name], {}), metrics.get(STORED_DETAILS[pass_name], {})
    out = {}
    for task, path in files.items():
        rows = read_items(path)
        examples = suite.examples(task)
        n_prompts = len(suite.tasks[task].prompts(examples))
        if len(rows) != n_prompts:
            raise HarnessError(f"{path} has {len(rows)} rows but the task has {n_prompts} prompts at "
                               f"retention.limit={suite.limit}: the data or the limit differ from the run's")
        outputs = [r["continuation"] for r in rows]
        # rows written before stop reasons were recorded have none: the scorer infers it from the text
        ended = [r["stop"] == "eos" for r in rows] if all("stop" in r for r in rows) else None
        headline, details = suite.tasks[task].score(examples, outputs, ended)
        items = suite.tasks[task].item_scores(examples, outputs, ended)
        out[task] = {"stored": stored.get(task), "rescored": headline,
                     "stored_authors": stored_details.get(task, {}).get("authors_score"),
                     "authors_score": details.get("authors_score"),
                     "changed_items": [r["id"] for r, new in zip(rows, items) if _changed(r, new)]}
    return out


def _changed(stored: dict[str, Any], new: dict[str, Any]) -> bool:
    """A row whose stored headline or authors'-code score differs from its score now."""
    return any(k in stored and not _same(stored[k], new.get(k)) for k in ("score", "authors"))


def _same(a: float | None, b: float | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-12))


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _flagged(stored: float | None, now: float | None) -> str:
    """``now`` as a percentage, marked where a stored value differs from it."""
    return _pct(now) + ("" if stored is None or _same(stored, now) else " (changed)")


def _ids(ids: Sequence[str], shown: int = 10) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _clip(text: str, width: int = 70) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 1] + "…"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diff", help="items whose continuations differ between two runs")
    d.add_argument("run_a", type=Path)
    d.add_argument("run_b", type=Path)
    d.add_argument("--task", action="append", help="only these tasks (repeatable)")
    d.add_argument("--show", type=int, default=20, help="items printed per task (0: counts only)")
    r = sub.add_parser("rescore", help="score a run's stored continuations again, without generating")
    r.add_argument("run", type=Path)
    r.add_argument("--data-dir", default=None, help="the retention data folder, if not the run's")
    for p in (d, r):
        p.add_argument("--pass", dest="pass_name", choices=PASSES, default="edited")
    args = parser.parse_args(argv)
    try:
        if args.command == "diff":
            for task, res in diff_runs(args.run_a, args.run_b, args.pass_name, args.task).items():
                print(f"## {task}: {len(res['differ'])} of {res['compared']} items differ")
                for side, run in (("only_a", args.run_a), ("only_b", args.run_b)):
                    if res[side]:
                        print(f"- {len(res[side])} item(s) only in {run}: {_ids(res[side])}")
                for ra, rb in res["differ"][:args.show]:
                    print(f"- {ra['id']}: {_clip(ra['prompt'][-60:])}\n    A ({ra.get('score')}): "
                          f"{_clip(ra['continuation'])}\n    B ({rb.get('score')}): {_clip(rb['continuation'])}")
        else:
            print("| task | stored | rescored | authors' code: stored | rescored | items changed |\n"
                  "|---|---:|---:|---:|---:|---|")
            for task, res in rescore_run(args.run, args.pass_name, args.data_dir).items():
                changed = res["changed_items"]
                print(f"| {task} | {_pct(res['stored'])} | {_flagged(res['stored'], res['rescored'])} "
                      f"| {_pct(res['stored_authors'])} | {_flagged(res['stored_authors'], res['authors_score'])} "
                      f"| {len(changed)}{': ' + _ids(changed) if changed else ''} |")
    except (HarnessError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
