"""The table builder: fixture results.json files become the paper's tables, missing and failed runs listed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.reporting import tables
from evaluation.reporting.tables import Options, build, collect_runs, main
from tests.conftest import RETENTION_DATA

EDITOR_CFG = {"elder": {"top_k": 2, "num_loras": 4, "guide_lambda": 0.01, "epsilon": 12, "aux_loss": "guided",
                        "layers": [20, 21, 22, 23, 24, 25]}}


def write_run(root: Path, name: str, editor: str, dataset: str, rel: float, gen: float, seed: int = 0,
              model: str = "smollm2", num_edits: int = 1000, params: int = 1000,
              curves: list[dict[str, Any]] | None = None, **metrics: Any) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    payload = {
        "config": {"seed": seed, "dataset": {"num_edits": num_edits}, "editor": EDITOR_CFG.get(editor, {}),
                   "retention": {"_target_": "evaluation.retention.suite.NoRetention"}},
        "choices": {"editor": editor, "model": model, "dataset": dataset, "experiment": "table1"},
        "metrics": {"reliability": rel, "generalization": gen, "locality": 1.0, "seconds_per_edit": 0.5,
                    "trainable_params": params, "stored_params": 0, "num_edits": num_edits, **metrics},
        "versions": {"cuda": "none", "processor": "x86_64"},
        "git_commit": "abc123",
        "curves": curves or [],
    }
    (run / "results.json").write_text(json.dumps(payload))
    return run


def write_failed(root: Path, name: str, editor: str, dataset: str, seed: int = 0, model: str = "smollm2",
                 num_edits: int = 1000, checkpoint_at: int | None = None, suite: bool | None = None) -> Path:
    """A run folder without results.json; ``checkpoint_at``: it saved a stream checkpoint after that many edits;
    ``suite``: its config has a retention suite (True), ``retention=none`` (False), or no retention key (None)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      editor: {editor}\n      model: {model}\n      dataset: {dataset}\n")
    retention = {None: "", False: "retention:\n  _target_: evaluation.retention.suite.NoRetention\n",
                 True: "retention:\n  _target_: evaluation.retention.suite.RetentionSuite\n  tasks: [sst2]\n"
                       "  limit: null\n"}[suite]
    (run / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\ndataset:\n  num_edits: {num_edits}\neditor:\n  seed: ${{seed}}\n{retention}")
    (run / "run.log").write_text("[INFO] - loading model\n[INFO] - edit 400/1000\n")
    if checkpoint_at is not None:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "latest.json").write_text(json.dumps(
            {"file": f"step-{checkpoint_at:06d}.pt", "position": checkpoint_at, "reason": "signal SIGTERM"}))
    return run


@pytest.fixture
def table1_runs(tmp_path: Path) -> Path:
    """Every Table 1 cell for SmolLM2 except ROME/CounterFact (missing) and MELO/CounterFact (failed);
    ELDER/ZsRE has two seeds."""
    root = tmp_path / "multirun"
    values = {"ft_l": (0.30, 0.20), "rome": (0.50, 0.40), "defer": (0.60, 0.10), "melo": (0.70, 0.50),
              "grace": (1.00, 0.00), "elder": (0.90, 0.70)}
    for editor, (rel, gen) in values.items():
        for dataset in ("zsre", "counterfact"):
            if (editor, dataset) in {("rome", "counterfact"), ("melo", "counterfact")}:
                continue
            write_run(root, f"{editor}_{dataset}_s0", editor, dataset, rel, gen)
    write_run(root, "elder_zsre_s1", "elder", "zsre", 0.80, 0.70, seed=1)
    write_failed(root, "melo_counterfact_s0", "melo", "counterfact")
    # GRACE's ZsRE run also scored the model's own answers (issue 33): its generated columns are filled
    grace = json.loads((root / "grace_zsre_s0" / "results.json").read_text())
    grace["metrics"].update(reliability_generated=0.25, generalization_generated=0.0)
    (root / "grace_zsre_s0" / "results.json").write_text(json.dumps(grace))
    return root


