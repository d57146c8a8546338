"""MEMIT and AlphaEdit on the tiny random models: the projector, learning a batch, the update's shape and site,
exact resume, the statistics' default corpus, and the configs of every model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baselines.alphaedit import AlphaEditEditor, alphaedit_update, null_space_projector
from baselines.memit import MEMITEditor
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.run.metrics import predict
from tests.conftest import (
    compose_config,
    save_merged_tokenizer,
    tiny_with_tokenizer,
    zsre_requests,
)

TEMPLATES = {"gpt2": "transformer.h.{i}.mlp.c_proj", "llama": "model.layers.{i}.mlp.down_proj"}
EDITORS = {"memit": MEMITEditor, "alphaedit": AlphaEditEditor}
MODELS = ("smollm2", "gpt2xl", "llama2", "tiny_gpt2", "tiny_llama", "gpt2xl_random", "llama2_random")
# A random model's attention does not carry a vector written at the subject far (tests/test_rome.py), so the
# edits expected to be learned end on the subject and have one-token targets (" Q", " Z", " V": one token each).
RECORDS = [("The capital of Zorbland", "Zorbland", "Q"), ("The mayor of Quux", "Quux", "Z"),
           ("The river of Blorvia", "Blorvia", "V")]
# small settings for the tiny models: a short model-sampled corpus, a clamp wide enough for random weights, and a
# threshold below the tiny models' smallest eigenvalues' scale so that AlphaEdit has a null space to write into
SMALL = dict(mom2_generated_texts=48, mom2_generated_length=24, clamp_norm_factor=4.0, v_num_grad_steps=15)
# A random model's keys are all typical (k^T C^-1 k near d_in), so MEMIT's lambda = 20000 would shrink each update
# to a percent of its residual; and the tiny models' C has no eigenvalue below AlphaEdit's 2e-2 (no null space).
TINY = {"memit": {"mom2_update_weight": 1.0}, "alphaedit": {"nullspace_threshold": 1e9}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def merged_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_merged_tokenizer(tmp_path_factory.mktemp("tokenizer"), ("Q", "Z", "V"))


def _editor(name: str, arch: str, model, tmp_path: Path, **kwargs):
    fields = dict(SMALL, layers=[1, 2], module_template=TEMPLATES[arch], cache_dir=str(tmp_path / "stats"),
                  batch_size=len(RECORDS))
    fields.update(TINY[name])
    fields.update(kwargs)
    return EDITORS[name](model, **fields)


# --- the projector -------------------------------------------------------------------------------------
def test_a_projected_update_leaves_the_outputs_on_the_preserved_keys_unchanged():
    """C from 12 keys in 48 dimensions has a 36-dimensional null space; the update AlphaEdit solves for lies in it,
    so a matrix changed by it maps every preserved key exactly as before (to float precision), while it does
    write the new keys' residuals."""
    g = torch.Generator().manual_seed(0)
    preserved_keys = torch.randn(48, 12, generator=g)
    mom2 = preserved_keys @ preserved_keys.T / 12
    projector, dims = null_space_projector(mom2, 2e-2)
    assert dims == 36
    torch.testing.assert_close(projector @ projector, projector, atol=1e-5, rtol=0)  # a projector
    keys, resid = torch.randn(48, 5, generator=g), torch.randn(16, 5, generator=g)
    update = alphaedit_update(projector, keys, torch.zeros(48, 48), resid, l2=10.0)
    weight = torch.randn(16, 48, generator=g)
    before, after = weight @ preserved_keys, (weight + update) @ preserved_keys
    assert (after - before).abs().max() < 1e-5 * before.abs().max()
    assert update.norm() > 0.1 and (update @ keys - resid).norm() < resid.norm()  # it moves the new keys
    # with no null space there is no update at all (the threshold is absolute, as the authors')
    none, dims = null_space_projector(mom2 + torch.eye(48), 2e-2)
    assert dims == 0 and torch.equal(alphaedit_update(none, keys, torch.zeros(48, 48), resid, 10.0),
                                     torch.zeros(16, 48))


