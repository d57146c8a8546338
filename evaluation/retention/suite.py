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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from filelock import FileLock, Timeout

from evaluation.common.atomic import file_stem, write_json_atomic
from evaluation.common.errors import ConfigError, HarnessError
from evaluation.common.integrity import CorruptFile, check_seal, file_sha256, seal
from evaluation.retention.base import RetentionTask, data_path
from evaluation.retention.boolq import BoolQ
from evaluation.retention.conll03 import CoNLL03
from evaluation.retention.gsm8k import GSM8K
from evaluation.retention.mutual import MuTual
from evaluation.retention.nq import NQ
from evaluation.retention.rte import RTE
from evaluation.retention.samsum import SAMSum
from evaluation.retention.sst2 import SST2

GenerateFn = Callable[..., list[str]]  # generate(prompts, max_new_tokens, desc="") -> continuations
# in_scope(prompts) -> (B,) bool tensor: the editor's router acts on each prompt; None: no router
InScopeFn = Callable[[Sequence[str]], Any]

TASK_NAMES = ("gsm8k", "rte", "nq", "boolq", "mutual", "samsum", "conll03", "sst2")
TASKS: dict[str, type] = {"gsm8k": GSM8K, "rte": RTE, "nq": NQ, "boolq": BoolQ, "mutual": MuTual,
                          "samsum": SAMSum, "conll03": CoNLL03, "sst2": SST2}

# Bump when prompts, decoding lengths or scoring change: cached reports made before are then ignored.
# 2: details gain authors_score (each task scored as the authors' code computes it; NQ's
# authors_loop_rate folded into it), BoolQ and MuTual authors_score_before.
SCORING_VERSION = 2

log = logging.getLogger(__name__)


