"""ROME on the tiny random models: the edit, the rank-one update, subject lookup, state, covariance cache."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import baselines.rome.covariance as covariance
from baselines.rome import ROMEEditor
from baselines.rome.compute_key import generate_prefixes, key_reprs, locate
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel
from evaluation.run.metrics import predict
from tests.conftest import (
    compose_config,
    save_merged_tokenizer,
    tiny_with_tokenizer,
    zsre_requests,
)

TEMPLATES = {"gpt2": "transformer.h.{i}.mlp.c_proj", "llama": "model.layers.{i}.mlp.down_proj"}
LAYERS = {"gpt2": 3, "llama": 1}  # conf/editor_model/rome_tiny_*.yaml
MODELS = ("smollm2", "gpt2xl", "llama2", "tiny_gpt2", "tiny_llama", "gpt2xl_random", "llama2_random")
FEW_PREFIXES = [[5, 5]]  # 5 generated prefixes instead of the authors' 20, to keep the tests fast

# ROME writes one vector at the subject's last token. A random model's attention does not carry that
# vector to later positions, so the edits the tests expect to be learned put the subject at the end of
# the prompt and use a target that is one token: " Q" and " Z" are single tokens of the tokenizer below.
EDITS = [
    EditRequest(0, "The capital of Zorbland", "Q", "", "", "", subject="Zorbland"),
    EditRequest(1, "The mayor of Quux", "Z", "", "", "", subject="Quux"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def merged_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_merged_tokenizer(tmp_path_factory.mktemp("tokenizer"), ("Q", "Z"))


tiny = tiny_with_tokenizer


def editor(arch: str, model: LoadedModel, **kwargs) -> ROMEEditor:
    kwargs.setdefault("context_template_length_params", FEW_PREFIXES)
    return ROMEEditor(model, layer=LAYERS[arch], module_template=TEMPLATES[arch], **kwargs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_learns_the_edit_just_made(arch, merged_tokenizer):
    model = tiny(arch, merged_tokenizer)
    assert len(model.tokenizer(" Q", add_special_tokens=False).input_ids) == 1
    ed = editor(arch, model)  # the authors' value settings (GPT2-XL file)
    for r in EDITS:
        assert predict(ed, [r.prompt], [r.target])[0].exact == 0.0
        stats = ed.edit([r])
        assert predict(ed, [r.prompt], [r.target])[0].exact == 1.0, stats
    assert ed.num_edits == 2 and ed.subject_fallbacks == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_update_is_rank_one_and_maps_the_key_to_the_value(arch):
    """On a multi-token ZsRE edit: the matrix changes by rank one, and the rewritten matrix's output at
    the subject of the bare prompt moves by exactly the optimised delta (the closed form is exact)."""
    model = tiny(arch)
    ed = editor(arch, model)
    r = zsre_requests(1)[0]
    before_w = ed.module.weight.detach().clone()
    prefixes = ed.context_prefixes()
    before = key_reprs(model.model, model.tokenizer, ed.module, prefixes, r.prompt, r.subject)
    stats = ed.edit([r])
    update = ed.module.weight.detach() - before_w
    assert update.shape == before_w.shape
    s = torch.linalg.svdvals(update.double())
    assert s[0] > 0 and s[1] / s[0] < 1e-5
    assert torch.linalg.matrix_rank(update, rtol=1e-5) == 1
    after = key_reprs(model.model, model.tokenizer, ed.module, prefixes, r.prompt, r.subject)
    moved = (after.outputs[0] - before.outputs[0]).norm().item()
    assert moved == pytest.approx(stats.extra["delta_norm"], rel=1e-3)
    u, _ = ed.last_update  # type: ignore[misc]
    expected_u = before.key / before.key.norm()
    assert torch.allclose(u, expected_u.cpu(), atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_r_rome_solves_the_update_at_the_averaged_key(arch):
    """``update_key=average`` (r-ROME): the same u and optimised delta, but the update writes the delta exactly at
    the prefix-averaged key k* (not at the bare prompt's k0), so the two readings differ by the ratio u.k0 / u.k*."""
    r = zsre_requests(1)[0]
    updates = {}
    for key in ("prompt", "average"):
        model = tiny(arch)
        ed = editor(arch, model, update_key=key)
        before_w = ed.module.weight.detach().clone()
        before = key_reprs(model.model, model.tokenizer, ed.module, ed.context_prefixes(), r.prompt, r.subject)
        stats = ed.edit([r])
        update = (ed.module.weight.detach() - before_w).double()
        update = update.T if ed.transposed else update  # (out, in)
        written_at = before.inputs[0] if key == "prompt" else before.key
        assert (update @ written_at.double()).norm().item() == pytest.approx(stats.extra["delta_norm"], rel=1e-3)
        updates[key] = (update, ed.last_update[0].double())  # type: ignore[index]
    (prompt, u), (average, u_avg) = updates["prompt"], updates["average"]
    assert torch.allclose(u, u_avg)
    ratio = torch.dot(u, before.key.double()) / torch.dot(u, before.inputs[0].double())
    assert not torch.allclose(prompt, average) and torch.allclose(average * ratio, prompt, rtol=1e-3, atol=1e-7)


def test_only_the_rewritten_matrix_changes():
    model = tiny("gpt2")
    ed = editor("gpt2", model)  # wraps the blocks below for replay (their keys gain '.block')
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    ed.edit(zsre_requests(1))
    changed = [k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["transformer.h.3.mlp.c_proj.weight"]
    assert not any(p.requires_grad for p in model.model.parameters())


def test_subject_lookup_and_fallback(caplog):
    model = tiny("llama")
    tok = model.tokenizer
    found = locate(tok, "Hello. ", "What university did Watts Humphrey attend?", "Watts Humphrey")
    assert found.found and tok.decode(found.ids[found.index]) == "y"  # byte tokens: last of "Humphrey"
    assert tok.decode(found.ids[:found.index + 1]).endswith("Watts Humphrey")
    ed = editor("llama", model, v_num_grad_steps=2)
    r = EditRequest(0, "What university did Watts Humphrey attend?", "Yale", "", "", "", subject="Nobody")
    with caplog.at_level(logging.WARNING, logger="baselines.rome.editor"):
        stats = ed.edit([r])
    assert ed.subject_fallbacks == 1 and stats.extra["subject_fallbacks"] == 1.0
    assert any("'Nobody' not found" in m and "1 of 1" in m for m in caplog.messages)


def test_prefixes_are_seeded_and_generated_once():
    model = tiny("gpt2")
    a = generate_prefixes(model.model, model.tokenizer, [[5, 5], [10, 5]], seed=3)
    b = generate_prefixes(model.model, model.tokenizer, [[5, 5], [10, 5]], seed=3)
    assert a == b and len(a) == 11 and a[0] == "" and all(p.endswith(". ") for p in a[1:])
    ed = editor("gpt2", model, v_num_grad_steps=2)
    ed.edit(zsre_requests(2)[:1])
    first = list(ed.prefixes)  # type: ignore[arg-type]
    ed.edit(zsre_requests(2)[1:])
    assert ed.prefixes == first


def test_state_round_trip_restores_identical_outputs(tmp_path):
    rs = zsre_requests(2)
    ed = editor("llama", tiny("llama"), v_num_grad_steps=5)
    for r in rs:
        ed.edit([r])
    ed.save(tmp_path / "rome.pt")
    fresh = editor("llama", tiny("llama"), v_num_grad_steps=5)
    fresh.load(tmp_path / "rome.pt")
    batch = encode_pairs(ed.tokenizer, [r.prompt for r in rs], [r.target for r in rs])
    with torch.no_grad():
        assert torch.equal(target_logits(ed.model, batch).logits, target_logits(fresh.model, batch).logits)
    assert fresh.prefixes == ed.prefixes and fresh.num_edits == 2


def test_parameter_counts():
    ed = editor("llama", tiny("llama"))
    assert ed.trainable_params() == 128 * 64  # down_proj of the tiny LLaMA: 128 -> 64
    assert ed.stored_params() == 0


def _corpus(path: Path) -> Path:
    words = "river stone light market winter garden signal harbor copper violin forest engine".split()
    lines = [" ".join(words[(i * 7 + j * 5) % len(words)] for j in range(12)) + f" {i}." for i in range(40)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_covariance_statistics_are_cached_and_reloaded(tmp_path, monkeypatch):
    corpus, cache = _corpus(tmp_path / "corpus.txt"), tmp_path / "stats"
    r = zsre_requests(1)[0]
    kwargs = dict(mom2_adjustment=True, mom2_corpus=str(corpus), mom2_n_samples=40, cache_dir=str(cache),
                  v_num_grad_steps=3)
    ed = editor("gpt2", tiny("gpt2"), **kwargs)
    ed.edit([r])
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and ed.mom2_path == str(files[0])
    saved = torch.load(files[0], weights_only=True)
    c = saved["mom2"]
    assert c.shape == (256, 256) and torch.allclose(c, c.T) and saved["texts"] == 40 and saved["count"] > 256
    # the direction is C^-1 k / ||C^-1 k||, not k / ||k||
    key = key_reprs(ed.model, ed.tokenizer, ed.module, ed.prefixes, r.prompt, r.subject).key  # type: ignore[arg-type]
    expected = torch.linalg.inv(c.double()).float() @ key
    assert torch.allclose(ed.last_update[0], expected / expected.norm(), atol=1e-4)  # type: ignore[index]

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached statistics should have been loaded")

    monkeypatch.setattr(covariance, "collect", no_recompute)
    again = editor("gpt2", tiny("gpt2"), **kwargs)
    again.edit([r])
    assert again.mom2_path == ed.mom2_path
    assert torch.equal(torch.load(files[0], weights_only=True)["mom2"], c)
    assert torch.allclose(again.module.weight, ed.module.weight)
    # another model under the same name misses the cache (fingerprint of the key activations)
    other = editor("gpt2", tiny("gpt2", seed=1), **kwargs)
    with pytest.raises(AssertionError, match="cached statistics"):
        other.edit([r])


def test_corpus_formats_and_errors(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    assert covariance.read_corpus(jsonl, 2) == ["one", "two"]
    with pytest.raises(ConfigError, match="mom2_text_field"):
        covariance.read_corpus(jsonl, 2, text_field="body")
    with pytest.raises(ConfigError, match=r"\.txt or \.jsonl"):
        (tmp_path / "c.csv").write_text("a\n")
        covariance.read_corpus(tmp_path / "c.csv", 2)
    few = tmp_path / "few.txt"
    few.write_text("a b\n", encoding="utf-8")
    ed = editor("llama", tiny("llama"), mom2_adjustment=True, mom2_corpus=str(few), cache_dir=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="singular"):
        ed.edit(zsre_requests(1))


def test_bad_settings_are_config_errors():
    model = tiny("gpt2")
    with pytest.raises(ConfigError, match=r"editor\.layer=48 .*0\.\.7"):
        ROMEEditor(model, layer=48, module_template=TEMPLATES["gpt2"])
    with pytest.raises(ConfigError, match="cache_dir"):
        ROMEEditor(model, layer=3, module_template=TEMPLATES["gpt2"], mom2_adjustment=True)
    with pytest.raises(ConfigError, match="mom2_corpus=/no/such.txt is neither 'model'"):
        ROMEEditor(model, layer=3, module_template=TEMPLATES["gpt2"], mom2_adjustment=True, cache_dir="/tmp",
                   mom2_corpus="/no/such.txt")
    with pytest.raises(ConfigError, match="fact_token"):
        ROMEEditor(model, layer=3, module_template=TEMPLATES["gpt2"], fact_token="subject_first")
    with pytest.raises(ConfigError, match=r"update_key must be one of prompt\|average, got 'mean'"):
        ROMEEditor(model, layer=3, module_template=TEMPLATES["gpt2"], update_key="mean")
    with pytest.raises(ConfigError, match="cannot edit a"):
        ROMEEditor(model, layer=3, module_template="transformer.h.{i}.mlp")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_has_a_layer_choice(model):
    cfg = compose_config(["editor=rome", f"model={model}"])
    assert 0 <= cfg.editor.layer < cfg.model.num_layers
    assert cfg.editor.module_template.endswith(("mlp.c_proj", "mlp.down_proj"))
    assert cfg.editor.v_lr == 0.5 and cfg.editor.clamp_norm_factor == 4.0 and cfg.editor.kl_factor == 0.0625
    # the original's covariance adjustment is on for GPT2-XL (kmeng01/rome), off on LLaMA (EasyEdit's llama-7b)
    assert cfg.editor.mom2_adjustment is model.startswith("gpt2xl") and cfg.editor.cache_dir.endswith("rome_stats")
    assert cfg.editor.mom2_corpus == "model"


def test_composed_config_instantiates_on_a_tiny_model():
    cfg = compose_config(["editor=rome", "model=tiny_gpt2"])
    ed = instantiate(cfg.editor, model=tiny("gpt2"))
    assert isinstance(ed, ROMEEditor)
    assert ed.module_name == "transformer.h.3.mlp.c_proj" and ed.transposed and ed.batch_size == 1
    assert ed.length_params == [[5, 10], [10, 10]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stepping_from_the_subject_gives_the_same_edits_as_whole_rows(arch):
    """v_from_subject computes the tokens before each row's subject once per edit: three sequential ZsRE edits end
    with the same weights as the original whole-row loop up to float rounding, in the same iterations."""
    results = {}
    for from_subject in (False, True):
        ed = editor(arch, tiny(arch), v_from_subject=from_subject)
        before = ed.module.weight.detach().clone()
        iterations = [ed.edit([r]).iterations for r in zsre_requests(3)]
        results[from_subject] = (ed.module.weight.detach() - before, iterations)
    (whole, its_whole), (stepped, its_stepped) = results[False], results[True]
    assert its_whole == its_stepped
    assert whole.abs().max() > 0.1  # real edits
    assert (stepped - whole).abs().max() < 1e-3 * whole.abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_cache_gives_a_bit_identical_update(arch):
    """Replaying the blocks below the edited layer in the value loop changes nothing but speed."""
    weights = []
    for cache in (True, False):
        ed = editor(arch, tiny(arch), prefix_cache=cache)
        assert (ed.prefix is not None) == cache
        ed.edit(zsre_requests(2)[:1])
        ed.edit(zsre_requests(2)[1:])
        weights.append(ed.module.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], tiny(arch).model.get_submodule(ed.module_name).weight)


def test_floor_spec_counts_every_prefixed_row():
    ed = editor("llama", tiny("llama"))
    spec = ed.floor_spec()
    assert spec.prompt_prefixes == tuple(ed.context_prefixes()) and spec.prompt_prefixes[0] == ""
    assert len(spec.prompt_prefixes) == 1 + 5 and spec.first_layer == LAYERS["llama"]
