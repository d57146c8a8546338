"""Rows that have ended leave their generation batch (evaluation.editing.generation, ``prune_every``): the rows
left generate exactly what they would have beside them, under every routed editor (whose per-row routes are
cut with the batch) and without one."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from elder.routing import Routes
from evaluation.editing.generation import generate_continuations
from evaluation.editing.query import select_route
from evaluation.run.compose import compose_config
from tests.conftest import zsre_requests

pytestmark = pytest.mark.usefixtures("one_thread")

OTHER_PROMPTS = ["The sky is", "a", "Paris is the capital of", "1 2 3 4", "hello there",
                 "Once upon a time, in a land far away, there lived a king"]


def _ends_unevenly(text: str) -> bool:
    """A stop rule that ends the tiny random models' rows after different numbers of steps."""
    return len(text) >= 3 and sum(map(ord, text)) % 4 == 0


@pytest.mark.parametrize("editor, overrides", [
    ("none", []),
    ("elder", ["editor.iterations=5"]),
    ("grace", ["editor.iterations=5"]),
    ("melo", ["editor.iterations=5"]),
    ("defer", ["editor.iterations=5"]),
    ("lemoe", ["editor.iterations=5", "editor.threshold=null"]),
    ("wise", ["editor.iterations=5", "editor.act_ratio=1e-3"]),
    ("memoir", ["editor.iterations=5", "editor.threshold=0.01"]),
])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_rows_that_end_leave_the_batch_and_the_rest_generate_as_before(arch: str, editor: str,
                                                                       overrides: list[str]) -> None:
    cfg = compose_config([f"model={arch}", f"editor={editor}", *overrides])
    ed = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    requests = zsre_requests(6)
    ed.edit(requests[:max(ed.batch_size, 2)])  # edited and unedited prompts share batches
    prompts = [r.prompt for r in requests] + OTHER_PROMPTS
    in_scope = ed.in_scope(prompts)
    assert (in_scope is None) == (editor == "none") and (in_scope is None or in_scope.any())  # routes to cut
    rows_seen: list[int] = []
    hook = ed.model.get_input_embeddings().register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[0]))

    def generate(prune_every: int | None) -> Any:
        rows_seen.clear()
        return generate_continuations(ed.model, ed.tokenizer, prompts, 10, scope=ed, batch_size=16,
                                      stops=_ends_unevenly, prune_every=prune_every)

    whole = generate(None)
    assert set(rows_seen) == {len(prompts)}  # one batch, every row to the end
    pruned = generate(1)
    hook.remove()
    assert pruned == whole
    assert len({c.tokens for c in whole}) > 2  # the rows ended at different steps ...
    assert min(rows_seen) < len(prompts) and rows_seen == sorted(rows_seen, reverse=True)  # ... and left


def test_a_route_is_cut_along_each_fields_batch_dimension() -> None:
    L, B, N = 3, 5, 4
    scores = torch.randn(L, B, N).log_softmax(-1)
    routes = Routes(scores, scores.exp(), scores.topk(2, -1).indices, torch.tensor([1, 0, 1, 1, 0]).bool())
    rows = torch.tensor([0, 3])
    cut = select_route(routes, rows)
    assert torch.equal(cut.log_scores, scores[:, rows]) and torch.equal(cut.topk, routes.topk[:, rows])
    assert cut.active.tolist() == [True, True]
    assert select_route(None, rows) is None and torch.equal(select_route(torch.arange(5), rows), rows)
    with pytest.raises(TypeError, match="per-row tensors"):
        select_route((torch.zeros(5),), rows)
