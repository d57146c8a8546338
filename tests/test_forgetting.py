"""The forgetting record (per-batch accuracy at every curve point), its table/figures, and the width sweep."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from evaluation.run import forgetting as fg


def test_each_curve_point_records_every_batch_from_the_same_evaluation_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """Per-batch values averaged with the batch sizes are the curve point's reliability and generalization,
    they are the per-request scores of that point's one evaluation grouped by batch, and results.json keeps them."""
    from evaluation.run import stream
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment

    calls: list[dict[str, list[float]]] = []
    real = stream.evaluate_edits

    def spy(*args: Any, per_request_out: dict | None = None, **kwargs: Any) -> dict[str, float]:
        out = real(*args, per_request_out=per_request_out, **kwargs)
        calls.append({k: list(v) for k, v in (per_request_out or {}).items()})
        return out

    monkeypatch.setattr(stream, "evaluate_edits", spy)
    overrides = ["model=tiny_llama", "dataset.num_edits=10", "retention=none", "progress=false", "eval_every=4",
                 "editor.iterations=10", "logger=none", "checkpoint.every=0"]
    run_experiment(compose_config(overrides), tmp_path, {"editor": "elder", "model": "tiny_llama", "dataset": "zsre"})
    res = json.loads((tmp_path / "results.json").read_text())
    curves, points = res["curves"], res["forgetting"]
    assert [p["edits"] for p in points] == [c["edits"] for c in curves] == [4, 8, 10]
    assert len(calls) == 3  # one evaluation per curve point: the record costs no extra pass
    assert [p["batch_size"] for p in points] == [4, 4, 4]
    assert [len(p["reliability"]) for p in points] == [1, 2, 3]  # the last batch of 10 edits holds 2
    for point, curve, per_request in zip(points, curves, calls):
        for metric in ("reliability", "generalization"):
            assert fg.weighted_mean(point, metric) == pytest.approx(curve[metric], abs=1e-12)
            assert point[metric] == fg.batch_means(per_request[metric], 4)
    assert points[-1]["reliability"][-1] == pytest.approx(sum(calls[-1]["reliability"][8:]) / 2)
    assert any(v > 0 for p in points for v in p["reliability"])  # something was learned, so this tests something


def test_a_resumed_stream_has_the_uninterrupted_forgetting_record(tmp_path: Path, one_thread: None) -> None:
    from evaluation.editing.unedited import Unedited
    from evaluation.run.checkpoint import (
        CheckpointManager,
        StreamCheckpoint,
        checkpoint_name,
    )
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import base_locality_predictions
    from evaluation.run.stream import run_stream

    cfg = compose_config(["model=tiny_llama", "dataset.num_edits=12", "editor.iterations=5"])

    def fresh() -> tuple[Any, list, list]:
        seed_everything(0)
        requests, loaded = build(cfg.dataset).load(), build(cfg.model)
        return build(cfg.editor, model=loaded), requests, base_locality_predictions(Unedited(loaded), requests)

    editor, requests, base = fresh()
    manager = CheckpointManager(tmp_path, every=4, keep=5)
    full = run_stream(editor, requests, base, NullLogger(), 4, progress=False, checkpoints=manager)
    assert [p["edits"] for p in full.forgetting] == [4, 8, 12]
    saved = CheckpointManager.read(tmp_path / checkpoint_name(4))
    assert saved.forgetting == full.forgetting[:1]  # the record travels in the checkpoint file
    editor, requests, base = fresh()
    resumed = run_stream(editor, requests, base, NullLogger(), 4, progress=False, resume=saved)
    assert resumed.resumed_from == 4
    assert resumed.forgetting == full.forgetting and resumed.curves == full.curves
    # resuming the finished, evaluated stream (to add retention tasks) keeps the record without evaluating
    end = CheckpointManager.read(tmp_path / checkpoint_name(12))
    assert end.final_metrics is not None
    done = run_stream(editor, requests, base, NullLogger(), 4, progress=False, resume=end)
    assert done.forgetting == full.forgetting
    # killed during the final evaluation: the end checkpoint owes its point, which the resumed run adds
    end.final_metrics, end.curves, end.forgetting, end.curve_due = None, end.curves[:-1], end.forgetting[:-1], True
    editor, requests, base = fresh()
    owed = run_stream(editor, requests, base, NullLogger(), 4, progress=False, resume=end)
    assert owed.forgetting == full.forgetting and owed.curves == full.curves
    # a checkpoint written before the record existed still loads
    payload = saved.to_payload()
    del payload["forgetting"]
    assert StreamCheckpoint.from_payload(payload).forgetting == []


