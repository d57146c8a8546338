"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

log = logging.getLogger(__name__)

#: a temporary file of an atomic write is named ``.<target name>.<random>.tmp`` beside its target (the random
#: part is mkstemp's: letters, digits, "_"); the sweeps below recognise them by this name alone
_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]+\.tmp$")
#: a temporary untouched this long has no live writer: an atomic write takes seconds (it is written, fsynced and
#: renamed in one go), so only a write whose process was killed (or stopped for a day) leaves one this old
STALE_TEMP_SECONDS = 24 * 3600.0


def file_stem(key: str) -> str:
    """``key`` as the start of a cache file's name: characters other than letters, digits, ".", "_" and "-"
    replaced, at most 80 long."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80].strip("_") or "model"


def write_json_atomic(path: str | Path, payload: Mapping[str, Any], *, indent: int = 2,
                      sort_keys: bool = False) -> None:
    """Write ``payload`` to a fresh temporary file beside ``path``, then rename it over ``path``.

    A kill mid-write leaves no half file, and concurrent writers (parallel runs sharing a cache) each
    rename their own complete file: a fixed temporary name would let one truncate another's.
    """
    write_atomic(path, lambda f: json.dump(payload, f, indent=indent, sort_keys=sort_keys, default=float))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, atomically (see :func:`write_json_atomic`); the folder is made if missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically (see :func:`write_json_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _complete_temporary(path: Path, write: Callable[[IO[Any]], Any], binary: bool) -> str:
    """A fresh temporary file beside ``path`` holding what ``write(file)`` wrote, fsynced, with the mode of the
    file it will replace (or 0644: ``mkstemp`` alone would leave 0600); removed again if writing fails."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return tmp


def temp_files(folder: str | Path, target: str = "*") -> list[Path]:
    """The temporary files in ``folder`` that atomic writes to files named like ``target`` (a glob pattern) left."""
    found = []
    for candidate in Path(folder).glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        m = _TEMP_NAME.match(candidate.name)
        if m and fnmatch.fnmatchcase(m.group("target"), target) and candidate.is_file():
            found.append(candidate)
    return sorted(found)


def _remove(strays: Iterable[Path]) -> list[Path]:
    removed = []
    for stray in strays:
        try:
            stray.unlink()
        except FileNotFoundError:
            continue  # another process's sweep got there first
        except OSError as err:  # tidying only: a folder this user cannot write keeps it, and the run goes on
            log.info("cannot remove %s, left by an interrupted write: %s", stray, err.strerror or err)
            continue
        removed.append(stray)
        log.info("removed %s, left by an interrupted write", stray)
    return removed


def remove_temp_files(path: str | Path) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes of ``path`` left beside it; returns them.

    Call it only where no other process can be writing ``path``: under the lock that guards its writes (a shared
    cache's entry), or in a folder the caller holds alone (a run folder); elsewhere, :func:`remove_stale_temp_files`.
    """
    path = Path(path)
    return _remove(temp_files(path.parent, glob.escape(path.name)))


def remove_folder_temp_files(folder: str | Path) -> list[Path]:
    """Remove every temporary file that interrupted atomic writes left in ``folder``; only for a folder the caller
    holds alone (a run folder, its checkpoints): no other writer can be live there."""
    return _remove(temp_files(folder))


def remove_stale_temp_files(folder: str | Path, target: str = "*",
                            older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove the temporary files of atomic writes to files named like ``target`` in ``folder`` (a cache shared by
    concurrent runs, written without a lock) that nothing has touched for ``older_than`` seconds: their writers are
    dead, while a younger one may be a live process's write in progress. Returns them; a missing folder has none."""
    cutoff = time.time() - older_than

    def stale(p: Path) -> bool:
        try:
            return p.stat().st_mtime < cutoff
        except FileNotFoundError:
            return False
    return _remove(p for p in temp_files(folder, target) if stale(p))


def write_atomic(path: str | Path, write: Callable[[IO[Any]], Any], binary: bool = False,
                 before_replace: Callable[[Path], Any] | None = None) -> None:
    """Call ``write(file)`` on a fresh temporary file beside ``path``, fsync it, then rename it over ``path``.

    The one atomic-write helper (results, caches, checkpoints): a kill mid-write leaves the old file and
    at most a ``.<name>.*.tmp``, removed when its run folder or cache is next held (:func:`remove_temp_files`).
    ``before_replace(tmp)`` runs on the complete temporary file just before the rename (checkpoints write their
    digest there)."""
    path = Path(path)
    tmp = _complete_temporary(path, write, binary)
    try:
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM/SIGINT arriving inside the block are noted and raised again once it ends (only the main thread
    can handle signals; elsewhere the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in arrived[:1]:  # now the block is done: the signal does what it would have done
            signal.raise_signal(signum)


def write_texts_together(files: Mapping[Path, str]) -> None:
    """Replace several text files as one: each is written whole to a temporary first, then all are renamed with
    SIGTERM and SIGINT deferred (raised again after the last rename), so a signal leaves all the old files or all the
    new ones, never a mix; a failure before the renames removes the temporaries and changes nothing."""
    done: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            done.append((_complete_temporary(Path(path), lambda f, t=text: f.write(t), binary=False), Path(path)))
        with _signals_deferred():
            for tmp, path in done:
                os.replace(tmp, path)
    except BaseException:
        for tmp, _ in done:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    for parent in {path.parent for _, path in done}:
        fsync_dir(parent)
