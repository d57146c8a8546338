"""Routing queries kept across runs (evaluation.retention.query_store): a routed editor's query is the
unedited model's whatever its edits, so vectors stored by one editor state decide another's scope as its
own forward would, without a forward; a damaged file is computed again."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from evaluation.retention.query_store import QueryStore
from evaluation.run.compose import compose_config
from tests.conftest import zsre_requests

pytestmark = pytest.mark.usefixtures("one_thread")

# few iterations: what is tested is where the query is read, not how well an edit is learned
ROUTED = {"grace": ["editor.iterations=5"], "melo": ["editor.iterations=5"], "defer": ["editor.iterations=5"],
          "elder": ["editor.iterations=5", "editor.epsilon=1"], "lemoe": ["editor.iterations=5", "editor.threshold=0.5"]}


def edited(name: str, num_edits: int):
    """``name`` on a fresh (seeded) tiny model after the first ``num_edits`` zsRE edits."""
    cfg = compose_config(["model=tiny_llama", f"editor={name}", *ROUTED[name]])
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    requests = zsre_requests(num_edits) if num_edits else []
    for i in range(0, num_edits, editor.batch_size):
        editor.edit(requests[i:i + editor.batch_size])
    return editor


def prompts() -> list[str]:
    """Edit prompts (in scope after their edits) and others, of several lengths."""
    return [r.prompt for r in zsre_requests(12)] + ["The sky is", "A long sentence about nothing in particular."]


@pytest.mark.parametrize("name", sorted(ROUTED))
def test_the_query_at_the_named_site_is_the_unedited_models_after_edits(name: str) -> None:
    before, after = edited(name, 0), edited(name, 4)
    assert after.query_site() is not None and after.query_site() == before.query_site()
    assert torch.equal(after.query_vectors(prompts(), batch_size=4), before.query_vectors(prompts(), batch_size=4))


@pytest.mark.parametrize("name", ["grace", "elder"])
def test_stored_queries_decide_another_states_scope_as_its_own_forward(name: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    few, more = edited(name, 4), edited(name, 8)
    store = QueryStore(tmp_path, "tiny_llama-x")
    first = store.scope_fn(few, batch_size=4)(prompts())
    assert torch.equal(first, few.in_scope(prompts(), batch_size=4))
    assert (store.computed, store.read) == (1, 0) and len(list(tmp_path.glob("*-queries-*.pt"))) == 1

    live = more.in_scope(prompts(), batch_size=4)
    assert live.any() and not live.all() and not torch.equal(live, first)  # the later state routes otherwise

    def no_forward(*args, **kwargs):
        raise AssertionError("the stored queries should have been read")
    monkeypatch.setattr(more, "query_vectors", no_forward)
    later = QueryStore(tmp_path, "tiny_llama-x")
    assert torch.equal(later.scope_fn(more, batch_size=4)(prompts()), live)
    assert (later.computed, later.read) == (0, 1)


def test_another_model_a_damaged_file_or_an_editor_without_a_router_computes_again(tmp_path: Path) -> None:
    editor = edited("grace", 2)
    store = QueryStore(tmp_path, "model-a")
    scope = store.scope_fn(editor, batch_size=4)
    expected = scope(prompts())
    (path,) = tmp_path.glob("*.pt")

    other = QueryStore(tmp_path, "model-b")  # another model key: its own file
    assert torch.equal(other.scope_fn(editor, batch_size=4)(prompts()), expected) and other.computed == 1

    blob = torch.load(path, weights_only=True)
    blob["queries"][0, 0] += 1.0  # a changed value under the old digest
    torch.save(blob, path)
    assert store.load(editor.query_site(), prompts()) is None
    path.write_bytes(b"not a tensor file")
    assert store.load(editor.query_site(), prompts()) is None
    again = QueryStore(tmp_path, "model-a")
    assert torch.equal(again.scope_fn(editor, batch_size=4)(prompts()), expected) and again.computed == 1
    assert store.load(editor.query_site(), prompts()) is not None  # rewritten whole

    ft = instantiate(compose_config(["model=tiny_llama", "editor=ft_l"]).editor, _partial_=True)(
        model=instantiate(compose_config(["model=tiny_llama"]).model))
    assert QueryStore(tmp_path / "ft", "m").scope_fn(ft, batch_size=4)(prompts()) is None
    assert not (tmp_path / "ft").exists()


def test_two_files_swapped_by_name_are_not_read_as_each_other(tmp_path: Path, caplog) -> None:
    editor = edited("grace", 2)
    store, site = QueryStore(tmp_path, "model-a"), editor.query_site()
    first, second = prompts()[:4], list(reversed(prompts()[:4]))  # same count, other order: other vectors
    store.save(site, first, editor.query_vectors(first))
    store.save(site, second, editor.query_vectors(second))
    a, b = store.path(site, first), store.path(site, second)
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    with caplog.at_level("WARNING"):
        assert store.load(site, first) is None and store.load(site, second) is None
    assert "holds routing queries of another model, site or prompt list" in caplog.text
