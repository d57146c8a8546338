"""MELO: vector-database rules on hand-made keys, learning a stream, exact deferral, batching, state, configs."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from baselines.melo import NO_LORA, ClusterDB, MeloEditor
from evaluation.common.errors import ConfigError
from evaluation.editing.editor import check_batch_limit
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.generation import make_generate_fn
from evaluation.editing.unedited import Unedited
from evaluation.run.loggers import NullLogger
from evaluation.run.metrics import locality_inputs, predict
from evaluation.run.stream import run_stream
from tests.conftest import compose_config, tiny_model, zsre_requests

pytestmark = pytest.mark.usefixtures("one_thread")


# zsRE edits with short targets: a rank-2 block on two layers of a tiny random model holds four of
# these per batch (four of the first eight records' long targets do not fit)
SHORT = (12, 22, 66, 145, 0, 5, 25, 53)  # Babur, Lyra, Mars, Lynx, 2006, Yemen, Essex, Java


def short_requests():
    requests = zsre_requests(max(SHORT) + 1)
    return [requests[i] for i in SHORT]


def k(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def logits(editor: MeloEditor, prompts: list[str], targets: list[str]) -> torch.Tensor:
    batch = encode_pairs(editor.tokenizer, prompts, targets)
    with torch.no_grad(), editor.scope(batch.query_positions):
        return target_logits(editor.model, batch).logits


# --- database rules --------------------------------------------------------------------------------
def test_cluster_db_new_join_split_and_search() -> None:
    db = ClusterDB(key_dim=2, init_radius=0.5)
    assert db.add_batch(torch.stack([k(0, 0), k(10, 0)]), ["a", "b"], block=0) == ["new", "new"]
    actions = db.add_batch(torch.stack([k(0, 0.8), k(20, 0), k(10, 0.6)]), ["a", "c", "d"], block=1)
    assert actions == ["join", "new", "split"]
    assert len(db) == 4 and db.labels == ["a", "b", "c", "d"]
    assert db.centers[0].tolist() == pytest.approx([0.0, 0.4])  # mean of its two keys
    assert db.radii[0].item() == pytest.approx(0.5)  # max(farthest key 0.4, init radius)
    assert db.radii[1].item() == pytest.approx(0.3 - 1e-5) and db.radii[3].item() == pytest.approx(0.3 + 1e-5)
    assert db.conflicts == 1 and db.forgotten == 0

    blocks, active = db.search(torch.stack([k(0, 0.75), k(0, -0.05), k(10, 0.1), k(10, 0.5), k(5, 5)]))
    assert blocks.tolist() == [1, 0, 0, 1, NO_LORA]  # the cluster's nearest key picks the block
    assert active.tolist() == [True, True, True, True, False]

    # a conflict that leaves a cluster without keys: it keeps its centre, pointing at no block
    assert db.add_batch(torch.stack([k(0, 0.1)]), ["z"], block=2) == ["split"]
    assert db.forgotten == 2 and db.conflicts == 2
    blocks, active = db.search(torch.stack([k(0, 0.4), k(0, 0.12)]))
    assert blocks.tolist() == [NO_LORA, 2] and active.tolist() == [False, True]


# --- the editor on a tiny model --------------------------------------------------------------------
def test_stream_learns_every_edit_and_leaves_other_inputs_exact() -> None:
    requests = short_requests()
    loaded = tiny_model("tiny_gpt2")
    base_locality = predict(Unedited(loaded), *locality_inputs(requests))
    prompts = [r.prompt for r in requests] + [r.locality_prompt for r in requests]
    targets = [r.target for r in requests] + [r.locality_answer for r in requests]
    batch = encode_pairs(loaded.tokenizer, prompts, targets)
    with torch.no_grad():
        base = target_logits(loaded.model, batch)

    editor = MeloEditor(loaded, layers=[2, 3], query_layer=1, lr=3e-3)  # as melo_tiny_gpt2.yaml
    result = run_stream(editor, requests, base_locality, NullLogger(), progress=False)
    assert result.metrics["reliability"] == 1.0
    assert result.metrics["locality"] == 1.0
    assert editor.next_block == 2  # two batches of four, a block each
    assert editor.trainable_params() == 2 * 2 * 2 * (64 + 256)  # blocks x layers x rank x (d_in + d_out)
    assert editor.stored_params() == editor.db.num_stored() > 0

    # locality prompts find no cluster: their logits are the unedited model's, bit for bit
    blocks, active = editor.db.search(editor.keys_for(batch))
    assert active.tolist() == [True] * 8 + [False] * 8
    assert blocks[:8].tolist() == [0] * 4 + [1] * 4
    edited = logits(editor, prompts, targets)
    n_edit_rows = int((base.rows < 8).sum())
    assert torch.equal(edited[n_edit_rows:], base.logits[n_edit_rows:])

    # batched and one-at-a-time evaluation agree
    together = predict(editor, prompts, targets, batch_size=len(prompts))
    alone = predict(editor, prompts, targets, batch_size=1)
    assert all(torch.equal(a.predicted, b.predicted) for a, b in zip(together, alone))

    # greedy generation reuses the prompt's block for the generated tokens and reproduces the targets
    generate = make_generate_fn(editor.model, editor.tokenizer, editor, progress=False)
    out = generate([r.prompt for r in requests[:4]], max_new_tokens=max(len(r.target) for r in requests[:4]) + 1)
    assert [o.text[:len(r.target) + 1] for o, r in zip(out, requests[:4])] == [" " + r.target for r in requests[:4]]

    # state round trip onto a freshly built editor
    fresh = MeloEditor(tiny_model("tiny_gpt2"), layers=[2, 3], query_layer=1)
    fresh.load_state_dict(editor.state_dict())
    assert torch.equal(logits(fresh, prompts, targets), edited)
    assert fresh.trainable_params() == editor.trainable_params()


def test_running_out_of_blocks_is_a_config_error() -> None:
    requests = zsre_requests(2)
    editor = MeloEditor(tiny_model("tiny_llama"), layers=[2, 3], query_layer=1, num_blocks=1, iterations=1)
    editor.edit(requests[:1])
    with pytest.raises(ConfigError, match="editor.num_blocks=1"):
        editor.edit(requests[1:])


# --- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, query_layer, layers", [
    ("gpt2xl", 35, [36, 37]), ("gpt2xl_random", 35, [36, 37]), ("llama2", 23, [24, 25]),
    ("llama2_random", 23, [24, 25]), ("smollm2", 22, [23, 24]), ("tiny_gpt2", 1, [2, 3]), ("tiny_llama", 1, [2, 3]),
])
def test_configs_compose(model: str, query_layer: int, layers: list[int]) -> None:
    cfg = compose_config(["editor=melo", f"model={model}"])
    assert cfg.editor.query_layer == query_layer and list(cfg.editor.layers) == layers
    assert (cfg.editor.rank_per_block, cfg.editor.num_blocks, cfg.editor.batch_size) == (2, 350, 4)
    assert cfg.editor.radius == 0.5 and cfg.editor.iterations == 50
    assert max(layers) < cfg.model.num_layers


def test_instantiate_from_config_and_reject_bad_layers() -> None:
    cfg = compose_config(["editor=melo", "model=tiny_llama"])
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))  # as run_experiment
    assert isinstance(editor, MeloEditor) and editor.batch_size == 4 and editor.config.lr == 3e-3
    with pytest.raises(ConfigError, match=r"editor\.layers=9 .*0\.\.7"):
        MeloEditor(tiny_model("tiny_llama"), layers=[2, 9], query_layer=1)
    with pytest.raises(ConfigError, match="editor.query_layer=3 must lie below"):
        MeloEditor(tiny_model("tiny_llama"), layers=[2, 3], query_layer=3)


def test_block_parameters_at_gpt2xl_shape() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from evaluation.editing.models import LoadedModel, byte_tokenizer

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25))
    loaded = LoadedModel(model, byte_tokenizer(), "gpt2xl", "transformer.h.{i}.mlp.c_fc", 48)
    editor = MeloEditor(loaded, layers=[36, 37], query_layer=35, prefix_cache=False)
    assert editor.block_params() == 2 * 2 * (1600 + 6400)  # layers x rank x (d_in + d_out) = 32,000
    assert editor.trainable_params() == 0  # 1000 edits in batches of 4: 250 blocks, 8.0M parameters
    assert editor.adapters[0].lora_A.shape == (350, 1600, 2) and editor.adapters[0].scaling == 350.0


def test_a_stream_needing_more_lora_blocks_than_melo_has_is_refused_with_the_setting_to_raise() -> None:
    config = MeloEditor.Config(layers=[1], query_layer=0, num_blocks=2, batch_size=4)
    check_batch_limit(MeloEditor, config, 8)  # two batches of four: every block used, none short
    with pytest.raises(ConfigError, match=r"MeloEditor takes at most editor.num_blocks=2 edit batches of "
                                          r"editor.batch_size=4 \(8 edits\), but the stream has 9 edits \(3 batches\): "
                                          r"set editor.num_blocks=3"):
        check_batch_limit(MeloEditor, config, 9)
