"""WilKE on the tiny random models: the wise-layer rule, learning through the stream, state, configs."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

import baselines.rome.covariance as covariance
import baselines.wilke as wilke
from baselines.rome.editor import RankOneUpdate
from baselines.wilke import WilKEEditor
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel
from evaluation.editing.unedited import Unedited
from evaluation.run.checkpoint import CheckpointManager, checkpoint_name, to_cpu
from evaluation.run.experiment import build, seed_everything
from evaluation.run.loggers import NullLogger
from evaluation.run.metrics import locality_inputs, predict
from evaluation.run.stream import run_stream
from tests.conftest import (
    compose_config,
    save_merged_tokenizer,
    tiny_with_tokenizer,
    zsre_requests,
)

TEMPLATES = {"gpt2": "transformer.h.{i}.mlp.c_proj", "llama": "model.layers.{i}.mlp.down_proj"}
LAYERS = [0, 1, 2, 3]  # conf/editor/wilke.yaml's rule on 8 layers: the first half
FEW_PREFIXES = [[5, 5]]  # 5 generated prefixes instead of the authors' 20, to keep the tests fast
MODELS = ("smollm2", "gpt2xl", "gpt2xl_random", "llama2", "llama2_random", "gemma3_270m", "tiny_gpt2", "tiny_llama")
TARGETS = ("Q", "Z", "X", "V")  # one token each with the tokenizer below

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def merged_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_merged_tokenizer(tmp_path_factory.mktemp("tokenizer"), TARGETS)


tiny = tiny_with_tokenizer


def editor(arch: str, model: LoadedModel, **kwargs) -> WilKEEditor:
    kwargs.setdefault("context_template_length_params", FEW_PREFIXES)
    kwargs.setdefault("layers", LAYERS)
    return WilKEEditor(model, module_template=TEMPLATES[arch], **kwargs)


def weights(ed: WilKEEditor) -> list[torch.Tensor]:
    return [w.detach().clone() for w in ed.weights]


# --- the rule -------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection, expected", [("relative", 2), ("absolute", 1)])
def test_the_smallest_update_wins_and_only_its_matrix_changes(monkeypatch, selection, expected):
    """Constructed scores: every candidate's update is fixed (norms 3, 2, 2.5, 4), and layer 2's matrix is
    scaled by 100 beforehand, so relative to its matrix layer 2's update is the smallest, in absolute
    terms layer 1's. The chosen layer's matrix changes by exactly its rank-one update; the others not."""
    model = tiny("gpt2")
    with torch.no_grad():
        model.model.get_submodule(TEMPLATES["gpt2"].format(i=2)).weight.mul_(100.0)
    ed = editor("gpt2", model, selection=selection)
    d_in, d_out = ed.weights[0].shape  # Conv1D: (in, out)
    u = torch.zeros(d_in)
    u[0] = 1.0
    norms = [3.0, 2.0, 2.5, 4.0]
    rights = {id(m): torch.full((d_out,), n / d_out ** 0.5) for m, n in zip(ed.candidate_modules, norms)}
    seen = []

    def fixed_update(model, tokenizer, module, prefixes, request, c, **shared):
        seen.append(id(module))
        return RankOneUpdate(u, rights[id(module)], True, 0.5, 0.0, 3, 1.0)

    monkeypatch.setattr(wilke, "rank_one_update", fixed_update)
    before = weights(ed)
    stats = ed.edit(zsre_requests(1))
    assert seen == [id(m) for m in ed.candidate_modules]  # every candidate is scanned, in order
    norms_w = [w.float().norm().item() for w in before]
    want = [n / nw for n, nw in zip(norms, norms_w)] if selection == "relative" else norms
    assert ed.scores[0] == pytest.approx(want, rel=1e-5)
    assert ed.chosen == [expected] and stats.extra["layer"] == expected
    assert stats.iterations == 3 * len(LAYERS)  # the whole scan's value iterations
    for i, (old, new) in enumerate(zip(before, weights(ed))):
        if LAYERS[i] == expected:
            torch.testing.assert_close(new - old, torch.outer(u, rights[id(ed.candidate_modules[i])]))
        else:
            assert torch.equal(new, old), i


def test_a_tie_goes_to_the_lowest_layer(monkeypatch):
    ed = editor("llama", tiny("llama"), selection="absolute")
    d_out, d_in = ed.weights[0].shape
    update = RankOneUpdate(torch.ones(d_in) / d_in ** 0.5, torch.ones(d_out), True, 0.0, 0.0, 1, 0.0)
    monkeypatch.setattr(wilke, "rank_one_update", lambda *a, **k: update)
    ed.edit(zsre_requests(1))
    assert ed.chosen == [0] and len(set(ed.scores[0])) == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_real_edit_goes_to_the_argmin_layer_by_rank_one(arch):
    """No patching: the chosen layer is the candidate with the lowest score, its score is the real change
    ||dW||_F / ||W||_F, and nothing else of the model changes."""
    model = tiny(arch)
    ed = editor(arch, model, v_num_grad_steps=5)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    stats = ed.edit(zsre_requests(1))
    scores = ed.scores[0]
    i = min(range(len(scores)), key=scores.__getitem__)
    assert ed.chosen == [LAYERS[i]] and stats.extra["score"] == scores[i]
    changed = [k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])]
    name = f"{ed.module_names[i]}.weight"
    assert [k.replace(".block", "") for k in changed] == [name]  # blocks below are wrapped for replay
    key = next(k for k in before if k.replace(".block", "") == name)
    update = model.model.state_dict()[key] - before[key]
    assert torch.linalg.matrix_rank(update, rtol=1e-5) == 1
    assert scores[i] == pytest.approx((update.norm() / before[key].norm()).item(), rel=1e-4)
    assert ed.last_update is not None and ed.last_update[0] == LAYERS[i]


def test_the_shared_pass_scans_as_the_whole_row_loop_did():
    """One key pass and one value batch (from the subject on) for all candidates: the same scores up to float
    rounding, the same layer, the same iterations as scanning each candidate over whole rows."""
    runs = {}
    for from_subject in (False, True):
        ed = editor("llama", tiny("llama"), v_num_grad_steps=5, v_from_subject=from_subject)
        stats = [ed.edit([r]) for r in zsre_requests(2)]
        runs[from_subject] = (ed.chosen, ed.scores, [s.iterations for s in stats])
    (chosen_a, scores_a, its_a), (chosen_b, scores_b, its_b) = runs[False], runs[True]
    assert chosen_a == chosen_b and its_a == its_b
    assert scores_b == [pytest.approx(s, rel=1e-3) for s in scores_a]


# --- learning through the stream --------------------------------------------------------------------
SUBJECTS = ("Zorbland", "Quux", "Blenk", "Morvania")
PROMPTS = ("The capital of {}", "A song written by {}", "Tell me about {}", "Everyone in town knows {}")


def learnable_edits() -> list[EditRequest]:
    return [EditRequest(i, p.format(s), t, f"Who rules {s}", "The colour of grass is", "green", subject=s)
            for i, (p, s, t) in enumerate(zip(PROMPTS, SUBJECTS, TARGETS))]


def test_stream_learns_the_edits(merged_tokenizer):
    """Through the real stream on the tiny LLaMA: at least 3 of 4 edits hold at the end (measured: 4 of 4;
    ROME at its layer 3: 3 of 4). On the tiny random GPT-2 every later edit overwrites the earlier ones, for
    ROME as for WilKE (1 of 4 each, measured), so there the next test checks each edit as it is made."""
    loaded = tiny("llama", merged_tokenizer)
    requests = learnable_edits()
    assert all(len(loaded.tokenizer(" " + t, add_special_tokens=False).input_ids) == 1 for t in TARGETS)
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    assert sum(p.exact for p in predict(Unedited(loaded), prompts, targets)) == 0  # nothing known before
    base = predict(Unedited(loaded), *locality_inputs(requests))
    ed = editor("llama", loaded)  # the authors' value settings (GPT2-XL file)
    result = run_stream(ed, requests, base, NullLogger(), progress=False, handle_signals=False)
    assert result.metrics["reliability"] >= 0.75, (result.metrics, ed.chosen)
    assert ed.num_edits == 4 and len(ed.scores) == 4 and ed.subject_fallbacks == 0
    assert sum(ed.layer_counts().values()) == 4


@pytest.mark.slow  # the LLaMA stream test covers learning in the default suite; this adds GPT-2's Conv1D path
def test_learns_each_edit_as_it_is_made_on_gpt2(merged_tokenizer):
    ed = editor("gpt2", tiny("gpt2", merged_tokenizer))
    for r in learnable_edits():
        assert predict(ed, [r.prompt], [r.target])[0].exact == 0.0
        stats = ed.edit([r])
        assert predict(ed, [r.prompt], [r.target])[0].exact == 1.0, stats


# --- state ----------------------------------------------------------------------------------------
def test_state_is_extra_state_only_and_the_weights_are_the_models_own():
    model = tiny("gpt2")
    own = [model.model.get_submodule(TEMPLATES["gpt2"].format(i=layer)).weight for layer in LAYERS]
    ed = editor("gpt2", model)  # wraps the blocks below layer 3 for replay (their names gain '.block')
    assert sorted(ed.state_dict()) == ["_extra_state"]  # the updates' factors, not the matrices
    assert all(ed.weights[i] is own[i] for i in range(len(LAYERS)))  # the model's own parameters
    assert ed.trainable_params() == len(LAYERS) * 256 * 64  # every candidate c_proj: 256 -> 64
    assert ed.stored_params() == 0


def test_resume_from_a_state_round_trip_equals_the_uninterrupted_stream(tmp_path):
    rs = zsre_requests(3)
    settings = dict(v_num_grad_steps=4)
    whole = editor("llama", tiny("llama"), **settings)
    for r in rs:
        whole.edit([r])
    first = editor("llama", tiny("llama"), **settings)
    first.edit(rs[:1])
    first.save(tmp_path / "wilke.pt")
    resumed = editor("llama", tiny("llama"), **settings)
    resumed.load(tmp_path / "wilke.pt")
    assert resumed.chosen == first.chosen and resumed.prefixes == first.prefixes
    for r in rs[1:]:
        resumed.edit([r])
    assert resumed.chosen == whole.chosen and resumed.scores == whole.scores
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(whole)))
    batch = encode_pairs(whole.tokenizer, [r.prompt for r in rs], [r.target for r in rs])
    with torch.no_grad():
        assert torch.equal(target_logits(whole.model, batch).logits, target_logits(resumed.model, batch).logits)
    with pytest.raises(ConfigError, match="candidates"):
        editor("llama", tiny("llama"), layers=[1, 2]).load(tmp_path / "wilke.pt")


def test_the_state_is_the_updates_factors_and_a_load_into_an_edited_editor_is_exact():
    """The state holds two vectors per edit, no candidate matrix; loading the state after 1 edit into an
    editor that has made 2 (what on_nan=skip does) gives the 1-edit matrices bit for bit, the unedited ones
    where nothing was applied."""
    rs = zsre_requests(2)
    ed = editor("llama", tiny("llama"), v_num_grad_steps=3)
    unedited = weights(ed)
    ed.edit(rs[:1])
    after_one, state = weights(ed), to_cpu(ed.state_dict())
    assert [(i, tuple(u.shape), tuple(r.shape)) for i, u, r in state["_extra_state"]["updates"]] == \
        [(ed.layers.index(ed.chosen[0]), (ed.weights[0].shape[1],), (ed.weights[0].shape[0],))]
    assert sum(not torch.equal(a, b) for a, b in zip(after_one, unedited)) == 1
    ed.edit(rs[1:])
    assert not all(torch.equal(a, b) for a, b in zip(weights(ed), after_one))
    ed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(weights(ed), after_one)) and len(ed.chosen) == 1
    ed.load_state_dict(to_cpu(editor("llama", tiny("llama")).state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(weights(ed), unedited)) and ed.num_edits == 0


def test_a_stream_resumed_from_its_checkpoint_ends_as_the_full_stream(tmp_path):
    """In-process, as tests/test_resume.py for the other baselines: the harness's checkpoint after 2 of 4 edits."""
    cfg = compose_config(["model=tiny_llama", "editor=wilke", "dataset.num_edits=4", "editor.v_num_grad_steps=3",
                          "editor.context_template_length_params=[[5,5]]"])

    def fresh():
        seed_everything(0)
        requests, loaded = build(cfg.dataset).load(), build(cfg.model)
        return build(cfg.editor, model=loaded), requests, predict(Unedited(loaded), *locality_inputs(requests))

    full_editor, requests, base = fresh()
    manager = CheckpointManager(tmp_path, every=2, keep=3)
    full = run_stream(full_editor, requests, base, NullLogger(), 2, progress=False, checkpoints=manager,
                      handle_signals=False)
    resumed_editor, requests, base = fresh()
    resumed = run_stream(resumed_editor, requests, base, NullLogger(), 2, progress=False, handle_signals=False,
                         resume=CheckpointManager.read(tmp_path / checkpoint_name(2)))
    assert resumed.resumed_from == 2 and (resumed.metrics, resumed.curves) == (full.metrics, full.curves)
    assert resumed_editor.chosen == full_editor.chosen and resumed_editor.scores == full_editor.scores
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed_editor), weights(full_editor)))


