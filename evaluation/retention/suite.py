"""The eight-task test-retention suite of Gu et al. 2024 ("Model Editing Harms General Abilities of
Large Language Models"), run through the harness's batched generator.

``Gu2024Suite(data_dir, tasks, limit, cache_dir).evaluate(generate, cache_key=...)`` prompts every
task zero-shot with the authors' templates, decodes greedily for the authors' number of new tokens
and scores the continuations with the authors' rules (see docs/retention.md).

With a cache key, each task's score is stored as soon as the task is done (one file per task), so
an interrupted suite loses at most the task it was in, and runs over different task subsets fill
one cache that a later run over all eight reads back. While a task is generated its file is claimed
with a lock (``filelock``, released by the kernel when its process dies), so parallel runs on one
cache generate each task once between them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from filelock import FileLock, Timeout

from evaluation.common.atomic import file_stem, remove_temp_files, write_json_atomic
from evaluation.common.errors import ConfigError, HarnessError
from evaluation.common.integrity import CorruptFile, check_seal, file_sha256, seal
from evaluation.retention.base import RetentionTask, data_path
from evaluation.retention.boolq import BoolQ
from evaluation.retention.conll03 import CoNLL03
from evaluation.retention.gsm8k import GSM8K
from evaluation.retention.mutual import MuTual
from evaluation.retention.nq import NQ
from evaluation.retention.report import (
    TASK_FIELDS,
    RetentionReport,
    fill,
    row_of,
    rows_of,
    valid_stored_fields,
)
from evaluation.retention.rte import RTE
from evaluation.retention.samsum import SAMSum
from evaluation.retention.sst2 import SST2

if TYPE_CHECKING:  # the suite reads generated rows; importing the generator (torch) is the caller's
    from evaluation.editing.generation import Continuation

# generate(prompts, max_new_tokens, desc="") -> one Continuation (text, tokens, stop reason) per prompt
GenerateFn = Callable[..., list["Continuation"]]
# in_scope(prompts) -> (B,) bool tensor: the editor's router acts on each prompt; None: no router
InScopeFn = Callable[[Sequence[str]], Any]

TASK_NAMES = ("gsm8k", "rte", "nq", "boolq", "mutual", "samsum", "conll03", "sst2")
TASKS: dict[str, type] = {"gsm8k": GSM8K, "rte": RTE, "nq": NQ, "boolq": BoolQ, "mutual": MuTual,
                          "samsum": SAMSum, "conll03": CoNLL03, "sst2": SST2}

# Bump when prompts, decoding lengths or scoring change: cached reports made before are then ignored.
# 2: details gain authors_score (each task scored as the authors' code computes it; NQ's
# authors_loop_rate folded into it), BoolQ and MuTual authors_score_before.
# 3: each row's stop reason and token count are stored; the authors' string ends with the end token
# exactly where the model stopped at it (authors_score changes where a non-empty output ended early).
SCORING_VERSION = 3

log = logging.getLogger(__name__)


def _task_list(tasks: Sequence[str] | str) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    if not names:
        raise ConfigError(f"retention.tasks is empty; choose from {', '.join(TASK_NAMES)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown retention task(s) {', '.join(map(repr, unknown))}; "
                          f"valid names: {', '.join(TASK_NAMES)}")
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise ConfigError(f"retention task(s) listed twice: {', '.join(dup)}")
    return names


def _fingerprint(path: str) -> str:
    """sha256 of a file, or of a folder's files (names and bytes, sorted by name)."""
    if not os.path.isdir(path):
        return file_sha256(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            h.update(name.encode() + b"\0")
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class Gu2024Suite:
    """The eight general-ability tasks of Gu et al. 2024; ``evaluate`` returns a :class:`RetentionReport`."""

    enabled = True

    def __init__(self, data_dir: str, tasks: Sequence[str] = TASK_NAMES, limit: int | None = None,
                 cache_dir: str | None = None, wait_poll_seconds: float = 10.0, reuse_unedited: bool = True):
        self.data_dir = str(data_dir)
        # an edited pass takes the unedited pass's continuation for every row its editor's router leaves
        # out of scope (it equals the unedited output bit for bit) and generates only the rows in scope
        self.reuse_unedited = bool(reuse_unedited)
        # how often a run waiting for a task another run is generating looks at its lock
        self.wait_poll_seconds = float(wait_poll_seconds)
        if self.wait_poll_seconds <= 0:
            raise ConfigError(f"retention.wait_poll_seconds must be positive, got {wait_poll_seconds}")
        self.task_names = _task_list(tasks)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"retention.limit must be null or a positive integer, got {limit!r}")
        self.limit = None if limit is None else int(limit)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.tasks: dict[str, RetentionTask] = {name: TASKS[name]() for name in self.task_names}
        # Fail at construction (before any editing) when a data file is missing.
        for task in self.tasks.values():
            for rel in task.files:
                data_path(self.data_dir, rel)
        self._examples: dict[str, list] = {}
        self._fingerprints: dict[str, str] = {}

    def examples(self, name: str) -> list:
        if name not in self._examples:
            self._examples[name] = self.tasks[name].load(self.data_dir, self.limit)
        return self._examples[name]

    def _data_fingerprint(self, rel: str) -> str:
        if rel not in self._fingerprints:
            self._fingerprints[rel] = _fingerprint(data_path(self.data_dir, rel))
        return self._fingerprints[rel]

    def task_settings(self, name: str) -> dict[str, Any]:
        """Everything besides the model that decides one task's score; part of its cache key."""
        return {"suite": "gu2024", "scoring_version": SCORING_VERSION, "task": name, "limit": self.limit,
                "data": {rel: self._data_fingerprint(rel) for rel in self.tasks[name].files}}

    def cache_path(self, cache_dir: str, cache_key: str, name: str) -> str:
        blob = json.dumps({"key": cache_key, "settings": self.task_settings(name)}, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        stem = file_stem(cache_key)
        return os.path.join(cache_dir, f"{stem}-{name}-{digest}.json")

    def _load_cached(self, path: str, cache_key: str, name: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        try:
            check_seal(blob, path)
        except CorruptFile as err:
            log.warning("%s; generating the task again", err)
            return None
        if not isinstance(blob, dict) or blob.get("key") != cache_key or blob.get("settings") != self.task_settings(name):
            return None
        if not valid_stored_fields(blob):
            # a damaged or hand-edited file: generate the task again (and overwrite it) rather than fail
            log.warning("ignoring %s: its score, details or seconds are missing or not numbers", path)
            return None
        return blob

    def _store(self, path: str, cache_key: str, name: str, task: Mapping[str, Any]) -> None:
        """One task's :data:`TASK_FIELDS` (score, details, ..., its rows) under its key and settings."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blob = {"key": cache_key, "settings": self.task_settings(name), **{k: task[k] for k in TASK_FIELDS}}
        write_json_atomic(path, seal(blob), indent=1, sort_keys=True)

    def _continuations(self, name: str, prompts: list[str], generate: GenerateFn, in_scope: InScopeFn | None,
                       unedited: RetentionReport | None) -> dict[str, Any]:
        """Every row's continuation (``outputs``, ``stops``, ``tokens``), whether the router put it in scope
        (``routed``), and whether it was taken over from the unedited pass instead of generated
        (``reused_rows``: only rows out of scope, when ``reuse_unedited``)."""
        task = self.tasks[name]
        mask = in_scope(prompts) if in_scope is not None else None
        routed = None if mask is None else [bool(x) for x in mask.tolist()]
        base = rows_of(unedited, name) if unedited is not None and self.reuse_unedited else None
        if routed is None or base is None or len(base) != len(prompts):
            # no router (FT-L, ROME: the edits act on every input) or no unedited outputs: generate every row
            rows = [row_of(c) for c in generate(prompts, task.max_new_tokens, desc=name)]
            reused = [False] * len(prompts)
        else:
            todo = [i for i, r in enumerate(routed) if r]
            rows = list(base)
            for i, c in zip(todo, generate([prompts[i] for i in todo], task.max_new_tokens, desc=name)):
                rows[i] = row_of(c)
            reused = [not r for r in routed]
        return {"outputs": [t for t, _, _ in rows], "stops": [s for _, s, _ in rows],
                "tokens": [n for _, _, n in rows], "routed": routed, "reused_rows": reused}

    def evaluate(self, generate: GenerateFn, *, cache_key: str | None = None, cache_dir: str | None = None,
                 in_scope: InScopeFn | None = None, unedited: RetentionReport | None = None,
                 on_stored: Callable[[str, RetentionReport], None] | None = None,
                 defer_others: bool = False) -> RetentionReport:
        """Run every task through ``generate``. With ``cache_key`` (naming the model, its state and its
        generation settings) and a cache folder (``cache_dir``, else the suite's), each task's score is
        read back when stored for the same key and task settings, and stored as soon as it is computed
        (then ``on_stored(task, report so far)``: the run keeps its wall time so far beside what a resume
        restores, and writes the task's per-example outputs).

        ``in_scope`` (an edited pass: the editor's router) marks the rows the edits act on; with the
        ``unedited`` pass's report, the other rows keep its continuations (see ``reuse_unedited``).

        A task another run is generating (its lock held) is done last: read back once stored, generated
        here if that run stops without it. With ``defer_others`` it is not waited for but left in the
        report's ``pending`` for :meth:`collect`, so this run can go on (with its stream) meanwhile."""
        directory = cache_dir if cache_dir is not None else self.cache_dir
        paths = ({name: self.cache_path(directory, cache_key, name) for name in self.task_names}
                 if cache_key is not None and directory is not None else {})
        stored = {name: blob for name, path in paths.items()
                  if (blob := self._load_cached(path, cache_key, name)) is not None}
        for name in self.task_names:  # parse every file first: a bad record fails before generating
            if name not in stored:
                self.examples(name)
        report = RetentionReport(scores={})

        def run_task(name: str) -> None:
            task = self.tasks[name]
            t0 = time.perf_counter()
            examples = self.examples(name)
            rows = self._continuations(name, task.prompts(examples), generate, in_scope, unedited)
            score, details = task.score(examples, rows["outputs"], [s == "eos" for s in rows["stops"]])
            done = {"score": score, "details": details, "seconds": time.perf_counter() - t0, **rows}
            fill(report, name, done)
            if name in paths:
                self._store(paths[name], cache_key, name, done)
                if on_stored is not None:
                    on_stored(name, report)

        def read_back(name: str) -> bool:
            blob = stored.get(name) or (self._load_cached(paths[name], cache_key, name) if name in paths else None)
            if blob is None:
                return False
            fill(report, name, blob)
            report.reused.append(name)
            return True

        def generate_or_read(name: str) -> None:  # under the task's lock
            remove_temp_files(paths[name])  # a killed write's temporary: every write of this entry holds the lock
            if not read_back(name):  # stored by another run between our first look and the lock
                run_task(name)

        waiting: list[str] = []  # locked by a concurrent run: done last, read back when it stores them
        for name in self.task_names:
            if read_back(name):
                continue
            if name not in paths:
                run_task(name)
                continue
            lock = FileLock(paths[name] + ".lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                waiting.append(name)
                continue
            try:
                generate_or_read(name)
            finally:
                lock.release()
        if defer_others and waiting:
            report.pending = waiting
            return report
        for name in waiting:
            # the holder either stores the task (read back here) or stops without it (generated here)
            with self._wait_for(name, paths[name]):
                generate_or_read(name)
        return self._complete(report)

    def collect(self, report: RetentionReport, *, cache_key: str, cache_dir: str | None = None) -> RetentionReport:
        """``report`` with its ``pending`` tasks (see :meth:`evaluate`) read back once the runs generating
        them have stored them; :class:`PendingTaskLost` where one stopped without storing its task (this
        run cannot generate it: its model has been edited since)."""
        directory = cache_dir if cache_dir is not None else self.cache_dir
        for name in report.pending:
            path = self.cache_path(str(directory), cache_key, name)
            with self._wait_for(name, path):
                blob = self._load_cached(path, cache_key, name)
            if blob is None:
                raise PendingTaskLost(name)
            fill(report, name, blob)
            report.reused.append(name)
        report.pending = []
        return self._complete(report)

    def _wait_for(self, name: str, path: str) -> Any:
        """The lock of a task another run is generating, once that run lets go of it (a context manager)."""
        log.info("retention task %s is being generated by another run; waiting for its result", name)
        return FileLock(path + ".lock").acquire(poll_interval=self.wait_poll_seconds)

    def _complete(self, report: RetentionReport) -> RetentionReport:
        """Tasks in the suite's order (each map and ``reused``), and the average."""
        order = {name: i for i, name in enumerate(self.task_names)}
        for table in (report.scores, report.details, report.seconds, report.outputs, report.routed,
                      report.stops, report.tokens, report.reused_rows):
            items = sorted(table.items(), key=lambda kv: order[kv[0]])
            table.clear()
            table.update(items)
        report.reused.sort(key=order.__getitem__)
        report.scores["average"] = sum(report.scores[n] for n in self.task_names) / len(self.task_names)
        return report


class PendingTaskLost(HarnessError):
    """The run that was generating a task :meth:`Gu2024Suite.collect` waited for stopped without storing it."""

    def __init__(self, task: str) -> None:
        super().__init__(f"the unedited model's retention task {task} was being generated by another run, which "
                         f"stopped without storing it")
        self.task = task


class NoRetention:
    """``retention=none``: the suite switched off."""

    enabled = False

    def __init__(self, **_: Any):
        pass

    def evaluate(self, generate: GenerateFn | None = None, *, cache_key: str | None = None,
                 cache_dir: str | None = None, in_scope: InScopeFn | None = None,
                 unedited: RetentionReport | None = None,
                 on_stored: Callable[[str, RetentionReport], None] | None = None, defer_others: bool = False) -> None:
        return None

    def collect(self, report: None, *, cache_key: str, cache_dir: str | None = None) -> None:
        return None
