"""Edit metrics under teacher forcing, batched (spec section 6).

Per request: reliability on the edit prompt, generalization on the held-out paraphrase, each as
sequence-level exact match (every target token is the argmax: the headline) and token accuracy
(EasyEdit's variant); locality as agreement of argmax tokens with the unedited model on the
locality prompt + its answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from data.requests import EditRequest
from evaluation.editor import Editor
from evaluation.encoding import encode_pairs
from evaluation.forward import target_logits

Scorer = Callable[[torch.Tensor, torch.Tensor, int], Any]


@dataclass
class RowPredictions:
    """Argmax predictions and targets of one row's target tokens."""

    predicted: torch.Tensor  # (n_tokens,)
    target: torch.Tensor  # (n_tokens,)

    @property
    def exact(self) -> float:
        return float(bool((self.predicted == self.target).all()))

    @property
    def token_accuracy(self) -> float:
        return float((self.predicted == self.target).float().mean())


@torch.no_grad()
def predict(editor: Editor, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32,
            desc: str | None = None) -> list[RowPredictions]:
    """Teacher-forced argmax predictions at the target tokens, batched, routed per row."""
    device = next(editor.model.parameters()).device
    # sort by length so batches pad little; restore the order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    out: list[RowPredictions | None] = [None] * len(prompts)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        idx = order[s:s + batch_size]
        batch = encode_pairs(editor.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx]).to(device)
        with editor.scope(batch.query_positions):
            tl = target_logits(editor.model, batch)
        pred = tl.logits.argmax(-1)
        for j, i in enumerate(idx):
            sel = tl.rows == j
            out[i] = RowPredictions(pred[sel].cpu(), tl.targets[sel].cpu())
    return out  # type: ignore[return-value]


def locality_agreement(base: Sequence[RowPredictions], edited: Sequence[RowPredictions]) -> float:
    """Mean over requests of the share of target positions where edited and unedited argmax agree."""
    if not base:
        return float("nan")
    return sum(float((b.predicted == e.predicted).float().mean()) for b, e in zip(base, edited)) / len(base)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def locality_inputs(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    return [r.locality_prompt for r in requests], [r.locality_answer for r in requests]


def evaluate_edits(editor: Editor, requests: Sequence[EditRequest], base_locality: Sequence[RowPredictions],
                   batch_size: int = 32, progress: bool = True) -> dict[str, float]:
    """All edit metrics for ``requests`` on the editor's current model."""
    tag = (lambda s: s) if progress else (lambda s: None)
    rel = predict(editor, [r.prompt for r in requests], [r.target for r in requests], batch_size, tag("eval reliability"))
    gen = predict(editor, [r.paraphrase for r in requests], [r.target for r in requests], batch_size, tag("eval generalization"))
    loc = predict(editor, *locality_inputs(requests), batch_size=batch_size, desc=tag("eval locality"))
    return {
        "reliability": mean([p.exact for p in rel]),
        "generalization": mean([p.exact for p in gen]),
        "reliability_token": mean([p.token_accuracy for p in rel]),
        "generalization_token": mean([p.token_accuracy for p in gen]),
        "locality": locality_agreement(base_locality, loc),
    }
