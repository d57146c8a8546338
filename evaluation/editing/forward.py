"""Teacher-forced forward passes that compute logits only where a target token is predicted.

The LM head is the most expensive single matrix of a small model (vocabulary x hidden); applying it
to the few target positions instead of every token keeps results identical and saves most of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.editing.encoding import EncodedBatch, target_positions


@dataclass
class TargetLogits:
    logits: torch.Tensor  # (n, V) at every position that predicts a target token
    targets: torch.Tensor  # (n,)
    rows: torch.Tensor  # (n,) which sequence each position belongs to

    def loss(self) -> torch.Tensor:
        """Mean token-level cross entropy over all target tokens of the batch."""
        return F.cross_entropy(self.logits.float(), self.targets)

    def row_exact(self, num_rows: int) -> torch.Tensor:
        """(num_rows,) bool: whether every target token of each row is the argmax (rows without targets: True)."""
        hit = (self.logits.argmax(-1) == self.targets).float()
        ones = torch.ones(num_rows, device=hit.device)
        return ones.scatter_reduce(0, self.rows, hit, reduce="amin").bool()


def target_logits(model: nn.Module, batch: EncodedBatch) -> TargetLogits:
    hidden = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (B, T, d)
    (rows, cols), targets = target_positions(batch.labels)
    logits = model.get_output_embeddings()(hidden[rows, cols])  # (n, V)
    return TargetLogits(logits, targets, rows)
