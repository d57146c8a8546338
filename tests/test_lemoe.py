"""LEMoE: frozen earlier experts, routing at inference = routing in training, learning through the real run,
exact resume, configs, and the clustering-based edit order (data/order.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from baselines.lemoe import LEMoEEditor, pooled_embedding
from data.order import cluster_order, kmeans, plan_order
from evaluation.common.errors import ConfigError, HarnessError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.run.experiment import build, run_experiment
from tests.conftest import REPO, compose_config, tiny_model, zsre_requests
from tests.test_resume import ENV

pytestmark = pytest.mark.usefixtures("one_thread")

# zsRE edits with short targets (as tests/test_melo.py), three batches of four
SHORT = (12, 22, 66, 145, 0, 5, 25, 53, 1, 3, 9, 14)


def short_requests():
    requests = zsre_requests(max(SHORT) + 1)
    return [requests[i] for i in SHORT]


def editor(model: str = "tiny_llama", **fields) -> LEMoEEditor:
    return LEMoEEditor(tiny_model(model), **{"layer": 5, "batch_size": 4, "lr": 3e-3, "iterations": 20, **fields})


def logits(ed: LEMoEEditor, requests) -> torch.Tensor:
    batch = encode_pairs(ed.tokenizer, [r.prompt for r in requests], [r.target for r in requests])
    with torch.no_grad(), ed.scope(batch.query_positions):
        return target_logits(ed.model, batch).logits


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- module insertion and KV anchor routing --------------------------------------------------------
@pytest.mark.parametrize("routing, expert", [("anchor", "ffn"), ("learned", "lora")])
def test_earlier_experts_stay_bit_identical(routing: str, expert: str) -> None:
    requests = short_requests()
    ed = editor(routing=routing, expert=expert, max_experts=4)
    before: list[dict[str, torch.Tensor]] = []
    for t in range(3):
        ed.edit(requests[4 * t:4 * t + 4])
        before.append(snapshot(ed.experts[t]) | ({} if ed.routers is None else snapshot(ed.routers[t])))
    for t, saved in enumerate(before):  # every expert (and router) as it was when its own batch ended
        now = snapshot(ed.experts[t]) | ({} if ed.routers is None else snapshot(ed.routers[t]))
        assert all(torch.equal(saved[k], now[k]) for k in saved), t
    assert not any(p.requires_grad for p in ed.parameters())  # nothing trains between edits
    assert ed.num_experts == 3 and ed.trainable_params() == 3 * ed.expert_params()


def test_routing_at_inference_equals_routing_in_training() -> None:
    requests = short_requests()
    ed = editor()
    trained = []
    for t in range(3):
        stats = ed.edit(requests[4 * t:4 * t + 4])
        trained.append(ed.train_route.experts[:, 0].tolist())
        assert stats.extra["train_rows_on_new_expert"] == 1.0
    assert trained == [[0] * 4, [1] * 4, [2] * 4]
    route = ed.routes_for([r.prompt for r in requests])  # after all three batches
    assert route.experts[:, 0].tolist() == [t for t in range(3) for _ in range(4)]
    assert route.active.all() and ed.stored_params() == 12 * (64 + 1)  # one unit embedding (+ expert) per edit

    # the instance embedding does not depend on padding: generation (left-padded) reads what training read
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    left, right = (encode_pairs(ed.tokenizer, prompts, targets, padding_side=side) for side in ("left", "right"))
    emb = ed.model.get_input_embeddings()
    assert torch.equal(pooled_embedding(emb, left.input_ids, left.attention_mask, left.query_positions),
                       pooled_embedding(emb, right.input_ids, right.attention_mask, right.query_positions))

    # a threshold sends far inputs to no expert: the FFN's output bit for bit
    far = editor(threshold=0.0)
    far.edit(requests[:4])
    assert far.in_scope([r.prompt for r in requests]).tolist() == [True] * 4 + [False] * 8
    base = logits(LEMoEEditor(tiny_model(), layer=5), requests[4:])  # no expert inserted yet: the base model
    assert torch.equal(logits(far, requests[4:]), base)


# --- training until the batch fits ------------------------------------------------------------------
def test_a_batch_trains_until_its_loss_is_below_the_stop_and_reports_its_fit() -> None:
    from evaluation.run.metrics import predict

    requests = short_requests()
    capped = editor(iterations=300, stop_below=0.05)
    stats = capped.edit(requests[:4])
    assert 0 < stats.iterations < 300  # stopped well before the cap
    assert stats.extra["final_loss"] == stats.loss < 0.05 < stats.extra["first_loss"]
    # the in-batch exact share is what the metrics' teacher-forced exact match says after training
    exact = [p.exact for p in predict(capped, [r.prompt for r in requests[:4]], [r.target for r in requests[:4]])]
    assert stats.extra["batch_exact"] == sum(exact) / 4 == 1.0
    fixed = editor(iterations=7).edit(requests[:4])  # no stop: every step is taken
    assert fixed.iterations == 7 and fixed.extra["batch_exact"] < 1.0
    with pytest.raises(ConfigError, match="editor.stop_below must be positive"):
        editor(stop_below=0.0)


def test_the_threshold_sweep_of_a_finished_run(tmp_path: Path) -> None:
    """scope_report --sweep: the trained experts seen through other anchor thresholds, without retraining."""
    from evaluation.reporting.scope_report import sweep

    overrides = ["editor=lemoe", "model=tiny_llama", "dataset.num_edits=8", "editor.batch_size=4",
                 "editor.iterations=30", "retention=none", "logger=none", "progress=false", "checkpoint.every=4"]
    run_experiment(compose_config(overrides), tmp_path, {"editor": "lemoe", "model": "tiny_llama", "dataset": "zsre"})
    out = sweep(tmp_path, "threshold", [None, 1e-6], metrics=True)
    (wide, narrow) = out["rows"]
    assert out["trained_with"] is None and json.loads((tmp_path / "scope_sweep_threshold.json").read_text()) == out
    assert all(g["in_scope"] == 1.0 for g in wide["groups"].values())  # no threshold: every input to an expert
    assert narrow["groups"]["edit prompts"]["in_scope"] == 1.0  # each prompt finds its own anchor
    assert narrow["groups"]["locality prompts"]["in_scope"] == 0.0
    assert narrow["metrics"]["locality"] == 1.0  # out of scope: the unedited model's predictions exactly
    assert narrow["metrics"]["reliability"] == wide["metrics"]["reliability"]
    with pytest.raises(HarnessError, match="editor.lr is not read only at inference"):
        sweep(tmp_path, "lr", [0.1])


# --- learning through the real run, with the planned order ------------------------------------------
def test_run_learns_edits_and_records_the_planned_order(tmp_path: Path) -> None:
    overrides = ["editor=lemoe", "model=tiny_llama", "dataset.num_edits=8", "editor.batch_size=4",
                 "dataset.order=lemoe_cluster", "retention=none", "logger=none", "progress=false", "checkpoint.every=0"]
    cfg = compose_config(overrides)
    result = run_experiment(cfg, tmp_path / "run", {"editor": "lemoe", "model": "tiny_llama", "dataset": "zsre"})
    assert result["metrics"]["reliability"] >= 0.75  # base model: 0
    payload = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(payload["dataset_order"]) == list(range(8))
    assert result["metrics"]["trainable_params"] == 2 * 3 * 64 * 128  # two FFN experts: gate, up, down


# --- exact resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("routing, expert, model", [("anchor", "ffn", "tiny_llama"), ("learned", "lora", "tiny_gpt2"),
                                                   ("anchor", "ffn", "tiny_gpt2")])
def test_state_round_trip_continues_exactly(routing: str, expert: str, model: str) -> None:
    requests = short_requests()
    fields = {"routing": routing, "expert": expert, "iterations": 10}
    straight = editor(model, **fields)
    for t in range(3):
        straight.edit(requests[4 * t:4 * t + 4])

    first = editor(model, **fields)
    first.edit(requests[:4])
    resumed = editor(model, **fields)  # a fresh model and editor, as a resumed stream builds them
    resumed.load_state_dict(first.state_dict())
    for t in range(1, 3):
        resumed.edit(requests[4 * t:4 * t + 4])
    assert torch.equal(logits(resumed, requests), logits(straight, requests))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert not any(name.startswith("model.") or "base_layer" in name for name in a)  # the base model stays out


# --- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, layer", [("smollm2", 17), ("gpt2xl", 27), ("llama2", 18), ("llama2_random", 18),
                                          ("tiny_llama", 5), ("tiny_gpt2", 5)])
def test_configs_compose(model: str, layer: int) -> None:
    cfg = compose_config(["editor=lemoe", f"model={model}"])
    assert cfg.editor.layer == layer < cfg.model.num_layers
    assert cfg.editor.out_template == cfg.model.ffn_out_template and "{i}" in cfg.editor.out_template
    assert (cfg.editor.top_k, cfg.editor.max_experts, cfg.editor.scale, cfg.editor.routing) == (1, 5, 1.0, "anchor")
    assert cfg.dataset.order == "file"


def test_instantiate_from_config_and_reject_bad_settings() -> None:
    cfg = compose_config(["editor=lemoe", "model=tiny_gpt2"])
    ed = build(cfg.editor, model=instantiate(cfg.model))  # as run_experiment
    assert isinstance(ed, LEMoEEditor) and ed.config.lr == 1e-3 and ed.batch_size == 200
    assert type(ed.adapters[0].base_layer).__name__ == "GPT2MLP"  # the whole FFN block gets the experts
    assert not torch.count_nonzero(ed.experts[0].c_proj.weight)  # zero_out: each expert starts as a no-op
    with pytest.raises(ConfigError, match=r"editor\.layer=9 .*0\.\.7"):
        editor(layer=9)
    with pytest.raises(ConfigError, match="editor.top_k=3 must be between 1 and editor.max_experts=2"):
        editor(top_k=3, max_experts=2)
    with pytest.raises(ConfigError, match="editor.routing must be one of"):
        editor(routing="router")
    one = editor(max_experts=1, iterations=1)
    one.edit(zsre_requests(1))
    with pytest.raises(ConfigError, match="editor.max_experts=1"):
        one.edit(zsre_requests(1))
    with pytest.raises(ConfigError, match="dataset.order must be one of"):
        build(compose_config(["dataset.order=random"]).dataset)


# --- edit order planning ---------------------------------------------------------------------------
def test_file_order_is_kept_and_cluster_order_groups_similar_edits() -> None:
    requests = zsre_requests(6)
    assert plan_order(requests, "file", None, None, batch_size=2) is requests  # no model work at all

    # three well-separated directions, interleaved in the file: the plan puts each group together
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 10
    group = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 2]
    reps = centres[group] + 0.1 * torch.randn(len(group), 8, generator=g)
    perm = cluster_order(reps, batch_size=4)
    assert sorted(perm) == list(range(len(group)))  # a permutation: each edit once
    assert [group[i] for i in perm] == [0] * 4 + [1] * 3 + [2] * 5  # clusters in the file order of their first edit
    assert [group[i] for i in cluster_order(reps, 4, sequence="size")] == [2] * 5 + [0] * 4 + [1] * 3
    assert perm == cluster_order(reps, batch_size=4)  # seeded: a resumed run plans the same order
    assert kmeans(reps, 3).unique().numel() == 3

    loaded = tiny_model()
    planned = plan_order(requests, "lemoe_cluster", loaded.tokenizer, loaded.model.get_input_embeddings(), batch_size=2)
    assert sorted(r.uid for r in planned) == list(range(6))  # uids keep the file positions


@pytest.mark.slow  # SmolLM2 (real weights): about 10 minutes of one thread
def test_smollm2_learns_each_of_its_first_batches_and_keeps_the_earlier_expert() -> None:
    cfg = compose_config(["editor=lemoe", "model=smollm2", "editor.batch_size=50"])  # the model's own settings
    requests = build(cfg.dataset).load()[:100]
    ed = build(cfg.editor, model=instantiate(cfg.model))
    first = ed.edit(requests[:50])
    kept = snapshot(ed.experts[0])
    second = ed.edit(requests[50:])
    for stats in (first, second):
        assert stats.extra["batch_exact"] >= 0.95 and stats.iterations <= ed.config.iterations
    assert all(torch.equal(kept[k], v) for k, v in snapshot(ed.experts[0]).items())
    from evaluation.run.metrics import predict

    rows = predict(ed, [r.prompt for r in requests[:50]], [r.target for r in requests[:50]])
    assert sum(p.exact for p in rows) / 50 >= 0.95  # the first batch, still learned after the second


def test_a_stream_longer_than_the_experts_allow_is_one_line_before_the_model_loads(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "model=tiny_llama", "editor=lemoe",
                           "editor.max_experts=2", "editor.batch_size=3", "dataset.num_edits=7", "retention=none",
                           "logger=none", f"hydra.run.dir={tmp_path}"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: LEMoEEditor takes at most editor.max_experts=2 edit batches of editor.batch_size=3 (6 edits), but "
        "the stream has 7 edits (3 batches): set editor.max_experts=3 (or a larger editor.batch_size)")
    assert "unedited locality" not in proc.stderr and not (tmp_path / "checkpoints").exists()
