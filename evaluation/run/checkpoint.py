"""Stream checkpoints: everything needed to continue a lifelong stream exactly where it stopped.

A checkpoint holds the editor's ``state_dict()`` (the edited weights or adapters, the method's memory,
its optimizer and generators), the stream position (edits done), the curve points and timings so far,
the forgetting record (per-batch scores at each curve point), the skipped batches, the
python/numpy/torch RNG states, the W&B run id and a fingerprint of the config and of the edits done.
Files live in ``<run dir>/checkpoints/``:

- ``step-000120.pt``: the state after 120 edits (``torch.save`` of a plain dict);
- ``step-000120.pt.sha256``: its SHA-256 (``sha256sum`` format), checked when it is read back: a
  checkpoint whose bytes changed is named as corrupt and the next older one is used;
- ``latest.json``: names the newest complete one.

Writes are atomic: the file is written under a temporary name in the same folder, flushed and fsynced,
then renamed over the final name (``os.replace``), and only then does ``latest.json`` (written the same
way) point at it. A crash or SIGKILL while writing leaves at most a stray ``.tmp`` file, never a torn
checkpoint. Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from evaluation.common.atomic import (
    remove_folder_temp_files,
    write_atomic,
    write_json_atomic,
)
from evaluation.common.errors import ConfigError, HarnessError
from evaluation.common.evaluation_parts import point_of
from evaluation.common.integrity import (
    CorruptFile,
    digest_line,
    digest_path,
    file_sha256,
    verify_beside,
)
from evaluation.run.interrupts import Interrupted

log = logging.getLogger(__name__)

#: 2: the editor state is the editor module's torch state_dict (format 1: each editor's own dict, before
#: editors were nn.Modules); a format-1 checkpoint is refused with one line saying so
FORMAT_VERSION = 2
LATEST = "latest.json"
#: the run folder whose checkpoints a checkpoint folder holds (a shared checkpoint.dir is refused, never cleared)
OWNER = "owner.json"
PARTS_DIR = "evaluation-parts"  # the saved batches of evaluations under way (evaluation.common.evaluation_parts)
_NAME = re.compile(r"^step-(\d+)\.pt$")


class StreamInterrupted(Interrupted):
    """SIGTERM/SIGINT: the stream stopped at a batch boundary after saving a checkpoint."""


class NonFiniteLoss(HarnessError):
    """An edit produced a NaN/inf loss or non-finite state (``on_nan=stop``)."""


class EditOutOfMemory(HarnessError):
    """The device ran out of memory during an edit or an evaluation."""


@dataclass
class StreamCheckpoint:
    """One saved point of a stream (``position`` edits done)."""

    position: int
    editor_state: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    curves: list[dict[str, Any]] = field(default_factory=list)
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    data_hash: str = ""  # of the edits done (uid, prompt, target), to refuse resuming on other data
    run_id: str | None = None  # the W&B run to resume
    fingerprint: dict[str, Any] = field(default_factory=dict)  # config keys that must match on resume
    reason: str = "periodic"  # periodic | end | signal SIGTERM | requeue on SIGUSR2 | nan | oom
    curve_due: bool = False  # a curve point at ``position`` is owed (evaluation interrupted, or the stream grew)
    # the final evaluation's metrics, saved once the whole stream is evaluated: resuming a finished
    # stream (to add retention tasks) then skips that evaluation
    final_metrics: dict[str, float] | None = None
    # one entry per curve point: per-batch reliability and generalization (evaluation.run.forgetting)
    forgetting: list[dict[str, Any]] = field(default_factory=list)
    # the generated answers so far (StreamResult.answers)
    answers: list[dict[str, Any]] = field(default_factory=list)
    # the run's wall seconds up to this point, over all its processes (None: saved before this record)
    wall_seconds: float | None = None
    costs: list[dict[str, float]] = field(default_factory=list)  # StreamResult.costs
    path: Path | None = None  # where it was loaded from / saved to (not stored)

    def to_payload(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "position": self.position, "editor_state": self.editor_state,
                "rng": self.rng, "curves": self.curves, "edit_seconds": self.edit_seconds,
                "eval_seconds": self.eval_seconds, "skipped": self.skipped, "data_hash": self.data_hash,
                "run_id": self.run_id, "fingerprint": self.fingerprint, "reason": self.reason,
                "curve_due": self.curve_due, "final_metrics": self.final_metrics, "forgetting": self.forgetting,
                "answers": self.answers, "wall_seconds": self.wall_seconds, "costs": self.costs}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], path: Path | None = None) -> "StreamCheckpoint":
        if not isinstance(payload, Mapping) or "format" not in payload:
            raise ValueError("not a stream checkpoint")
        if payload["format"] != FORMAT_VERSION:
            raise ValueError(f"saved by another version of the harness (checkpoint format {payload['format']}, this "
                             f"version reads format {FORMAT_VERSION}); it cannot resume here: start the run again")
        keys = ("position", "editor_state", "rng", "curves", "edit_seconds", "eval_seconds", "skipped",
                "data_hash", "run_id", "fingerprint", "reason", "curve_due")
        return cls(**{k: payload[k] for k in keys}, final_metrics=payload.get("final_metrics"),
                   forgetting=list(payload.get("forgetting") or []), answers=list(payload.get("answers") or []),
                   wall_seconds=payload.get("wall_seconds"), costs=list(payload.get("costs") or []),
                   path=path)


# --- RNG and state helpers ---------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    """python, numpy and torch (CPU and every initialised CUDA device) generator states."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: Mapping[str, Any]) -> None:
    if not states:
        return
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor cloned to the CPU (a snapshot no later step can alias)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        items = {k: to_cpu(v) for k, v in obj.items()}
        return items if type(obj) is dict else type(obj)(items)  # OrderedDict from module.state_dict()
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        values = [to_cpu(v) for v in obj]
        return tuple(values) if type(obj) is tuple else type(obj)(*values)  # namedtuple
    return copy.deepcopy(obj)


