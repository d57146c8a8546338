"""Which earlier run a run may take as its own: the finished result ``resume=auto`` keeps, the checkpoint
``resume=true`` continues. Both must be of this config (but for where files live and what may change on resume)
and of the same inputs, named by content (``run_inputs``: the data file, the weights)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from data.protocol import is_plain
from evaluation.common.errors import ConfigError
from evaluation.common.integrity import file_sha256
from evaluation.editing.models import weights_identity
from evaluation.run.checkpoint import CheckpointManager, StreamCheckpoint
from evaluation.run.compose import compose_config
from evaluation.run.folder import run_dir_override
from evaluation.run.interrupts import preemption_signal, requeue_reason
from evaluation.run.results import RESULTS, BadResults, read_results
from evaluation.run.stream import ON_NAN

log = logging.getLogger(__name__)


#: config leaves that say where files live, not what is computed
_WHERE_FILES_LIVE = ("path", "cache_dir", "locality_cache_dir", "url", "sha256", "tokenizer_path", "data_dir")
#: config leaves that say how a number is computed, not which: it is the same bit for bit either way (a locality or
#: retention row out of the router's scope taken from the unedited pass instead of generated again)
_HOW_NOT_WHAT = ("reuse_unedited",)
#: config leaves that may change between a run and its resumption
_MAY_CHANGE_ON_RESUME = (*_WHERE_FILES_LIVE, *_HOW_NOT_WHAT, "device", "device_map", "num_edits")


#: may change on resume (e.g. after running out of memory), with a warning: the state carries over
_MAY_CHANGE_WITH_A_WARNING = ("editor.batch_size",)


def _leaves(node: Any, prefix: str, skip: tuple[str, ...]) -> dict[str, Any]:
    """The config's leaves as flat dotted keys, without those whose own name is in ``skip``."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}.{key}", skip).items()}
    return {} if prefix.rsplit(".", 1)[-1] in skip else {prefix: node}


def run_inputs(cfg: DictConfig) -> dict[str, str | None]:
    """What the run reads, named by content (evaluation.common.content_id): the data file's SHA-256 (None where the
    file is missing: the loader says so) and the model's weights where the config text does not pin them
    (``evaluation.editing.models.weights_identity``)."""
    cache = cfg.paths.get("cache_dir")
    data = Path(str(cfg.dataset.path)).expanduser()
    # the data file is hashed in full every time (small; a store keyed by mtime could be fooled by a rewrite that
    # restores the time, as the loader's cache key guards against); the weights' digests come from the store
    return {"dataset_sha256": file_sha256(data) if data.is_file() else None,
            "model_weights": weights_identity(OmegaConf.to_container(cfg.model, resolve=True), cache)}