EXPECTED_TABLE1 = """\
### SmolLM2-135M (paper: LLaMA2-7B)

| Editor | ZsRE Rel. | paper | Δ | ZsRE Gen. | paper | Δ | ZsRE Rel. (generated) | ZsRE Gen. (generated) | CounterFact Rel. | paper | Δ | CounterFact Gen. | paper | Δ | CounterFact Rel. (generated) | CounterFact Gen. (generated) |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| FT-L | 30.00 | 32.21 | -2.21 | 20.00 | 28.96 | -8.96 | — | — | 30.00 | 66.26 | -36.26 | 20.00 | 44.65 | -24.65 | — | — |
| ROME | 50.00 | 77.60 | -27.60 | 40.00 | 74.53 | -34.53 | — | — | missing | 79.37 |  | missing | 80.30 |  | missing | missing |
| Defer | 60.00 | 53.82 | +6.18 | 10.00 | 51.32 | -41.32 | — | — | 60.00 | 68.82 | -8.82 | 10.00 | 57.75 | -47.75 | — | — |
| MELO | 70.00 | 64.57 | +5.43 | 50.00 | 42.93 | +7.07 | — | — | failed | 51.39 |  | failed | 35.71 |  | failed | failed |
| GRACE | 100.00 | 89.48 | +10.52 | 0.00 | 0.46 | -0.46 | 25.00 | 0.00 | 100.00 | 77.70 | +22.30 | 0.00 | 63.35 | -63.35 | — | — |
| ELDER | 85.00 ± 7.07 | 93.96 | -8.96 | 70.00 ± 0.00 | 90.21 | -20.21 | — | — | 90.00 | 95.07 | -5.07 | 70.00 | 90.79 | -20.79 | — | — |"""


def test_table1_from_fixture_runs_matches_the_expected_markdown(table1_runs: Path) -> None:
    report = build("table1", collect_runs([table1_runs]), Options())
    assert len(report.tables) == 1
    assert report.tables[0].markdown() == EXPECTED_TABLE1
    assert report.missing == ["ROME / smollm2 / CounterFact: missing", "MELO / smollm2 / CounterFact: failed"]
    assert len(report.failed) == 1
    failed = report.failed[0]
    assert "melo_counterfact_s0" in failed and "editor=melo" in failed and "dataset=counterfact" in failed
    assert "no results.json" in failed and "edit 400/1000" in failed  # the last line of the run's log


def test_a_run_stopped_after_a_checkpoint_is_unfinished_not_failed(tmp_path: Path) -> None:
    """A run folder with a stream checkpoint is ``unfinished`` (with how far it got and how to go on); a cell
    with one run that saved nothing is ``failed``."""
    root = tmp_path / "multirun"
    write_run(root, "grace_zsre", "grace", "zsre", 1.0, 0.0)
    stopped = write_failed(root, "defer_zsre", "defer", "zsre", checkpoint_at=610)
    write_failed(root, "defer_cf_s0", "defer", "counterfact", checkpoint_at=20)
    write_failed(root, "defer_cf_s1", "defer", "counterfact", seed=1)
    rows = {Path(r["source"]).name: r for r in collect_runs([root])}
    assert [rows[n]["status"] for n in ("grace_zsre", "defer_zsre", "defer_cf_s0", "defer_cf_s1")] == \
        ["ok", "unfinished", "unfinished", "failed"]
    assert f"checkpoint after 610/1000 edits (signal SIGTERM): resume=true hydra.run.dir={stopped}" \
        in rows["defer_zsre"]["reason"]
    report = build("table1", list(rows.values()), Options())
    assert ("| Defer | unfinished | 53.82 |  | unfinished | 51.32 |  | unfinished | unfinished | failed | 68.82 |"
            in report.tables[0].markdown())
    assert "Defer / smollm2 / ZsRE: unfinished" in report.missing
    assert "Defer / smollm2 / CounterFact: failed" in report.missing  # one of its two runs saved nothing
    assert sum("defer_zsre" in f and "unfinished" in f and "610/1000" in f for f in report.failed) == 1


