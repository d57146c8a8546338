"""One run: build everything from the composed config, stream the edits, measure, save, log."""
from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from baselines.unedited import Unedited
from evaluation.editor import Editor
from evaluation.generation import make_generate_fn
from evaluation.metrics import locality_inputs, predict
from evaluation.results import write_results
from evaluation.stream import run_stream

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_key(node: Any) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(node, resolve=True).encode()).hexdigest()[:16]


def run_experiment(cfg: DictConfig, run_dir: str | Path, choices: Mapping[str, str]) -> dict[str, Any]:
    """Run the configured stream; returns the payload written to ``run_dir/results.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    wall = time.perf_counter()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    loaded = instantiate(cfg.model)
    timings["model_load_seconds"] = time.perf_counter() - start
    requests = instantiate(cfg.dataset).load()
    retention = instantiate(cfg.retention)

    # the unedited model's view: locality reference and retention baseline
    unedited = Unedited(loaded)
    base_locality = predict(unedited, *locality_inputs(requests), batch_size=cfg.eval_batch_size,
                            desc="unedited locality" if cfg.progress else None)
    retention_base = None
    if retention.enabled:
        start = time.perf_counter()
        gen = make_generate_fn(loaded.model, loaded.tokenizer, unedited, cfg.eval_batch_size, cfg.progress)
        retention_base = retention.evaluate(gen, cache_key=f"{choices.get('model', 'model')}-{_config_key(cfg.model)}")
        timings["retention_base_seconds"] = time.perf_counter() - start

    # _partial_: Hydra would turn the LoadedModel dataclass into a config if passed as a kwarg
    editor: Editor = instantiate(cfg.editor, _partial_=True)(model=loaded)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = instantiate(cfg.logger)
    name = "-".join(str(choices.get(k, "?")) for k in ("editor", "model", "dataset")) + f"-s{cfg.seed}"
    logger.start(str(run_dir), name, {"config": resolved, "choices": dict(choices)})
    try:
        stream = run_stream(editor, requests, base_locality, logger, cfg.eval_every, cfg.eval_batch_size, cfg.progress)
        timings["edit_seconds"] = stream.edit_seconds
        timings["eval_seconds"] = stream.eval_seconds
        metrics: dict[str, Any] = {
            **stream.metrics,
            "seconds_per_edit": stream.edit_seconds / len(requests),
            "trainable_params": editor.trainable_params(),
            "stored_params": editor.stored_params(),
            "num_edits": len(requests),
        }
        if retention.enabled:
            start = time.perf_counter()
            gen = make_generate_fn(editor.model, editor.tokenizer, editor, cfg.eval_batch_size, cfg.progress)
            after = retention.evaluate(gen)
            timings["retention_seconds"] = time.perf_counter() - start
            metrics["retention"] = after.scores
            metrics["retention_base"] = retention_base.scores
            metrics["retention_ratio"] = {k: (v / retention_base.scores[k] if retention_base.scores[k] else float("nan"))
                                          for k, v in after.scores.items()}
            metrics["retention_details"] = after.details
            metrics["retention_base_details"] = retention_base.details
        timings["wall_seconds"] = time.perf_counter() - wall
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        flat.update({f"retention/{k}": v for k, v in metrics.get("retention", {}).items()})
        logger.summary(flat)
        path = write_results(run_dir, resolved, metrics, stream.curves, timings, {"choices": dict(choices)})
        log.info("results written to %s", path)
        return {"metrics": metrics, "curves": stream.curves, "timings": timings}
    finally:
        logger.finish()