@dataclass
class RetentionReport:
    scores: dict[str, float]  # headline per task (0..1) and "average"
    details: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # generation + scoring, when it was generated
    reused: list[str] = field(default_factory=list)  # tasks read back from the cache, not generated now
    # per task, one continuation per prompt row (task.prompts order), and per row whether the editor's
    # router put it in scope (None: no router, or the unedited pass)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    routed: dict[str, list[bool] | None] = field(default_factory=dict)
    # per task, the rows whose continuation is the unedited pass's (out of scope), not generated again
    reused_rows: dict[str, list[bool]] = field(default_factory=dict)
    # tasks another run was generating, left for ``collect`` (evaluate(defer_others=True)); no average yet
    pending: list[str] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        """Every task came from the cache."""
        return bool(self.details) and set(self.reused) >= set(self.details)

    def ratio_to(self, base: "RetentionReport") -> dict[str, float | None]:
        """Each score over ``base``'s; None (JSON null) where the base scores 0 and the ratio is undefined."""
        return {k: (v / base.scores[k] if base.scores.get(k) else None) for k, v in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetentionReport":
        return cls(scores=dict(d["scores"]), details={k: dict(v) for k, v in d.get("details", {}).items()},
                   seconds=dict(d.get("seconds", {})), reused=list(d.get("reused", [])),
                   outputs={k: list(v) for k, v in d.get("outputs", {}).items()},
                   routed={k: (None if v is None else list(v)) for k, v in d.get("routed", {}).items()},
                   reused_rows={k: list(v) for k, v in d.get("reused_rows", {}).items()},
                   pending=list(d.get("pending", [])))


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
        if not _valid_stored_fields(blob):
            # a damaged or hand-edited file: generate the task again (and overwrite it) rather than fail
            log.warning("ignoring %s: its score, details or seconds are missing or not numbers", path)
            return None
        return blob

    def _store(self, path: str, cache_key: str, name: str, score: float, details: dict[str, float],
               seconds: float, outputs: list[str], routed: list[bool] | None, reused_rows: list[bool]) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blob = {"key": cache_key, "settings": self.task_settings(name), "score": score, "details": details,
                "seconds": seconds, "outputs": outputs, "routed": routed, "reused_rows": reused_rows}
        write_json_atomic(path, seal(blob), indent=1, sort_keys=True)

    def _continuations(self, name: str, prompts: list[str], generate: GenerateFn, in_scope: InScopeFn | None,
                       unedited: RetentionReport | None) -> tuple[list[str], list[bool] | None, list[bool]]:
        """Every row's continuation, whether the router put it in scope, and whether it was taken over
        from the unedited pass instead of generated (only rows out of scope, when ``reuse_unedited``)."""
        task = self.tasks[name]
        mask = in_scope(prompts) if in_scope is not None else None
        routed = None if mask is None else [bool(x) for x in mask.tolist()]
        base = unedited.outputs.get(name) if unedited is not None and self.reuse_unedited else None
        if routed is None or base is None or len(base) != len(prompts):
            # no router (FT-L, ROME: the edits act on every input) or no unedited outputs: generate every row
            return list(generate(prompts, task.max_new_tokens, desc=name)), routed, [False] * len(prompts)
        todo = [i for i, r in enumerate(routed) if r]
        outputs = list(base)
        for i, out in zip(todo, generate([prompts[i] for i in todo], task.max_new_tokens, desc=name)):
            outputs[i] = out
        return outputs, routed, [not r for r in routed]

    def evaluate(self, generate: GenerateFn, *, cache_key: str | None = None, cache_dir: str | None = None,
                 in_scope: InScopeFn | None = None, unedited: RetentionReport | None = None,
                 on_stored: Callable[[str], None] | None = None, defer_others: bool = False) -> RetentionReport:
        """Run every task through ``generate``. With ``cache_key`` (naming the model, its state and its
        generation settings) and a cache folder (``cache_dir``, else the suite's), each task's score is
        read back when stored for the same key and task settings, and stored as soon as it is computed
        (then ``on_stored(task)``: the run keeps its wall time so far beside what a resume restores).

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
            outputs, routed, reused_rows = self._continuations(name, task.prompts(examples), generate, in_scope,
                                                               unedited)
            score, details = task.score(examples, outputs)
            seconds = time.perf_counter() - t0
            _fill(report, name, {"score": score, "details": details, "seconds": seconds, "outputs": outputs,
                                 "routed": routed, "reused_rows": reused_rows})
            if name in paths:
                self._store(paths[name], cache_key, name, score, details, seconds, outputs, routed, reused_rows)
                if on_stored is not None:
                    on_stored(name)

        def read_back(name: str) -> bool:
            blob = stored.get(name) or (self._load_cached(paths[name], cache_key, name) if name in paths else None)
            if blob is None:
                return False
            _fill(report, name, blob)
            report.reused.append(name)
            return True

        def generate_or_read(name: str) -> None:  # under the task's lock
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
            _fill(report, name, blob)
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
                      report.reused_rows):
            items = sorted(table.items(), key=lambda kv: order[kv[0]])
            table.clear()
            table.update(items)
        report.reused.sort(key=order.__getitem__)
        report.scores["average"] = sum(report.scores[n] for n in self.task_names) / len(self.task_names)
        return report


def _fill(report: RetentionReport, name: str, blob: Mapping[str, Any]) -> None:
    """One task's score, details, seconds, outputs and routing (stored or just computed) into ``report``."""
    report.scores[name], report.seconds[name] = blob["score"], blob["seconds"]
    report.details[name] = dict(blob["details"])
    report.outputs[name], report.routed[name] = list(blob["outputs"]), blob["routed"]
    report.reused_rows[name] = list(blob["reused_rows"])


class PendingTaskLost(HarnessError):
    """The run that was generating a task :meth:`Gu2024Suite.collect` waited for stopped without storing it."""

    def __init__(self, task: str) -> None:
        super().__init__(f"the unedited model's retention task {task} was being generated by another run, which "
                         f"stopped without storing it")
        self.task = task


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _valid_stored_fields(blob: dict[str, Any]) -> bool:
    details, outputs, routed, reused = (blob.get(k) for k in ("details", "outputs", "routed", "reused_rows"))
    return (_is_number(blob.get("score")) and _is_number(blob.get("seconds")) and isinstance(details, dict)
            and all(isinstance(k, str) and _is_number(v) for k, v in details.items())
            and isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
            and (routed is None or (isinstance(routed, list) and len(routed) == len(outputs)))
            and isinstance(reused, list) and len(reused) == len(outputs))


class NoRetention:
    """``retention=none``: the suite switched off."""

    enabled = False

    def __init__(self, **_: Any):
        pass

    def evaluate(self, generate: GenerateFn | None = None, *, cache_key: str | None = None,
                 cache_dir: str | None = None, in_scope: InScopeFn | None = None,
                 unedited: RetentionReport | None = None, on_stored: Callable[[str], None] | None = None,
                 defer_others: bool = False) -> None:
        return None

    def collect(self, report: None, *, cache_key: str, cache_dir: str | None = None) -> None:
        return None
