"""The run's own settings, checked before any work: one line naming the key and what it may be."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evaluation.common.errors import ConfigError

#: run settings that count something and must be at least 1, checked before any work (the stream checks
#: editor.batch_size again where it uses it; the loader checks dataset.num_edits)
_POSITIVE = ("eval_batch_size", "generation_token_budget", "editor.batch_size", "checkpoint.keep")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def check_caches_writable(cfg: DictConfig) -> None:
    """``retention.cache_dir`` is written during the run (the unedited model's tasks before the stream, the routing
    queries after it): a folder this user can read but not write would fail the run after the stream, hours in, so
    it is refused before any work (root passes ``os.access`` everywhere but on a read-only mount)."""
    value = OmegaConf.select(cfg, "retention.cache_dir")
    if not value:
        return  # no cache (retention=none, or retention.cache_dir=null): nothing is kept across runs
    folder = Path(str(value)).expanduser()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"retention.cache_dir {folder}: {existing} is not a folder; point retention.cache_dir=DIR "
                          f"(or paths.cache_dir=DIR, for every cache) at a folder")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    what = f"retention.cache_dir {folder}" + ("" if existing == folder else f" cannot be made: {existing}")
    raise ConfigError(f"{what} is not writable by this user (the run stores the unedited model's retention tasks "
                      f"and routing queries there): make it writable, or point retention.cache_dir=DIR (or "
                      f"paths.cache_dir=DIR, for every cache) at a folder you can write")


def check_run_settings(cfg: DictConfig) -> None:
    """Counts that would otherwise fail deep inside, or be quietly replaced and recorded as given."""
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    for key in ("eval_every", "checkpoint.every"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key} must be an integer >= 0 (0: off), got {value!r}")
    seed = OmegaConf.select(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer from 0 to {2**32 - 1} (numpy's range), got {seed!r}")
    eval_at = OmegaConf.select(cfg, "eval_at") or []
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in eval_at):
        raise ConfigError(f"eval_at must be a list of positive edit counts, got {list(eval_at)!r}")
    if not (isinstance(cfg.resume, bool) or cfg.resume == "auto"):
        raise ConfigError(f"resume must be true, false or auto, got {cfg.resume!r}")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise ConfigError(f"threads must be null or a positive integer, got {cfg.threads!r}")
    corpus = OmegaConf.select(cfg, "editor.mom2_corpus")
    if corpus and corpus != "model":  # statistics of what retention scores would protect exactly what it measures
        scored = Path(str(OmegaConf.select(cfg, "paths.data_dir"))).expanduser().resolve() / "retention"
        if scored in Path(corpus).expanduser().resolve().parents:
            raise ConfigError(f"editor.mom2_corpus={corpus} is the retention suite's data: the statistics would "
                              f"protect what retention measures; give another text file or 'model'")
