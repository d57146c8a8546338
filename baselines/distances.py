"""Distances between a layer's query keys and stored keys (GRACE's codebook, MELO's vector database)."""
from __future__ import annotations

import torch


def euclidean(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, K) exact pairwise distances in float32 (no ||a||^2+||b||^2-2ab shortcut: d(k, k) is 0)."""
    return torch.cdist(queries.float()[None], keys.float()[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
