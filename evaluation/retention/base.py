"""The protocol every retention task implements, and the errors and helpers they share."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from evaluation.common.errors import HarnessError

DATA_DIR_HINT = "set the data folder with retention.data_dir=... (it holds the files of Gu et al. 2024's task-data/)"


class RetentionDataMissing(HarnessError, FileNotFoundError):
    """A retention data file is not where the config says."""


class RetentionDataError(HarnessError, ValueError):
    """A retention data file is there but a record in it is malformed."""


@runtime_checkable
class RetentionTask(Protocol):
    """One task of the suite.

    ``prompts(examples)`` may return several prompts per example (CoNLL03 returns four);
    ``score(examples, outputs)`` takes the generated continuations in the order of ``prompts`` and
    returns ``(headline, details)``: the headline is a fraction in 0..1, details are every other figure,
    among them ``authors_score``, the task's figure as the authors' code computes it (0..1).
    ``ended`` (per row: the model stopped at its end token, not at the token budget) decides the string
    the authors' decode showed (evaluation.retention.authors); None infers it from the text alone.
    """

    name: str
    max_new_tokens: int
    files: tuple[str, ...]  # paths relative to data_dir that load() reads (a folder for MuTual)

    def load(self, data_dir: str, limit: int | None = None) -> list[Any]: ...

    def prompts(self, examples: Sequence[Any]) -> list[str]: ...

    def score(self, examples: Sequence[Any], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]: ...

    def item_scores(self, examples: Sequence[Any], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """One dict per prompt row, in the order of ``prompts(examples)``, with at least
        ``score`` (the row under the headline's rule), ``authors`` (under the authors' code) and
        ``standard`` (a standard metric's value, None where the task has none). ``score`` aggregates
        to the headline and ``authors`` to ``details["authors_score"]``: by the mean for most tasks,
        by ratios of summed counts where a task says so (RTE's ``authors_denominator``, CoNLL03's
        ``hits``/``denominator`` and ``authors_hits``/``authors_denominator`` per type); a
        row's ``score``/``authors`` is None when its denominator is 0. NQ's ``authors`` depends on
        the rows before it (their loop's state), so rows count only from the file's first item.
        Rows also give ``reference`` (the gold answer: a string, or a list where a task has several) and
        ``prediction`` (the text the headline's rule was applied to, extracted from the output)."""
        ...


def data_path(data_dir: str, relative: str) -> str:
    """``data_dir/relative``, or :class:`RetentionDataMissing` naming the path and the config key."""
    path = os.path.join(data_dir, relative)
    if not os.path.exists(path):
        raise RetentionDataMissing(f"retention data not found: {path} is missing; {DATA_DIR_HINT}")
    return path


def malformed(path: str, where: str, why: str) -> RetentionDataError:
    return RetentionDataError(f"malformed record in {path} ({where}): {why}")


def read_jsonl(path: str, limit: int | None) -> Iterator[tuple[int, dict]]:
    """``(line_number, record)`` for the first ``limit`` non-blank lines of a JSON-lines file."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise malformed(path, f"line {lineno}", f"not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise malformed(path, f"line {lineno}", "expected a JSON object")
            n += 1
            yield lineno, rec


def read_tsv(path: str, header: Sequence[str], limit: int | None) -> Iterator[tuple[int, list[str]]]:
    """Rows of a tab-separated file read as the authors did (``csv.reader(f, delimiter='\\t')``,
    default quoting), after checking the header row; yields ``(line_number, row)``."""
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        first = next(reader, None)
        if first is None or [c.strip() for c in first] != list(header):
            raise malformed(path, "line 1", f"expected the header {list(header)}, got {first}")
        n = 0
        for row in reader:
            if limit is not None and n >= limit:
                return
            lineno = reader.line_num
            if len(row) != len(header):
                raise malformed(path, f"line {lineno}", f"expected {len(header)} tab-separated fields, got {len(row)}")
            n += 1
            yield lineno, row


def require(rec: dict, key: str, kind: type | tuple[type, ...], path: str, where: str) -> Any:
    if key not in rec:
        raise malformed(path, where, f"missing field {key!r}")
    value = rec[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise malformed(path, where, f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def check_outputs(name: str, expected: int, outputs: Sequence[str]) -> None:
    if len(outputs) != expected:
        raise ValueError(f"{name}: got {len(outputs)} outputs for {expected} prompts")


def label_accuracy(n_items: int, n_valid: int, n_correct: int) -> tuple[float, dict[str, float]]:
    """Headline = accuracy over all items (invalid outputs count as wrong: the authors'
    ``total_accuracy``); details add accuracy over valid outputs (their ``accuracy``) and counts."""
    acc_all = n_correct / n_items if n_items else 0.0
    acc_valid = n_correct / n_valid if n_valid else 0.0
    return acc_all, {
        "accuracy": acc_all,
        "accuracy_valid": acc_valid,
        "n_items": float(n_items),
        "n_valid": float(n_valid),
        "n_invalid": float(n_items - n_valid),
        "n_correct": float(n_correct),
    }