# --- the table: numbers on a made-up results.json ------------------------------------------------------
RUN_A = [  # batches of 2; 5 edits, so the last batch holds one edit
    {"edits": 2, "batch_size": 2, "reliability": [1.0], "generalization": [0.5]},
    {"edits": 4, "batch_size": 2, "reliability": [0.5, 1.0], "generalization": [0.0, 1.0]},
    {"edits": 5, "batch_size": 2, "reliability": [0.0, 0.5, 1.0], "generalization": [0.0, 0.5, 1.0]},
]
RUN_B = [  # batches of 1, two points
    {"edits": 2, "batch_size": 1, "reliability": [1.0, 1.0], "generalization": [0.0, 1.0]},
    {"edits": 4, "batch_size": 1, "reliability": [1.0, 1.0, 0.0, 1.0], "generalization": [0.0, 1.0, 0.0, 0.0]},
]


def write_run(root: Path, name: str, editor: str, points: list[dict[str, Any]] | None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    edits = points[-1]["edits"] if points else 4
    payload = {"config": {"seed": 0, "dataset": {"num_edits": edits}, "editor": {}},
               "choices": {"editor": editor, "model": "tiny_llama", "dataset": "zsre"},
               "metrics": {"reliability": 0.5, "generalization": 0.5, "locality": 1.0, "num_edits": edits},
               "curves": [], "versions": {}, "git_commit": "abc"}
    if points is not None:
        payload["forgetting"] = points
    (run / "results.json").write_text(json.dumps(payload))
    return run


def test_cells_heatmap_and_ages_of_a_made_up_record() -> None:
    cells = fg.cells(RUN_A)
    assert [(c.batch, c.edits, c.age, c.size) for c in cells] == [
        (0, 2, 0, 2), (0, 4, 2, 2), (1, 4, 0, 2), (0, 5, 3, 2), (1, 5, 1, 2), (2, 5, 0, 1)]
    assert [c.reliability_just_after for c in cells] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [c.generalization_just_after for c in cells] == [0.5, 0.5, 1.0, 0.5, 1.0, 1.0]
    xs, ranges, matrix = fg.heatmap(RUN_A, "reliability")
    assert xs == [2, 4, 5] and ranges == [(1, 2), (3, 4), (5, 5)]
    assert matrix[0] == [1.0, 0.5, 0.0] and matrix[1][1:] == [1.0, 0.5] and matrix[2][2] == 1.0
    assert math.isnan(matrix[1][0]) and math.isnan(matrix[2][0]) and math.isnan(matrix[2][1])

    young, old = fg.age_table(cells, 2)
    assert (young["age_from"], young["age_to"], young["cells"], young["edits"]) == (0, 1, 4, 7)
    assert young["reliability"] == pytest.approx(6 / 7) and young["generalization"] == pytest.approx(5 / 7)
    assert young["reliability_retained"] == pytest.approx(6 / 7)
    assert young["generalization_retained"] == pytest.approx(5 / 6)  # ÷ (2*0.5 + 2*1 + 2*1 + 1*1)
    assert (old["age_from"], old["cells"], old["reliability"], old["generalization"]) == (2, 2, 0.25, 0.0)
    assert old["reliability_retained"] == pytest.approx(0.25) and old["generalization_retained"] == 0.0
    assert fg.auto_age_bin([cells, fg.cells(RUN_B)]) == 2  # a multiple of both batch sizes (2 and 1)

    first = fg.first_edits_accuracy(RUN_A, 4)
    assert first["edits_counted"] == 4 and first["just_after"] == {"reliability": 1.0, "generalization": 0.75}
    assert first["by_point"] == [{"edits": 4, "reliability": 0.75, "generalization": 0.5},
                                 {"edits": 5, "reliability": 0.25, "generalization": 0.25}]
    assert first["retained"]["reliability"] == pytest.approx(0.25)


def test_forgetting_command_writes_heatmap_age_figures_and_their_numbers(tmp_path: Path) -> None:
    from evaluation.reporting.tables import main

    runs = tmp_path / "runs"
    write_run(runs, "a", "elder", RUN_A)
    write_run(runs, "b", "grace", RUN_B)
    write_run(runs, "old", "melo", None)  # made before runs recorded forgetting: listed, not drawn
    out = tmp_path / "out" / "forgetting"
    assert main(["forgetting", str(runs), "--out", str(out), "--age-bin", "2"]) == 0

    heat = pd.read_csv(tmp_path / "out" / "forgetting_heatmap.csv")
    assert len(heat) == 6 + 6  # run A: 6 (batch, point) cells; run B: 2 + 4
    a = heat[heat["run"] == "ELDER, 5 edits"].set_index(["batch", "edits"])
    assert a.loc[(1, 5), "age"] == 1 and a.loc[(1, 5), "reliability"] == 0.5
    assert a.loc[(0, 5), "reliability_just_after"] == 1.0 and a.loc[(2, 5), "size"] == 1
    ages = pd.read_csv(tmp_path / "out" / "forgetting_age.csv")
    a_ages = ages[ages["run"] == "ELDER, 5 edits"].set_index("age_from")
    assert a_ages.loc[0, "reliability"] == pytest.approx(6 / 7) and a_ages.loc[2, "reliability"] == 0.25
    assert a_ages.loc[0, "generalization_retained"] == pytest.approx(5 / 6)
    b_ages = ages[ages["run"] == "GRACE, 4 edits"].set_index("age_from")
    # run B: ages 0,1 (2 at point 2, 2 at point 4 for edits 3-4) and ages 2,3 (edits 1-2 at point 4)
    assert b_ages.loc[0, "cells"] == 4 and b_ages.loc[0, "reliability"] == 0.75
    assert b_ages.loc[2, "reliability"] == 1.0 and b_ages.loc[2, "generalization_retained"] == 1.0
    for name in ("forgetting_heatmap.png", "forgetting_heatmap.pdf", "forgetting_age.png", "forgetting_age.pdf"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written atomically: no temporary left behind
    assert (tmp_path / "out" / "forgetting_age.png").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    md = out.with_suffix(".md").read_text()
    # rel. at the end (0*2 + .5*2 + 1*1)/5; gen. just after (.5*2 + 1*2 + 1*1)/5
    assert "| ELDER, 5 edits | 5 | 2 | 3 | 100.0 | 40.0 | 100.0 → 0.0 | 80.0 | 40.0 |" in md
    assert "| 0–1 | 85.7 | 75.0 |" in md
    assert "![forgetting](forgetting_heatmap.png)" in md and "![forgetting](forgetting_age.png)" in md
    assert "`" + str(runs / "old") + "`: no forgetting record" in md
    assert "100.0 $\\rightarrow$ 0.0" in out.with_suffix(".tex").read_text()

    assert main(["forgetting", str(runs), "--out", str(out), "--age-bin", "2", "--normalise"]) == 0
    # retained fractions; run B's third edit was not held just after editing, so it is left out
    assert "| 0–1 | 0.86 | 1.00 |" in out.with_suffix(".md").read_text()


# --- the width sweep ---------------------------------------------------------------------------------
def test_width_sweep_layers_scale_with_depth_and_the_stream_is_fixed() -> None:
    from benchmarks import width_sweep as ws
    from evaluation.run.compose import compose_config

    elder = compose_config(["model=tiny_llama", "editor=elder"]).editor
    assert ws.layer_overrides(elder, 8) == ([], [])
    scaled, _ = ws.layer_overrides(elder, 16)
    assert scaled == ["editor.query_layer=2", "editor.layers=[3,4,5,6,7,8]"]
    scaled, notes = ws.layer_overrides(elder, 4)
    assert scaled == ["editor.query_layer=0", "editor.layers=[1,2,3]", "editor.epsilon=6"] and notes
    grace = compose_config(["model=tiny_llama", "editor=grace"]).editor
    assert ws.layer_overrides(grace, 16)[0] == ["editor.layer=2"]

    a, b = ws.synthetic_stream(6, seed=0), ws.synthetic_stream(6, seed=1)
    assert a == ws.synthetic_stream(6, seed=0) and a != b
    assert all(r.paraphrase.endswith(" " + r.prompt) and r.paraphrase != r.prompt for r in a)
    assert len({r.prompt for r in a}) == 6 and all(len(r.prompt.split()) == 4 for r in a)
    perturbed = ws.synthetic_stream(6, seed=0, paraphrase="perturb")
    assert all(len(r.paraphrase) == len(r.prompt) and r.paraphrase != r.prompt for r in perturbed)
    assert ws.curve_positions(10, 4, 4) == [4, 8, 10] and ws.curve_positions(8, 1, 4) == [4, 8]
    first = fg.first_edits_accuracy(RUN_A, 2)  # edits 1-2: 1.0 at 2 edits, 0.5 at 4, 0.0 at 5
    assert [ws.after_later_edits(first, a, "reliability") for a in (0, 1, 2, 3)] == [1.0, 1.0, 0.5, 0.0]
    assert math.isnan(ws.after_later_edits(first, 10, "reliability"))  # the stream ends before


def test_width_sweep_runs_tiny_widths_and_writes_its_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             one_thread: None) -> None:
    from benchmarks import width_sweep as ws

    args = ["--widths", "16,32", "--num-edits", "8", "--editors", "elder", "--out", str(tmp_path),
            "--first-edits", "4", "--ages", "4", "editor.iterations=5"]
    assert ws.main(args) == 0
    printed = capsys.readouterr().out
    assert "timed elder at width 16" in printed and "estimated seconds" in printed
    rows = pd.read_csv(tmp_path / "sweep.csv")
    assert list(rows["width"]) == [16, 32] and list(rows["editor"]) == ["elder", "elder"]
    assert list(rows["intermediate"]) == [64, 96] and set(rows["edits_counted"]) == {4}
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["settings"]["num_edits"] == 8 and set(saved["estimates"]["seconds"]["elder"]) == {"16", "32"}
    res = json.loads((tmp_path / "runs" / "elder_w32" / "results.json").read_text())
    assert res["config"]["model"]["config"]["hidden_size"] == 32 and res["config"]["dataset"]["name"] == "synthetic"
    assert [p["edits"] for p in res["forgetting"]] == [4, 8] and res["choices"]["model"] == "random_llama_w32"
    first = ws.summarise("elder", 32, ws.parse_args(args), res)  # edits 1-4, read at 4 and at 8 edits
    assert first["reliability_first_just_after"] == res["forgetting"][0]["reliability"][0]
    at_8 = res["forgetting"][1]["reliability"][0]
    assert first["reliability_first_after_4"] == first["reliability_first_end"] == at_8
    # every batch by age: age 0 = each batch at the point right after it, age 4 = batch 1-4 at 8 edits
    ages = [p["reliability"][-1] for p in res["forgetting"]]
    assert first["reliability_all_age_0"] == pytest.approx(sum(ages) / 2) and first["reliability_all_age_4"] == at_8
    for name in ("width_sweep.png", "width_sweep.pdf", "forgetting_heatmap.png", "forgetting_age.csv"):
        assert (tmp_path / name).stat().st_size > 0
    # run again: the saved points are reused, not recomputed
    assert ws.main(args + ["--no-estimate", "--no-tables"]) == 0
    assert "elder width 32: reusing" in capsys.readouterr().out
