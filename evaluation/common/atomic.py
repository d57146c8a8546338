"""Atomic file writes: a reader sees the old file or the whole new one, never half of it."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping


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


def write_atomic(path: str | Path, write: Callable[[IO[Any]], Any], binary: bool = False,
                 before_replace: Callable[[Path], Any] | None = None) -> None:
    """Call ``write(file)`` on a fresh temporary file beside ``path``, fsync it, then rename it over ``path``.

    The one atomic-write helper (results, caches, checkpoints): a kill mid-write leaves the old file and
    at most a ``.<name>.*.tmp`` (removed when its run folder is next held). ``before_replace(tmp)`` runs
    on the complete temporary file just before the rename (checkpoints write their digest there). The
    file gets the mode of the file it replaces, or 0644 (``mkstemp`` alone would leave 0600)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)
