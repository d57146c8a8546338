"""Per-example retention outputs: reuse of the unedited continuations for rows out of scope equals
regeneration, stored outputs re-score to the stored scores, and the diff command."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra.utils import instantiate

from data.requests import EditRequest
from evaluation.editing.generation import make_generate_fn
from evaluation.editing.unedited import Unedited
from evaluation.reporting.retention_items import diff_runs, main, rescore_run
from evaluation.retention.outputs import item_ids, read_items, task_file, write_items
from evaluation.retention.suite import Gu2024Suite, RetentionReport
from evaluation.run.compose import compose_config
from evaluation.run.loggers import NullLogger
from tests.conftest import RETENTION_DATA, tiny_model

pytestmark = pytest.mark.skipif(not RETENTION_DATA.is_dir(), reason=f"retention data not at {RETENTION_DATA}")

TASKS = ["rte", "sst2", "gsm8k"]


class Counting:
    """A generate function that counts the prompts it is asked to continue."""

    def __init__(self, generate):
        self.generate, self.prompts = generate, 0

    def __call__(self, prompts, max_new_tokens, desc=""):
        self.prompts += len(prompts)
        return self.generate(prompts, max_new_tokens, desc=desc)


def _suite(reuse: bool) -> Gu2024Suite:
    return Gu2024Suite(str(RETENTION_DATA), tasks=TASKS, limit=3, reuse_unedited=reuse)


@pytest.fixture(scope="module")
def base() -> RetentionReport:
    """The tiny model's unedited retention report (the model is the same for every test: seeded)."""
    loaded = tiny_model("tiny_llama")
    return _suite(True).evaluate(make_generate_fn(loaded.model, loaded.tokenizer, Unedited(loaded), progress=False))


def _edited(editor_name: str, *overrides: str):
    """An editor on a fresh tiny model whose edits are the first retention prompt of each task: those
    rows are in the router's scope, the others (unrelated text) are not."""
    loaded = tiny_model("tiny_llama")
    suite = _suite(True)
    cfg = compose_config([f"editor={editor_name}", "model=tiny_llama", *overrides])
    editor = instantiate(cfg.editor, _partial_=True)(model=loaded)
    prompts = [suite.tasks[t].prompts(suite.examples(t))[0] for t in TASKS]
    requests = [EditRequest.make(i, p, " Z", [p], [("The sky is", " blue")]) for i, p in enumerate(prompts)]
    step = getattr(editor.config, "batch_size", 1)
    for start in range(0, len(requests), step):
        editor.edit(requests[start:start + step])
    return editor


# ELDER on a random tiny model: most prompts share the edits' codes at the default Hamming threshold;
# epsilon=1 keeps exactly the prompts whose code equals a stored one (the edits) in scope
SETTINGS = {"elder": ["editor.epsilon=1"]}


@pytest.mark.parametrize("editor_name", ["grace", "melo", "elder", "defer"])
def test_rows_out_of_scope_reuse_the_unedited_continuation_and_equal_regeneration(editor_name, base, one_thread):
    editor = _edited(editor_name, *SETTINGS.get(editor_name, []))

    def in_scope(prompts):
        return editor.in_scope(prompts)

    gen_reuse = Counting(make_generate_fn(editor.model, editor.tokenizer, editor, progress=False))
    gen_all = Counting(make_generate_fn(editor.model, editor.tokenizer, editor, progress=False))
    reused = _suite(True).evaluate(gen_reuse, in_scope=in_scope, unedited=base)
    regenerated = _suite(False).evaluate(gen_all, in_scope=in_scope, unedited=base)

    routed = [r for t in TASKS for r in reused.routed[t]]
    assert any(routed) and not all(routed), f"{editor_name}: the case needs rows in and out of scope"
    assert reused.outputs == regenerated.outputs  # bit for bit, every row
    assert reused.scores == regenerated.scores
    assert gen_reuse.prompts == sum(routed) < gen_all.prompts == len(routed)
    for t in TASKS:
        assert reused.reused_rows[t] == [not r for r in reused.routed[t]]
        assert regenerated.reused_rows[t] == [False] * len(regenerated.outputs[t])
    # the reuse is not vacuous: some rows in scope generate something other than the unedited text
    assert any(reused.outputs[t][i] != base.outputs[t][i] for t in TASKS
               for i, r in enumerate(reused.routed[t]) if r)


def test_an_editor_without_a_router_regenerates_every_row(base, one_thread):
    editor = _edited("ft_l")
    gen = Counting(make_generate_fn(editor.model, editor.tokenizer, editor, progress=False))
    report = _suite(True).evaluate(gen, in_scope=editor.in_scope, unedited=base)
    assert all(report.routed[t] is None for t in TASKS)
    assert gen.prompts == sum(len(report.outputs[t]) for t in TASKS)
    assert not any(r for t in TASKS for r in report.reused_rows[t])


