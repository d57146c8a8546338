"""Digests that let every stored result and checkpoint be verified when it is read back.

Two forms, one rule (a file whose bytes changed since it was written is named as corrupt, never used):

- JSON results (``results.json``, the retention store) carry their own digest under :data:`SEAL_KEY`:
  the SHA-256 of the rest of the payload in a canonical form, so the file stays one atomic write.
- Binary files (stream checkpoints) get a digest beside them, ``<file>.sha256`` in ``sha256sum``'s
  format (``sha256sum -c step-000100.pt.sha256`` checks one by hand); a folder (the model cache) gets
  one manifest of its files in the same format.

Files written before digests existed have none; they are read as before (:func:`check_seal` and
:func:`verify_beside` say so by returning False / None). A JSON payload sealed by this version also carries
:data:`SEALED_MARK`, so one whose digest was deleted is corrupt, not old.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from evaluation.common.atomic import write_text_atomic
from evaluation.common.errors import HarnessError

SEAL_KEY = "content_sha256"
#: written (and hashed) with every seal: a payload that has it but no digest had its digest removed
SEALED_MARK = "sealed_format"
DIGEST_SUFFIX = ".sha256"


class CorruptFile(HarnessError):
    """A stored file whose content differs from the digest written with it."""


def _canonical(payload: Mapping[str, Any]) -> bytes:
    # the round trip through JSON first: what is hashed is what a reader of the file gets back
    plain = json.loads(json.dumps(payload, default=float))
    return json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()


def seal(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` plus :data:`SEALED_MARK` and its digest (any old one replaced)."""
    body = {**{k: v for k, v in payload.items() if k != SEAL_KEY}, SEALED_MARK: 1}
    return {**body, SEAL_KEY: hashlib.sha256(_canonical(body)).hexdigest()}


def check_seal(blob: Any, path: str | Path) -> bool:
    """Raise :class:`CorruptFile` when ``blob`` (a JSON object read from ``path``) carries a digest that
    does not match it, or was sealed (:data:`SEALED_MARK`) and lost its digest; True where it matched, False
    where there is none (a file from before digests)."""
    if not isinstance(blob, Mapping):
        return False
    if SEAL_KEY not in blob:
        if SEALED_MARK in blob:  # what this version writes always carries its digest: removed, not old
            raise CorruptFile(f"{path} is corrupt: it was written with a digest ({SEAL_KEY}) and the digest is gone")
        return False
    body = {k: v for k, v in blob.items() if k != SEAL_KEY}
    if hashlib.sha256(_canonical(body)).hexdigest() != blob[SEAL_KEY]:
        raise CorruptFile(f"{path} is corrupt: its content no longer matches the digest written with it "
                          f"({SEAL_KEY})")
    return True


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def digest_line(digest: str, name: str) -> str:
    return f"{digest}  {name}\n"  # sha256sum's format


def _digests(text: str) -> list[tuple[str, str]]:
    """(digest, file name) of each line of a ``sha256sum``-format file."""
    return [(d, name) for line in text.splitlines() if line.strip() for d, _, name in [line.partition("  ")]]


def write_manifest(folder: Path, name: str) -> None:
    """``folder/name``: the digest of every other file in ``folder``."""

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != name)
    write_text_atomic(folder / name, "".join(digest_line(file_sha256(p), p.name) for p in files))


def manifest_mismatch(folder: Path, name: str) -> str | None:
    """The first file of ``folder`` that is missing or differs from the manifest ``folder/name``; None
    where all match."""
    for digest, file in _digests((folder / name).read_text(encoding="utf-8")):
        if not (folder / file).is_file() or file_sha256(folder / file) != digest:
            return file
    return None


def verify_beside(path: str | Path) -> bool | None:
    """Check ``path`` against ``<path>.sha256``: True where it matches, None where there is no digest;
    raises :class:`CorruptFile` where it differs."""
    path = Path(path)
    side = digest_path(path)
    try:
        # one line per accepted digest (two only while the file is being replaced)
        expected = {digest for digest, _ in _digests(side.read_text(encoding="utf-8"))}
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path}: its digest {side.name} is unreadable ({err})") from None
    if file_sha256(path) not in expected:
        raise CorruptFile(f"{path} is corrupt: its SHA-256 differs from the one in {side.name}")
    return True
