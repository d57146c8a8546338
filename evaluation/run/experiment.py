"""One run: build everything from the composed config, stream the edits, measure, save, log."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from data.lengths import model_context
from data.protocol import describe_stream
from evaluation.common.atomic import write_jsonl_atomic
from evaluation.common.errors import ConfigError, HarnessError
from evaluation.editing.answers import AnswerReading
from evaluation.editing.compilation import compile_blocks
from evaluation.editing.editor import Editor, check_batch_limit
from evaluation.editing.generation import make_generate_fn
from evaluation.editing.unedited import Unedited
from evaluation.retention.outputs import write_report_items
from evaluation.retention.query_store import QueryStore
from evaluation.retention.suite import PendingTaskLost
from evaluation.run.answer_metrics import answer_scoring
from evaluation.run.checkpoint import CheckpointManager, StreamCheckpoint, state_digest
from evaluation.run.folder import ANSWERS, RunFolder, RunFolderBusy
from evaluation.run.forgetting import at_edit_time
from evaluation.run.interrupts import stop_on_signals
from evaluation.run.metrics import base_locality_predictions, locality_prediction_cache
from evaluation.run.results import (
    git_commit,
    write_results,
)
from evaluation.run.resume_rules import (
    finished_run,
    resume_checkpoints,
    run_inputs,
    same_result,
)
from evaluation.run.settings import check_caches_writable, check_run_settings
from evaluation.run.stream import run_stream

log = logging.getLogger(__name__)

#: the run folder's store of retention tasks scored on the edited model (one file per task)
RETENTION_STORE = "retention"


def seed_everything(seed: int) -> None:
    """python, numpy and torch (CPU and all CUDA devices). Everything else random in the harness draws
    from generators seeded from ``seed`` too (model init, ELDER's routers/LoRAs and preset allocations,
    MELO/GRACE/Defer init, ROME's prefixes), so one seed fixes a run."""
    set_seed(seed)  # transformers': python, numpy, torch and every CUDA device


def set_deterministic(enabled: bool) -> tuple[bool, bool]:
    """``torch.use_deterministic_algorithms(enabled, warn_only=True)``; returns the previous setting.

    warn_only: an op without a deterministic kernel warns instead of failing. On CUDA, cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` set before its first use for reproducible matmuls.
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if enabled:
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    return previous


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node)``, but the target's own errors propagate as they are.

    Hydra wraps an exception raised by the target in an InstantiationException (the message becomes a
    repr); calling the partial ourselves keeps a HarnessError a HarnessError, so run.py prints its message.
    ``_partial_`` also keeps Hydra from turning objects passed as kwargs (the LoadedModel) into configs.
    """
    return instantiate(node, _partial_=True)(**kwargs)


def _config_key(node: Any) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(node, resolve=True).encode()).hexdigest()[:16]


