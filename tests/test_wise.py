"""WISE: edits learned through the real run, out-of-scope inputs bit for bit unedited (teacher forcing and cached
generation), knowledge sharding and merging, exact resume, configs and bad settings."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from baselines.wise import WISEEditor, gta_merge
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.generation import generate_continuations
from evaluation.run.experiment import build, run_experiment
from tests.conftest import DATA_DIR, compose_config, tiny_model, zsre_requests

pytestmark = pytest.mark.usefixtures("one_thread")

LOC = str(DATA_DIR / "counterfact" / "counterfact-train.json")
SHORT = (12, 22, 66, 145, 0, 5, 25, 53)  # zsRE edits with short targets (as tests/test_melo.py)


def short_requests() -> list:
    requests = zsre_requests(max(SHORT) + 1)
    return [requests[i] for i in SHORT]


def editor(model: str = "tiny_llama", **fields: Any) -> WISEEditor:
    return WISEEditor(tiny_model(model), **{"layer": 4, "template_lengths": [], "loc_corpus": LOC, **fields})


def logits(model: torch.nn.Module, tokenizer: Any, scope: WISEEditor | None, prompts: list, targets: list
           ) -> list[torch.Tensor]:
    batch = encode_pairs(tokenizer, prompts, targets)
    ctx = scope.scope(batch.query_positions) if scope is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        out = target_logits(model, batch)
    return [out.logits[out.rows == b] for b in range(len(prompts))]


# --- learning through the real run -------------------------------------------------------------------
def test_run_learns_edits(tmp_path: Path) -> None:
    overrides = ["editor=wise", "model=tiny_llama", "dataset.num_edits=4", "retention=none", "logger=none",
                 "progress=false", "checkpoint.every=0"]
    result = run_experiment(compose_config(overrides), tmp_path / "run",
                            {"editor": "wise", "model": "tiny_llama", "dataset": "zsre"})
    assert result["metrics"]["reliability"] >= 0.75  # base model: 0
    assert result["metrics"]["trainable_params"] == 64 * 128  # one down_proj side memory


# --- the router ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_out_of_scope_inputs_get_the_unedited_model_bit_for_bit(model: str) -> None:
    requests = short_requests()
    ed = editor(model, save_freq=1, mask_ratio=0.5, iterations=40)
    for r in requests[:2]:
        ed.edit([r])
    prompts = [r.prompt for r in requests[:2]] + [r.locality_prompt for r in requests] + [r.prompt for r in requests[2:]]
    targets = [r.target for r in requests[:2]] + [r.locality_answer for r in requests] + [r.target for r in requests[2:]]
    scope = ed.in_scope(prompts)
    assert scope[:2].all() and not scope.all()  # the edits are in scope, some other inputs are not
    base = tiny_model(model)  # the same seed: the unedited model
    edited = logits(ed.model, ed.tokenizer, ed, prompts, targets)
    unedited = logits(base.model, base.tokenizer, None, prompts, targets)
    assert all(torch.equal(edited[b], unedited[b]) for b in range(len(prompts)) if not scope[b])
    assert all(not torch.equal(edited[b], unedited[b]) for b in range(len(prompts)) if scope[b])

    # generation: left padding and a KV cache; the route is read from the prompt and kept while decoding
    out = generate_continuations(ed.model, ed.tokenizer, prompts, 6, scope=ed)
    ref = generate_continuations(base.model, base.tokenizer, prompts, 6)
    assert all(o.text == r.text for o, r, s in zip(out, ref, scope.tolist()) if not s)
    left = encode_pairs(ed.tokenizer, prompts, targets, padding_side="left")
    with torch.no_grad(), ed.scope(left.query_positions):  # the prompt's scores do not depend on the padding
        target_logits(ed.model, left)
        left_scores = ed.query.value.clone()
    assert torch.allclose(left_scores, ed.query_vectors(prompts).to(left_scores), atol=1e-4)


@pytest.mark.parametrize("retrieve", [True, False])
def test_the_threshold_ratio_is_read_only_at_inference(retrieve: bool) -> None:
    """``scope_report --sweep act_ratio=...`` sees a trained editor through other ratios without retraining: the
    merge mode's cached memories never freeze the threshold."""
    from evaluation.reporting.scope_report import with_setting

    requests = short_requests()
    ed = editor(save_freq=1 if retrieve else 4, merge_freq=4, retrieve=retrieve, mask_ratio=0.5, iterations=40)
    for r in requests[:2]:
        ed.edit([r])
    prompts = [r.prompt for r in requests[:2]] + [r.locality_prompt for r in requests]
    trained = ed.in_scope(prompts)
    assert trained[:2].all() and not trained.all()
    with_setting(ed, "act_ratio", 0.0)  # a zero threshold: every input reaches a side memory
    assert ed.in_scope(prompts).all()
    with_setting(ed, "act_ratio", 1e9)  # out of reach: every input keeps the main memory
    assert not ed.in_scope(prompts).any()
    with_setting(ed, "act_ratio", 0.88)
    assert torch.equal(ed.in_scope(prompts), trained)


