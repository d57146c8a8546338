"""A long evaluation kept in parts: the batches it has done survive a stop, and the resumed run computes only
the rest.

The final evaluation of a 10,000-edit stream (teacher-forced predictions and generated answers for tens of
thousands of prompts) takes hours of one CPU thread, and so does a curve point half way. While one runs, the rows
of its finished batches are written every ``every_s`` seconds (and when it stops, signal or error) into sealed
files under the run's checkpoint folder. A run that resumes at the same point with the editor in the same state
reads them back and computes only the batches that are missing. Batches are formed as without parts (the same
rows in the same order), so the numbers are the same bit for bit. A point's files go when a checkpoint that
holds the point is saved (:meth:`evaluation.run.checkpoint.CheckpointManager.save`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

from evaluation.common.atomic import remove_folder_temp_files, write_json_atomic
from evaluation.common.integrity import CorruptFile, check_seal, seal

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How one row of a batched call becomes JSON and back."""

    encode: Callable[[T], Any]
    decode: Callable[[Any], T]


def point_folder(root: Path, upto: int, state: str) -> Path:
    """The folder of the evaluation of the first ``upto`` edits with the editor in state ``state`` (a digest)."""
    return root / f"{upto:07d}-{state}"


def point_of(folder: Path) -> int | None:
    """The edit count a folder of :func:`point_folder` evaluates (None: not such a folder)."""
    head = folder.name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


class BatchRecord(Generic[T]):
    """One batched call's rows by batch number: those saved before (:meth:`done`), and those computed since
    (:meth:`add`), written every ``every_s`` seconds and on :meth:`flush`.

    ``key`` names what the rows depend on besides the point (the inputs' digest, the batch settings): files of
    another key are not read. A torn or changed file is not read either (its batches are computed again)."""

    def __init__(self, folder: Path, call: str, key: Sequence[Any], codec: Codec[T], every_s: float) -> None:
        self.folder, self.call, self.key, self.codec, self.every_s = folder, call, list(key), codec, every_s
        self.saved = self._read()
        self.pending: dict[int, list[Any]] = {}
        self.last_write = time.monotonic()

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.call}-*.json")) if self.folder.is_dir() else []

    def _read(self) -> dict[int, list[Any]]:
        saved: dict[int, list[Any]] = {}
        for path in self._files():
            try:
                blob = json.loads(path.read_text(encoding="utf-8"))
                if not check_seal(blob, path):
                    raise CorruptFile(f"{path} carries no digest")
            except (OSError, ValueError, CorruptFile) as err:
                log.warning("not using the saved evaluation batches in %s (%s): computing them again", path, err)
                continue
            if blob.get("key") == self.key:
                saved.update({int(b): rows for b, rows in blob["batches"].items()})
        if saved:
            log.info("%s: %d batches evaluated before are read back from %s", self.call, len(saved), self.folder)
        return saved

    def done(self, batch: int) -> list[T] | None:
        """Batch ``batch``'s rows where they were saved before, else None (compute it, then :meth:`add`)."""
        rows = self.saved.get(batch)
        return None if rows is None else [self.codec.decode(r) for r in rows]

    def add(self, batch: int, rows: Sequence[T]) -> None:
        if batch in self.saved:
            return
        self.pending[batch] = [self.codec.encode(r) for r in rows]
        if time.monotonic() - self.last_write >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Write the batches computed since the last write (one sealed file named by the first of them)."""
        if not self.pending:
            return
        path = self.folder / f"{self.call}-{min(self.pending):06d}.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, seal({"key": self.key, "batches": {str(b): r for b, r in self.pending.items()}}),
                              indent=None)
        except OSError as err:  # costs time on a resume, not results: the rows stay in memory and the next write tries
            log.warning("could not save evaluation batches in %s (%s)", self.folder, err.strerror)
            return
        self.saved.update(self.pending)
        self.pending = {}
        self.last_write = time.monotonic()


class EvaluationParts:
    """The saved batches of one evaluation point (its folder); :meth:`record` gives each batched call its own."""

    def __init__(self, root: Path, upto: int, state: str, every_s: float) -> None:
        self.folder = point_folder(root, upto, state)
        self.every_s = every_s
        if self.folder.is_dir():
            remove_folder_temp_files(self.folder)  # a write cut off by a kill (the run holds its checkpoint folder)

    def record(self, call: str, key: Sequence[Any], codec: Codec[T]) -> BatchRecord[T]:
        return BatchRecord(self.folder, call, key, codec, self.every_s)


def batches_with(record: BatchRecord[T] | None, batches: Iterable[list[int]],
                 compute: Callable[[list[int]], list[T]]) -> Iterator[tuple[list[int], list[T]]]:
    """``(idx, rows)`` for each batch of row indices in ``batches``: read from ``record`` where it holds the batch,
    else computed (and added to it). The record is flushed however the loop ends (a signal, an error)."""
    try:
        for b, idx in enumerate(batches):
            rows = record.done(b) if record is not None else None
            if rows is None:
                rows = compute(idx)
                if record is not None:
                    record.add(b, rows)
            yield idx, rows
    finally:
        if record is not None:
            record.flush()
