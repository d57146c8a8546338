"""A list computed once from the unedited model and kept across runs: one sealed JSON file per key.

The unedited model's locality answers and its teacher-forced locality predictions are the same for every
run of one model and data set; a 10,000-edit stream spends minutes on each at every start. ``model_key``
names the unedited model and what changes its numbers (as the retention cache's key does); ``key`` the rest
(settings, a digest of the inputs). A file of another key, a torn file or one whose content changed is not
used: the list is computed again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from evaluation.common.atomic import file_stem, write_json_atomic
from evaluation.common.integrity import CorruptFile, check_seal, seal

log = logging.getLogger(__name__)


def digest_of(value: Any) -> str:
    """SHA-256 of ``value``'s JSON text: how an input list enters a key."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


class SealedListCache:
    """``load(key, n)`` / ``save(key, items)`` of lists of JSON values under ``directory``, one file per key,
    named ``<model key>-<kind>-<digest>.json`` with the list under ``field``."""

    def __init__(self, directory: str | Path, model_key: str, kind: str, field: str) -> None:
        self.dir, self.model_key, self.kind, self.field = Path(directory), model_key, kind, field

    def _full_key(self, key: Sequence[Any]) -> list[Any]:
        return [self.model_key, *key]

    def path(self, key: Sequence[Any]) -> Path:
        return self.dir / f"{file_stem(self.model_key)}-{self.kind}-{digest_of(self._full_key(key))[:20]}.json"

    def load(self, key: Sequence[Any], n: int) -> list[Any] | None:
        """The ``n`` items kept under ``key``, or None where there is no usable file."""
        path = self.path(key)
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
            sealed = check_seal(blob, path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, CorruptFile) as err:  # a torn or changed file: compute again
            log.warning("ignoring the cached %s %s (%s); computing them again", self.kind, path, err)
            return None
        items = blob.get(self.field)
        if not sealed or blob.get("key") != self._full_key(key) or not isinstance(items, list) or len(items) != n:
            return None
        return items

    def save(self, key: Sequence[Any], items: Sequence[Any]) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path(key), seal({"key": self._full_key(key), self.field: list(items)}))
        except OSError as err:  # a cache that cannot be written costs time, not results
            log.warning("could not cache the unedited %s in %s (%s)", self.kind, self.dir, err.strerror)
