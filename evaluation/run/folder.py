"""A run folder belongs to one live process, and holds one run's files at a time.

:class:`RunFolder` takes the folder's lock (``filelock``; released by the kernel when the process dies,
so a killed run never leaves it held) and refuses a second process at once, naming the holder. While
held, the run may tidy the folder: temporary files left by a kill mid-write are removed, and a fresh
run sets the results of an earlier run aside (renamed, never deleted) so no table reads them as its own.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Mapping

from filelock import FileLock, Timeout

from evaluation.common.atomic import (
    remove_folder_temp_files,
    write_json_atomic,
    write_text_atomic,
)
from evaluation.common.errors import HarnessError
from evaluation.retention.outputs import OUTPUTS_DIR
from evaluation.run.results import RESULTS

log = logging.getLogger(__name__)

LOCK = ".run.lock"
HOLDER = ".run.holder.json"
#: the generated answers of a run's edit metrics, one JSON line per prompt (evaluation.run.answer_metrics)
ANSWERS = "answers.jsonl"
#: files (and the per-example retention folder) a finished run leaves that a fresh run in the same folder replaces
RUN_OUTPUTS = (RESULTS, "codes.npz", ANSWERS, OUTPUTS_DIR)
HYDRA_RECORD = ".hydra"


class RunFolderBusy(HarnessError):
    """Another live process holds the run folder."""


#: characters Hydra's override grammar gives a meaning (or strips) in an unquoted value
_HYDRA_SPECIAL = frozenset("\\()[]{}:=,'\" \t")


def run_dir_override(run_dir: str | Path) -> str:
    """``hydra.run.dir=DIR`` as one shell word that Hydra reads back as DIR: quoted for Hydra where DIR has a
    character its grammar reads (a comma would make a sweep, a space is stripped at the ends), then for the shell."""
    text = str(run_dir)
    if any(ch in _HYDRA_SPECIAL for ch in text):
        # Hydra's quoted strings: backslashes are literal except a run before a quote (or the closing one)
        text = "'" + re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'") + "'"
    return shlex.quote(f"hydra.run.dir={text}")


def unwritable(path: Path, err: OSError) -> HarnessError:
    return HarnessError(f"cannot write in {path}: {err.strerror or err}. Choose a writable folder with "
                        f"hydra.run.dir=DIR (or paths.output_dir=DIR)")


def held_by_another(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir`` (a run in progress); False where nothing does or there is no lock."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:  # a read-only folder: nothing can be running in it
        return False
    lock.release()
    return False


class RunFolder:
    """``with RunFolder(run_dir) as folder:`` holds ``run_dir`` for this process."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir)
        self._lock = FileLock(self.path / LOCK)

    def __enter__(self) -> "RunFolder":
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderBusy(f"the run folder {self.path} is in use by {self._holder()}: wait for it to end, "
                                f"or give this run another folder with hydra.run.dir=DIR") from None
        except OSError as err:
            raise unwritable(self.path, err) from None
        try:
            write_json_atomic(self.path / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(),
                                                   "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   "command": " ".join(sys.argv)})
        except OSError as err:
            self._lock.release()
            raise unwritable(self.path, err) from None
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        with contextlib.suppress(OSError):
            (self.path / HOLDER).unlink()
        self._lock.release()

    def _holder(self) -> str:
        try:
            holder = json.loads((self.path / HOLDER).read_text(encoding="utf-8"))
            return (f"process {holder['pid']} on {holder['host']} (started {holder['started']}: "
                    f"{holder['command']})")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def remove_temp_files(self) -> None:
        """Temporary files of atomic writes that a kill interrupted (no live writer: the folder is ours)."""
        remove_folder_temp_files(self.path)

    def set_aside_earlier_run(self) -> None:
        """A fresh run here: rename the outputs of the run that used the folder before, so they stay on
        disk but no table takes them for this run's."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in RUN_OUTPUTS:
            old = self.path / name
            if old.exists():
                new = old.with_name(f"{old.stem}.superseded-{stamp}{old.suffix}")
                old.rename(new)
                log.warning("a new run in %s: the earlier run's %s is kept as %s", self.path, name, new.name)

    def write_hydra_record(self, files: Mapping[str, str]) -> None:
        """Hydra's record of the job (``.hydra/config.yaml`` ...), written once the run is sure to go on
        (Hydra's own writing is off: it would come before the resume check)."""
        directory = self.path / HYDRA_RECORD
        directory.mkdir(exist_ok=True)
        for name, text in files.items():
            write_text_atomic(directory / name, text)
