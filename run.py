"""Entry point: ``python run.py model=smollm2 editor=elder dataset=zsre`` (Hydra; ``-m`` sweeps)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evaluation.errors import HarnessError
from evaluation.schema import register

REPO_ROOT = Path(__file__).resolve().parent
register()
OmegaConf.register_new_resolver("repo", lambda: str(REPO_ROOT), replace=True)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from evaluation.experiment import run_experiment  # heavy imports after config errors are reported

    hc = HydraConfig.get()
    try:
        result = run_experiment(cfg, hc.runtime.output_dir, dict(hc.runtime.choices))
    except HarnessError as err:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the launcher records this job as failed and goes on with the others
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return float(result["metrics"]["generalization"])  # the sweepers' objective


if __name__ == "__main__":
    main()
