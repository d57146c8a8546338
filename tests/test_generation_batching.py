"""Token-budget batching of generation: the partition keeps its budget, and continuations equal one
prompt at a time and fixed batches, also under a routed editor; prefill projects only the last position."""
from __future__ import annotations

import random

import pytest

from elder.editor import ElderEditor
from evaluation.editing.generation import make_generate_fn, token_budget_batches
from tests.conftest import tiny_model, zsre_requests


def test_partition_keeps_budget_rows_and_length_order() -> None:
    assert token_budget_batches([5, 3, 9, 3, 4], budget=12, max_rows=8) == [[1, 3, 4], [0], [2]]
    assert token_budget_batches([50, 3], budget=10, max_rows=8) == [[1], [0]]  # too long: a batch alone
    assert token_budget_batches([], budget=10, max_rows=4) == []
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
        budget, max_rows = rng.randint(1, 2000), rng.randint(1, 40)
        batches = token_budget_batches(lengths, budget, max_rows)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first, so a batch pads little
        for b, nxt in zip(batches, batches[1:] + [None]):
            longest = max(lengths[i] for i in b)
            assert len(b) <= max_rows and (len(b) * longest <= budget or len(b) == 1)
            if nxt is not None and len(b) < max_rows:  # greedy: the next prompt would have broken the budget
                assert (len(b) + 1) * lengths[nxt[0]] > budget


def test_no_budget_is_fixed_batches_in_length_order() -> None:
    lengths = [7, 2, 9, 2, 5, 1, 8]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    assert token_budget_batches(lengths, None, 3) == [order[0:3], order[3:6], order[6:]]
    with pytest.raises(ValueError):
        token_budget_batches(lengths, None, 0)
    with pytest.raises(ValueError):
        token_budget_batches(lengths, 0, 4)


PROMPTS = ["The sky is", "nq question: who wrote the iliad", "a", "Paris is the capital of",
           "Once upon a time, in a land far away, there lived a king who had three daughters", "1 2 3 4",
           "The quick brown fox jumps over the lazy dog. The quick brown fox", "hello there"]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_budget_batches_generate_as_one_at_a_time(arch: str, one_thread: None) -> None:
    loaded = tiny_model(arch)
    budget = 80  # the byte-level prompts are 1-80 tokens: batches of four, two and one rows
    lengths = [len(loaded.tokenizer(p).input_ids) for p in PROMPTS]
    assert sorted(len(b) for b in token_budget_batches(lengths, budget, 32)) == [1, 1, 2, 4]
    single = make_generate_fn(loaded.model, loaded.tokenizer, batch_size=1, progress=False)
    fixed = make_generate_fn(loaded.model, loaded.tokenizer, batch_size=32, progress=False)
    budgeted = make_generate_fn(loaded.model, loaded.tokenizer, batch_size=32, progress=False, token_budget=budget)
    alone = [single([p], 8)[0] for p in PROMPTS]
    assert budgeted(PROMPTS, 8) == alone == fixed(PROMPTS, 8)
    assert budgeted(PROMPTS[:0], 8) == []


def test_budget_batches_route_per_row_under_elder(one_thread: None) -> None:
    editor = ElderEditor(tiny_model("tiny_llama"), layers=[2, 3, 4, 5, 6, 7], query_layer=1, lr=1e-2, iterations=40)
    requests = zsre_requests(4)
    editor.edit(requests)
    prompts = [r.prompt for r in requests] + PROMPTS[:4]  # edited and unrelated prompts share batches
    lengths = [len(editor.tokenizer(p).input_ids) for p in prompts]
    budget = 3 * max(lengths)
    assert len(token_budget_batches(lengths, budget, 32)) > 1
    generate = make_generate_fn(editor.model, editor.tokenizer, editor, batch_size=32, progress=False,
                                token_budget=budget)
    fixed = make_generate_fn(editor.model, editor.tokenizer, editor, batch_size=32, progress=False)
    out = generate(prompts, 6)
    assert out == [generate([p], 6)[0] for p in prompts] == fixed(prompts, 6)
    assert out[0].text.strip().startswith(requests[0].target[:3])  # the edit shows in free generation


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_prefill_projects_only_the_last_position(arch: str, one_thread: None) -> None:
    """transformers' generate passes logits_to_keep=1, so the LM head never sees the prompt's other positions."""
    loaded = tiny_model(arch)
    seen: list[tuple[int, ...]] = []
    handle = loaded.model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        make_generate_fn(loaded.model, loaded.tokenizer, progress=False, token_budget=1000)(PROMPTS[:3], 4)
    finally:
        handle.remove()
    assert seen and all(positions == 1 for _, positions in seen)
