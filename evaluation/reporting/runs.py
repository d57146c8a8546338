"""Run discovery: every results.json, run folder or committed per-run frame becomes one row of a frame."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import pandas as pd

from evaluation.run.folder import held_by_another, run_dir_override
from evaluation.run.results import BadResults, read_results

#: the edit metrics from the model's generated answers (evaluation.run.answer_metrics)
GENERATED_METRICS = ("reliability_generated", "reliability_generated_contains", "generalization_generated",
                     "generalization_generated_contains", "locality_generated")
SCALAR_METRICS = ("reliability", "generalization", "reliability_token", "generalization_token", "locality",
                  *GENERATED_METRICS, "seconds_per_edit", "trainable_params", "stored_params", "skipped_edits")
#: each batch scored just after it was edited (results.json metrics.at_edit_time), as frame columns
AT_EDIT_TIME = tuple(f"at_edit_time.{m}" for m in ("reliability", "generalization", "reliability_generated",
                                                    "generalization_generated"))
KEY_COLUMNS = ("source", "status", "reason", "editor", "model", "dataset", "experiment", "seed", "num_edits",
               "top_k", "num_loras", "guide_lambda", "epsilon", "aux_loss", "L", "layers", "retention_limit",
               "retention_suite", "elder_reading", "key_position", "lr", "protocol", "revisit", "device",
               "git_commit")
#: what a run measured besides its metrics: the stream's distinct facts (results.json ``dataset_protocol``)
#: and the run's seconds end to end (``timings.wall_seconds``)
RUN_VALUES = ("num_facts", "wall_seconds")


class TablesError(Exception):
    """Bad input to the table builder (reported as one line, exit status 2)."""


def num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def key_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _settings(choices: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The grouping columns of one run, from its Hydra choices and resolved config."""
    editor_cfg = cfg.get("editor") or {}
    dataset_cfg = cfg.get("dataset") or {}
    retention_cfg = cfg.get("retention") or {}
    layers = editor_cfg.get("layers")
    experiment = choices.get("experiment")
    return {
        "editor": choices.get("editor"),
        "model": choices.get("model"),
        "dataset": choices.get("dataset"),
        "experiment": ",".join(map(str, experiment)) if isinstance(experiment, list) else experiment,
        "seed": cfg.get("seed"),
        "num_edits": dataset_cfg.get("num_edits"),
        "top_k": editor_cfg.get("top_k"),
        "num_loras": editor_cfg.get("num_loras"),
        "guide_lambda": editor_cfg.get("guide_lambda"),
        "epsilon": editor_cfg.get("epsilon"),
        "aux_loss": editor_cfg.get("aux_loss"),
        "L": len(layers) if isinstance(layers, list) else None,
        "layers": ",".join(map(str, layers)) if isinstance(layers, list) else None,
        "retention_limit": retention_cfg.get("limit") if "tasks" in retention_cfg else None,
        # whether the run measures test retention at all (retention=none has no tasks); None: unknown
        "retention_suite": ("tasks" in retention_cfg) if retention_cfg else None,
        # the readings table's keys: ELDER's reading of the authors' code, the key token, the lr
        "elder_reading": choices.get("elder_reading"),
        "key_position": editor_cfg.get("key_position"),
        "lr": editor_cfg.get("lr"),
        # the stream protocol (data/protocol.py); None where the run predates it (see stream_defaults)
        "protocol": dataset_cfg.get("protocol"),
        "revisit": dataset_cfg.get("revisit"),
    }


def stream_defaults(row: Mapping[str, Any]) -> dict[str, Any]:
    """A run that records no stream protocol (made before data/protocol.py) edited the default stream:
    ``one_per_fact``, revisit 1, each edit a distinct fact."""
    row = dict(row)
    if key_value(row.get("protocol")) is None:
        row["protocol"] = "one_per_fact"
    if key_value(row.get("revisit")) is None:
        row["revisit"] = 1
    plain = row["protocol"] == "one_per_fact" and key_value(row["revisit"]) == 1
    if plain and math.isnan(num(row.get("num_facts"))):
        row["num_facts"] = num(row.get("num_edits"))
    return row