def test_a_shard_trains_only_its_masked_entries_and_shards_merge() -> None:
    requests = short_requests()
    ed = editor(weight_decay=0.0, norm_constraint=None, iterations=5, save_freq=2, merge_freq=4)
    ed.edit([requests[0]])
    changed = ed.working.detach() != ed.main
    assert changed.any() and not (changed & ~ed.weight_mask).any()  # knowledge sharding: masked gradient only
    first_mask = ed.weight_mask.clone()
    ed.edit([requests[1]])  # the shard is full: put away, a fresh one starts from the main memory
    assert len(ed.memories) == 1 and torch.equal(ed.working.detach(), ed.main)
    ed.edit([requests[2]])
    assert not torch.equal(ed.weight_mask, first_mask)  # a new shard draws a new mask
    ed.edit([requests[3]])  # merge_freq: the two shards become one memory with the lower threshold
    assert len(ed.memories) == 1 and len(ed.memory_min_act) == 1 and ed.merge_count == 1
    assert ed.in_scope([requests[0].prompt]) is not None

    # TIES: keep each task vector's largest half, elect the sign by the total, average the agreeing entries
    base = torch.zeros(1, 4)
    a, b = torch.tensor([[2.0, -1.0, 0.1, 3.0]]), torch.tensor([[1.0, 1.5, -4.0, -0.5]])
    merged = gta_merge([0.5, 0.5], base, [a, b], 0.5, "ties", torch.Generator())
    assert torch.allclose(merged, torch.tensor([[2.0, 1.5, -4.0, 3.0]]))


# --- exact resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("retrieve", ["true", "false"])
def test_resumes_exactly_from_its_checkpoint(retrieve: str, tmp_path: Path) -> None:
    """A stream resumed from its checkpoint after 4 edits ends exactly as the full one (shards put away at 2
    and 6, merged at 4 and 8: both sides of the checkpoint)."""
    from evaluation.run.checkpoint import to_cpu
    from tests.test_resume import resume_pair

    full_editor, _ = resume_pair(["editor=wise", "dataset.num_edits=8", "editor.iterations=8", "editor.save_freq=2",
                                  "editor.merge_freq=4", f"editor.retrieve={retrieve}", "editor.template_lengths=[3]"],
                                 tmp_path)
    state = to_cpu(full_editor.state_dict())
    extra = state["_extra_state"]
    assert extra["merge_count"] == 2 and len(extra["prefixes"]) == 6  # "" + one prefix per seed word
    assert len(extra["memories"]) == (2 if retrieve == "true" else 0)


# --- configs and bad settings ------------------------------------------------------------------------
@pytest.mark.parametrize("model, layer, iterations, act_ratio", [
    ("smollm2", 25, 70, 0.88), ("llama2", 27, 70, 0.88), ("llama2_random", 27, 70, 0.88),
    ("gpt2xl", 8, 40, 0.8), ("gpt2xl_random", 8, 40, 0.8), ("tiny_llama", 4, 150, 0.88)])
def test_configs_compose(model: str, layer: int, iterations: int, act_ratio: float) -> None:
    cfg = compose_config(["editor=wise", f"model={model}"])
    e = cfg.editor
    assert (e.layer, e.iterations, e.act_ratio) == (layer, iterations, act_ratio)
    if not model.startswith("tiny"):  # the authors' llama-7b.yaml
        assert (e.mask_ratio, e.lr, e.alpha, e.beta, e.gamma, e.save_freq, e.merge_freq, e.merge_alg, e.densities,
                e.retrieve, e.norm_constraint) == (0.2, 1.0, 5.0, 20.0, 10.0, 500, 1000, "ties", 0.53, True, 1.0)
    assert Path(e.loc_corpus).is_file()


def test_bad_settings_are_one_line_errors() -> None:
    cfg = compose_config(["editor=wise", "model=tiny_gpt2"])
    ed = build(cfg.editor, model=instantiate(cfg.model))  # as run_experiment
    assert type(ed.adapters[0].base_layer).__name__ == "Conv1D" and ed.batch_size == 1
    cases = [({"layer": 8}, r"editor\.layer=8 .*0\.\.7"),
             ({"save_freq": 3, "merge_freq": 4}, "editor.merge_freq=4 must be a multiple of editor.save_freq=3"),
             ({"mask_ratio": 1.5}, r"editor.mask_ratio must be in \(0, 1\]"),
             ({"merge_alg": "slerp"}, "editor.merge_alg must be one of"),
             ({"key_position": "last"}, "editor.key_position must be one of"),
             ({"loc_corpus": "/nonexistent/loc.txt"}, "editor.loc_corpus=/nonexistent/loc.txt is neither .* nor an existing file")]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            editor(**fields)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="editor.loc_corpus must be set"):
        WISEEditor(tiny_model(), layer=4)
