"""Defer: learning edits, a per-row exact deferral mask, batching, state, configs."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from baselines.defer import DeferEditor
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.run.metrics import predict
from tests.conftest import compose_config, tiny_model, zsre_requests

# zsRE edits with short targets whose characters do not repeat (see tests/test_grace.py)
EASY = (12, 66)  # Babur, Mars


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(editor: DeferEditor, prompts: list[str], targets: list[str]) -> torch.Tensor:
    batch = encode_pairs(editor.tokenizer, prompts, targets)
    with torch.no_grad(), editor.scope(batch.query_positions):
        return target_logits(editor.model, batch).logits


def keys(editor: DeferEditor, prompts: list[str], targets: list[str]) -> torch.Tensor:
    batch = encode_pairs(editor.tokenizer, prompts, targets)
    with torch.no_grad(), editor.scope(batch.query_positions):
        target_logits(editor.model, batch)
        assert editor.query.value is not None
        return editor.query.value.clone()


def test_edits_are_learned_and_deferred_rows_are_exact() -> None:
    all_requests = zsre_requests(max(EASY) + 1)
    requests = [all_requests[i] for i in EASY]
    loaded = tiny_model("tiny_llama")
    prompts = [r.prompt for r in requests] + [r.locality_prompt for r in requests]
    targets = [r.target for r in requests] + [r.locality_answer for r in requests]
    batch = encode_pairs(loaded.tokenizer, prompts, targets)
    with torch.no_grad():
        base = target_logits(loaded.model, batch)
    rows_of = lambda i: base.rows == i  # noqa: E731  target positions of row i

    editor = DeferEditor(loaded, layer=1, lr=1e-2, iterations=200)  # as defer_tiny_llama.yaml
    assert torch.equal(logits(editor, prompts, targets), base.logits)  # no edit yet: the base layer
    assert editor.trainable_params() == (128 + 1) + (128 * 64 + 64)  # deferral unit + value map
    for request in requests:
        editor.edit([request])
        assert predict(editor, [request.prompt], [request.target])[0].exact == 1.0  # learned when made
    # (the value map is retrained on each new edit alone, as the authors': earlier edits may be overwritten)

    # rows whose deferral stays under the threshold get the unedited logits, bit for bit
    q = keys(editor, prompts, targets)
    edited = logits(editor, prompts, targets)
    for i, is_deferred in enumerate((editor.deferral(q) < editor.config.threshold).tolist()):
        if is_deferred:
            assert torch.equal(edited[rows_of(i)], base.logits[rows_of(i)])

    # nothing teaches the unit to defer unrelated inputs (no negatives); set it by hand to separate the
    # last edit from its locality prompt and check the mask acts per row within one batch
    last, loc = len(requests) - 1, 2 * len(requests) - 1
    with torch.no_grad():
        w = q[last] - q[loc]
        editor.defer.weight.copy_(w[None] / w.norm() * 10)
        editor.defer.bias.copy_(-(editor.defer.weight[0] @ (q[last] + q[loc]) / 2)[None])
    pair = [last, loc]
    two = logits(editor, [prompts[i] for i in pair], [targets[i] for i in pair])
    assert editor.deferral(q[pair]).tolist()[0] > 0.5 > editor.deferral(q[pair]).tolist()[1]
    n_last = int(rows_of(last).sum())
    assert torch.equal(two[n_last:], base.logits[rows_of(loc)])
    assert predict(editor, [requests[-1].prompt], [requests[-1].target])[0].exact == 1.0

    # batched and one-at-a-time evaluation agree
    together = predict(editor, prompts, targets, batch_size=len(prompts))
    alone = predict(editor, prompts, targets, batch_size=1)
    assert all(torch.equal(a.predicted, b.predicted) for a, b in zip(together, alone))

    # state round trip onto a freshly built editor
    fresh = DeferEditor(tiny_model("tiny_llama"), layer=1)
    fresh.load_state_dict(editor.state_dict())
    assert torch.equal(logits(fresh, prompts, targets), logits(editor, prompts, targets))

    # a unit that defers everything: the whole batch is the unedited model
    with torch.no_grad():
        editor.defer.weight.zero_()
        editor.defer.bias.fill_(-1e4)
    assert torch.equal(logits(editor, prompts, targets), base.logits)


# --- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, layer", [
    ("gpt2xl", 35), ("gpt2xl_random", 35), ("llama2", 27), ("llama2_random", 27), ("smollm2", 25),
    ("tiny_gpt2", 1), ("tiny_llama", 1),
])
def test_configs_compose(model: str, layer: int) -> None:
    cfg = compose_config(["editor=defer", f"model={model}"])
    assert cfg.editor.layer == layer and cfg.editor.threshold == 0.5 and cfg.editor.batch_size == 1
    if not model.startswith("tiny"):  # the authors' values; smollm2's lr is its own (defer_smollm2.yaml)
        assert cfg.editor.lr == (1e-3 if model == "smollm2" else 0.1) and cfg.editor.iterations == 100
    assert 0 <= layer < cfg.model.num_layers


def test_instantiate_from_config_and_reject_bad_values() -> None:
    cfg = compose_config(["editor=defer", "model=tiny_gpt2"])
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))  # as run_experiment
    assert isinstance(editor, DeferEditor) and editor.batch_size == 1
    with pytest.raises(ConfigError, match=r"editor\.layer=-1 .*0\.\.7"):
        DeferEditor(tiny_model("tiny_gpt2"), layer=-1)
    with pytest.raises(ConfigError, match="editor.threshold"):
        DeferEditor(tiny_model("tiny_gpt2"), layer=1, threshold=1.5)
