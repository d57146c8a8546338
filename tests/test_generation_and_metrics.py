"""Batched evaluation routes every row as if it were alone; metric definitions on known cases."""
from __future__ import annotations

import pytest
import torch

from elder.editor import ElderEditor
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.generation import make_generate_fn
from evaluation.run.metrics import RowPredictions, locality_agreement, predict
from tests.conftest import tiny_model, zsre_requests


def _edited(arch: str = "tiny_llama") -> ElderEditor:
    editor = ElderEditor(tiny_model(arch), layers=[2, 3, 4, 5, 6, 7], query_layer=1, lr=1e-2, iterations=40)
    requests = zsre_requests(4)
    editor.edit(requests)
    return editor


def test_batched_generation_equals_one_at_a_time_under_elder() -> None:
    editor = _edited()
    requests = zsre_requests(4)
    prompts = [r.prompt for r in requests] + ["nq question: who wrote the iliad", "The sky is"]
    generate = make_generate_fn(editor.model, editor.tokenizer, editor, batch_size=8, progress=False)
    batched = generate(prompts, 6)
    single = [generate([p], 6)[0] for p in prompts]
    assert batched == single
    assert batched[0].text.strip().startswith(requests[0].target[:3])  # the edit shows in free generation


def test_batched_teacher_forcing_equals_one_at_a_time() -> None:
    editor = _edited("tiny_gpt2")
    requests = zsre_requests(4)
    prompts, targets = [r.paraphrase for r in requests], [r.target for r in requests]
    together = predict(editor, prompts, targets, batch_size=4)
    alone = [predict(editor, [p], [t], batch_size=1)[0] for p, t in zip(prompts, targets)]
    assert all(torch.equal(a.predicted, b.predicted) for a, b in zip(together, alone))


def test_encoding_masks_everything_but_the_target() -> None:
    tok = tiny_model().tokenizer
    batch = encode_pairs(tok, ["ab", "abcd"], ["x", "yz"], padding_side="left")
    assert batch.input_ids.shape == (2, 7)  # "abcd" + " yz" = 7 byte tokens
    assert (batch.labels != -100).sum(1).tolist() == [2, 3]  # " x", " yz"
    assert batch.query_positions.tolist() == [4, 3]  # last prompt token under left padding
    assert batch.position_ids[0].tolist() == [0, 0, 0, 0, 1, 2, 3]


def test_exact_match_and_token_accuracy() -> None:
    row = RowPredictions(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
    assert row.exact == 0.0 and row.token_accuracy == pytest.approx(2 / 3)
    assert RowPredictions(torch.tensor([5]), torch.tensor([5])).exact == 1.0
    base = [RowPredictions(torch.tensor([1, 2]), torch.tensor([0, 0]))]
    assert locality_agreement(base, [RowPredictions(torch.tensor([1, 3]), torch.tensor([0, 0]))]) == 0.5
