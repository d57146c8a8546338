"""MEMOIR: edits learned into the residual memory's own columns, TopHash masks, out-of-scope inputs bit for bit
unedited (teacher forcing and KV-cached generation), learning through the real run, exact resume, configs."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from baselines.memoir import MEMOIREditor
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import TargetLogits, target_logits
from evaluation.editing.generation import generate_continuations
from evaluation.run.checkpoint import to_cpu
from evaluation.run.experiment import build, run_experiment
from tests.conftest import compose_config, tiny_model, zsre_requests

pytestmark = pytest.mark.usefixtures("one_thread")

# zsRE edits with short targets (as tests/test_lemoe.py)
SHORT = (12, 22, 66, 145)
# conf/editor_model/memoir_tiny_llama.yaml's settings, fewer background texts
TINY = {"layer": 5, "threshold": 0.8, "top_k_fraction": 0.5, "lr": 5.0, "max_grad_norm": 2.0,
        "context_template_length_params": [[5, 5]], "background_samples": 20}


def short_requests() -> list:
    requests = zsre_requests(max(SHORT) + 1)
    return [requests[i] for i in SHORT]


def editor(model: str = "tiny_llama", **fields: Any) -> MEMOIREditor:
    return MEMOIREditor(tiny_model(model), **{**TINY, **fields})


def forward(ed: MEMOIREditor | None, prompts: list[str], targets: list[str], model: str = "tiny_llama") -> TargetLogits:
    """Teacher-forced target logits through the edited model (None: a fresh unedited model)."""
    loaded = ed.loaded if ed is not None else tiny_model(model)
    batch = encode_pairs(loaded.tokenizer, prompts, targets)
    scope = ed.scope(batch.query_positions) if ed is not None else contextlib.nullcontext()
    with torch.no_grad(), scope:
        return target_logits(loaded.model, batch)


def logits(ed: MEMOIREditor | None, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    out = forward(ed, prompts, targets)
    return out.logits, out.rows


def exact(ed: MEMOIREditor, prompts: list[str], targets: list[str]) -> torch.Tensor:
    return forward(ed, prompts, targets).row_exact(len(prompts))


def test_edits_are_learned_in_their_own_columns_and_out_of_scope_is_unedited() -> None:
    requests = short_requests()
    ed = editor(threshold=0.95)
    learned = []
    for r in requests:
        ed.edit([r])
        learned.append(bool(exact(ed, [r.prompt], [r.target])[0]))
    assert sum(learned) >= 3, learned  # right after its own edit (base model: none)

    # TopHash: k dims per mask, the permuted top-k of |prompt mean - background|; each edit prompt finds its own mask
    assert ed.masks.shape == (4, 128) and (ed.masks.sum(-1) == ed.top_k).all() and ed.top_k == 64
    route = ed.routes_for([r.prompt for r in requests])
    assert route.match.tolist() == [0, 1, 2, 3] and torch.equal(route.overlap, torch.ones(4)) and route.active.all()
    q = ed.query_vectors([requests[0].prompt])
    expected = ed.permutation[(q[0] - ed.background_mean).abs().topk(ed.top_k).indices]
    assert torch.equal(ed.masks[0].nonzero()[:, 0], expected.sort().values)
    # minimal overwrite: the memory's columns outside every stored mask were never written
    assert not torch.count_nonzero(ed.memory[:, ~ed.masks.any(0)]) and torch.count_nonzero(ed.memory)

    # inputs whose best overlap is under the threshold get the unedited model's output bit for bit
    loc = [r.locality_prompt for r in requests] + [r.prompt for r in requests]
    answers = [r.locality_answer for r in requests] + [r.target for r in requests]
    scope = ed.in_scope(loc)
    assert scope[4:].all() and not scope[:4].all(), scope
    edited, rows = logits(ed, loc, answers)
    base, _ = logits(None, loc, answers)
    out = ~scope[rows]
    assert torch.equal(edited[out], base[out]) and not torch.equal(edited[~out], base[~out])
    assert ed.stored_params() == 4 * 128 + 128 and ed.trainable_params() == 64 * 128


def test_generation_keeps_the_prompts_route_for_every_decoding_step() -> None:
    request = short_requests()[1]
    ed = editor()
    ed.edit([request])
    calls = []
    route = ed._route
    ed.query.on_query = lambda q: calls.append(q.shape[0]) or route(q)
    prompts = [request.prompt, request.locality_prompt]
    assert ed.in_scope(prompts).tolist() == [True, False]
    calls.clear()
    got = generate_continuations(ed.model, ed.tokenizer, prompts, 12, scope=ed, batch_size=2)
    assert calls == [2]  # one route, from the prompt's forward; the decoding steps reuse it
    assert got[0].text.startswith(" " + request.target)  # the memory acts on generated tokens too
    fresh = tiny_model()
    base = generate_continuations(fresh.model, fresh.tokenizer, prompts, 12, batch_size=2)
    assert got[1] == base[1] and got[0] != base[0]


def test_run_learns_edits(tmp_path: Path) -> None:
    overrides = ["editor=memoir", "model=tiny_llama", "dataset.num_edits=4", "retention=none", "logger=none",
                 "progress=false", "checkpoint.every=0", "editor.background_samples=20"]
    result = run_experiment(compose_config(overrides), tmp_path / "run",
                            {"editor": "memoir", "model": "tiny_llama", "dataset": "zsre"})
    m = result["metrics"]
    assert m["reliability_token"] >= 0.5 and m["locality"] == 1.0  # base model: 0.0 and 1.0
    assert m["trainable_params"] == 64 * 128 and m["num_edits"] == 4


def test_state_round_trip_continues_exactly() -> None:
    requests = short_requests()
    fields = {"iterations": 8}
    straight = editor("tiny_gpt2", **fields)
    for r in requests[:3]:
        straight.edit([r])
    first = editor("tiny_gpt2", **fields)
    first.edit(requests[:1])
    resumed = editor("tiny_gpt2", **fields)  # a fresh model and editor, as a resumed stream builds them
    resumed.load_state_dict(first.state_dict())
    for r in requests[1:3]:
        resumed.edit([r])
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    assert torch.equal(logits(resumed, prompts, targets)[0], logits(straight, prompts, targets)[0])
    a, b = to_cpu(straight.state_dict()), to_cpu(resumed.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    extra_a, extra_b = a["_extra_state"], b["_extra_state"]
    assert torch.equal(extra_a["masks"], extra_b["masks"]) and extra_a["prefixes"] == extra_b["prefixes"]
    assert torch.equal(extra_a["background_mean"], extra_b["background_mean"]) and extra_b["num_edits"] == 3
    assert not any(name.startswith("model.") or "base_layer" in name for name in a)  # the base model stays out


def test_resumes_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    """A stream resumed from its checkpoint after 2 edits ends exactly as the full stream (tests/test_resume.py)."""
    from tests.test_resume import resume_pair

    _, resumed_editor = resume_pair(["editor=memoir", "dataset.num_edits=4", "editor.iterations=5",
                                     "editor.background_samples=10"], tmp_path, every=2)
    state = to_cpu(resumed_editor.state_dict())  # equal to the straight stream's (resume_pair): not empty either
    assert torch.count_nonzero(state["memory"]) and len(state["_extra_state"]["masks"]) >= 1


@pytest.mark.parametrize("model, layer, top_k, module", [
    ("llama2", 27, 4096, "model.layers.{i}.mlp.down_proj"), ("llama2_random", 27, 4096, "model.layers.{i}.mlp.down_proj"),
    ("smollm2", 25, None, "model.layers.{i}.mlp.down_proj"), ("gpt2xl", 41, None, "transformer.h.{i}.mlp.c_proj"),
    ("tiny_llama", 7, None, "model.layers.{i}.mlp.down_proj"), ("tiny_gpt2", 7, None, "transformer.h.{i}.mlp.c_proj")])
def test_configs_compose(model: str, layer: int, top_k: int | None, module: str) -> None:
    cfg = compose_config(["editor=memoir", f"model={model}"])
    e = cfg.editor
    assert (e.layer, e.top_k, e.module_template) == (layer, top_k, module)
    assert (e.lr, e.iterations, e.weight_decay, e.prompt_feature_agg) == (
        5.0 if model.startswith("tiny") else 1.0, 30, 1e-5, "mean_decentered")
    assert e.threshold == (0.8 if model.startswith("tiny") else 0.4)


def test_instantiate_from_config_and_reject_bad_settings() -> None:
    cfg = compose_config(["editor=memoir", "model=tiny_gpt2"])
    ed = build(cfg.editor, model=instantiate(cfg.model))  # as run_experiment
    assert isinstance(ed, MEMOIREditor) and type(ed.adapter.base_layer).__name__ == "Conv1D"
    assert ed.memory.shape == (64, 256) and ed.top_k == 128 and not torch.count_nonzero(ed.memory)
    assert ed.query_site() == "transformer.h.7.mlp.c_proj:input:prompt_mean"
    bad = [({"layer": 9}, r"editor\.layer=9 .*0\.\.7"),
           ({"top_k": 129}, "editor.top_k=129 must be between 1 and the memory's input width 128"),
           ({"threshold": 0.0}, r"editor.threshold must be in \(0, 1\]"),
           ({"prompt_feature_agg": "max"}, "editor.prompt_feature_agg must be one of"),
           ({"overlap": "cosine"}, "editor.overlap must be one of"),
           ({"background": "/nonexistent/bg.txt"}, "editor.background=/nonexistent/bg.txt is neither 'model'"),
           ({"context_template_length_params": [[5]]}, "editor.context_template_length_params must be"),
           ({"iterations": 0}, "editor.iterations must be positive")]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            MEMOIREditor(tiny_model(), **{"layer": 5, **fields})