def test_a_run_stores_every_item_and_its_outputs_rescore_to_the_stored_scores(tmp_path: Path, one_thread):
    from evaluation.run.experiment import run_experiment

    overrides = ["model=tiny_llama", "editor=grace", "dataset.num_edits=3", "progress=false", "logger=none",
                 "retention.limit=3", "retention.tasks=[rte,nq,samsum,conll03]",
                 f"retention.cache_dir={tmp_path / 'cache'}", f"logger._target_={__name__}.SummaryFile"]
    run = tmp_path / "run"
    out = run_experiment(compose_config(overrides), run, {"editor": "grace", "model": "tiny_llama", "dataset": "zsre"})
    for pass_name, group in (("edited", "retention"), ("unedited", "retention_base")):
        rescored = rescore_run(run, pass_name)
        assert set(rescored) == {"rte", "nq", "samsum", "conll03"}
        for task, res in rescored.items():
            assert res["rescored"] == res["stored"] == out["metrics"][group][task], (pass_name, task)
            assert res["authors_score"] == res["stored_authors"] == out["metrics"][f"{group}_details"][task][
                "authors_score"], (pass_name, task)
            assert res["changed_items"] == []
    # each task's authors'-code score reaches the logger's summary (W&B) beside the headline
    summary = json.loads((run / SummaryFile.FILE).read_text())
    assert {k: summary[f"retention_authors/{k}"] for k in rescored} == {
        k: d["authors_score"] for k, d in out["metrics"]["retention_details"].items()}
    assert "retention_base_authors/nq" in summary
    rows = read_items(task_file(run, "edited", "conll03"))
    assert [r["id"] for r in rows[:5]] == ["0.0", "0.1", "0.2", "0.3", "1.0"]  # four prompts per sentence
    assert {"id", "prompt", "continuation", "stop", "tokens", "reference", "prediction", "authors", "routed",
            "reused"} <= set(rows[0])
    assert all(isinstance(r["reference"], list) for r in rows)  # CoNLL03: the gold entities of the type
    # every row says why it stopped: the budget (10 new tokens) or the end token, before the budget
    for task, budget in (("conll03", 10), ("nq", 20), ("samsum", 25), ("rte", 1)):
        for r in read_items(task_file(run, "unedited", task)):
            assert (r["stop"], r["tokens"] == budget) in (("budget", True), ("eos", False)), (task, r)
    # a row whose stored score no longer matches its output is named by rescore
    path = task_file(run, "edited", "rte")
    tampered = read_items(path)
    tampered[1]["authors"] = 1.0 - tampered[1]["authors"]
    write_items(path, tampered)
    assert rescore_run(run, "edited")["rte"]["changed_items"] == [tampered[1]["id"]]
    write_items(path, [{k: v for k, v in r.items() if k != "stop"} for r in tampered])  # rows of an older run
    assert rescore_run(run, "edited")["rte"]["rescored"] == out["metrics"]["retention"]["rte"]
    assert all(isinstance(r["routed"], bool) for r in rows)
    assert all(r["routed"] is None for r in read_items(task_file(run, "unedited", "rte")))
    # an edited pass that generated only in-scope rows says how many (GRACE: nothing here is in scope)
    results = json.loads((run / "results.json").read_text())
    generated = results["retention_tasks"]["edited"]["generated_rows"]
    assert generated == {t: sum(r["routed"] for r in read_items(task_file(run, "edited", t)))
                         for t in ("rte", "nq", "samsum", "conll03")}
    # the routing queries were computed once per task and stored: a run of another state reads them
    assert results["retention_tasks"]["edited"]["routing_queries"] == {"read": 0, "computed": 4}
    other = run_experiment(compose_config([*overrides, "dataset.num_edits=2"]), tmp_path / "other",
                           {"editor": "grace", "model": "tiny_llama", "dataset": "zsre"})
    assert json.loads((tmp_path / "other" / "results.json").read_text())[
        "retention_tasks"]["edited"]["routing_queries"] == {"read": 4, "computed": 0}
    assert other["metrics"]["retention"] == out["metrics"]["retention"]  # nothing in scope either way


class SummaryFile(NullLogger):
    """A logger that writes the run's summary (what W&B's run summary receives) to a file in its folder."""

    FILE = "summary.json"

    def start(self, run_dir: str, name: str, config: Any, resume_id: str | None = None) -> None:
        self.path = Path(run_dir) / self.FILE

    def summary(self, metrics: Any) -> None:
        self.path.write_text(json.dumps(dict(metrics)))


def _fixture_run(folder: Path, continuations: list[str]) -> None:
    rows = [{"id": i, "prompt": f"prompt {i}", "continuation": c, "score": 0.0, "authors": 0.0, "routed": None,
             "reused": False} for i, c in zip(item_ids(len(continuations), len(continuations)), continuations)]
    write_items(task_file(folder, "edited", "rte"), rows)


