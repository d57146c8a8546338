"""Entry point: ``python run.py model=smollm2 editor=elder dataset=zsre`` (Hydra; ``-m`` sweeps)."""
from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from evaluation.common.errors import HarnessError
from evaluation.run.folder import run_dir_override
from evaluation.run.interrupts import (
    SIGNALS,
    Interrupted,
    SweepStopped,
    stop_when_orphaned,
)
from evaluation.run.schema import register

REPO_ROOT = Path(__file__).resolve().parent
register()

#: failures that are the machine's, not the harness's, reported in one line like bad input: no room left, and a
#: file or folder this user may not open (for reading or writing: the errno does not say which)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_ACCESS = {errno.EROFS, errno.EACCES, errno.EPERM}


def machine_failure(err: OSError, run_dir: str) -> HarnessError | None:
    """The one line for an OSError that is the machine's (no room, no access), None for any other."""
    name = err.filename or "a file"
    if err.errno in _NO_ROOM:
        what = f"cannot write {name}: {err.strerror}. Free space (or choose a writable folder with hydra.run.dir=DIR)"
    elif err.errno in _NO_ACCESS:
        what = (f"cannot open {name}: {err.strerror}. Give this user access to it (or choose a writable folder "
                f"with hydra.run.dir=DIR, or another path in the config)")
    else:
        return None
    resume = f"resume=true {run_dir_override(run_dir)}"
    return HarnessError(f"{what}; a run that saved checkpoints continues with `{resume}`")


class SweepJobFailed(HarnessError, CompactHydraException):
    """A job of a multirun failed on bad input (its own line is printed as it fails): Hydra's launcher records it,
    runs the rest, and at the end prints this one line instead of a traceback; the exit status becomes 2."""


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
    # a job in a launcher's worker process (joblib) stops, and its worker ends, with the sweep's main process
    in_worker = multiprocessing.parent_process() is not None
    with stop_when_orphaned() if in_worker else contextlib.nullcontext():
        return run_job(cfg)


def run_job(cfg: DictConfig) -> float | None:
    """One run of the sweep (or the single run): its failures as one line, its objective for the sweepers."""
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
            if (failure := machine_failure(err, run_dir)) is None:
                raise
            raise failure from None
    except HarnessError as err:
        if isinstance(err, Interrupted):
            # the stop is under way and the process exits: the same signal again (timeout around make sends it
            # twice) must not kill it mid-exit, before or after its line is written
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        if isinstance(err, RunFolderBusy) and hc.mode == RunMode.MULTIRUN and cfg.get("resume") == "auto":
            # another process is running this very job (e.g. the same sweep started twice): nothing left to do here
            print(f"skipped: {err}", file=sys.stderr)
            return None
        if not isinstance(err, RunFolderBusy):  # that log belongs to the live run
            to_run_log(f"error: {err}")
        if hc.mode == RunMode.MULTIRUN:
            if isinstance(err, Interrupted):
                raise SweepStopped(str(err)) from None  # a signal is meant for the sweep, not only this job
            print(f"error: {err}", file=sys.stderr)  # each failed job says why as it fails
            # the launcher records this job as failed and goes on with the others
            raise SweepJobFailed(f"error: the job in {run_dir} failed (the line above, and its run.log, say why); "
                                 f"the sweep's other jobs ran") from None
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return float(result["metrics"]["generalization"])  # the sweepers' objective


if __name__ == "__main__":
    try:
        main()
    except SystemExit as done:  # Hydra exits 1 after any failed job; a job that failed on bad input means 2
        if done.code == 1 and isinstance(done.__context__, SweepJobFailed):
            raise SystemExit(2) from None
        raise
    except SweepStopped as stop:
        print(f"error: {stop}\nThe sweep stopped there; rerun it with resume=auto to keep its finished runs, "
              f"continue the stopped ones and start the rest.", file=sys.stderr)
        raise SystemExit(2) from None
