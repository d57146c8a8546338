"""Per-example retention outputs: one JSON-lines file per task and pass, read back for diffs and re-scoring.

Each line is one prompt row of a task, in the order of ``task.prompts(examples)``:

``{"id", "prompt", "continuation", "stop", "tokens", "reference", "prediction", "score", "authors",
"standard", "routed", "reused"}``

* ``id``: the example's index in the task's file order (``"12"``), with the prompt's index inside the
  example where a task asks several prompts per example (CoNLL03: ``"12.3"``);
* ``stop``: why generation stopped (``eos``: the model's end token; ``budget``: the task's number of new
  tokens), ``tokens``: how many tokens it generated (the end token not counted). ``stop`` decides the
  string the authors' decode showed, so re-scoring a row needs it;
* ``reference``: the gold answer (a list where a task has several: NQ's answers, CoNLL03's entities of
  the prompt's type); ``prediction``: the text the headline's rule was applied to;
* ``score`` / ``authors`` / ``standard``: the row's value under the headline's rule, under the authors'
  code, and under a standard metric where the task has one (``task.item_scores``; CoNLL03 adds
  ``hits`` and ``denominator``);
* ``routed``: whether the editor's router put the prompt in scope (``null``: the unedited pass, or an
  editor without a router, whose edits act on every input);
* ``reused``: the continuation is the unedited pass's, taken over because the row was out of scope.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from evaluation.common.atomic import write_jsonl_atomic
from evaluation.common.errors import HarnessError
from evaluation.retention.base import RetentionTask
from evaluation.retention.suite import Gu2024Suite, RetentionReport

#: the run folder's per-example outputs: retention_outputs/<pass>/<task>.jsonl
OUTPUTS_DIR = "retention_outputs"
PASSES = ("unedited", "edited")


def item_ids(n_examples: int, n_prompts: int) -> list[str]:
    """The id of every prompt row: the example's index, plus the prompt's index within it when a task
    asks several prompts per example."""
    if n_examples == 0:
        return []
    per = n_prompts // n_examples
    if per * n_examples != n_prompts:
        raise ValueError(f"{n_prompts} prompts are not a whole number per example ({n_examples} examples)")
    return [str(i) for i in range(n_examples)] if per == 1 else [f"{i // per}.{i % per}" for i in range(n_prompts)]


def item_rows(task: RetentionTask, examples: Sequence[Any], outputs: Sequence[str], stops: Sequence[str],
              tokens: Sequence[int], routed: Sequence[bool] | None = None,
              reused: Sequence[bool] | None = None) -> list[dict[str, Any]]:
    """One record per prompt row: its id, prompt, continuation and how it stopped, per-item scores and routing."""
    prompts = task.prompts(examples)
    if not len(outputs) == len(stops) == len(tokens) == len(prompts):
        raise ValueError(f"{task.name}: {len(outputs)} outputs, {len(stops)} stop reasons and {len(tokens)} token "
                         f"counts for {len(prompts)} prompts")
    scores = task.item_scores(examples, outputs, [s == "eos" for s in stops])
    rows = []
    for k, (iid, prompt, sc) in enumerate(zip(item_ids(len(examples), len(prompts)), prompts, scores)):
        rows.append({"id": iid, "prompt": prompt, "continuation": outputs[k], "stop": stops[k],
                     "tokens": int(tokens[k]), **sc,
                     "routed": None if routed is None else bool(routed[k]),
                     "reused": False if reused is None else bool(reused[k])})
    return rows


def task_file(folder: str | Path, pass_name: str, task: str) -> Path:
    return Path(folder) / OUTPUTS_DIR / pass_name / f"{task}.jsonl"


def write_items(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write the rows as JSON lines, atomically (a kill mid-write leaves the previous file or none)."""
    write_jsonl_atomic(path, rows)


def read_items(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:  # e.g. cut short by a full disk or a copy that stopped
                raise HarnessError(f"{path} line {number} is not a JSON row ({err.msg}): the file is damaged; rerun "
                                   f"the run's retention pass (resume=true) or restore the file") from None
    return rows


def stored_tasks(folder: str | Path, pass_name: str) -> Iterator[tuple[str, Path]]:
    """``(task, path)`` of every task file a run folder holds for one pass, sorted by task name."""
    directory = Path(folder) / OUTPUTS_DIR / pass_name
    if directory.is_dir():
        for path in sorted(directory.glob("*.jsonl")):
            yield path.stem, path


def write_report_items(suite: Gu2024Suite, report: RetentionReport, folder: str | Path, pass_name: str,
                       tasks: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Write one JSON-lines file per task of ``report`` (``tasks``: only these) under
    ``folder/retention_outputs/<pass_name>/``; returns the rows per task."""
    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}, got {pass_name!r}")
    written = {}
    for name, outputs in report.outputs.items():
        if tasks is not None and name not in tasks:
            continue
        rows = item_rows(suite.tasks[name], suite.examples(name), outputs, report.stops[name], report.tokens[name],
                         report.routed.get(name), report.reused_rows.get(name))
        write_items(task_file(folder, pass_name, name), rows)
        written[name] = rows
    return written