def row_from_payload(payload: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One frame row from a results.json payload (or a W&B run shaped like one)."""
    cfg = payload.get("config") or {}
    metrics = payload.get("metrics") or {}
    row: dict[str, Any] = {"source": source, "status": "ok", "reason": "",
                           **_settings(payload.get("choices") or {}, cfg)}
    if metrics.get("num_edits") is not None:
        row["num_edits"] = int(metrics["num_edits"])
    for key in SCALAR_METRICS:
        row[key] = num(metrics.get(key))
    for block in ("at_edit_time", "retention", "retention_base"):
        for task, value in (metrics.get(block) or {}).items():
            row[f"{block}.{task}"] = num(value)
    stream = payload.get("dataset_protocol") or {}
    for key in ("protocol", "revisit"):
        row[key] = stream.get(key, row[key])
    row["num_facts"] = num(stream.get("num_facts"))
    timings = payload.get("timings") or {}
    resumed = (payload.get("stream") or {}).get("resumed_from") is not None
    # a run resumed before the wall time was kept across processes recorded only its last part: unknown
    old_resumed = resumed and "wall_seconds_this_process" not in timings
    row["wall_seconds"] = None if old_resumed else num(timings.get("wall_seconds"))
    versions = payload.get("versions") or {}
    cuda = versions.get("cuda")
    row["device"] = cuda if cuda and cuda != "none" else versions.get("processor")
    row["git_commit"] = payload.get("git_commit")
    row["curve"] = json.dumps(payload.get("curves") or [])  # for --from-curves
    row["costs"] = json.dumps(payload.get("costs") or [])  # seconds editing up to each curve point (scale)
    row["editor_config"] = json.dumps(cfg.get("editor") or {}, sort_keys=True)  # for the ablation table
    return row


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-200:] if lines else ""


def _checkpoint_state(run_dir: Path, cfg: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The run's ``latest.json`` (edits done, why it was saved), or None where it saved no checkpoint."""
    from evaluation.run.checkpoint import (
        CheckpointManager,  # torch: only for folders without results.json
    )

    ckpt = cfg.get("checkpoint")
    sub = ckpt.get("dir") if isinstance(ckpt, Mapping) else None
    directory = sub if isinstance(sub, str) and not sub.startswith("${") else "checkpoints"
    return CheckpointManager(run_dir / directory).pointer()


def failed_row(run_dir: Path, reason: str) -> dict[str, Any]:
    """A run folder that has Hydra's record of the job but no (readable) results.json: ``running`` where a
    live process holds it, else ``unfinished`` where it saved a stream checkpoint, ``failed`` where it did not."""
    from omegaconf import OmegaConf

    choices: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    try:
        hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
        choices = OmegaConf.to_container(OmegaConf.select(hydra_cfg, "hydra.runtime.choices") or {}, resolve=False)
    except Exception:  # noqa: BLE001 - a half-written folder is still listed
        pass
    try:
        loaded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        cfg = OmegaConf.to_container(loaded, resolve=False)  # type: ignore[assignment]
    except Exception:  # noqa: BLE001
        pass
    status = "failed"
    running = held_by_another(run_dir)
    if running:  # a run in progress (e.g. a sweep's), not a failure
        status, reason = "running", "a live process holds the folder: the run is in progress"
    state = _checkpoint_state(run_dir, cfg)
    if state is not None:
        dataset = cfg.get("dataset")
        total = dataset.get("num_edits") if isinstance(dataset, Mapping) else None
        done = f"{state['position']}/{total}" if isinstance(total, int) else str(state["position"])
        if running:
            reason += f"; checkpoint after {done} edits"
        else:
            status = "unfinished"
            reason += (f"; checkpoint after {done} edits ({state.get('reason', 'periodic')}): "
                       f"resume=true {run_dir_override(run_dir)} continues it")
    logs = sorted(run_dir.glob("*.log"))
    last = _last_line(logs[0]) if logs else ""
    if last:
        reason += f"; last log line: {last}"
    row = {"source": str(run_dir), "status": status, "reason": reason, **_settings(choices, cfg)}
    # unresolved interpolations (``${...}``) are not settings we can group on
    return {k: (None if isinstance(v, str) and v.startswith("${") else v) for k, v in row.items()}


def frame_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a per-run frame this module wrote (``<out>.csv``), as :func:`collect_runs` gives them.

    ``outputs/`` is not kept from one machine to the next; the committed frames are, so a table can
    put new runs beside runs whose folders are gone.
    """
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise TablesError(f"{path}: not a per-run frame written by evaluation.reporting.tables ({err})") from None
    missing = {"source", "status", "editor", "model", "dataset"} - set(frame.columns)
    if missing:
        raise TablesError(f"{path}: not a per-run frame written by evaluation.reporting.tables "
                          f"(no column {sorted(missing)[0]!r})")
    frame = frame.astype(object).where(frame.notna(), None)
    return [{k: v for k, v in row.items()} for row in frame.to_dict("records")]


def collect_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows for every results.json under ``paths`` and every run folder that has none.

    A run listed both in a committed frame and as a folder given here counts once, from its folder,
    so a table can be made again from the frame it wrote and the folders it added.
    """
    rows: dict[str, dict[str, Any]] = {}
    for root in map(Path, paths):
        if not root.exists():
            raise TablesError(f"no such file or folder: {root}")
        if root.suffix == ".csv":  # a committed per-run frame (<out>.csv): its runs' folders may be gone
            for row in frame_rows(root):
                rows.setdefault(str(Path(str(row["source"])).resolve()), row)
            continue
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for file in files:
            key = str(file.parent.resolve())
            try:
                payload = read_results(file)
            except BadResults as err:
                rows[key] = {**failed_row(file.parent, str(err)), "status": "failed"}
                continue
            rows[key] = row_from_payload(payload, str(file.parent))
        if root.is_dir():
            for hydra_dir in sorted(root.rglob(".hydra")):
                run_dir = hydra_dir.parent
                key = str(run_dir.resolve())
                if key not in rows and not (run_dir / "results.json").exists():
                    rows[key] = failed_row(run_dir, "no results.json (the run failed or has not finished)")
    return list(rows.values())


def collect_wandb(path: str) -> list[dict[str, Any]]:
    """Rows for the runs of a W&B project ``ENTITY/PROJECT`` (needs ``wandb`` and a login)."""
    try:
        import wandb
    except ImportError as err:  # pragma: no cover - wandb is a dependency
        raise TablesError(f"--wandb needs the wandb package ({err})") from None
    try:
        runs = list(wandb.Api().runs(path))
    except Exception as err:  # noqa: BLE001 - network, login, unknown project
        raise TablesError(f"could not read W&B runs of {path}: {err}") from None
    rows = []
    for run in runs:
        config = dict(run.config)
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        metrics: dict[str, Any] = {k: v for k, v in summary.items() if "/" not in k}
        metrics["retention"] = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("retention/")}
        source = f"wandb:{path}/{run.id}"
        payload = {"config": config.get("config", {}), "choices": config.get("choices", {}), "metrics": metrics}
        if run.state == "finished" and "reliability" in metrics:
            rows.append(row_from_payload(payload, source))
        else:
            row = {"source": source, "status": "failed", "reason": f"W&B state {run.state}",
                   **_settings(payload["choices"], payload["config"])}
            rows.append(row)
    return rows


