"""Routing queries kept across runs, so an edited pass decides each row's scope without a forward.

A routed editor (ELDER, GRACE, MELO, Defer, LEMoE) puts a retention row in or out of its scope from one
vector per prompt: its query layer's input at the last prompt token. Where nothing the editor changes
runs before that point (``Editor.query_site`` names it; None otherwise), the vector is the unedited
model's: the same after any number of edits and for every editor reading the same site. The first
edited pass on a model computes the vectors with routing forwards (stopped at the query layer) and
stores them here, one file per site and prompt list; every later pass on the same model and site (other
editors, seeds, numbers of edits) reads them and only applies its router to them.

A file holds the vectors, what they were computed for (model, site and the prompt list's digest) and a digest
of their bytes: a file of another model, site or prompt list (e.g. renamed into another's place), or changed
bytes, is not used (the vectors are computed again, with a warning).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from evaluation.common.atomic import file_stem, remove_stale_temp_files, write_atomic
from evaluation.retention.suite import InScopeFn

log = logging.getLogger(__name__)

#: the names of the store's files (:meth:`QueryStore.path`)
FILES = "*-queries-*.pt"


def _tensor_sha256(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t.contiguous(), buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _prompts_sha256(prompts: Sequence[str]) -> str:
    """The prompt list a file's vectors were computed for, in order (stored in the file, checked on reading)."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


class QueryStore:
    """Query vectors per (model, site, prompt list) in ``cache_dir``; ``model_key`` names the unedited model
    and everything that changes its numbers (weights, dtype, compiled blocks). Counts what it served."""

    def __init__(self, cache_dir: str | Path, model_key: str) -> None:
        self.dir, self.model_key = Path(cache_dir), model_key
        self.read = self.computed = 0  # prompt lists served from a file / computed (this store's use only)
        # files are written without a lock (each write is whole and any writer's is right): only a temporary too
        # old to be another run's write in progress is known to be left by a killed one
        remove_stale_temp_files(self.dir, FILES)

    def path(self, site: str, prompts: Sequence[str]) -> Path:
        digest = hashlib.sha256(json.dumps([self.model_key, site, list(prompts)]).encode()).hexdigest()[:20]
        stem = file_stem(self.model_key)
        return self.dir / f"{stem}-queries-{digest}.pt"

    def load(self, site: str, prompts: Sequence[str]) -> torch.Tensor | None:
        path = self.path(site, prompts)
        try:
            blob: Any = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as err:  # a truncated or foreign file: compute again rather than fail
            log.warning("ignoring the stored routing queries %s (%s); computing them again", path, err)
            return None
        q = blob.get("queries") if isinstance(blob, dict) else None
        if not isinstance(q, torch.Tensor) or q.shape[0] != len(prompts):
            return None
        if blob.get("key") != [self.model_key, site, _prompts_sha256(prompts)]:
            # e.g. two files renamed into each other's place: their vectors belong to other prompts
            log.warning("%s holds routing queries of another model, site or prompt list than its name says; "
                        "computing them again", path)
            return None
        if blob.get("sha256") != _tensor_sha256(q):
            log.warning("%s is corrupt: its vectors no longer match the digest written with them; computing "
                        "them again", path)
            return None
        return q

    def save(self, site: str, prompts: Sequence[str], queries: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        q = queries.detach().cpu().contiguous()
        blob = {"key": [self.model_key, site, _prompts_sha256(prompts)], "queries": q, "sha256": _tensor_sha256(q)}
        write_atomic(self.path(site, prompts), lambda f: torch.save(blob, f), binary=True)

    def scope_fn(self, editor: Any, batch_size: int) -> InScopeFn:
        """``editor.in_scope`` with the query vectors read from this store where its site has them (and
        stored where it computes them); ``editor.in_scope`` itself for an editor without a site."""
        def in_scope(prompts: list[str]) -> torch.Tensor | None:
            site = editor.query_site() if editor.query is not None else None
            if site is None:
                return editor.in_scope(prompts, batch_size)
            q = self.load(site, prompts)
            if q is None:
                q = editor.query_vectors(prompts, batch_size)
                self.save(site, prompts, q)
                self.computed += 1
            else:
                self.read += 1
            return editor.scope_of(q, batch_size)
        return in_scope