def test_earlier_batches_keys_are_preserved_too():
    """Kp (the sum of earlier batches' K K^T) enters the solve: with it large along an old key, the new update
    barely changes that key's output."""
    g = torch.Generator().manual_seed(1)
    projector = torch.eye(32)
    old, keys, resid = torch.randn(32, 1, generator=g), torch.randn(32, 4, generator=g), torch.randn(8, 4, generator=g)
    free = alphaedit_update(projector, keys, torch.zeros(32, 32), resid, 1.0)
    kept = alphaedit_update(projector, keys, 1e6 * old @ old.T, resid, 1.0)
    assert (kept @ old).norm() < 1e-3 * (free @ old).norm()


# --- editing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_a_batch_is_learned_and_only_the_edited_matrices_change(name, arch, merged_tokenizer, tmp_path):
    model = tiny_with_tokenizer(arch, merged_tokenizer)
    ed = _editor(name, arch, model, tmp_path)
    prompts, targets = [p for p, _, _ in RECORDS], [t for _, _, t in RECORDS]
    requests = [EditRequest(i, p, t, p, "", "", subject=s) for i, (p, s, t) in enumerate(RECORDS)]
    assert [x.exact for x in predict(ed, prompts, targets)] == [0.0] * len(RECORDS)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    stats = ed.edit(requests)
    assert [x.exact for x in predict(ed, prompts, targets)] == [1.0] * len(RECORDS), stats
    changed = {v.data_ptr() for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {w.data_ptr() for w in ed.weights} and ed.module_names == [TEMPLATES[arch].format(i=i)
                                                                                  for i in (1, 2)]
    assert ed.num_edits == len(RECORDS) and stats.iterations > 0
    if name == "alphaedit":  # the batch's keys are kept for the next batches
        assert ed.preserved.abs().sum() > 0 and torch.allclose(ed.preserved[0], ed.preserved[0].T)


def test_memit_spreads_the_residual_over_the_layers(merged_tokenizer, tmp_path, monkeypatch):
    """The lower layer's solve gets half the residual (2 layers left), the upper one what is left after it."""
    model = tiny_with_tokenizer("llama", merged_tokenizer)
    ed = _editor("memit", "llama", model, tmp_path)
    seen = []
    solve = MEMITEditor.layer_update

    def spy(self, index, keys, resid):
        seen.append((index, resid.clone()))
        return solve(self, index, keys, resid)

    monkeypatch.setattr(MEMITEditor, "layer_update", spy)
    ed.edit(zsre_requests(2))
    assert [i for i, _ in seen] == [0, 1]
    assert seen[0][1].norm() > 0 and not torch.allclose(seen[0][1] * 2, seen[1][1])  # recomputed after layer 1


# --- a run, resume, configs ------------------------------------------------------------------------------
def _dataset(tmp_path: Path) -> Path:
    rows = [{"subject": s, "src": p, "rephrase": p, "alt": t, "answers": ["x"], "loc": "nq question: who is it",
             "loc_ans": "me"} for p, s, t in RECORDS * 2]
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_a_run_learns_its_batches(name, merged_tokenizer, tmp_path):
    from evaluation.run.experiment import run_experiment

    extra = [f"editor.{k}={v}" for k, v in TINY[name].items()]
    args = ["model=tiny_llama", f"model.tokenizer_path={merged_tokenizer}", f"editor={name}",
            f"dataset.path={_dataset(tmp_path)}", "dataset.sha256=null", "dataset.url=null", "dataset.num_edits=6",
            "retention=none", "logger=none", "progress=false", "answers=none", "editor.batch_size=3",
            f"editor.cache_dir={tmp_path / 'stats'}", *[f"editor.{k}={v}" for k, v in SMALL.items()], *extra]
    out = run_experiment(compose_config(args), tmp_path / "run", {"model": "tiny_llama", "editor": name,
                                                                   "dataset": "zsre"})
    assert out["metrics"]["at_edit_time"]["reliability"] == 1.0  # each batch learned when it is written
    assert out["metrics"]["reliability"] > 0.5


@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_a_resumed_stream_ends_exactly_as_the_uninterrupted_one(name, tmp_path):
    from evaluation.editing.unedited import Unedited
    from evaluation.run.checkpoint import CheckpointManager, checkpoint_name, to_cpu
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import locality_inputs
    from evaluation.run.stream import run_stream

    extra = [f"editor.{k}={v}" for k, v in TINY[name].items()]
    cfg = compose_config(["model=tiny_llama", f"editor={name}", "dataset.num_edits=6", "editor.batch_size=2",
                          f"editor.cache_dir={tmp_path / 'stats'}", *[f"editor.{k}={v}" for k, v in SMALL.items()],
                          "editor.v_num_grad_steps=3", *extra])

    def fresh():
        seed_everything(0)
        requests, loaded = build(cfg.dataset).load(), build(cfg.model)
        return build(cfg.editor, model=loaded), requests, predict(Unedited(loaded), *locality_inputs(requests))

    full_editor, requests, base = fresh()
    manager = CheckpointManager(tmp_path / "ck", every=2, keep=3)
    full = run_stream(full_editor, requests, base, NullLogger(), 2, progress=False, checkpoints=manager)
    resumed_editor, requests, base = fresh()
    resumed = run_stream(resumed_editor, requests, base, NullLogger(), 2, progress=False,
                         resume=CheckpointManager.read(tmp_path / "ck" / checkpoint_name(2)))
    assert resumed.resumed_from == 2 and resumed.metrics == full.metrics
    a, b = to_cpu(resumed_editor.state_dict()), to_cpu(full_editor.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    if name == "alphaedit":
        assert "preserved" in a and a["preserved"].abs().sum() > 0


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_every_model_has_layers_and_the_authors_settings(name, model):
    c = compose_config([f"editor={name}", f"model={model}"]).editor
    n = compose_config([f"model={model}"]).model.num_layers
    layers = list(c.layers)
    assert layers == sorted(set(layers)) and all(0 <= layer < n for layer in layers)
    assert c.module_template.endswith(("mlp.c_proj", "mlp.down_proj")) and c.mom2_corpus == "model"
    assert c.batch_size == 100 and c.context_template_length_params == [[10, 5]]
    if model.startswith("gpt2xl"):
        assert layers == [13, 14, 15, 16, 17] and (c.v_num_grad_steps, c.clamp_norm_factor) == (20, 0.75)
    if model.startswith("llama2"):
        assert layers == [4, 5, 6, 7, 8] and c.v_num_grad_steps == 25
    if name == "memit":
        assert c.mom2_update_weight == (20000 if model.startswith(("gpt2xl", "tiny")) else 15000)
    else:
        assert (c.nullspace_threshold, c.L2) == (2e-2, 10.0)
        assert c.v_lr == (0.1 if model.startswith(("llama2", "smollm2")) else 0.5)


def test_bad_settings_are_config_errors(tmp_path):
    model = tiny_with_tokenizer("gpt2")
    for layers in ([], [1, 1], [0, 8]):
        with pytest.raises(ConfigError, match=r"editor\.layers .*0\.\.7"):
            MEMITEditor(model, layers=layers, module_template=TEMPLATES["gpt2"], cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="mom2_corpus=/no/such.txt is neither 'model'"):
        MEMITEditor(model, layers=[1], module_template=TEMPLATES["gpt2"], cache_dir=str(tmp_path),
                    mom2_corpus="/no/such.txt")
    for key, value in (("v_lr", float("nan")), ("clamp_norm_factor", 0.0), ("kl_factor", -1.0),
                       ("mom2_update_weight", float("nan"))):
        with pytest.raises(ConfigError, match=f"editor.{key} must be"):
            MEMITEditor(model, layers=[1], module_template=TEMPLATES["gpt2"], cache_dir=str(tmp_path), **{key: value})
    with pytest.raises(ConfigError, match="nullspace_threshold"):
        AlphaEditEditor(model, layers=[1], module_template=TEMPLATES["gpt2"], cache_dir=str(tmp_path),
                        nullspace_threshold=0.0, **{k: v for k, v in SMALL.items() if k.startswith("mom2")})


def test_the_retention_suite_is_refused_as_the_statistics_corpus():
    from evaluation.run.settings import check_run_settings

    cfg = compose_config(["editor=alphaedit", "model=tiny_llama"])
    scored = f"{cfg.paths.data_dir}/retention/test-NER.txt"
    with pytest.raises(ConfigError, match="retention suite's data"):
        check_run_settings(compose_config(["editor=alphaedit", "model=tiny_llama", f"editor.mom2_corpus={scored}"]))
    check_run_settings(compose_config(["editor=alphaedit", "model=tiny_llama", "editor.mom2_corpus=/tmp/x.txt"]))


def test_the_model_sampled_corpus_is_seeded_cached_and_tied_to_the_weights(tmp_path, monkeypatch):
    import baselines.rome.covariance as covariance

    corpus = covariance.Corpus("model", generated_texts=6, generated_length=8, seed=3)
    model = tiny_with_tokenizer("llama")
    first = covariance.corpus_ids(model.model, model.tokenizer, corpus, model_name="tiny", cache_dir=tmp_path)
    assert len(first) == 6 and all(0 < len(r) <= 9 for r in first)
    assert covariance.sample_texts(model.model, model.tokenizer, corpus) == first  # the seed fixes the texts

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached texts should have been read")

    monkeypatch.setattr(covariance, "sample_texts", no_sampling)
    assert covariance.corpus_ids(model.model, model.tokenizer, corpus, model_name="tiny", cache_dir=tmp_path) == first
    other = tiny_with_tokenizer("llama", seed=1)  # same name, other weights: another file
    with pytest.raises(AssertionError, match="cached texts"):
        covariance.corpus_ids(other.model, other.tokenizer, corpus, model_name="tiny", cache_dir=tmp_path)


def test_runs_started_together_compute_the_statistics_once(tmp_path, monkeypatch, caplog):
    """A sweep's two jobs need the same statistics: the second waits for the first's lock and reads its files."""
    import shutil
    import threading
    import time

    import baselines.rome.covariance as covariance

    model = tiny_with_tokenizer("llama")
    corpus = covariance.Corpus("model", generated_texts=6, generated_length=8, seed=3)
    module = model.model.model.layers[1].mlp.down_proj
    settings = dict(model_name="tiny", module_names=["layers.1.mlp.down_proj"], corpus=corpus, max_length=16,
                    dtype="float32", batch_size=4)
    first = covariance.second_moments(model.model, model.tokenizer, [module], cache_dir=tmp_path / "first",
                                      **settings)
    computed = []
    real_collect = covariance.collect
    monkeypatch.setattr(covariance, "collect", lambda *a, **k: computed.append(1) or real_collect(*a, **k))
    shared, found = tmp_path / "shared", {}
    caplog.set_level("INFO", logger=covariance.__name__)
    with covariance._computing(shared, "tiny", corpus.label()):  # another run is computing them
        waiter = threading.Thread(target=lambda: found.update(stats=covariance.second_moments(
            model.model, model.tokenizer, [module], cache_dir=shared, **settings)))
        waiter.start()
        deadline = time.monotonic() + 30
        while "another run is computing" not in caplog.text:
            assert time.monotonic() < deadline, "the second run did not wait for the first"
            time.sleep(0.05)
        for path in (tmp_path / "first").glob("*.pt"):  # the other run writes its statistics and texts
            shutil.copy(path, shared / path.name)
    waiter.join(timeout=60)
    (stats,) = found["stats"]
    assert computed == [] and stats.from_cache
    assert torch.equal(stats.mom2, first[0].mom2)
