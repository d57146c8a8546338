"""GRACE: codebook rules on hand-made keys, learning a stream, exact deferral, batching, state, configs."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from baselines.grace import Codebook, GraceEditor
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.generation import make_generate_fn
from evaluation.run.metrics import predict
from tests.conftest import compose_config, tiny_model, zsre_requests

# zsRE edits with short targets whose characters do not repeat: a tiny random model learns these
# through one replaced vector (a repeated character needs context the random model does not carry)
EASY = (12, 22, 66, 145)  # Babur, Lyra, Mars, Lynx


pytestmark = pytest.mark.usefixtures("one_thread")


def easy_requests() -> list[EditRequest]:
    requests = zsre_requests(max(EASY) + 1)
    return [requests[i] for i in EASY]


def logits(editor: GraceEditor, prompts: list[str], targets: list[str]) -> torch.Tensor:
    batch = encode_pairs(editor.tokenizer, prompts, targets)
    with torch.no_grad(), editor.scope(batch.query_positions):
        return target_logits(editor.model, batch).logits


# --- codebook rules --------------------------------------------------------------------------------
def test_codebook_grows_expands_and_splits() -> None:
    cb = Codebook(key_dim=2, value_dim=3, init_eps=1.0)
    value = lambda: torch.zeros(3)  # noqa: E731
    k = lambda x, y: torch.tensor([x, y], dtype=torch.float32)  # noqa: E731

    assert cb.insert(k(0, 0), "a", value) == (0, "new")
    assert cb.insert(k(5, 0), "b", value) == (1, "new")  # 5 > eps + radius = 2: a key of its own
    assert len(cb) == 2
    assert cb.insert(k(0, 1.5), "a", value) == (0, "expand")  # same label, overlapping: widen key 0
    assert len(cb) == 2 and cb.radii[0].item() == pytest.approx(1.5)
    assert cb.insert(k(0, 0.5), "a", value) == (0, "reuse")  # already covered
    assert cb.insert(k(5, 1.2), "c", value) == (2, "split")  # other label, overlapping: halve both
    assert len(cb) == 3
    assert cb.radii[1].item() == pytest.approx(0.6 - 1e-5)
    assert cb.radii[2].item() == pytest.approx(0.6)
    assert cb.labels == ["a", "b", "c"]

    active, index = cb.lookup(torch.stack([k(5, 0.7), k(5, -0.5), k(0, 1.4), k(20, 20), k(5, 2.0)]))
    assert index.tolist()[:3] == [2, 1, 0]
    assert active.tolist() == [True, True, True, False, False]  # (5, 2) is 0.8 from key 2: outside 0.6


def test_codebook_moving_average_and_reedit_of_the_same_key() -> None:
    cb = Codebook(key_dim=2, value_dim=1, init_eps=1.0, eps_expand="moving_average")
    value = lambda: torch.zeros(1)  # noqa: E731
    cb.insert(torch.tensor([0.0, 0.0]), "a", value)
    assert cb.insert(torch.tensor([0.0, 1.5]), "a", value) == (0, "expand")
    assert cb.keys[0].tolist() == [0.0, 0.75] and cb.radii[0].item() == pytest.approx(1.5)
    # the same key edited to another label: the new key wins the tie and covers it
    assert cb.insert(torch.tensor([0.0, 0.75]), "b", value) == (1, "split")
    active, index = cb.lookup(torch.tensor([[0.0, 0.75]]))
    assert index.tolist() == [1] and active.tolist() == [True]


# --- the editor on a tiny model --------------------------------------------------------------------
def test_stream_learns_every_edit_and_leaves_other_inputs_exact() -> None:
    requests = easy_requests()
    loaded = tiny_model("tiny_llama")
    prompts = [r.prompt for r in requests] + [r.locality_prompt for r in requests]
    targets = [r.target for r in requests] + [r.locality_answer for r in requests]
    batch = encode_pairs(loaded.tokenizer, prompts, targets)
    with torch.no_grad():
        base = target_logits(loaded.model, batch)

    editor = GraceEditor(loaded, layer=1, replacement="replace_all", iterations=100)  # grace_tiny_llama.yaml
    for request in requests:
        editor.edit([request])
    assert len(editor.codebook) == len(requests)  # every edit has a new label: one key each
    d_in, d_out = editor.codebook.keys.shape[1], editor.codebook.values.shape[1]
    assert editor.trainable_params() == len(requests) * d_out
    assert editor.stored_params() == len(requests) * (d_in + 1)

    rel = predict(editor, [r.prompt for r in requests], [r.target for r in requests])
    assert [p.exact for p in rel] == [1.0] * len(requests)

    # locality prompts lie outside every key's radius: their logits are the unedited model's, bit for bit
    batch_keys = editor.keys_for(batch)
    active, _ = editor.codebook.lookup(batch_keys)
    assert active.tolist() == [True] * len(requests) + [False] * len(requests)
    edited = logits(editor, prompts, targets)
    n_edit_rows = int((base.rows < len(requests)).sum())
    assert torch.equal(edited[n_edit_rows:], base.logits[n_edit_rows:])
    assert not torch.equal(edited[:n_edit_rows], base.logits[:n_edit_rows])

    # batched and one-at-a-time evaluation agree
    together = predict(editor, prompts, targets, batch_size=len(prompts))
    alone = predict(editor, prompts, targets, batch_size=1)
    assert all(torch.equal(a.predicted, b.predicted) for a, b in zip(together, alone))

    # greedy generation reuses the prompt's route for the generated tokens and reproduces the targets
    generate = make_generate_fn(editor.model, editor.tokenizer, editor, progress=False)
    out = generate([r.prompt for r in requests], max_new_tokens=max(len(r.target) for r in requests) + 1)
    assert [o.text[:len(r.target) + 1] for o, r in zip(out, requests)] == [" " + r.target for r in requests]

    # state round trip onto a freshly built editor
    fresh = GraceEditor(tiny_model("tiny_llama"), layer=1, replacement="replace_all")
    fresh.load_state_dict(editor.state_dict())
    assert torch.equal(logits(fresh, prompts, targets), edited)


def test_replace_last_changes_only_the_query_token_of_edited_rows() -> None:
    request = easy_requests()[1]
    loaded = tiny_model("tiny_gpt2")  # Conv1D c_fc
    editor = GraceEditor(loaded, layer=6, iterations=30)  # the default replacement: replace_last
    outputs: list[torch.Tensor] = []
    handle = editor.adapter.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    prompts = [request.prompt, request.locality_prompt]
    targets = [request.target, request.locality_answer]
    batch = encode_pairs(editor.tokenizer, prompts, targets)
    with torch.no_grad():
        before = logits(editor, prompts, targets)  # empty codebook: the base model
    editor.edit([request])
    outputs.clear()
    after = logits(editor, prompts, targets)
    handle.remove()

    base_out = editor.adapter.base_layer(_layer_input(editor, batch))
    changed = (outputs[0] != base_out).any(-1)  # (B, T) positions whose layer output was replaced
    q = batch.query_positions
    assert changed[0].nonzero().flatten().tolist() == [q[0].item()]
    assert not changed[1].any()
    rows = (batch.labels[:, 1:] != -100).sum(-1)
    n0 = int(rows[0])
    assert torch.equal(after[n0:], before[n0:])  # the locality row: bit for bit
    # the query token now predicts the target's first token (its leading space)
    assert after[0].argmax().item() == editor.tokenizer(" ").input_ids[0]


def _layer_input(editor: GraceEditor, batch) -> torch.Tensor:
    inputs: list[torch.Tensor] = []
    handle = editor.adapter.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        target_logits(editor.model, batch)
    handle.remove()
    return inputs[0]


# --- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, layer, iterations", [
    ("gpt2xl", 35, 200), ("gpt2xl_random", 35, 200), ("llama2", 27, 50), ("llama2_random", 27, 50),
    ("smollm2", 25, 100), ("tiny_gpt2", 1, 100), ("tiny_llama", 1, 100),
])
def test_configs_compose(model: str, layer: int, iterations: int) -> None:
    cfg = compose_config(["editor=grace", f"model={model}"])
    assert cfg.editor.layer == layer and cfg.editor.iterations == iterations
    assert cfg.editor.eps == 1.0 and cfg.editor.lr == 1.0 and cfg.editor.batch_size == 1
    assert 0 <= layer < cfg.model.num_layers


def test_instantiate_from_config_and_reject_a_bad_layer() -> None:
    cfg = compose_config(["editor=grace", "model=tiny_gpt2"])
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))  # as run_experiment
    assert isinstance(editor, GraceEditor) and editor.batch_size == 1
    with pytest.raises(ConfigError, match=r"editor\.layer=8 .*0\.\.7"):
        GraceEditor(tiny_model("tiny_gpt2"), layer=8)
    with pytest.raises(ConfigError, match="editor.replacement"):
        GraceEditor(tiny_model("tiny_gpt2"), layer=1, replacement="replace_first")


def test_prefix_cache_changes_nothing_but_speed() -> None:
    request = easy_requests()[0]
    values = []
    for cache in (True, False):
        editor = GraceEditor(tiny_model("tiny_llama"), layer=3, iterations=5, prefix_cache=cache)
        editor.edit([request])
        assert (editor.prefix is not None) == cache
        values.append(editor.codebook.values.clone())
    assert torch.equal(values[0], values[1])


@pytest.mark.parametrize("arch, layer, per_edit", [("gpt2xl", 35, 6400), ("llama2", 27, 4096)])
def test_one_value_per_key_gives_table3_counts_at_paper_shapes(arch: str, layer: int, per_edit: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from evaluation.editing.models import LoadedModel, byte_tokenizer

    with torch.device("meta"):
        if arch == "gpt2xl":
            model = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25))
            loaded = LoadedModel(model, byte_tokenizer(), arch, "transformer.h.{i}.mlp.c_fc", 48)
        else:
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                                 num_attention_heads=32, vocab_size=32000))
            loaded = LoadedModel(model, byte_tokenizer(), arch, "model.layers.{i}.mlp.down_proj", 32)
    editor = GraceEditor(loaded, layer=layer, prefix_cache=False)
    assert editor.trainable_params() == 0
    assert editor.codebook.values.shape[1] == per_edit  # 1000 edits: 6.4M (GPT2-XL), 4.1M (LLaMA-2-7B), Table 3
