"""Preset random allocations for the guided loss (spec section 3).

Every fact gets, for each of the L layers, k distinct LoRA indices out of N, drawn once and kept;
different facts get different allocations while there are enough combinations to go round.
"""
from __future__ import annotations

import math

import torch


class PresetAllocator:
    def __init__(self, num_layers: int, num_loras: int, top_k: int, seed: int) -> None:
        self.L, self.N, self.k = num_layers, num_loras, top_k
        self.generator = torch.Generator().manual_seed(seed)
        self.by_fact: dict[int, torch.Tensor] = {}
        self._taken: set[tuple[int, ...]] = set()
        self.capacity = math.comb(num_loras, top_k) ** num_layers

    def _draw(self) -> torch.Tensor:
        scores = torch.rand(self.L, self.N, generator=self.generator)
        return scores.topk(self.k, dim=-1).indices.sort(dim=-1).values  # (L, k)

    def get(self, fact: int) -> torch.Tensor:
        """The (L, k) allocation of ``fact``, drawn on first use."""
        if fact not in self.by_fact:
            alloc = self._draw()
            # distinct per fact while combinations remain (46,656 for L=6, N=4, k=2)
            while tuple(alloc.flatten().tolist()) in self._taken and len(self._taken) < self.capacity:
                alloc = self._draw()
            self._taken.add(tuple(alloc.flatten().tolist()))
            self.by_fact[fact] = alloc
        return self.by_fact[fact]

    def batch(self, facts: list[int]) -> torch.Tensor:
        return torch.stack([self.get(f) for f in facts])  # (B, L, k)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "by_fact": dict(self.by_fact)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.by_fact = dict(state["by_fact"])
        self._taken = {tuple(a.flatten().tolist()) for a in self.by_fact.values()}
