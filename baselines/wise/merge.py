"""WISE's merges of side-memory shards: the GTA family of the authors' merge/gta.py (TIES by default)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from evaluation.common.errors import ConfigError

#: merge_alg -> (sparsify, consensus, normalize): the GTA instances of the authors' WISE.py ``merge_dict``
MERGE_ALGS: dict[str, tuple[Optional[str], Optional[str], bool]] = {
    "ties": ("magnitude", "sum", True),
    "magnitude_norm": ("magnitude", None, True),
    "magnitude": ("magnitude", None, False),
    "sign": (None, "sum", True),
    "dare_ties": ("rescaled_random", "sum", False),
    "dare_linear": ("random", None, False),
}


def _sparsify(delta: torch.Tensor, method: Optional[str], density: float, generator: torch.Generator) -> torch.Tensor:
    if method is None or density >= 1:
        return delta
    if method == "magnitude":  # keep the largest |delta|
        k = int(density * delta.numel())
        if k <= 0:
            raise ConfigError(f"editor.densities={density} keeps no entry of a {delta.numel()}-entry matrix")
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[delta.abs().flatten().topk(k).indices] = 1
        return delta * mask.view_as(delta)
    keep = torch.bernoulli(torch.full(delta.shape, density), generator=generator).to(delta)
    return delta * keep / density if method == "rescaled_random" else delta * keep


def gta_merge(weights: Sequence[float], base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float,
              alg: str, generator: torch.Generator) -> torch.Tensor:
    """``base`` plus the merged task vectors ``tensors - base`` (sparsified, sign-elected, weighted)."""
    sparsify, consensus, normalize = MERGE_ALGS[alg]
    deltas = torch.stack([_sparsify(t - base, sparsify, density, generator) for t in tensors])
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, 1, 1)
    weighted = deltas * w
    if consensus is not None:  # TIES's "sum" election: keep the entries whose sign agrees with the total's
        majority = (weighted.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        mask = (weighted.sign() == majority).to(deltas.dtype)
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(weighted[0]).clone()
        divisor[divisor.abs() < 1e-8] = 1
    return base + (mixed / divisor if normalize else mixed)


def merge_into_side(main: torch.Tensor, merged: torch.Tensor, shards: list[torch.Tensor], weights: float,
                    density: float, alg: str, generator: torch.Generator) -> torch.Tensor:
    """The authors' WISEAdapter.merge_weight (retrieve=False): the first merge (``merged`` still equal to ``main``)
    weighs the shards alone; later ones give the shards 0.4 and the merged memory 0.6."""
    if torch.equal(merged, main):
        return gta_merge([weights / len(shards)] * len(shards), main, shards, density, alg, generator)
    return gta_merge([0.4 / len(shards)] * len(shards) + [0.6], main, [*shards, merged], density, alg, generator)
