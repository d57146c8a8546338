"""Auxiliary router losses: ELDER's guided loss and the Switch load-balancing ablation."""
from __future__ import annotations

import torch

from elder.routing import Routes


def guided_loss(routes: Routes, preset: torch.Tensor) -> torch.Tensor:
    """-sum_l sum_{j in preset_l} log s_{l,j}, averaged over the batch.

    ``preset`` is (B, L, k): each sample's preset LoRA indices per layer.
    """
    idx = preset.permute(1, 0, 2).to(routes.log_scores.device)  # (L, B, k)
    return -routes.log_scores.gather(-1, idx).sum(dim=(0, 2)).mean()


def load_balancing_loss(routes: Routes) -> torch.Tensor:
    """Switch Transformer's N * sum_j f_j P_j per layer, summed over layers (the paper's ablation)."""
    L, B, N = routes.log_scores.shape
    probs = routes.log_scores.exp()  # (L, B, N)
    dispatch = torch.zeros_like(probs).scatter(-1, routes.topk, 1.0)
    f = dispatch.sum(1) / dispatch.sum(dim=(1, 2)).unsqueeze(-1)  # (L, N) share of routed slots
    P = probs.mean(1)  # (L, N)
    return (N * (f * P).sum(-1)).sum()
