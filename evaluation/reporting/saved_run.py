"""Rebuild a saved run's editor from its config and newest checkpoint (for reports), finished or still going."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data.requests import EditRequest
from evaluation.common.errors import HarnessError
from evaluation.editing.editor import Editor
from evaluation.run.checkpoint import CheckpointManager
from evaluation.run.results import read_results


@dataclass
class SavedRun:
    cfg: DictConfig
    editor: Editor  # with the checkpoint's state loaded
    requests: list[EditRequest]  # the edits the checkpoint holds, in stream order


def run_config(run_dir: Path) -> DictConfig:
    """A run's config: results.json's, or for a run not finished yet the one Hydra saved in ``.hydra/``."""
    results_path, hydra_path = run_dir / "results.json", run_dir / ".hydra" / "config.yaml"
    if results_path.is_file():
        return OmegaConf.create(read_results(results_path)["config"])
    if hydra_path.is_file():
        return OmegaConf.load(hydra_path)
    raise HarnessError(f"neither {results_path} nor {hydra_path} exists: pass the folder of a run "
                       f"(its hydra.run.dir)")


def load_saved_run(run_dir: Path) -> SavedRun:
    """The run's config, its editor restored from the newest checkpoint, and the edits made so far.

    The config is results.json's, or for a run not finished yet (stopped, or still editing) the one
    Hydra saved in ``.hydra/config.yaml``: a report can then look at the stream's latest checkpoint.
    Call ``evaluation.run.compose.compose_config([])`` first: it registers the resolvers the saved config uses.
    """
    cfg = run_config(run_dir)
    checkpoints = CheckpointManager(run_dir / cfg.checkpoint.dir if "checkpoint" in cfg else run_dir / "checkpoints")
    ckpt = checkpoints.load_latest()
    if ckpt is None:
        raise HarnessError(f"no checkpoint in {checkpoints.directory}: the run must have saved one "
                           f"(checkpoint.every > 0)")
    requests = instantiate(cfg.dataset).load()[:ckpt.position]
    editor: Any = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    editor.load_state_dict(ckpt.editor_state)
    return SavedRun(cfg, editor, requests)


def prompt_groups(requests: Sequence[EditRequest]) -> dict[str, list[str]]:
    """The three inputs of each edit the reports compare: its prompt, a paraphrase, an unrelated prompt."""
    return {"edit prompts": [r.prompt for r in requests], "paraphrases": [r.paraphrase for r in requests],
            "locality prompts": [r.locality_prompt for r in requests]}