def test_diff_prints_the_items_whose_outputs_differ(tmp_path: Path, capsys) -> None:
    _fixture_run(tmp_path / "a", [" True", " False", " True"])
    _fixture_run(tmp_path / "b", [" True", " True", " True"])
    res = diff_runs(tmp_path / "a", tmp_path / "b")
    assert res["rte"]["compared"] == 3 and [ra["id"] for ra, _ in res["rte"]["differ"]] == ["1"]
    main(["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert "rte: 1 of 3 items differ" in printed and "- 1: prompt 1" in printed
    with pytest.raises(SystemExit, match="no per-example retention outputs"):
        main(["diff", str(tmp_path / "a"), str(tmp_path / "missing")])


def test_diff_names_the_items_only_one_run_holds(tmp_path: Path, capsys) -> None:
    _fixture_run(tmp_path / "a", [" True", " False", " True"])
    _fixture_run(tmp_path / "b", [" True"])  # e.g. a run with a smaller retention.limit
    res = diff_runs(tmp_path / "a", tmp_path / "b")
    assert (res["rte"]["compared"], res["rte"]["only_a"], res["rte"]["only_b"]) == (1, ["1", "2"], [])
    main(["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    assert f"- 2 item(s) only in {tmp_path / 'a'}: 1, 2" in capsys.readouterr().out


def test_a_truncated_outputs_file_is_one_line_naming_it(tmp_path: Path) -> None:
    from evaluation.retention.outputs import task_file

    _fixture_run(tmp_path / "a", [" True", " False", " True"])
    _fixture_run(tmp_path / "b", [" True", " True", " True"])
    path = task_file(tmp_path / "b", "edited", "rte")
    path.write_bytes(path.read_bytes()[:-25])  # cut inside its last row, as a full disk would
    with pytest.raises(SystemExit, match=rf"error: {path} line 3 is not a JSON row .* the file is damaged"):
        main(["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    # rescore reads the rows through the same reader
    from evaluation.common.errors import HarnessError
    from evaluation.retention.outputs import read_items

    with pytest.raises(HarnessError, match=r"line 3 is not a JSON row"):
        read_items(path)


def test_items_are_logged_as_a_wandb_table_offline(tmp_path: Path, caplog) -> None:
    pytest.importorskip("wandb")
    from evaluation.run.loggers import WandbLogger

    rows = [{"id": "0", "prompt": "p", "continuation": " True", "score": 1.0, "authors": 1.0, "standard": None,
             "routed": None, "reused": False},
            {"id": "1", "prompt": "q", "continuation": " False", "score": 0.0, "authors": 0.0, "standard": None,
             "routed": None, "reused": False}]
    logger = WandbLogger(mode="offline")
    assert logger.start(str(tmp_path), "run", {}) is not None
    logger.table("retention_outputs/edited/rte", rows)
    logger.finish()
    assert "W&B table failed" not in caplog.text
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/retention_outputs/edited/rte_*.table.json")
    stored = json.loads(table.read_text())
    assert stored["columns"] == list(rows[0]) and [r[2] for r in stored["data"]] == [" True", " False"]


def test_an_interrupted_run_keeps_the_outputs_of_every_task_it_finished(tmp_path: Path, monkeypatch, one_thread):
    import os
    import signal

    from evaluation.common.errors import HarnessError
    from evaluation.run.experiment import run_experiment

    continuations = Gu2024Suite._continuations

    def stop_at_the_second_edited_task(self, name, prompts, generate, in_scope, unedited):
        if unedited is not None and name == "sst2":  # the edited pass, after rte was stored
            os.kill(os.getpid(), signal.SIGTERM)
        return continuations(self, name, prompts, generate, in_scope, unedited)

    monkeypatch.setattr(Gu2024Suite, "_continuations", stop_at_the_second_edited_task)
    overrides = ["model=tiny_llama", "editor=grace", "dataset.num_edits=2", "progress=false", "logger=none",
                 "retention.limit=2", "retention.tasks=[rte,sst2]", f"retention.cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "run"
    with pytest.raises(HarnessError, match="stopped by SIGTERM during the retention suite"):
        run_experiment(compose_config(overrides), run, {"editor": "grace", "model": "tiny_llama", "dataset": "zsre"})
    assert not (run / "results.json").exists()
    for pass_name, tasks in (("unedited", ["rte", "sst2"]), ("edited", ["rte"])):  # what was done before the stop
        assert sorted(t for t in ("rte", "sst2") if task_file(run, pass_name, t).is_file()) == tasks, pass_name
        assert [r["id"] for r in read_items(task_file(run, pass_name, "rte"))] == ["0", "1"]
