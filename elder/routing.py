"""Sequence-level routers, allocation codes and Hamming-distance deferral (spec sections 2 and 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from evaluation.common.errors import ConfigError


@dataclass
class Routes:
    """Routing of one batch of sequences through all L ELDER layers."""

    log_scores: torch.Tensor  # (L, B, N) log-softmax of router logits
    gates: torch.Tensor  # (L, B, N) softmax scores on the top-k, zero elsewhere (not renormalised)
    topk: torch.Tensor  # (L, B, k)
    active: torch.Tensor | None = None  # (B,) bool: False = deferred to the unedited model
    #: the batch dimension of the (L, B, ...) fields (evaluation.editing.query.select_route)
    ROW_DIMS: ClassVar[dict[str, int]] = {"log_scores": 1, "gates": 1, "topk": 1}

    def codes(self, num_loras: int) -> torch.Tensor:
        """(B, L*N) boolean allocation codes: ones at each layer's top-k."""
        L, B, _ = self.topk.shape
        onehot = torch.zeros(L, B, num_loras, dtype=torch.bool, device=self.topk.device)
        onehot.scatter_(-1, self.topk, True)
        return onehot.permute(1, 0, 2).reshape(B, L * num_loras)


class Routers(nn.Module):
    """L routers (linear with bias, query dim -> N), all reading the same query vector."""

    def __init__(self, num_layers: int, query_dim: int, num_loras: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_loras:
            raise ConfigError(f"editor.top_k must be between 1 and editor.num_loras={num_loras}, got {top_k}")
        self.routers = nn.ModuleList(nn.Linear(query_dim, num_loras) for _ in range(num_layers))
        self.top_k = top_k

    def forward(self, q: torch.Tensor) -> Routes:  # q: (B, d_q)
        logits = torch.stack([r(q.to(r.weight.dtype)) for r in self.routers])  # (L, B, N)
        log_scores = logits.float().log_softmax(-1)
        scores = log_scores.exp()
        topk = logits.topk(self.top_k, dim=-1).indices  # from router logits, as the paper's codes
        gates = torch.zeros_like(scores).scatter(-1, topk, scores.gather(-1, topk))
        return Routes(log_scores, gates, topk)


def min_hamming(codes: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """(B,) distance from each code to its nearest stored code; +inf-like when nothing is stored."""
    if stored.numel() == 0:
        return torch.full((codes.shape[0],), codes.shape[1] + 1, dtype=torch.long, device=codes.device)
    # |a xor b| = |a| + |b| - 2 a.b, as one matrix product instead of a (B, M, bits) tensor
    a, b = codes.float(), stored.to(codes.device).float()
    dist = a.sum(-1, keepdim=True) + b.sum(-1) - 2 * a @ b.T  # (B, M)
    return dist.min(dim=-1).values.round().long()
