"""results.json: everything a table needs from one run (config, metrics, timings, versions, commit).

Written atomically and sealed with its own digest (evaluation.integrity); :func:`read_results` is the
one reader: it verifies the digest and the shape, so a damaged or foreign file is named, never used.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping

from evaluation.errors import HarnessError
from evaluation.integrity import check_seal, seal

RESULTS = "results.json"
#: the metrics every finished run reports; a results.json without them as numbers is not a result
REQUIRED_METRICS = ("reliability", "generalization", "locality")


class BadResults(HarnessError):
    """A results.json that cannot be used: unreadable, corrupt or of the wrong shape."""


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: str | Path, payload: Mapping[str, Any], *, indent: int = 2,
                      sort_keys: bool = False) -> None:
    """Write ``payload`` to a fresh temporary file beside ``path``, then rename it over ``path``.

    A kill mid-write leaves no half file, and concurrent writers (parallel runs sharing a cache) each
    rename their own complete file: a fixed temporary name would let one truncate another's.
    """
    write_atomic(path, lambda f: json.dump(payload, f, indent=indent, sort_keys=sort_keys, default=float))


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


def write_results(run_dir: str | Path, config: Mapping[str, Any], metrics: Mapping[str, Any],
                  curves: list[Mapping[str, Any]], timings: Mapping[str, float], extra: Mapping[str, Any] | None = None,
                  commit: str | None = None) -> Path:
    """``commit``: the code the run started with (taken at its start: the tree may change during a long run)."""
    path = Path(run_dir) / RESULTS
    payload = {"config": config, "metrics": metrics, "curves": curves, "timings": timings,
               "versions": versions(), "git_commit": commit or git_commit(), **(extra or {})}
    write_json_atomic(path, seal(payload))
    return path


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_results(path: str | Path) -> dict[str, Any]:
    """The payload of one results.json, verified; :class:`BadResults` names what is wrong with it."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadResults(f"unreadable results.json ({err})") from None
    if not isinstance(payload, dict):
        raise BadResults(f"results.json holds a JSON {type(payload).__name__}, not an object")
    try:
        check_seal(payload, path)
    except HarnessError:
        raise BadResults("corrupt results.json: its content no longer matches the digest written with it") from None
    metrics = payload.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(payload.get("config", {}), dict):
        raise BadResults("results.json of the wrong shape: `metrics` and `config` must be objects")
    bad = [k for k in REQUIRED_METRICS if not _is_number(metrics.get(k))]
    bad += [k for k, v in metrics.items() if k not in REQUIRED_METRICS and not isinstance(v, (dict, list))
            and v is not None and not _is_number(v)]
    if bad:
        shown = ", ".join(f"{k}={metrics.get(k)!r}" for k in bad[:4])
        raise BadResults(f"results.json with missing or non-numeric metrics: {shown}")
    return payload
