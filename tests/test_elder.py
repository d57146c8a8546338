"""ELDER: parameter count, codes, routing invariances, deferral, learning through the stream."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from elder.editor import ElderEditor
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel, byte_tokenizer
from evaluation.editing.unedited import Unedited
from evaluation.run.loggers import NullLogger
from evaluation.run.metrics import locality_inputs, predict
from evaluation.run.stream import run_stream
from tests.conftest import tiny_model, zsre_requests

LAYERS = [2, 3, 4, 5, 6, 7]


def _meta_model(arch: str) -> LoadedModel:
    with torch.device("meta"):
        if arch == "gpt2xl":
            model = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25))
            return LoadedModel(model, byte_tokenizer(), "gpt2xl", "transformer.h.{i}.mlp.c_fc", 48, "transformer.h.{i}")
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                             num_attention_heads=32, vocab_size=32000))
        return LoadedModel(model, byte_tokenizer(), "llama2", "model.layers.{i}.mlp.down_proj", 32, "model.layers.{i}")


@pytest.mark.parametrize("arch, query, layers, expected", [
    # per layer: N * r * (d_in + d_out) + router (d_q * N + N); spec section 7's note
    ("gpt2xl", 35, range(36, 42), 6 * (4 * 8 * (1600 + 6400) + 1600 * 4 + 4)),  # 1,574,424
    ("llama2", 20, range(21, 27), 6 * (4 * 8 * (11008 + 4096) + 11008 * 4 + 4)),  # 3,164,184
])
def test_parameter_count_at_paper_shapes(arch: str, query: int, layers: range, expected: int) -> None:
    editor = ElderEditor(_meta_model(arch), layers=list(layers), query_layer=query)
    assert editor.trainable_params() == expected
    assert round(expected / 1e6, 2) == {"gpt2xl": 1.57, "llama2": 3.16}[arch]


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_stream_learns_every_edit(arch: str) -> None:
    # One batch of four: on these 64-wide random models a later batch overwrites an earlier one
    # (measured: the first batch of 8 ZsRE edits drops to 0 after the second), so the stream's
    # learning is asserted per batch; the real model's multi-batch figures are in docs/findings.md.
    loaded = tiny_model(arch)
    requests = zsre_requests(4)
    base = predict(Unedited(loaded), *locality_inputs(requests))
    before = predict(Unedited(loaded), [r.prompt for r in requests], [r.target for r in requests])
    assert sum(p.exact for p in before) == 0  # nothing known before editing
    editor = ElderEditor(loaded, layers=LAYERS, query_layer=1, lr=1e-2, iterations=50)
    result = run_stream(editor, requests, base, NullLogger(), progress=False)
    assert result.metrics["reliability"] == 1.0
    assert result.metrics["reliability_token"] == 1.0
    assert len(editor.stored_codes) == 4


def test_codes_have_one_bit_per_selected_lora() -> None:
    editor = ElderEditor(tiny_model(), layers=LAYERS, query_layer=1, num_loras=4, top_k=2)
    codes = editor.codes_for(["The capital of France is", "Who wrote Hamlet?", "x"])
    assert codes.shape == (3, 6 * 4)
    assert codes.dtype == torch.bool
    assert codes.sum(-1).tolist() == [6 * 2] * 3
    assert codes.view(3, 6, 4).sum(-1).eq(2).all()  # exactly k per layer


def test_padding_side_does_not_change_routing() -> None:
    editor = ElderEditor(tiny_model(), layers=LAYERS, query_layer=1)
    prompts = ["A short one?", "A considerably longer question about a subject?", "Mid length prompt"]
    seen = {}
    for side in ("left", "right"):
        batch = encode_pairs(editor.tokenizer, prompts, ["a", "b", "c"], padding_side=side)
        with torch.no_grad(), editor.scope(batch.query_positions):
            target_logits(editor.model, batch)
            routes = editor.query.derived
            seen[side] = (routes.codes(4), routes.gates)
    assert torch.equal(seen["left"][0], seen["right"][0])
    torch.testing.assert_close(seen["left"][1], seen["right"][1])
    # and a row routes the same alone as in a padded batch
    assert torch.equal(editor.codes_for(prompts[:1])[0], seen["right"][0][0])


def test_deferral_returns_the_unedited_logits_bit_for_bit() -> None:
    loaded = tiny_model()
    requests = zsre_requests(4)
    probes = ["Ada Lovelace wrote her notes in", "nq question: who painted the chapel ceiling",
              "The Eiffel Tower is located in", "1 2 3 4 5 6", "zzzz qqqq"]
    probe_batch = encode_pairs(loaded.tokenizer, probes, ["French"] * len(probes))
    with torch.no_grad():
        before = target_logits(loaded.model, probe_batch).logits.clone()
    editor = ElderEditor(loaded, layers=LAYERS, query_layer=1, lr=1e-2, iterations=30)
    editor.edit(requests)
    from elder.routing import min_hamming
    dist = min_hamming(editor.codes_for(probes), editor.stored_codes)
    assert dist.max() > 0, "need a probe whose code differs from every stored one"
    editor.config.epsilon = int(dist.max())  # defer exactly the probes that are at least that far
    deferred = dist >= editor.config.epsilon
    with torch.no_grad(), editor.scope(probe_batch.query_positions):
        after = target_logits(editor.model, probe_batch)
    for row in range(len(probes)):
        sel = after.rows == row
        same = torch.equal(after.logits[sel], before[sel])
        assert same == bool(deferred[row]), f"row {row}: deferred={bool(deferred[row])} but identical={same}"
    # the edits themselves are not deferred: their own codes are stored (distance 0)
    assert min_hamming(editor.codes_for([r.prompt for r in requests]), editor.stored_codes).eq(0).all()


def test_nothing_stored_means_everything_deferred() -> None:
    loaded = tiny_model()
    batch = encode_pairs(loaded.tokenizer, ["Who is the author of Dune?"], ["Frank"])
    with torch.no_grad():
        before = target_logits(loaded.model, batch).logits.clone()
    editor = ElderEditor(loaded, layers=LAYERS, query_layer=1)
    for adapter in editor.adapters:  # a non-zero update that deferral must hide
        torch.nn.init.normal_(adapter.lora_B.data)
    with torch.no_grad(), editor.scope(batch.query_positions):
        assert torch.equal(target_logits(editor.model, batch).logits, before)


def test_guided_loss_pulls_routing_to_the_preset_allocation() -> None:
    loaded = tiny_model()
    requests = zsre_requests(4)
    editor = ElderEditor(loaded, layers=LAYERS, query_layer=1, lr=1e-2, iterations=60, guide_lambda=1.0)
    editor.edit(requests)
    preset = editor.allocator.batch([r.uid for r in requests])  # (B, L, k)
    codes = editor.stored_codes.view(4, 6, 4)
    hits = codes.gather(-1, preset).float().mean()
    assert hits > 0.9, f"only {hits:.0%} of preset indices are in the learned top-k"
    assert len({tuple(p.flatten().tolist()) for p in preset}) == 4  # distinct per fact


@pytest.mark.parametrize("kwargs, needle", [
    ({"top_k": 5}, "top_k"),
    ({"epsilon": 25}, "epsilon"),
    ({"layers": [2, 3, 99]}, "layer index 99"),
    ({"query_layer": 3}, "query_layer"),
    ({"aux_loss": "balance"}, "aux_loss"),
    ({"code_snapshot": "sometimes"}, "code_snapshot"),
])
def test_bad_hyper_parameters_are_named(kwargs: dict, needle: str) -> None:
    args = {"layers": LAYERS, "query_layer": 1, **kwargs}
    with pytest.raises(ConfigError, match=needle):
        ElderEditor(tiny_model(), **args)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_prefix_cache_gives_the_same_edits(arch: str) -> None:
    requests = zsre_requests(4)
    results = []
    for cached in (False, True):
        editor = ElderEditor(tiny_model(arch), layers=[4, 5, 6, 7], query_layer=3, lr=1e-2, iterations=5,
                             prefix_cache=cached)
        editor.edit(requests)
        results.append([a.lora_B.detach().clone() for a in editor.adapters] + [editor.stored_codes])
    for plain, cached in zip(*results):
        torch.testing.assert_close(plain, cached, rtol=0, atol=0)


def test_code_snapshot_last_iteration_stores_the_pre_step_codes() -> None:
    requests = zsre_requests(4)
    stored = {}
    for snapshot in ("last_iteration", "after_training"):
        editor = ElderEditor(tiny_model(), layers=LAYERS, query_layer=1, lr=1e-1, iterations=1,
                             code_snapshot=snapshot)
        before = editor.codes_for([r.prompt for r in requests])  # routers before the only step
        editor.edit(requests)
        stored[snapshot] = (before, editor.stored_codes, editor.codes_for([r.prompt for r in requests]))
    before, codes, _ = stored["last_iteration"]
    assert torch.equal(codes, before)
    _, codes, after = stored["after_training"]
    assert torch.equal(codes, after)


def test_state_round_trip_restores_the_edited_model() -> None:
    requests = zsre_requests(4)
    editor = ElderEditor(tiny_model(), layers=LAYERS, query_layer=1, lr=1e-2, iterations=10)
    editor.edit(requests)
    state = editor.state_dict()
    fresh = ElderEditor(tiny_model(), layers=LAYERS, query_layer=1, lr=1e-2, iterations=10)
    fresh.load_state_dict(state)
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    a, b = predict(editor, prompts, targets), predict(fresh, prompts, targets)
    assert all(torch.equal(x.predicted, y.predicted) for x, y in zip(a, b))
    assert torch.equal(editor.stored_codes, fresh.stored_codes)
