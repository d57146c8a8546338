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
                 rel: float) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    payload = {"config": {"seed": 0, "dataset": {"num_edits": 100}, "retention": {},
                          "editor": {"key_position": key, "lr": lr}},
               "choices": {"editor": editor, "model": "smollm2", "dataset": dataset, "elder_reading": reading},
               "metrics": {"reliability": rel, "generalization": rel / 2, "locality": 1.0, "num_edits": 100},
               "versions": {}, "git_commit": "abc", "curves": []}
    (run / "results.json").write_text(json.dumps(payload))


def test_the_readings_table_has_a_row_per_reading_and_key(tmp_path: Path) -> None:

    _reading_run(tmp_path, "a", "elder", "project", "prompt_last", 1e-3, "zsre", 0.1)
    _reading_run(tmp_path, "b", "elder", "authors", "sequence_last", 1e-3, "zsre", 0.3)
    _reading_run(tmp_path, "c", "elder", "authors", "sequence_last", 1e-4, "zsre", 0.05)
    _reading_run(tmp_path, "d", "elder", "authors", "sequence_last", 1e-3, "counterfact_rome", 0.5)
    _reading_run(tmp_path, "e", "grace", None, "sequence_last", 1.0, "zsre", 1.0)
    out = tmp_path / "readings"
    assert main(["readings", str(tmp_path), "--out", str(out)]) == 0
    rows = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| GRACE | — | sequence_last | 1 | 100.0 | 50.0 | 100.0 | missing")
    assert rows[1].startswith("| ELDER | project's earlier reading | prompt_last | 0.001 | 10.0 | 5.0 | 100.0 | missing")
    assert rows[2].startswith("| ELDER | all authors' readings | sequence_last | 0.001 | 30.0 | 15.0 | 100.0 | 50.0 |")
    assert rows[3].startswith("| ELDER | all authors' readings | sequence_last | 0.0001 | 5.0 | 2.5 |")


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