#: columns that say where or when a run ran, not what it computed: runs differing only in these are repeats
_PROVENANCE = ("source", "status", "reason", "device", "git_commit")


def shared_seed_warnings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Finished runs with the same settings and the same seed: a table would average them as if they
    were seeds (a rerun, or the same run read twice through a folder and a frame)."""
    groups: dict[tuple, list[tuple[str, Any]]] = {}
    for row in map(stream_defaults, rows):
        if row.get("status") == "ok":
            key = tuple((c, str(key_value(row.get(c)))) for c in KEY_COLUMNS if c not in _PROVENANCE)
            groups.setdefault(key, []).append((str(row.get("source")), row.get("editor_config")))
    out = []
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        sources = ", ".join(source for source, _ in runs)
        what = ("every setting" if len({config for _, config in runs}) == 1 else
                "every setting the tables key on (their editor settings differ: the ablation table tells them apart)")
        out.append(f"{len(runs)} finished runs share seed {dict(key).get('seed')} and {what}; a cell averages them "
                   f"as if they were different seeds: {sources}")
    return out


def runs_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame([stream_defaults(row) for row in rows])
    for col in (*KEY_COLUMNS, *SCALAR_METRICS, *AT_EDIT_TIME, *RUN_VALUES):
        if col not in frame.columns:
            frame[col] = None if col in KEY_COLUMNS else math.nan
    return frame