def non_finite(obj: Any, prefix: str = "") -> str | None:
    """The key path of the first floating tensor in ``obj`` holding NaN or inf, else None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def data_hash(requests: Sequence[Any]) -> str:
    """A hash of the edits' (uid, prompt, target): the same stream prefix gives the same hash."""
    h = hashlib.sha256()
    for r in requests:
        h.update(f"{r.uid}\x00{r.prompt}\x00{r.target}\x01".encode())
    return h.hexdigest()[:16]


def state_digest(obj: Any) -> str:
    """A hash of a (nested) editor state: equal states, e.g. a saved one and the same one loaded back,
    give equal digests. Names the edited model in the retention cache."""
    h = hashlib.sha256()

    def walk(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            t = node.detach().to("cpu").contiguous().reshape(-1)  # 1-d: a 0-d tensor cannot be viewed as bytes
            h.update(f"T{node.dtype}{tuple(node.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(node, Mapping):
            h.update(f"M{len(node)}".encode())
            for key in sorted(node, key=str):
                h.update(f"K{key!s}".encode())
                walk(node[key])
        elif isinstance(node, (list, tuple)):
            h.update(f"L{len(node)}".encode())
            for value in node:
                walk(value)
        else:
            h.update(f"V{node!r}".encode())

    walk(obj)
    return h.hexdigest()[:16]


# --- atomic files ------------------------------------------------------------------------------------
def _write_verified(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` atomically with its digest ``<path>.sha256`` (of the bytes on disk) beside it.

    While ``path`` is replaced the digest file lists the old and the new digest, so a crash between the
    two renames leaves a pair that still verifies (the end of a stream saves twice under one name)."""
    side = digest_path(path)
    old = side.read_text(encoding="utf-8") if path.exists() and side.is_file() else ""
    new: list[str] = []

    def record_digest(tmp: Path) -> None:
        new.append(digest_line(file_sha256(tmp), path.name))
        write_atomic(side, lambda fh: fh.write(new[0] + old))

    write_atomic(path, write, binary=True, before_replace=record_digest)
    if old:
        write_atomic(side, lambda fh: fh.write(new[0]))


def checkpoint_name(position: int) -> str:
    return f"step-{position:06d}.pt"


class CheckpointManager:
    """Saves and finds the stream checkpoints of one run folder.

    ``every``: save after every ``every`` edits (at the batch boundary that crosses a multiple) and at
    the end of the edit loop; 0 saves only when the stream stops early (signal, NaN loss, out of memory).
    """

    def __init__(self, directory: str | Path, every: int = 100, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.every = max(0, int(every))
        self.keep = max(1, int(keep))
        self.run_id: str | None = None
        self.fingerprint: dict[str, Any] = {}
        self.last_saved: int | None = None
        #: checkpoints :meth:`load_latest` passed over, with why (named when none is usable)
        self.rejected: list[tuple[Path, str]] = []
        #: how to continue, for messages (the experiment sets the run folder in it)
        self.resume_hint = "rerun the same command with resume=true and hydra.run.dir=<this run's folder>"
        #: the run folder these checkpoints belong to (None: not recorded or checked)
        self.owner: str | None = None

    def _owner_record(self) -> str | None:
        """The owning run folder as recorded: relative to this folder, so a run folder moved or copied whole (to
        another machine, another clone) still owns the checkpoints inside it."""
        return None if self.owner is None else os.path.relpath(self.owner, self.directory)

    def check_owner(self) -> None:
        """Refuse a folder that holds another run folder's checkpoints (``checkpoint.dir`` shared by two runs):
        this run would delete them when it starts afresh, or resume from them."""
        try:
            recorded = json.loads((self.directory / OWNER).read_text(encoding="utf-8")).get("run_dir")
        except (OSError, ValueError, AttributeError):
            return  # none recorded (a folder from before the record, or a fresh one)
        # accepted: the relative record, or the absolute one written before records were relative
        if self.owner is not None and recorded not in (None, self.owner, self._owner_record()) and self.exists():
            other = os.path.normpath(os.path.join(self.directory, recorded))
            raise ConfigError(f"checkpoint.dir {self.directory} holds the checkpoints of the run in {other}; give "
                              f"each run its own checkpoint.dir (the default, checkpoints, is inside the run's folder)")

    def due(self, before: int, after: int) -> bool:
        return bool(self.every) and after // self.every > before // self.every

    def files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def exists(self) -> bool:
        return bool(self.files()) or (self.directory / LATEST).exists()

    def save(self, ckpt: StreamCheckpoint) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.owner is not None and not (self.directory / OWNER).exists():
            write_json_atomic(self.directory / OWNER, {"run_dir": self._owner_record()})
        ckpt.run_id = ckpt.run_id or self.run_id
        ckpt.fingerprint = ckpt.fingerprint or self.fingerprint
        path = self.directory / checkpoint_name(ckpt.position)
        _write_verified(path, lambda fh: torch.save(ckpt.to_payload(), fh))
        latest = {"file": path.name, "position": ckpt.position, "reason": ckpt.reason, "run_id": ckpt.run_id}
        write_json_atomic(self.directory / LATEST, latest, indent=1)
        ckpt.path, self.last_saved = path, ckpt.position
        self._prune(keep_path=path)
        self._drop_parts(ckpt)
        log.info("checkpoint after %d edits (%s): %s", ckpt.position, ckpt.reason, path)
        return path

    @property
    def parts_dir(self) -> Path:
        """Where curve points and the final evaluation save the batches they have done
        (evaluation.common.evaluation_parts)."""
        return self.directory / PARTS_DIR

    def _drop_parts(self, ckpt: StreamCheckpoint) -> None:
        """Remove the saved batches of the evaluation points ``ckpt`` holds (and of any before its position)."""
        if not self.parts_dir.is_dir():
            return
        held = {c["edits"] for c in ckpt.curves}
        for folder in self.parts_dir.iterdir():
            upto = point_of(folder)
            if upto is not None and (upto < ckpt.position or upto in held):
                shutil.rmtree(folder, ignore_errors=True)

    def note_wall(self, seconds: float) -> None:
        """Write the run's wall time so far into the newest saved checkpoint (the stream's end, during the
        retention pass): a run resumed from it then also counts the time spent after it was saved."""
        if self.last_saved is None:
            return
        ckpt = self.read(self.directory / checkpoint_name(self.last_saved))
        ckpt.wall_seconds = seconds
        self.save(ckpt)

    def _prune(self, keep_path: Path) -> None:
        files = [p for _, p in self.files() if p != keep_path]
        for p in files[: max(0, len(files) - (self.keep - 1))]:
            p.unlink(missing_ok=True)
            digest_path(p).unlink(missing_ok=True)
        remove_folder_temp_files(self.directory)  # left by a crash mid-write (the folder is this run's)

    def clear(self) -> None:
        for _, p in self.files():
            p.unlink(missing_ok=True)
            digest_path(p).unlink(missing_ok=True)
        (self.directory / LATEST).unlink(missing_ok=True)
        (self.directory / OWNER).unlink(missing_ok=True)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        remove_folder_temp_files(self.directory)

    @staticmethod
    def read(path: str | Path) -> StreamCheckpoint:
        """Load one checkpoint; :class:`CorruptFile` where its bytes differ from its digest. A checkpoint
        saved before digests existed is loaded unverified."""
        path = Path(path)
        if verify_beside(path) is None:
            log.warning("%s has no digest beside it (saved by an older version): loaded unverified", path)
        payload = torch.load(path, map_location="cpu", weights_only=False)  # our own file: python objects
        return StreamCheckpoint.from_payload(payload, path)

    def pointer(self) -> dict[str, Any] | None:
        """``latest.json`` (file, position, reason, run id) without loading the checkpoint, or None where
        there is none or it is unreadable."""
        path = self.directory / LATEST
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            if isinstance(state, dict) and isinstance(state["file"], str) and isinstance(state["position"], int):
                return state
            raise TypeError("expected {file: str, position: int, ...}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable %s (%s)", path, err)
            return None

    def load_latest(self) -> StreamCheckpoint | None:
        """The newest readable checkpoint (the one ``latest.json`` names, else the highest step file);
        those passed over are in :attr:`rejected`."""
        self.rejected = []
        pointer = self.pointer()
        candidates = [self.directory / pointer["file"]] if pointer else []
        candidates += [p for _, p in reversed(self.files()) if p not in candidates]
        for path in candidates:
            if not path.is_file():
                continue
            try:
                return self.read(path)
            except CorruptFile as err:
                self.rejected.append((path, "corrupt: its SHA-256 differs from the digest saved with it"))
                log.warning("%s; falling back to an older checkpoint", err)
            except Exception as err:  # noqa: BLE001 - a damaged file: try the next older one
                self.rejected.append((path, f"unreadable: {err}"))
                log.warning("skipping unreadable checkpoint %s (%s)", path, err)
        return None