@pytest.mark.parametrize("arch", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_prefix_cache_gives_bit_identical_edits(arch):
    """Each candidate replays only the blocks below it (a view on one shared replay)."""
    runs = []
    for cache in (True, False):
        ed = editor(arch, tiny(arch), prefix_cache=cache, v_num_grad_steps=5)
        assert (ed.replays[1] is not None) == cache and ed.replays[0] is None
        ed.edit(zsre_requests(2)[:1])
        ed.edit(zsre_requests(2)[1:])
        runs.append((weights(ed), ed.chosen, ed.scores))
    assert runs[0][1:] == runs[1][1:]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


def test_covariance_of_every_candidate_is_read_when_built(tmp_path, monkeypatch):
    words = "river stone light market winter garden signal harbor copper violin forest engine".split()
    lines = [" ".join(words[(i * 7 + j * 5) % len(words)] for j in range(12)) + f" {i}." for i in range(40)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kwargs = dict(layers=[1, 3], mom2_adjustment=True, mom2_corpus=str(corpus), mom2_n_samples=40,
                  cache_dir=str(tmp_path / "stats"))
    ed = editor("gpt2", tiny("gpt2"), **kwargs)
    assert ed.mom2_paths is not None and sorted(ed.mom2_paths) == sorted(map(str, (tmp_path / "stats").glob("*.pt")))
    assert len(ed.mom2_paths) == 2 and all(inv is not None and inv.shape == (256, 256) for inv in ed.inv_mom2)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached statistics should have been loaded")

    monkeypatch.setattr(covariance, "collect", no_recompute)
    again = editor("gpt2", tiny("gpt2"), **kwargs)
    assert again.mom2_paths == ed.mom2_paths
    assert all(torch.equal(a, b) for a, b in zip(again.inv_mom2, ed.inv_mom2))  # type: ignore[arg-type]


# --- settings and configs ---------------------------------------------------------------------------
def test_bad_settings_are_config_errors():
    model = tiny("gpt2")
    for layers in ([], [1, 1], [0, 8]):
        with pytest.raises(ConfigError, match=r"editor\.layers .*0\.\.7"):
            WilKEEditor(model, layers=layers, module_template=TEMPLATES["gpt2"])
    with pytest.raises(ConfigError, match="selection"):
        WilKEEditor(model, layers=[1], module_template=TEMPLATES["gpt2"], selection="paper")
    with pytest.raises(ConfigError, match="cache_dir"):
        WilKEEditor(model, layers=[1], module_template=TEMPLATES["gpt2"], mom2_adjustment=True)
    with pytest.raises(ConfigError, match="cannot edit a"):
        WilKEEditor(model, layers=[1], module_template="transformer.h.{i}.mlp")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_has_candidate_layers(model):
    cfg = compose_config(["editor=wilke", f"model={model}"])
    n = cfg.model.num_layers
    layers = list(cfg.editor.layers)
    assert layers == list(range(round(n / 2))) and all(0 <= layer < n for layer in layers)  # the first half
    assert cfg.editor.module_template.endswith(("mlp.c_proj", "mlp.down_proj"))
    assert cfg.editor.selection == "relative" and cfg.editor.mom2_adjustment is model.startswith("gpt2xl")  # the authors: on
    assert cfg.editor.cache_dir.endswith("rome_stats") and cfg.editor.v_lr == 0.5
    llama_values = model in ("smollm2", "gemma3_270m", "llama2", "llama2_random")
    assert (cfg.editor.v_num_grad_steps, cfg.editor.v_weight_decay) == ((25, 1e-3) if llama_values else (20, 0.5))
    if model.startswith("gpt2xl"):
        assert layers == list(range(24))  # the authors' scanning_ceiling


def test_composed_config_instantiates_on_a_tiny_model():
    cfg = compose_config(["editor=wilke", "model=tiny_gpt2"])
    ed = instantiate(cfg.editor, _partial_=True)(model=tiny("gpt2"))  # as run_experiment
    assert isinstance(ed, WilKEEditor) and ed.layers == LAYERS and ed.batch_size == 1
    assert ed.module_names == [f"transformer.h.{i}.mlp.c_proj" for i in LAYERS] and all(ed.transposed)
    assert ed.length_params == [[5, 10], [10, 10]]
    spec = ed.floor_spec()
    assert spec.first_layer == 3 and spec.passes == 20 * 4 and spec.prompt_prefixes[0] == ""