def autocast_context(dtype: str | None, device: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for every forward of the run (``autocast=bfloat16``); off by default."""
    if not dtype:
        return contextlib.nullcontext()
    if dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"autocast must be null, bfloat16 or float16, got {dtype!r}")
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def run_experiment(cfg: DictConfig, run_dir: str | Path, choices: Mapping[str, str],
                   hydra_record: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run the configured stream; returns the payload written to ``run_dir/results.json``.

    ``run_dir`` is held for this process throughout (a second run there stops at once). Nothing in it
    changes before the config and the resume check pass; then ``hydra_record`` (file name -> text, Hydra's
    ``.hydra/`` files) is written.
    """
    run_dir = Path(run_dir)
    check_run_settings(cfg)
    with RunFolder(run_dir) as folder, contextlib.ExitStack() as stack:
        resume = cfg.resume
        inputs = run_inputs(cfg)
        finished = finished_run(run_dir) if resume == "auto" else None
        if finished is not None:
            if same_result(cfg, finished, inputs, run_dir):
                log.info("resume=auto: %s already holds a finished run of this config; nothing to do", run_dir)
                return {k: finished.get(k) for k in ("metrics", "curves", "forgetting", "timings")}
            resume = False  # a finished run of another config: set aside below, and this one starts afresh
        check_caches_writable(cfg)  # a run with work to do: a cache it cannot write fails now, not after the stream
        # before any work: a bad resume fails at once
        checkpoints, resume_from = resume_checkpoints(cfg, run_dir, resume, inputs)
        if run_dir.resolve() not in checkpoints.directory.resolve().parents:  # a checkpoint.dir of its own: held too
            checkpoints.directory.mkdir(parents=True, exist_ok=True)
            try:
                stack.enter_context(RunFolder(checkpoints.directory))
            except RunFolderBusy as err:
                raise ConfigError(f"checkpoint.dir {checkpoints.directory} is in use by another run ({err}); give "
                                  f"each run its own checkpoint.dir") from None
        folder.remove_temp_files()
        if resume_from is None:
            if checkpoints.exists():
                log.warning("a fresh run: removing the old checkpoints in %s", checkpoints.directory)
                checkpoints.clear()
            folder.set_aside_earlier_run()
            if (run_dir / RETENTION_STORE).exists():
                shutil.rmtree(run_dir / RETENTION_STORE)  # a new run: tasks scored by an earlier run do not count
        if hydra_record:
            folder.write_hydra_record(hydra_record)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        previous_deterministic = set_deterministic(cfg.deterministic)
        try:
            with autocast_context(cfg.autocast, str(cfg.model.get("device", "cpu"))):
                return _run(cfg, run_dir, choices, checkpoints, resume_from, inputs)
        finally:
            torch.use_deterministic_algorithms(previous_deterministic[0], warn_only=previous_deterministic[1])


def _collect_unedited(retention: Any, report: Any, model_key: str, checkpoints: CheckpointManager,
                      num_edits: int) -> Any:
    """The unedited retention report with the tasks other runs were generating during the stream read back."""
    if not report.pending:
        return report
    saved = checkpoints.last_saved == num_edits
    then = (f"the stream's end is saved: {checkpoints.resume_hint}, which generates it on the unedited model "
            f"first" if saved else "no checkpoint holds the stream's end: rerun the same command")
    with stop_on_signals(lambda sig: f"stopped by {sig} while waiting for the unedited retention tasks "
                                     f"{', '.join(report.pending)} from another run; {then}"):
        try:
            return retention.collect(report, cache_key=model_key)
        except PendingTaskLost as err:
            raise HarnessError(f"{err}; {then}") from None


def _run(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str], checkpoints: CheckpointManager,
         resume_from: StreamCheckpoint | None, inputs: Mapping[str, Any]) -> dict[str, Any]:
    seed_everything(cfg.seed)
    commit = git_commit()
    wall = time.perf_counter()
    timings: dict[str, float] = {}

    dataset = build(cfg.dataset)
    requests = dataset.load()  # before the model: bad data fails in seconds
    check_batch_limit(get_class(cfg.editor._target_), cfg.editor, len(requests))  # and an editor too small for them
    reading: AnswerReading = build(cfg.answers)  # and a bad answer reading
    # nothing here is worth a checkpoint (what is reused is cached), but a stop still says so in one line
    with stop_on_signals(lambda sig: f"stopped by {sig} before the first edit (loading the model and reading "
                                     f"the unedited model's answers); nothing is lost: rerun the same command"):
        start = time.perf_counter()
        loaded = build(cfg.model)
        timings["model_load_seconds"] = time.perf_counter() - start
        dataset.check_fits(requests, loaded.tokenizer, model_context(loaded.model))  # before any work on them
        # the stream's edit order (dataset.order): the file's, or LEMoE's plan on the model's prompt embeddings;
        # before the unedited locality, which is read per request in stream order
        requests = dataset.in_stream_order(requests, loaded.tokenizer, loaded.model.get_input_embeddings(),
                                           batch_size=OmegaConf.select(cfg, "editor.batch_size", default=1),
                                           seed=cfg.seed)
        compile_blocks(loaded, **cfg.compile)  # before the editors wrap anything: they are traced with the blocks
        retention = build(cfg.retention)

        # names the unedited model and how it generates; the edited model's key adds the editor and its state
        weights = str(inputs.get("model_weights") or "")  # where the config text does not pin the weights' content
        model_key = (f"{choices.get('model', 'model')}-{_config_key(cfg.model)}"
                     + (f"-w{hashlib.sha256(weights.encode()).hexdigest()[:12]}" if weights else "")
                     + (f"-{cfg.autocast}" if cfg.autocast else ""))
        # the unedited model's view: locality reference (teacher-forced and generated) and retention baseline
        unedited = Unedited(loaded)
        forward_key = f"{model_key}-{_config_key(cfg.compile)}"  # compiled blocks may round differently
        base_locality = base_locality_predictions(
            unedited, requests, batch_size=cfg.eval_batch_size, desc="unedited locality" if cfg.progress else None,
            cache=locality_prediction_cache(cfg.locality_cache_dir, forward_key) if cfg.locality_cache_dir else None)
        scorer, base_answers = answer_scoring(reading, unedited, requests, cfg.eval_batch_size,
                                              cfg.generation_token_budget, forward_key, cfg.progress)
    retention_base = None
    if retention.enabled:
        start = time.perf_counter()
        gen = make_generate_fn(loaded.model, loaded.tokenizer, unedited, cfg.eval_batch_size, cfg.progress,
                             token_budget=cfg.generation_token_budget)
        kept = ("are cached, so rerunning the same command skips them" if getattr(retention, "cache_dir", None)
                else "are lost (retention.cache_dir is null)")
        with stop_on_signals(lambda sig: f"stopped by {sig} during the unedited model's retention suite; "
                                         f"the tasks it finished {kept}"):
            # a task another run is generating is read after the stream, when the stream's end is saved
            # (if that run stops without it, a resume generates it on the unedited model before restoring)
            retention_base = retention.evaluate(gen, cache_key=model_key, defer_others=checkpoints.every > 0)
        timings["retention_base_seconds"] = time.perf_counter() - start
        write_report_items(retention, retention_base, run_dir, "unedited")  # kept if the run stops later

    # _partial_: Hydra would turn the LoadedModel dataclass into a config if passed as a kwarg
    editor: Editor = build(cfg.editor, model=loaded)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build(cfg.logger)
    name = "-".join(str(choices.get(k, "?")) for k in ("editor", "model", "dataset")) + f"-s{cfg.seed}"
    run_id = logger.start(str(run_dir), name, {"config": resolved, "choices": dict(choices)},
                          resume_id=resume_from.run_id if resume_from is not None else None)
    checkpoints.run_id = run_id
    try:
        stream = run_stream(editor, requests, base_locality, logger, cfg.eval_every, cfg.eval_batch_size,
                            cfg.progress, checkpoints=checkpoints, resume=resume_from, on_nan=cfg.on_nan,
                            started=wall, scorer=scorer, base_answers=base_answers, edit_time=cfg.edit_time_eval,
                            eval_at=cfg.eval_at, evaluation_parts_s=cfg.checkpoint.evaluation_every_s)
        timings["edit_seconds"] = stream.edit_seconds
        timings["eval_seconds"] = stream.eval_seconds
        metrics: dict[str, Any] = {
            **stream.metrics,
            "seconds_per_edit": stream.edit_seconds / len(requests),
            "trainable_params": editor.trainable_params(),
            "stored_params": editor.stored_params(),
            "num_edits": len(requests),
            "skipped_edits": sum(len(s["uids"]) for s in stream.skipped),
            # each batch scored right after it was edited (evaluation.run.forgetting.at_edit_time)
            "at_edit_time": at_edit_time(stream.forgetting),
        }
        if retention.enabled:
            pending = list(retention_base.pending)
            retention_base = _collect_unedited(retention, retention_base, model_key, checkpoints, len(requests))
            write_report_items(retention, retention_base, run_dir, "unedited", tasks=pending)
            start = time.perf_counter()
            gen = make_generate_fn(editor.model, editor.tokenizer, editor, cfg.eval_batch_size, cfg.progress,
                                 token_budget=cfg.generation_token_budget)
            edited_key = (f"{model_key}-{choices.get('editor', 'editor')}-{_config_key(cfg.editor)}"
                          f"-{state_digest(editor.state_dict())}")
            store = run_dir / RETENTION_STORE
            resumable = checkpoints.every > 0  # the stream saved its end state, so resume=true can skip the edits

            def on_stored(task: str, report: Any) -> None:
                write_report_items(retention, report, run_dir, "edited", tasks=[task])  # kept if the run stops
                seconds = stream.wall_seconds()  # a resume restores the stream's end: count the tasks done since
                if resumable and checkpoints.last_saved == len(requests) and seconds is not None:
                    checkpoints.note_wall(seconds)
            # routing queries read before any edited module are the unedited model's: kept across runs
            queries = (QueryStore(retention.cache_dir, f"{model_key}-{_config_key(cfg.compile)}")
                       if getattr(retention, "cache_dir", None) else None)
            in_scope = (queries.scope_fn(editor, cfg.eval_batch_size) if queries is not None
                        else lambda prompts: editor.in_scope(prompts, cfg.eval_batch_size))
            with stop_on_signals(lambda sig: f"stopped by {sig} during the retention suite after {len(requests)} "
                                             f"edits; the tasks it finished are kept in {store}" +
                                             (f"; to go on, {checkpoints.resume_hint}" if resumable else "")):
                # rows out of the router's scope keep the unedited continuation (equal bit for bit)
                after = retention.evaluate(gen, cache_key=edited_key, cache_dir=str(store), unedited=retention_base,
                                           in_scope=in_scope, on_stored=on_stored)
            timings["retention_seconds"] = time.perf_counter() - start
            metrics["retention"] = after.scores
            metrics["retention_base"] = retention_base.scores
            metrics["retention_ratio"] = after.ratio_to(retention_base)
            metrics["retention_details"] = after.details
            metrics["retention_base_details"] = retention_base.details
            # per task: seconds to generate and score (measured when it ran) and which were read from a cache
            retention_tasks = {name: {"seconds": report.seconds, "reused": report.reused}
                               for name, report in (("unedited", retention_base), ("edited", after))}
            # per task, how many rows the edited pass generated (in scope, or every row without a router)
            retention_tasks["edited"]["generated_rows"] = {
                t: len(rows) - sum(rows) for t, rows in after.reused_rows.items()}
            if queries is not None:  # tasks whose routing queries were read from an earlier run / computed
                retention_tasks["edited"]["routing_queries"] = {"read": queries.read, "computed": queries.computed}
            for pass_name, report in (("unedited", retention_base), ("edited", after)):
                for task, rows in write_report_items(retention, report, run_dir, pass_name).items():
                    logger.table(f"retention_outputs/{pass_name}/{task}", rows)
        # over all the run's processes where it was resumed (the checkpoint keeps the time so far)
        timings["wall_seconds"] = stream.wall_seconds()
        timings["wall_seconds_this_process"] = time.perf_counter() - wall
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for group in ("at_edit_time", "retention", "retention_base", "retention_ratio"):  # e.g. each task, the ratio
            flat.update({f"{group}/{k}": v for k, v in metrics.get(group, {}).items() if v is not None})
        for group in ("retention", "retention_base"):  # each task's score as the authors' code computes it
            flat.update({f"{group}_authors/{task}": d["authors_score"]
                         for task, d in metrics.get(f"{group}_details", {}).items() if "authors_score" in d})
        logger.summary(flat)
        stream_info = {"resumed_from": stream.resumed_from, "skipped": stream.skipped,
                       "checkpoints": str(checkpoints.directory), "wandb_run_id": run_id}
        # per curve point, each edit batch's reliability and generalization (evaluation/run/forgetting.py)
        extra: dict[str, Any] = {"choices": dict(choices), "stream": stream_info, "forgetting": stream.forgetting,
                                 "costs": stream.costs,  # seconds editing and evaluating up to each curve point
                                 "inputs": dict(inputs),  # the data's and the weights' content (run_inputs)
                                 "dataset_order": [r.uid for r in requests]}  # the edits' uids in stream order
        # dataset.protocol/revisit, the stream's entries, distinct facts and trained phrasings (data/protocol.py)
        extra["dataset_protocol"] = describe_stream(requests, dataset.protocol, dataset.revisit)
        if retention.enabled:
            extra["retention_tasks"] = retention_tasks
        if stream.answers:  # the generated answers of the edit-time points and the final evaluation
            write_jsonl_atomic(run_dir / ANSWERS, stream.answers)
            logger.table("answers", stream.answers)
        try:
            path = write_results(run_dir, resolved, metrics, stream.curves, timings, extra, commit=commit)
        except OSError as err:
            kept = (f"the stream's end is saved (checkpoint after {checkpoints.last_saved} edits): free space, "
                    f"then {checkpoints.resume_hint}, which writes the results without editing again"
                    if checkpoints.last_saved == len(requests) else "no checkpoint holds the stream's end")
            raise HarnessError(f"could not write {run_dir / 'results.json'}: {err.strerror}; {kept}") from None
        log.info("results written to %s", path)
        with stop_on_signals(lambda sig: f"stopped by {sig} while writing the editor's extra files (e.g. ELDER's "
                                         f"codes.npz) after the run's results were written to {path}; the results "
                                         f"are whole, the extra files are the earlier ones or none"):
            editor.write_artifacts(run_dir, requests, cfg.retention.get("data_dir") or f"{cfg.paths.data_dir}/retention")
        return {"metrics": metrics, "curves": stream.curves, "forgetting": stream.forgetting, "timings": timings}
    finally:
        logger.finish()