def test_a_run_in_progress_is_running_not_failed(tmp_path: Path) -> None:
    """A sweep's table made while it runs: a folder a live process holds is ``running``, even before its first
    checkpoint; once nothing holds it, the same folder is ``failed``."""
    from evaluation.run.folder import RunFolder

    live = write_failed(tmp_path / "multirun", "defer_zsre", "defer", "zsre")
    with RunFolder(live):
        (row,) = collect_runs([tmp_path / "multirun"])
        assert row["status"] == "running" and "in progress" in row["reason"]
        assert "| Defer | running | 53.82 |" in build("table1", [row], Options()).tables[0].markdown()
    (row,) = collect_runs([tmp_path / "multirun"])
    assert row["status"] == "failed"


def test_cli_writes_markdown_latex_and_csv_and_lists_what_is_missing(table1_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "results" / "table1_smollm2"
    assert main(["table1", str(table1_runs), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert EXPECTED_TABLE1 in md
    assert "## Missing cells\n\n- ROME / smollm2 / CounterFact: missing\n- MELO / smollm2 / CounterFact: failed" in md
    assert "## Failed or unfinished runs" in md and "melo_counterfact_s0" in md
    assert f"Made by: `python -m evaluation.tables table1 {table1_runs} --out {out}`" in md
    tex = out.with_suffix(".tex").read_text()
    assert "\\begin{tabular}{lrrrrrrrrrrrrrrrr}" in tex
    assert "ELDER & 85.00 $\\pm$ 7.07 & 93.96 & -8.96 &" in tex
    assert "% failed: `" in tex and "% missing: ROME / smollm2 / CounterFact: missing" in tex
    csv = out.with_suffix(".csv").read_text().splitlines()
    assert len(csv) == 1 + 12  # header + 11 finished runs + 1 failed run


def test_paper_model_override_and_unknown_model(table1_runs: Path) -> None:
    rows = collect_runs([table1_runs])
    gpt = build("table1", rows, Options(paper_model="gpt2xl")).tables[0]
    assert gpt.title == "SmolLM2-135M (paper: GPT2-XL)"
    assert gpt.rows[-1][:4] == ["ELDER", "85.00 ± 7.07", "97.47", "-12.47"]
    other = build("table1", rows, Options(models=["phi"])).tables[0]
    assert other.rows[0] == ["FT-L"] + (["missing", "—", ""] * 2 + ["missing"] * 2) * 2


def test_several_stream_lengths_need_a_choice(tmp_path: Path) -> None:
    write_run(tmp_path, "a", "elder", "zsre", 0.5, 0.5, num_edits=1000)
    write_run(tmp_path, "b", "elder", "zsre", 0.1, 0.1, num_edits=40)
    rows = collect_runs([tmp_path])
    with pytest.raises(tables.TablesError, match="several stream lengths"):
        build("table1", rows, Options())
    table = build("table1", rows, Options(num_edits=40)).tables[0]
    assert table.rows[-1][1] == "10.00"


def test_tables_2_to_4(tmp_path: Path) -> None:
    retention = {t: 0.3 for t in ("gsm8k", "rte", "nq", "boolq", "mutual", "samsum", "conll03", "sst2")}
    base = {**retention, "average": 0.32}
    write_run(tmp_path, "e", "elder", "zsre", 0.9, 0.8, retention={**retention, "average": 0.30}, retention_base=base,
              params=3_164_184, seconds_per_edit=2.0)
    write_run(tmp_path, "g", "grace", "zsre", 1.0, 0.0, retention={**retention, "average": 0.31}, retention_base=base,
              params=4_096_000)
    rows = collect_runs([tmp_path])
    t2 = build("table2", rows, Options())
    avg = t2.tables[0]
    assert avg.rows[0][:4] == ["Base (unedited)", "32.0", "32.1", "-0.1"]
    assert avg.rows[-1][:4] == ["ELDER", "30.0", "32.3", "-2.3"]
    assert avg.rows[1][1] == "missing"  # FT-L
    # an unfinished run counts in Table 2 only where it runs a suite (a Table 1 run with retention=none does not)
    write_failed(tmp_path, "defer_cf", "defer", "counterfact", checkpoint_at=300, suite=False)
    write_failed(tmp_path, "ft_l_zsre", "ft_l", "zsre", checkpoint_at=1000, suite=True)
    avg = build("table2", collect_runs([tmp_path]), Options()).tables[0]
    assert avg.rows[0][4] == "missing"  # the unedited model on CounterFact: no run with a suite
    assert avg.rows[1][1] == "unfinished" and avg.rows[3][4] == "missing"  # FT-L ZsRE; Defer CounterFact
    for name in ("defer_cf", "ft_l_zsre"):
        shutil.rmtree(tmp_path / name)
    per_task = t2.tables[1]
    assert per_task.columns[1] == "GSM8K" and per_task.rows[-1][1:3] == ["30.0", "30.0"]

    t3 = build("table3", rows, Options()).tables[0]
    assert t3.rows[0][:7] == ["GRACE", "0.50", "7.47", "-6.97", "4.10", "4.10", "+0.00"]
    assert t3.rows[1][:7] == ["ELDER", "2.00", "2.12", "-0.12", "3.16", "1.60", "+1.56"]

    write_run(tmp_path, "nog", "elder", "zsre", 0.9, 0.5, **{})
    payload = json.loads((tmp_path / "nog" / "results.json").read_text())
    payload["config"]["editor"] = {**EDITOR_CFG["elder"], "aux_loss": "none"}
    (tmp_path / "nog" / "results.json").write_text(json.dumps(payload))
    t4 = build("table4", collect_runs([tmp_path]), Options()).tables[0]
    assert [r[:4] for r in t4.rows] == [["ELDER", "80.00", "90.21", "-10.21"],
                                        ["w/o guided loss", "50.00", "87.19", "-37.19"],
                                        ["w/ load balancing (instead)", "missing", "71.39", ""]]


def test_table2_draws_each_editor_beside_the_unedited_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluation.reporting import figures

    tasks = ("gsm8k", "rte", "nq", "boolq", "mutual", "samsum", "conll03", "sst2")
    base = {**{t: 0.5 for t in tasks}, "average": 0.5}
    runs = tmp_path / "runs"
    for seed, score in ((0, 0.2), (1, 0.4)):
        write_run(runs, f"e{seed}", "elder", "zsre", 0.9, 0.8, seed=seed, retention_base=base,
                  retention={**{t: score for t in tasks}, "gsm8k": 0.1, "average": score})
    write_run(runs, "c", "grace", "counterfact", 1.0, 0.0, retention_base=base,
              retention={**{t: 0.5 for t in tasks}, "average": 0.5})
    write_run(runs, "u", "grace", "zsre", 1.0, 0.0)  # no suite: neither in the table nor in the figure
    drawn: dict = {}
    real = figures.plot_retention

    def spy(bars: Any, labels: Any, out: Path, title: str) -> list[str]:
        drawn.update(bars=bars, labels=labels, title=title)
        return real(bars, labels, out, title)

    monkeypatch.setattr(figures, "plot_retention", spy)
    out = tmp_path / "out" / "table2"
    assert main(["table2", str(runs), "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".pdf").stat().st_size > 0
    assert "![table2](table2.png)" in out.with_suffix(".md").read_text()
    assert drawn["labels"][0] == "GSM8K" and drawn["labels"][-1] == "Avg." and len(drawn["labels"]) == 9
    assert set(drawn["bars"]) == {("smollm2", "zsre"), ("smollm2", "counterfact")}
    zsre = drawn["bars"][("smollm2", "zsre")]
    assert [label for label, _ in zsre] == ["Base (unedited)", "ELDER"]
    elder = zsre[1][1]
    assert elder[0].mean == pytest.approx(10.0) and elder[0].n == 2  # GSM8K, both seeds
    assert elder[1].mean == pytest.approx(30.0) and elder[1].std == pytest.approx(np.std([20, 40], ddof=1))
    assert zsre[0][1][-1].mean == pytest.approx(50.0)  # the unedited average, counted once
    assert [label for label, _ in drawn["bars"][("smollm2", "counterfact")]] == ["Base (unedited)", "GRACE"]


def test_retention_figure_keeps_each_editors_colour_across_panels(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluation.reporting import figures
    from evaluation.reporting.cells import Stat

    saved: list = []
    monkeypatch.setattr(figures, "_save", lambda fig, out: saved.append(fig) or [])
    stat = [Stat(50.0, float("nan"), 1)]
    # the second panel has no Defer: GRACE must not take Defer's colour there
    figures.plot_retention({("m", "zsre"): [("Base", stat), ("Defer", stat), ("GRACE", stat)],
                            ("m", "counterfact"): [("Base", stat), ("GRACE", stat)]}, ["Avg."], tmp_path / "f", "t")
    colours = [{bar.get_label(): bar.patches[0].get_facecolor() for bar in ax.containers} for ax in saved[0].axes]
    assert colours[0]["GRACE"] == colours[1]["GRACE"] != colours[0]["Defer"]
    assert colours[0]["Base"] == colours[1]["Base"]
    # the curves of Figure 2 and the readings share the rule
    point = (1000, Stat(50.0, float("nan"), 1), None, None)
    figures.plot_curves({("m", "zsre"): {"defer": [point], "grace": [point]}, ("m", "counterfact"): {"grace": [point]}},
                        "edits", tmp_path / "g", "t")
    lines = [{bars.get_label(): bars.lines[0].get_color() for bars in ax.containers} for ax in saved[1].axes[::2]]
    assert lines[0]["GRACE reliability"] == lines[1]["GRACE reliability"] != lines[0]["Defer reliability"]


def test_figure2_lists_missing_seeds_and_draws_png_and_pdf(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for editor, params in (("elder", 1_000_000), ("grace", 2_000_000)):
        for n in (1000, 2000):
            for seed in (0, 1, 2, 3, 4):
                if (editor, n, seed) in {("grace", 2000, 4), ("elder", 2000, 3)}:
                    continue
                write_run(runs, f"{editor}_{n}_{seed}", editor, "counterfact", 0.9 - seed / 100, 0.5, seed=seed,
                          num_edits=n, params=params * n // 1000)
    write_failed(runs, "grace_2000_4", "grace", "counterfact", seed=4, num_edits=2000)
    write_failed(runs, "elder_2000_3", "elder", "counterfact", seed=3, num_edits=2000, checkpoint_at=1500)
    out = tmp_path / "out" / "figure2"
    assert main(["figure2", str(runs), "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".pdf").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "| ELDER | 1000 | 88.00 ± 1.58 | 50.00 ± 0.00 | — | 1.00 ± 0.00 | 5 |" in md
    assert "| GRACE | 2000 | 88.50 ± 1.29 | 50.00 ± 0.00 | — | 4.00 ± 0.00 | 4 |" in md
    assert "- GRACE / smollm2 / CounterFact / edits=2000: seed(s) 4 failed\n" in md
    assert "- ELDER / smollm2 / CounterFact / edits=2000: seed(s) 3 unfinished\n" in md
    assert "- ELDER / smollm2 / CounterFact / edits=3000: seed(s) 0, 1, 2, 3, 4 missing\n" in md
    assert "![figure2](figure2.png)" in md


def test_figure2_from_curve_points_keeps_each_point_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def point(n: int, rel: float, params: int, **generated: float) -> dict[str, Any]:
        return {"edits": n, "reliability": rel, "generalization": rel / 2, "trainable_params": params, **generated}

    write_run(runs, "elder_20", "elder", "zsre", 0.6, 0.3, num_edits=20, params=500,
              curves=[point(10, 0.8, 500), point(20, 0.6, 500)])
    write_run(runs, "elder_30", "elder", "zsre", 0.5, 0.25, num_edits=30, params=500,  # shares 20
              curves=[point(12, 0.7, 500), point(20, 0.6, 500), point(30, 0.5, 500)])
    write_run(runs, "grace_20", "grace", "zsre", 1.0, 0.5, num_edits=20, params=2_000_000,
              curves=[point(10, 1.0, 1_000_000, reliability_generated=0.25),  # GRACE grows per key
                      point(20, 1.0, 2_000_000, reliability_generated=0.2)])
    write_failed(runs, "grace_30", "grace", "zsre", num_edits=30)
    out = tmp_path / "out" / "figure2"
    assert main(["figure2", str(runs), "--from-curves", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| ELDER | 10 | 80.00 | 40.00 | — | 0.00 | 1 |" in md  # one seed, not the same point twice
    assert "| ELDER | 30 | 50.00 | 25.00 | — | 0.00 | 1 |" in md
    assert "| GRACE | 10 | 100.00 | 50.00 | 25.00 | 1.00 | 1 |" in md  # its generated reliability, per point
    assert "| GRACE | 20 | 100.00 | 50.00 | 20.00 | 2.00 | 1 |" in md
    assert "| GRACE | 30 | failed | failed | failed | failed | 0 |" in md
    assert "edits=1000" not in md  # the paper's lengths are not expected from curves
    assert "| ELDER | 12 | 70.00 |" in md and "| GRACE | 12 |" not in md  # each editor's own points only
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_curve_point_equals_a_run_of_that_length() -> None:
    """What --from-curves relies on: after t edits of a longer stream, the metrics are those of a t-edit run."""
    import torch
    from hydra.utils import instantiate

    from evaluation.editing.unedited import Unedited
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import locality_inputs, predict
    from evaluation.run.stream import run_stream
    from tests.conftest import compose_config, zsre_requests

    torch.set_num_threads(1)
    cfg = compose_config(["model=tiny_llama", "editor.iterations=5", "editor.batch_size=2"])
    requests = zsre_requests(8)

    def stream(n: int, every: int) -> Any:
        loaded = instantiate(cfg.model)
        editor = instantiate(cfg.editor, _partial_=True)(model=loaded)
        base = predict(Unedited(loaded), *locality_inputs(requests[:n]))
        return run_stream(editor, requests[:n], base, NullLogger(), eval_every=every, progress=False)

    long, short = stream(8, 4), stream(4, 0)
    assert [p["edits"] for p in long.curves] == [4, 8]
    assert long.curves[0] == short.curves[-1]
    assert long.curves[0]["trainable_params"] > 0


def test_figure4_from_codes_dumped_by_a_tiny_elder(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from elder.codes_dump import dump_codes
    from tests.conftest import compose_config, zsre_requests

    cfg = compose_config(["model=tiny_llama", "editor.iterations=2"])
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    requests = zsre_requests(8)
    for i in range(0, 8, 4):
        editor.edit(requests[i:i + 4])
    run = write_run(tmp_path / "runs", "elder", "elder", "zsre", 0.5, 0.5, model="tiny_llama", num_edits=8)
    path = dump_codes(editor, requests, RETENTION_DATA, run / "codes.npz", n_task=6)
    assert path == run / "codes.npz"
    data = np.load(path)
    assert data["codes"].shape == (5 * 2 + 6, 6 * 4) and (data["codes"].sum(1) == 6 * 2).all()
    assert list(data["kind"][:2]) == ["edit", "paraphrase"] and (data["group"][-6:] == -1).all()
    assert data["text"][0] == requests[0].prompt and data["text"][1] == requests[0].paraphrase
    assert int(data["num_stored"]) == 8 and int(data["epsilon"]) == 12
    assert (data["deferred"] == (data["min_distance"] >= 12)).all()

    out = tmp_path / "out" / "figure4"
    assert main(["figure4", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".pdf").stat().st_size > 0
    assert "| `" in out.with_suffix(".md").read_text()
    assert dump_codes(object(), requests, None, tmp_path / "x.npz") is None  # editors without codes: nothing

    # a dump killed mid-write leaves the previous file whole (the write is atomic) ...
    good = path.read_bytes()

    def dies_mid_write(f, **arrays):
        f.write(good[:270])
        raise KeyboardInterrupt  # stands for the kill: nothing after it runs

    with pytest.MonkeyPatch.context() as m:
        m.setattr(np, "savez_compressed", dies_mid_write)
        with pytest.raises(KeyboardInterrupt):
            dump_codes(editor, requests, RETENTION_DATA, path, n_task=6)
    assert path.read_bytes() == good and not list(run.glob(".codes.npz.*"))
    # ... and a damaged file from elsewhere is named in the report, not a crash
    other = write_run(tmp_path / "runs", "elder2", "elder", "zsre", 0.5, 0.5, model="tiny_llama", num_edits=8, seed=1)
    (other / "codes.npz").write_bytes(good[:270])
    assert main(["figure4", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert f"`{other / 'codes.npz'}`: damaged (BadZipFile" in out.with_suffix(".md").read_text()


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["table1", str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_wandb_runs_become_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """--wandb reads runs through wandb.Api (faked here: no network in tests)."""
    import sys
    import types

    class FakeRun:
        def __init__(self, run_id: str, state: str, editor: str, rel: float) -> None:
            self.id, self.state = run_id, state
            self.config = {"config": {"seed": 0, "dataset": {"num_edits": 1000}, "editor": {}},
                           "choices": {"editor": editor, "model": "smollm2", "dataset": "zsre"}}
            self.summary = {"reliability": rel, "generalization": rel / 2, "num_edits": 1000,
                            "retention/average": 0.3, "_runtime": 5} if state == "finished" else {}

    class FakeApi:
        def runs(self, path: str) -> list[FakeRun]:
            assert path == "me/elder"
            return [FakeRun("a1", "finished", "grace", 0.8), FakeRun("b2", "crashed", "rome", 0.0)]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeApi))
    rows = tables.collect_wandb("me/elder")
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["retention.average"] == 0.3 and rows[0]["source"] == "wandb:me/elder/a1"
    report = build("table1", rows, Options())
    grace = report.tables[0].rows[4]
    assert grace[:7] == ["GRACE", "80.00", "89.48", "-9.48", "40.00", "0.46", "+39.54"]
    assert "ROME / smollm2 / ZsRE: failed" in report.missing
    assert any("wandb:me/elder/b2" in f and "crashed" in f for f in report.failed)


def test_figure3_groups_elder_runs_by_number_of_layers(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for L in (1, 2, 6):
        for seed in range(5):
            run = write_run(runs, f"L{L}_s{seed}", "elder", "zsre", 0.5 + L / 20, 0.4, seed=seed, params=1000 * L)
            payload = json.loads((run / "results.json").read_text())
            payload["config"]["editor"] = {**EDITOR_CFG["elder"], "layers": list(range(20, 20 + L)), "epsilon": 2 * L}
            (run / "results.json").write_text(json.dumps(payload))
    out = tmp_path / "out" / "figure3"
    assert main(["figure3", str(runs), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| ELDER | 1 | 55.00 ± 0.00 | 40.00 ± 0.00 | — | 0.00 ± 0.00 | 5 |" in md
    assert "| ELDER | 6 | 80.00 ± 0.00 | 40.00 ± 0.00 | — | 0.01 ± 0.00 | 5 |" in md
    assert "- ELDER / smollm2 / ZsRE / L=4: seed(s) 0, 1, 2, 3, 4 missing" in md
    assert "L=2: 20,21" in md
    assert out.with_suffix(".png").exists() and out.with_suffix(".pdf").exists()


def test_a_run_over_all_of_a_shorter_dataset_stands_in_for_the_paper_length(tmp_path: Path) -> None:
    """ROME's CounterFact sample has 500 records: its 500-edit run fills the 1000-edit Table 1; a 100-edit
    run of it does not."""
    write_run(tmp_path, "zsre", "elder", "zsre", 0.5, 0.4)
    write_run(tmp_path, "cf_whole", "elder", "counterfact_rome", 0.3, 0.2, num_edits=500)
    for num_edits in (None, 1000):
        if num_edits == 1000:
            write_run(tmp_path, "cf_part", "grace", "counterfact_rome", 0.9, 0.1, num_edits=100)
        report = build("table1", collect_runs([tmp_path]), Options(num_edits=num_edits))
        text = report.markdown()
        assert "after 1000 sequential edits" in text
        elder = next(line for line in text.splitlines() if line.startswith("| ELDER |"))
        assert "30.00" in elder and "50.00" in elder  # both datasets' ELDER cells
        grace = next(line for line in text.splitlines() if line.startswith("| GRACE |"))
        assert "90.00" not in grace


def test_the_ablation_table_labels_each_run_by_the_settings_it_differs_in(tmp_path: Path) -> None:
    for name, corpus, rel in (("a", "model", 0.2), ("b", "/data/facts.txt", 0.6)):
        run = write_run(tmp_path, name, "alphaedit", "zsre", rel, 0.1, num_edits=100)
        payload = json.loads((run / "results.json").read_text())
        payload["config"]["editor"] = {"mom2_corpus": corpus, "L2": 10.0, "cache_dir": f"/cache/{name}"}
        (run / "results.json").write_text(json.dumps(payload))
    report = build("ablation", collect_runs([tmp_path]), Options())
    (table,) = report.tables
    assert table.title == "AlphaEdit, SmolLM2-135M, ZsRE"
    assert [(row[0], row[3]) for row in table.rows] == [('mom2_corpus="model"', "20.0"),
                                                        ('mom2_corpus="/data/facts.txt"', "60.0")]


def test_only_editor_keeps_one_editors_runs_out_of_a_saved_frame(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "rome", "rome", "zsre", 0.2, 0.1, num_edits=100)
    write_run(runs, "grace", "grace", "zsre", 1.0, 0.0, num_edits=100)
    saved = tmp_path / "all"
    assert main(["ablation", str(runs), "--out", str(saved)]) == 0
    assert "### GRACE" in saved.with_suffix(".md").read_text()
    out = tmp_path / "rome"
    assert main(["ablation", str(saved.with_suffix(".csv")), "--only-editor", "rome", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "### ROME, SmolLM2-135M, ZsRE" in md and "### GRACE" not in md
    assert ",grace," not in out.with_suffix(".csv").read_text()
    assert main(["ablation", str(saved.with_suffix(".csv")), "--only-editor", "wise", "--out", str(out)]) == 2


def test_the_scale_report_reads_each_editors_longest_run_at_its_curve_points(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def point(n: int, rel: float) -> dict[str, Any]:
        return {"edits": n, "reliability": rel, "generalization": rel / 2, "locality": 0.9, "reliability_generated":
                rel / 4, "trainable_params": 2_000_000, "stored_params": n * 1000}

    long_run = write_run(runs, "ultra_10k", "ultraedit", "counterfact", 0.5, 0.25, num_edits=10_000,
                         curves=[point(1000, 0.8), point(10_000, 0.5)])
    payload = json.loads((long_run / "results.json").read_text())
    payload["costs"] = [{"edits": 1000, "edit_seconds": 500.0, "eval_seconds": 9.0},
                        {"edits": 10_000, "edit_seconds": 6000.0, "eval_seconds": 99.0}]
    (long_run / "results.json").write_text(json.dumps(payload))
    write_run(runs, "ultra_1k", "ultraedit", "counterfact", 0.9, 0.4, num_edits=1000, curves=[point(1000, 0.9)])
    write_run(runs, "grace_1k", "grace", "counterfact", 1.0, 0.0, num_edits=1000, curves=[point(1000, 1.0)])
    out = tmp_path / "out" / "scale"
    assert main(["scale", str(runs), "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    # the longest run's points; s/edit from its cost record (editing only), absent for a run without one
    assert "| UltraEdit | 1000 | 80.0 | 40.0 | 90.0 | 20.0 | — | — | 0.5 | 2 | 1 |" in md
    assert "| UltraEdit | 10000 | 50.0 | 25.0 | 90.0 | 12.5 | — | — | 0.6 | 2 | 10 |" in md
    assert "| GRACE | 1000 | 100.0 | 50.0 | 90.0 | 25.0 | — | — | — | 2 | 1 |" in md
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".pdf").is_file()
