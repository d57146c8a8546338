"""Issue 18's readings of the authors' code: each changes what it claims and nothing else."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from baselines.defer import DeferEditor
from baselines.grace import GraceEditor
from baselines.melo import MeloEditor
from elder.editor import ElderEditor
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.reporting.tables import main
from evaluation.run.compose import compose_config
from evaluation.run.experiment import build
from tests.conftest import tiny_model, zsre_requests

LAYERS = [2, 3, 4, 5, 6, 7]
PROMPTS = ["a short prompt", "a much longer prompt with many more words in it"]
TARGETS = ["yes", "the answer is long too"]


def _elder(**kw: object) -> ElderEditor:
    return ElderEditor(tiny_model("tiny_llama"), layers=LAYERS, query_layer=1, **kw)  # type: ignore[arg-type]


def test_authors_lora_init_has_fan_in_r_and_peft_fan_in_d_in() -> None:
    authors, peft = _elder(lora_init="authors", rank=8), _elder(lora_init="peft", rank=8)
    d_in = authors.adapters[0].lora_A.shape[1]
    assert d_in != 8
    for editor, bound in ((authors, 1 / math.sqrt(8)), (peft, 1 / math.sqrt(d_in))):
        A = torch.stack([a.lora_A.detach() for a in editor.adapters])
        assert float(A.abs().max()) <= bound
        assert float(A.abs().max()) > 0.9 * bound  # uniform on +-bound: the largest entry comes close
        assert all(float(a.lora_B.detach().abs().max()) == 0 for a in editor.adapters)
    # nothing else changes: same routers, same B
    for (ka, va), (kp, vp) in zip(authors.routers.state_dict().items(), peft.routers.state_dict().items()):
        assert ka == kp and torch.equal(va, vp)


def test_a_bad_reading_is_named() -> None:
    with pytest.raises(ConfigError, match="editor.lora_init"):
        _elder(lora_init="kaiming")
    with pytest.raises(ConfigError, match="editor.key_position"):
        _elder(key_position="last")
    with pytest.raises(ConfigError, match="editor.lr_schedule"):
        _elder(lr_schedule="cosine")


def _layer_inputs(editor: ElderEditor | GraceEditor, module: torch.nn.Module, batch: object) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            target_logits(editor.model, batch)  # outside any scope: the plain forward
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sequence_last_key_is_the_last_fed_token_and_never_a_pad(padding_side: str) -> None:
    editor = _elder(key_position="sequence_last")
    batch = encode_pairs(editor.tokenizer, PROMPTS, TARGETS, padding_side=padding_side)
    lengths = batch.attention_mask.sum(-1)
    assert lengths[0] < lengths[1]  # rows of different length: padding is present
    last = batch.last_positions
    assert bool(batch.attention_mask[torch.arange(2), last].all())  # a real token
    if padding_side == "right":
        assert last.tolist() == (lengths - 1).tolist()
    else:
        assert last.tolist() == [batch.input_ids.shape[1] - 1] * 2
    assert bool((last > batch.query_positions).all())  # after the prompt: the target's last token
    x = _layer_inputs(editor, editor.loaded.ffn_module(1), batch)
    with torch.no_grad(), editor.batch_scope(batch):
        target_logits(editor.model, batch)
        q = editor.query.value
    assert torch.equal(q, x[torch.arange(2), last])


def test_prompt_last_key_reads_the_last_prompt_token() -> None:
    editor = _elder()
    batch = encode_pairs(editor.tokenizer, PROMPTS, TARGETS)
    x = _layer_inputs(editor, editor.loaded.ffn_module(1), batch)
    with torch.no_grad(), editor.batch_scope(batch):
        target_logits(editor.model, batch)
        q = editor.query.value
    assert torch.equal(q, x[torch.arange(2), batch.query_positions])


@pytest.mark.parametrize("cls, kw", [
    (GraceEditor, {"layer": 4}),
    (MeloEditor, {"layers": [4, 5], "query_layer": 3}),
    (DeferEditor, {"layer": 4}),
])
def test_baselines_read_their_key_at_the_chosen_token(cls: type, kw: dict) -> None:
    readings = {}
    for position in ("prompt_last", "sequence_last"):
        loaded = tiny_model("tiny_llama")  # a fresh model: an editor wraps its layers in place
        batch = encode_pairs(loaded.tokenizer, PROMPTS, TARGETS)
        editor = cls(loaded, key_position=position, **kw)
        assert editor.key_position == position
        with torch.no_grad(), editor.batch_scope(batch):
            target_logits(editor.model, batch)
            readings[position] = editor.query.value.clone()
    # same layer, different tokens: the prompt's last token vs. the target's last one
    assert not torch.equal(readings["prompt_last"], readings["sequence_last"])


def test_step_schedule_halves_lr_every_20_iterations_within_each_batch() -> None:
    editor = _elder(lr=1e-3, iterations=45, lr_schedule="step", reset_optimizer=True)
    seen: list[float] = []
    requests = zsre_requests(8)
    # a global hook: reset_optimizer makes a new Adam for every batch
    handle = register_optimizer_step_pre_hook(
        lambda opt, *a: seen.append(opt.param_groups[0]["lr"]))
    try:
        for start in (0, 4):
            editor.edit(requests[start:start + 4])
            assert editor.optimizer.param_groups[0]["lr"] == 1e-3  # left as configured between batches
    finally:
        handle.remove()
    expected = [1e-3] * 20 + [5e-4] * 20 + [2.5e-4] * 5
    assert seen == pytest.approx(expected * 2)


def test_constant_schedule_keeps_lr_and_optimizer_state_across_batches() -> None:
    editor = _elder(lr=1e-3, iterations=3)
    requests = zsre_requests(8)
    editor.edit(requests[:4])
    opt = editor.optimizer
    editor.edit(requests[4:])
    assert editor.optimizer is opt  # no reset: Adam's moments carry over
    assert opt.param_groups[0]["lr"] == 1e-3
    assert int(next(iter(opt.state.values()))["step"]) == 6


def test_code_snapshot_last_iteration_stores_the_codes_seen_before_the_last_step() -> None:
    requests = zsre_requests(4)
    runs = {}
    for snapshot in ("last_iteration", "after_training"):
        editor = _elder(lr=5e-2, iterations=3, code_snapshot=snapshot)
        seen = []
        editor.query.on_query = lambda q, route=editor._route: seen.append(route(q)) or seen[-1]
        editor.edit(requests)
        runs[snapshot] = (editor.stored_codes, [r.codes(4).cpu() for r in seen])
    codes, routes = runs["last_iteration"]
    assert torch.equal(codes, routes[2])  # the third (last) training iteration's forward
    codes, routes = runs["after_training"]
    assert len(routes) == 4 and torch.equal(codes, routes[3])  # one more forward after the last step


def test_the_authors_preset_sets_every_reading_and_nothing_else() -> None:
    plain, authors = compose_config([]), compose_config(["experiment=elder_authors"])
    expected = {"lora_init": "authors", "key_position": "sequence_last", "code_snapshot": "last_iteration",
                "reset_optimizer": True, "lr_schedule": "step", "lr_step": 20, "lr_gamma": 0.5}
    for key, value in expected.items():
        assert authors.editor[key] == value
    changed = {k for k in plain.editor if plain.editor[k] != authors.editor[k]}
    assert changed <= set(expected)
    assert authors.editor.lr == plain.editor.lr  # the paper's hyper-parameters are not readings
    assert authors.dataset.target == "rome"
    assert plain.editor.lora_init == "authors" and plain.editor.code_snapshot == "last_iteration"
    assert plain.editor.key_position == "prompt_last"


@pytest.mark.parametrize("editor", ["grace", "melo", "defer"])
def test_key_position_is_a_config_key_of_every_routed_baseline(editor: str) -> None:
    cfg = compose_config([f"editor={editor}", "model=tiny_llama", "editor.key_position=sequence_last"])
    built = build(cfg.editor, model=tiny_model("tiny_llama"))
    assert built.key_position == "sequence_last"


def _reading_run(root: Path, name: str, editor: str, reading: str | None, key: str, lr: float, dataset: str,
                 rel: float, num_edits: int = 100, stream: tuple[str, int, int] | None = None,
                 wall: float | None = None, resumed_from: int | None = None, summed: bool = True) -> None:
    """A finished run's results.json; ``stream`` = (protocol, revisit, facts) as runs record it since
    data/protocol.py (None: an older run, which records no protocol), ``wall`` its timings.wall_seconds;
    ``resumed_from``: where it resumed, with its wall time ``summed`` over its processes or not (older runs)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    payload: dict = {"config": {"seed": 0, "dataset": {"num_edits": num_edits}, "retention": {},
                                "editor": {"key_position": key, "lr": lr}},
                     "choices": {"editor": editor, "model": "smollm2", "dataset": dataset, "elder_reading": reading},
                     "metrics": {"reliability": rel, "generalization": rel / 2, "locality": 1.0,
                                 "num_edits": num_edits},
                     "versions": {}, "git_commit": "abc", "curves": []}
    if stream is not None:
        protocol, revisit, facts = stream
        payload["config"]["dataset"].update(protocol=protocol, revisit=revisit)
        payload["dataset_protocol"] = {"protocol": protocol, "revisit": revisit, "num_edits": num_edits,
                                       "num_facts": facts, "num_phrasings": num_edits // revisit, "facts": []}
    if wall is not None:
        payload["timings"] = {"edit_seconds": wall / 2, "wall_seconds": wall}
        if summed:
            payload["timings"]["wall_seconds_this_process"] = wall / 3 if resumed_from else wall
    if resumed_from is not None:
        payload["stream"] = {"resumed_from": resumed_from}
    (run / "results.json").write_text(json.dumps(payload))


def _table_lines(out: Path) -> list[str]:
    return [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("recorded", [False, True], ids=["older runs", "one_per_fact recorded"])
def test_the_readings_table_has_a_row_per_reading_and_key(tmp_path: Path, recorded: bool) -> None:
    """Runs of the default stream at one length: the table as before the protocol, whether or not the runs
    record their protocol and wall time."""
    kw: dict = {"stream": ("one_per_fact", 1, 100), "wall": 50.0} if recorded else {}
    _reading_run(tmp_path, "a", "elder", "project", "prompt_last", 1e-3, "zsre", 0.1, **kw)
    _reading_run(tmp_path, "b", "elder", "authors", "sequence_last", 1e-3, "zsre", 0.3, **kw)
    _reading_run(tmp_path, "c", "elder", "authors", "sequence_last", 1e-4, "zsre", 0.05)
    _reading_run(tmp_path, "d", "elder", "authors", "sequence_last", 1e-3, "counterfact_rome", 0.5, **kw)
    _reading_run(tmp_path, "e", "grace", None, "sequence_last", 1.0, "zsre", 1.0)
    out = tmp_path / "readings"
    assert main(["readings", str(tmp_path), "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Readings of the authors' code: reliability, generalization and locality (%) "
                           "after 100 sequential edits\n")
    assert "Protocol is dataset.protocol" not in text
    header, *rows = _table_lines(out)
    assert header == ("| Editor | Reading | key | lr | ZsRE Rel. | ZsRE Gen. | ZsRE Loc. | CounterFact (ROME's records) "
                      "Rel. | CounterFact (ROME's records) Gen. | CounterFact (ROME's records) Loc. |")
    assert rows[0].startswith("| GRACE | — | sequence_last | 1 | 100.0 | 50.0 | 100.0 | missing")
    assert rows[1].startswith("| ELDER | project's earlier reading | prompt_last | 0.001 | 10.0 | 5.0 | 100.0 | missing")
    assert rows[2].startswith("| ELDER | all authors' readings | sequence_last | 0.001 | 30.0 | 15.0 | 100.0 | 50.0 |")
    assert rows[3].startswith("| ELDER | all authors' readings | sequence_last | 0.0001 | 5.0 | 2.5 |")
    assert len(rows) == 4


def test_table1_puts_a_reading_beside_the_default_and_reads_a_committed_frame(tmp_path: Path) -> None:

    runs = tmp_path / "runs"
    _reading_run(runs, "a", "elder", None, "prompt_last", 1e-3, "zsre", 0.04)
    _reading_run(runs, "b", "elder", "authors", "sequence_last", 1e-3, "zsre", 0.3)
    _reading_run(runs, "c", "elder", "authors", "sequence_last", 1e-3, "counterfact_rome", 0.5)
    first, second = tmp_path / "t1", tmp_path / "t1_again"
    assert main(["table1", str(runs), "--out", str(first)]) == 0
    text = first.with_suffix(".md").read_text()
    elder = [line for line in text.splitlines() if line.startswith("| ELDER")]
    assert elder[0].startswith("| ELDER | 4.00 | 93.96 |")  # the paper's LLaMA2-7B ZsRE reliability
    assert elder[1].startswith("| ELDER (all authors' readings) | 30.00 | 93.96 |")
    assert "| 50.00 | 95.07 | -45.07 |" in elder[1]  # ROME's CounterFact against the paper's CounterFact
    # the committed frame stands in for run folders that are gone
    assert main(["table1", str(first.with_suffix(".csv")), "--out", str(second)]) == 0
    table = lambda p: [line for line in p.with_suffix(".md").read_text().splitlines() if line.startswith("|")]
    assert table(first) == table(second)
    # the frame beside the folders it was made from: each run once, from its folder
    _reading_run(runs, "d", "elder", None, "prompt_last", 1e-3, "zsre", 0.08)
    third = tmp_path / "t1_with_folders"
    assert main(["table1", str(first.with_suffix(".csv")), str(runs), "--out", str(third)]) == 0
    assert len(third.with_suffix(".csv").read_text().splitlines()) == 1 + 4
    assert "| ELDER | 6.00 ± 2.83 | 93.96 |" in third.with_suffix(".md").read_text()


def test_the_model_axis_reads_each_run_at_the_asked_lengths(tmp_path: Path) -> None:

    _reading_run(tmp_path, "a", "elder", "authors", "sequence_last", 1e-3, "zsre", 0.2)
    payload = json.loads((tmp_path / "a" / "results.json").read_text())
    payload["curves"] = [{"edits": 40, "reliability": 0.5, "generalization": 0.25},
                         {"edits": 100, "reliability": 0.2, "generalization": 0.1}]
    (tmp_path / "a" / "results.json").write_text(json.dumps(payload))
    out = tmp_path / "axis"
    assert main(["model_axis", str(tmp_path), "--out", str(out), "--points", "40", "100", "200"]) == 0
    row = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ELDER")][0]
    assert "| all authors' readings | 50.0 / 25.0 | 20.0 / 10.0 | — |" in row


def test_a_resumed_runs_wall_time_is_its_processes_summed_or_a_dash_where_only_the_last_was_kept(
        tmp_path: Path) -> None:
    elder = ("elder", None, "prompt_last", 1e-3)
    _reading_run(tmp_path, "summed", *elder, "zsre", 0.1, 40, ("one_per_fact", 1, 40), 90.0, resumed_from=20)
    _reading_run(tmp_path, "older", *elder, "counterfact_rome", 0.2, 40, ("one_per_fact", 1, 40), 30.0,
                 resumed_from=20, summed=False)
    _reading_run(tmp_path, "grouped", *elder, "zsre", 0.3, 40, ("grouped", 1, 40), 50.0)  # the detailed table
    out = tmp_path / "readings"
    assert main(["readings", str(tmp_path), "--out", str(out)]) == 0
    _, *rows = _table_lines(out)
    assert rows[0] == ("| ELDER | — | prompt_last | 0.001 | one_per_fact | 40 | 40 | 10.0 | 5.0 | 100.0 | 90 "
                       "| 40 | 20.0 | 10.0 | 100.0 | — |")


def test_protocol_runs_are_rows_of_their_own_with_edits_facts_and_wall_time(tmp_path: Path) -> None:
    elder = ("elder", None, "prompt_last", 1e-3)
    _reading_run(tmp_path, "old", *elder, "zsre", 0.1, num_edits=120, wall=100.0)  # older: one_per_fact, 120 facts
    _reading_run(tmp_path, "opf", *elder, "counterfact_rome", 0.2, 120, ("one_per_fact", 1, 120), 150.0)
    _reading_run(tmp_path, "grouped", *elder, "counterfact_rome", 0.3, 120, ("grouped", 1, 60), 200.0)
    _reading_run(tmp_path, "grouped_facts", *elder, "counterfact_rome", 0.4, 80, ("grouped", 1, 40), 130.0)
    _reading_run(tmp_path, "revisit", *elder, "zsre", 0.5, 120, ("one_per_fact", 3, 40), 300.0)
    _reading_run(tmp_path, "facts", *elder, "zsre", 0.6, 40, ("one_per_fact", 1, 40), 40.0)
    _reading_run(tmp_path, "grace", "grace", None, "prompt_last", 1.0, "zsre", 1.0, 40, ("grouped", 1, 40), 20.0)
    out = tmp_path / "readings"
    assert main(["readings", str(tmp_path), "--out", str(out)]) == 0  # several lengths: no --num-edits needed
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Readings of the authors' code: reliability, generalization and locality (%) "
                           "after 40, 80, 120 sequential edits\n")
    assert "Protocol is dataset.protocol" in text
    header, *rows = _table_lines(out)
    cf = "CounterFact (ROME's records)"
    assert header == ("| Editor | Reading | key | lr | Protocol | Edits | ZsRE Facts | ZsRE Rel. | ZsRE Gen. "
                      f"| ZsRE Loc. | ZsRE Wall (s) | {cf} Facts | {cf} Rel. | {cf} Gen. | {cf} Loc. | {cf} Wall (s) |")
    missing = " | ".join(["missing"] * 5)
    # by editor (the paper's order), then protocol and revisit, then edits
    assert rows == [
        f"| GRACE | — | prompt_last | 1 | grouped | 40 | 40 | 100.0 | 50.0 | 100.0 | 20 | {missing} |",
        f"| ELDER | — | prompt_last | 0.001 | one_per_fact | 40 | 40 | 60.0 | 30.0 | 100.0 | 40 | {missing} |",
        # the older run (no protocol recorded) shares the one_per_fact row of a run that records it
        "| ELDER | — | prompt_last | 0.001 | one_per_fact | 120 | 120 | 10.0 | 5.0 | 100.0 | 100 "
        "| 120 | 20.0 | 10.0 | 100.0 | 150 |",
        f"| ELDER | — | prompt_last | 0.001 | one_per_fact, revisit 3 | 120 | 40 | 50.0 | 25.0 | 100.0 | 300 "
        f"| {missing} |",
        f"| ELDER | — | prompt_last | 0.001 | grouped | 80 | {missing} | 40 | 40.0 | 20.0 | 100.0 | 130 |",
        f"| ELDER | — | prompt_last | 0.001 | grouped | 120 | {missing} | 60 | 30.0 | 15.0 | 100.0 | 200 |",
    ]
    # --num-edits keeps one length, and the protocol columns stay while protocols differ
    assert main(["readings", str(tmp_path), "--out", str(out), "--num-edits", "120"]) == 0
    header, *rows = _table_lines(out)
    assert "| Protocol | Edits |" in header
    assert [row.split(" | ")[4:6] for row in rows] == [["one_per_fact", "120"], ["one_per_fact, revisit 3", "120"],
                                                       ["grouped", "120"]]


def test_table1_never_averages_runs_of_different_protocols(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Runs that differ only in the stream protocol are not repeats: Table 1 asks which one to show, and
    --protocol/--revisit choose; an older run (no protocol recorded) counts as one_per_fact."""
    elder = ("elder", None, "prompt_last", 1e-3)
    _reading_run(tmp_path, "old", *elder, "zsre", 0.1, num_edits=120)
    _reading_run(tmp_path, "grouped", *elder, "zsre", 0.5, 120, ("grouped", 1, 120))
    _reading_run(tmp_path, "revisit", *elder, "zsre", 0.9, 120, ("grouped", 3, 40))
    out = tmp_path / "t1"
    assert main(["table1", str(tmp_path), "--out", str(out)]) == 2
    assert ("several stream protocols (grouped revisit 1, grouped revisit 3, one_per_fact revisit 1)"
            in capsys.readouterr().err)
    assert not out.with_suffix(".md").exists()

    def elder_zsre_reliability(*args: str) -> str:
        assert main(["table1", str(tmp_path), "--out", str(out), *args]) == 0
        row = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ELDER")][0]
        return row.split(" | ")[1]

    assert elder_zsre_reliability("--protocol", "one_per_fact") == "10.00"
    assert elder_zsre_reliability("--protocol", "grouped", "--revisit", "1") == "50.00"
    assert elder_zsre_reliability("--revisit", "3") == "90.00"
    # the readings table keeps them all, and narrows to one on request
    assert main(["readings", str(tmp_path), "--out", str(out), "--protocol", "grouped"]) == 0
    assert [row.split(" | ")[4] for row in _table_lines(out)[1:]] == ["grouped", "grouped, revisit 3"]


def test_runs_of_other_protocols_are_not_repeats_and_older_runs_are_one_per_fact() -> None:
    from evaluation.reporting.runs import runs_frame, shared_seed_warnings

    base = {"source": "a", "status": "ok", "editor": "elder", "model": "smollm2", "dataset": "zsre", "seed": 0,
            "num_edits": 120}
    grouped = {**base, "source": "b", "protocol": "grouped", "revisit": 1, "num_facts": 60.0}
    assert shared_seed_warnings([base, grouped]) == []
    # the same run read through an older frame (no protocol columns) and through its folder (one_per_fact)
    recorded = {**base, "source": "c", "protocol": "one_per_fact", "revisit": 1, "num_facts": 120.0}
    assert len(shared_seed_warnings([base, recorded])) == 1
    frame = runs_frame([base, grouped])
    assert frame[["protocol", "revisit", "num_facts"]].values.tolist() == [["one_per_fact", 1, 120], ["grouped", 1, 60]]


def test_the_committed_readings_table_is_rebuilt_from_its_committed_frame(tmp_path: Path) -> None:
    """results/readings_smollm2.csv predates the stream protocol (no protocol columns): its runs read as
    one_per_fact and give the committed table again."""
    from tests.conftest import REPO

    committed = REPO / "results" / "readings_smollm2"
    out = tmp_path / "readings"
    assert main(["readings", str(committed.with_suffix(".csv")), "--out", str(out)]) == 0
    body = lambda path: path.with_suffix(".md").read_text().split("## Provenance")[0]  # noqa: E731
    assert body(out) == body(committed)


def test_the_protocol_preset_runs_each_protocol_at_equal_edits_and_at_equal_facts() -> None:
    """The sweeps in conf/experiment/protocol.yaml's header, as Hydra's basic sweeper expands them."""
    from tests.conftest import REPO
    from tests.test_sweeps import sweep_jobs

    lines = (REPO / "conf" / "experiment" / "protocol.yaml").read_text().splitlines()
    sweeps = [line.split(" -m ", 1)[1].split() for line in lines if line.startswith("#   python run.py -m ")]
    assert len(sweeps) == 3
    points: dict[tuple, set] = {}
    for overrides in sweeps:
        master, jobs = sweep_jobs([*overrides, "model=smollm2"])
        assert master.hydra.sweep.dir.endswith("multirun/protocol_smollm2")  # all three into one folder
        assert list(master.tags) == ["protocol"]
        for job in jobs:
            assert job.retention.get("tasks") is None and job.seed == 0
            editor = job.editor._target_.rsplit(".", 1)[1]
            stream = (job.dataset.protocol, job.dataset.revisit, job.dataset.num_edits)
            points.setdefault((job.dataset.name, stream), set()).add(editor)
    assert sum(map(len, points.values())) == 33
    assert all(editors == {"ElderEditor", "GraceEditor", "MeloEditor"} for editors in points.values())
    for dataset in ("zsre", "counterfact_rome"):
        for stream in (("one_per_fact", 1, 120), ("grouped", 1, 120), ("one_per_fact", 3, 120),  # equal edits
                       ("one_per_fact", 1, 40)):                                               # 40 facts
            assert (dataset, stream) in points
    # grouped at 40 facts: ZsRE has one paraphrase per record (40 entries), ROME's CounterFact two (80)
    assert ("zsre", ("grouped", 1, 40)) in points and ("counterfact_rome", ("grouped", 1, 80)) in points


def test_editors_named_with_editors_get_a_missing_row_before_they_have_a_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _reading_run(runs, "a", "lemoe", None, "prompt_last", 1e-3, "zsre", 0.5)
    out = tmp_path / "t"
    assert main(["table1", str(runs), "--out", str(out)]) == 0
    assert "| WISE" not in out.with_suffix(".md").read_text()  # a sweep's editor without a run: not even a row
    assert main(["table1", str(runs), "--out", str(out), "--editors", "lemoe,wise"]) == 0
    text = out.with_suffix(".md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| WISE"))
    assert row.startswith("| WISE | missing | — |")
    assert "- WISE / smollm2 / ZsRE: missing" in text and "- WISE / smollm2 / CounterFact: missing" in text
    assert next(line for line in text.splitlines() if line.startswith("| LEMoE")).startswith("| LEMoE | 50.00 |")