def run_fingerprint(cfg: DictConfig, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config values (and ``inputs``' digests) a checkpoint must share with the run that resumes it (flat,
    dotted keys)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {"seed": resolved["seed"], "edit_time_eval": resolved.get("edit_time_eval")}
    flat.update({f"inputs.{k}": v for k, v in (inputs or {}).items()})
    for group in ("model", "editor", "dataset", "answers"):
        flat.update(_leaves(resolved[group], group, _MAY_CHANGE_ON_RESUME))
    dataset = resolved["dataset"]
    if not is_plain(dataset.get("protocol", "one_per_fact"), dataset.get("revisit", 1)):
        flat["dataset.num_edits"] = dataset["num_edits"]  # a grouped or revisited stream is built from all of them
    return flat


def resume_checkpoints(cfg: DictConfig, run_dir: Path, resume: bool | str | None = None,
                 inputs: Mapping[str, Any] | None = None) -> tuple[CheckpointManager, StreamCheckpoint | None]:
    """The run's checkpoint folder and, with ``resume=true``, the checkpoint to continue from (with
    ``resume=auto`` too, where there is one; none is a fresh run)."""
    if cfg.on_nan not in ON_NAN:
        raise ConfigError(f"on_nan must be one of {'|'.join(ON_NAN)}, got {cfg.on_nan!r}")
    manager = CheckpointManager(run_dir / cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep)
    manager.resume_hint = f"rerun the same command with `resume=true {run_dir_override(run_dir)}`"
    manager.fingerprint = run_fingerprint(cfg, inputs)
    manager.owner = str(run_dir.resolve())
    manager.check_owner()  # a checkpoint.dir shared with another run: refused before it is read or cleared
    resume = cfg.resume if resume is None else resume
    if not resume and (saved := saved_for_a_requeue(manager)):
        # submitit requeued this job with its own overrides after the stream saved for it: going on is what the
        # save was for (without it a job under a plain submitit launcher would start over at every time limit)
        log.info("this submitit job was requeued after saving %s for it: resuming it (resume=true)",
                 manager.directory / saved)
        resume = True
    if not resume:
        return manager, None  # an earlier run's checkpoints are cleared by the caller, which holds the folder
    ckpt = manager.load_latest()
    if ckpt is None and manager.rejected:
        shown = "; ".join(f"{path.name} ({why})" for path, why in manager.rejected)
        raise ConfigError(f"resume=true but no checkpoint in {manager.directory} can be used: {shown}. "
                          f"Start the run again without resume=true, or restore the files from a backup")
    if ckpt is None and resume == "auto":
        return manager, None  # nothing to continue: a fresh run
    if ckpt is None:
        raise ConfigError(f"resume=true but there is no checkpoint in {manager.directory}: pass the folder of the "
                          f"interrupted run with hydra.run.dir=DIR (its checkpoints are in DIR/{cfg.checkpoint.dir})")
    diff = [k for k in sorted(ckpt.fingerprint)
            if ckpt.fingerprint[k] != manager.fingerprint.get(k, "<unset>")]
    diff += added_keys_that_differ(manager.fingerprint, set(ckpt.fingerprint), run_dir, fingerprint=True)
    for key in [k for k in diff if k in _MAY_CHANGE_WITH_A_WARNING]:
        log.warning("resume: %s changed from %r to %r; the rest of the stream differs from an uninterrupted run",
                    key, ckpt.fingerprint[key], manager.fingerprint.get(key))
        diff.remove(key)
    if diff:
        shown = ", ".join(f"{k} (checkpoint {ckpt.fingerprint.get(k, '<unset>')!r}, now "
                          f"{manager.fingerprint.get(k, '<unset>')!r})" for k in diff[:5])
        if resume == "auto":  # e.g. a sweep rerun with one override changed: its folders hold the earlier runs
            raise ConfigError(f"resume=auto: {run_dir} holds an unfinished run of another config (its checkpoint "
                              f"{ckpt.path} differs in {shown}); to continue it, rerun with its overrides; to run "
                              f"this config, give it its own folder (hydra.sweep.dir=DIR or hydra.run.dir=DIR)")
        raise ConfigError(f"resume=true: this run's config differs from the checkpoint {ckpt.path} in {shown}; "
                          f"resume with the overrides of the interrupted run (only eval_batch_size, eval_every, "
                          f"editor.batch_size, on_nan, model.device and paths may change), or start a new run")
    log.info("resuming from %s (%d edits done, saved on %s)", ckpt.path, ckpt.position, ckpt.reason)
    return manager, ckpt


def added_keys_that_differ(now: Mapping[str, Any], recorded: set[str], run_dir: Path,
                           fingerprint: bool = False) -> list[str]:
    """Of the settings in ``now`` (flat, dotted) that the earlier run in ``run_dir`` did not record (added to the
    code since), those whose value differs from the one this code composes from that run's own overrides
    (``.hydra/overrides.yaml``): a sweep rerun keeps its runs when a new key only names what they did, and does not
    when it sets the new key otherwise. Without a readable record all of them differ (the run is not taken as this
    one's). ``fingerprint``: ``now`` is a ``run_fingerprint``, else ``same_result``'s settings."""
    added = sorted(set(now) - recorded)
    if not added:
        return []
    try:
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        composed = compose_config([str(o) for o in overrides])
        # the digests of inputs a checkpoint predates cannot be checked: taken as they are
        own = ({**run_fingerprint(composed), **{k: v for k, v in now.items() if k.startswith("inputs.")}}
               if fingerprint else _settings(OmegaConf.to_container(composed, resolve=True)))
    except Exception as err:  # noqa: BLE001 - no record, or one this code no longer composes: not the same run
        log.warning("resume: %s cannot be checked against %s's overrides (%s); taken as differing",
                    ", ".join(k.lstrip(".") for k in added), run_dir, err)
        return added
    differ = [k for k in added if own.get(k, "<unset>") != now[k]]
    if same := [k for k in added if k not in differ]:
        log.info("resume: settings added since the run in %s hold what its overrides give now: %s", run_dir,
                 ", ".join(k.lstrip(".") for k in same))
    return differ


def saved_for_a_requeue(manager: CheckpointManager) -> str | None:
    """In a submitit job whose folder's newest checkpoint was saved on submitit's notice, to be requeued
    (evaluation.run.stream_signals), that checkpoint's file name: the requeued job goes on from it. Else None."""
    signal = preemption_signal()
    pointer = manager.pointer() if signal is not None else None
    if pointer is None or signal is None or pointer.get("reason") != requeue_reason(signal.name):
        return None
    return str(pointer["file"])


#: run settings that change how a run is carried out or recorded, not what it measures (resume=auto)
_NOT_THE_RESULT = ("resume", "progress", "threads", "paths", "logger", "checkpoint", "tags")


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a finished run's result depends on among its config's leaves (flat, dotted)."""
    return _leaves({k: v for k, v in config.items() if k not in _NOT_THE_RESULT}, "",
                   (*_WHERE_FILES_LIVE, *_HOW_NOT_WHAT))


def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """The payload of ``run_dir/results.json``; None where there is none that reads (absent, corrupt)."""
    try:
        return read_results(run_dir / RESULTS)
    except BadResults:
        return None


def same_result(cfg: DictConfig, payload: Mapping[str, Any], inputs: Mapping[str, Any] | None = None,
                run_dir: Path | None = None) -> bool:
    """``payload`` is a finished run of this very config on the same inputs: every setting but those in
    ``_NOT_THE_RESULT`` and where files live, and the data's and weights' digests (``run_inputs``; a run made before
    they were recorded is taken on its settings alone, with a warning). A setting the code added after the run
    (absent from its record) matches where it holds what the code gives that run's overrides
    (``added_keys_that_differ``; without ``run_dir`` such keys are not checked)."""
    then, now = _settings(payload["config"]), _settings(OmegaConf.to_container(cfg, resolve=True))
    if any(then[k] != now.get(k, "<unset>") for k in then):
        return False
    if run_dir is not None and added_keys_that_differ(now, set(then), run_dir):
        return False
    recorded = payload.get("inputs")
    if inputs is not None and recorded is None:
        log.warning("resume=auto: the finished run predates the record of its data and weights digests; taken as "
                    "this config's result on its settings alone")
        return True
    return inputs is None or dict(recorded) == dict(inputs)
