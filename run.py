"""Entry point: ``python run.py model=smollm2 editor=elder dataset=zsre`` (Hydra; ``-m`` sweeps)."""
from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evaluation.common.errors import HarnessError
from evaluation.run.folder import run_dir_override
from evaluation.run.interrupts import Interrupted, SweepStopped
from evaluation.run.schema import register

REPO_ROOT = Path(__file__).resolve().parent
register()

#: write failures that are the machine's, not the harness's: reported in one line, like bad input
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes to ``.hydra/`` (its own writing is off: the run writes these after its checks)."""
    hc = HydraConfig.get()
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
            "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task)}


def to_run_log(line: str) -> None:
    """Append ``line`` to the job's log file(s) (run.log), if they can be written; never raises."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                with open(handler.baseFilename, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from evaluation.run.experiment import (
        run_experiment,  # heavy imports after config errors are reported
    )
    from evaluation.run.folder import RunFolderBusy

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        try:
            result = run_experiment(cfg, run_dir, dict(hc.runtime.choices), hydra_record=hydra_record(cfg))
        except OSError as err:
            if err.errno not in _CANNOT_WRITE:
                raise
            raise HarnessError(f"cannot write {err.filename or 'a file'}: {err.strerror}. Free space (or choose a "
                               f"writable folder with hydra.run.dir=DIR); a run that saved checkpoints continues "
                               f"with `resume=true {run_dir_override(run_dir)}`") from None
    except HarnessError as err:
        if not isinstance(err, RunFolderBusy):  # that log belongs to the live run
            to_run_log(f"error: {err}")
        if hc.mode == RunMode.MULTIRUN:
            if isinstance(err, Interrupted):
                raise SweepStopped(str(err)) from None  # a signal is meant for the sweep, not only this job
            raise  # the launcher records this job as failed and goes on with the others
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return float(result["metrics"]["generalization"])  # the sweepers' objective


if __name__ == "__main__":
    try:
        main()
    except SweepStopped as stop:
        print(f"error: {stop}\nThe sweep stopped there; rerun it with resume=auto to keep its finished runs, "
              f"continue the stopped ones and start the rest.", file=sys.stderr)
        raise SystemExit(2) from None
