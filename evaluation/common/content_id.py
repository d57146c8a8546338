"""What a result depends on, named by content: the SHA-256 of a data file, of a model's weight files.

A file's digest is kept in a small store beside the caches, keyed by its real path, size and modification time
(in nanoseconds), so a run hashes a multi-gigabyte weight file once, not on every start; a file rewritten in
place gets a new modification time and is hashed again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from evaluation.common.atomic import write_json_atomic
from evaluation.common.integrity import file_sha256

STORE = "file_digests.json"


def file_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """The SHA-256 of the file at ``path`` (from the store in ``cache_dir`` where it is known for this file as it
    is now)."""
    real = Path(path).expanduser().resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    store = Path(cache_dir).expanduser() / STORE if cache_dir is not None else None
    known: dict[str, str] = {}
    if store is not None:
        try:
            known = json.loads(store.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}  # absent, unreadable or torn: hash again and write a whole new one
        if isinstance(known, dict) and isinstance(known.get(key), str):
            return known[key]
    digest = file_sha256(real)
    if store is not None:
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(store, {**(known if isinstance(known, dict) else {}), key: digest}, sort_keys=True)
        except OSError:
            pass  # a cache that cannot be written costs time, not correctness
    return digest


def files_digest(files: Iterable[Path], root: Path, cache_dir: str | Path | None = None) -> str:
    """One SHA-256 over ``files`` (their names relative to ``root`` and their digests), in name order."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_digest(path, cache_dir)}\n".encode())
    return h.hexdigest()


def folder_weights(folder: Path, patterns: Iterable[str]) -> list[Path]:
    """The files of ``folder`` (not its sub-folders) matching any of ``patterns``."""
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})

