"""The value-replacement layer GRACE and Defer wrap around one layer: per sequence, a value instead of the
layer's output at some token positions (the routing record, :class:`Replacement`, says which)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from evaluation.editing.checks import check_choice

REPLACEMENTS = ("replace_last", "replace_all", "replace_prompt")


@dataclass
class Replacement:
    """Where the wrapped layer writes a value instead of its own output, for one batch of sequences."""

    active: torch.Tensor  # (B,) bool: rows that get a value; the others get the base output bit for bit
    values: torch.Tensor  # (B, d_out) the value of each row (rows that are not active: anything)
    positions: torch.Tensor  # (B,) each row's query token (last prompt token)
    gate: torch.Tensor | None = None  # (B,) soft mixture weight (Defer's training) instead of a hard swap
    prefilled: bool = False  # set by the layer after the first forward of the scope (the prompt)


class ValueReplacementLayer(nn.Module):
    """``base_layer`` whose output is replaced by a per-sequence value at some token positions.

    ``route()`` returns the current batch's :class:`Replacement` (None outside an editing scope or
    with nothing stored: the layer is then exactly the base layer). Positions that get the value:
    ``replace_last``: the query token only; ``replace_prompt``: the tokens before it (the authors'
    ``layer_out[:, :token_to_edit]``); ``replace_all``: every token, including generated ones.
    Decoding steps of a KV-cached ``generate`` reuse the prompt's route (the first forward of the
    scope is the prompt); under replace_last/replace_prompt they get no value, as the query token
    lives in the cache.
    """

    def __init__(self, base_layer: nn.Module, replacement: str, route: Callable[[], Replacement | None]) -> None:
        super().__init__()
        check_choice("replacement", replacement, REPLACEMENTS)
        self.base_layer = base_layer
        self.replacement = replacement
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)  # (B, T, d_out)
        r = self.route()
        if r is None:
            return y
        assert y.dim() == 3, f"expected (B, T, d) activations, got {tuple(y.shape)}"
        B, T, _ = y.shape
        prompt_pass = not r.prefilled
        r.prefilled = True
        if self.replacement == "replace_all":
            where = torch.ones(B, T, dtype=torch.bool, device=y.device)
        elif not prompt_pass:
            return y
        else:
            t = torch.arange(T, device=y.device)[None, :]  # (1, T)
            pos = r.positions.to(y.device)[:, None]  # (B, 1)
            where = t == pos if self.replacement == "replace_last" else t < pos
        where = where & r.active.to(y.device)[:, None]  # (B, T)
        v = r.values.to(device=y.device, dtype=y.dtype)[:, None, :]  # (B, 1, d_out)
        if r.gate is not None:
            g = r.gate.to(device=y.device, dtype=y.dtype)[:, None, None]  # (B, 1, 1)
            new = g * v + (1 - g) * y
        else:
            new = v.expand_as(y)
        return torch.where(where[..., None], new, y)
