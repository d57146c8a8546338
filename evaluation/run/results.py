"""results.json: everything a table needs from one run (config, metrics, timings, versions, commit).

Written atomically and sealed with its own digest (evaluation.common.integrity); :func:`read_results` is the
one reader: it verifies the digest and the shape, so a damaged or foreign file is named, never used.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from evaluation.common.atomic import write_json_atomic
from evaluation.common.errors import HarnessError
from evaluation.common.integrity import SEAL_KEY, check_seal, seal

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
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
        why = ("its digest (content_sha256) was removed" if SEAL_KEY not in payload
               else "its content no longer matches the digest written with it")
        raise BadResults(f"corrupt results.json: {why}") from None
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
