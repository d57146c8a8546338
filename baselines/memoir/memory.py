"""MEMOIR's parts around the editor: the route, the residual memory layer, the prompt-feature query."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from data.text_corpus import read_texts
from evaluation.editing.query import MaskedSequenceQuery, prompt_mean

MODEL_BACKGROUND = "model"


@dataclass
class MemoirRoute:
    """Which rows get the memory, and under which mask."""

    active: torch.Tensor  # (B,) bool: False = the memory is off, the unedited output bit for bit
    masks: torch.Tensor  # (B, D) bool: the input dims each active row reads (its matched edit's stored mask)
    match: torch.Tensor  # (B,) long: the matched stored mask (-1 in training)
    overlap: torch.Tensor  # (B,) the best overlap score


class ResidualMemoryLayer(nn.Module):
    """y = base(x) + (x * mask) M^T on the rows the route makes active; other rows get base(x) exactly.

    The mask applies at every token of an active row, the prompt's and the generated ones (the authors'
    ``x_hashed[:, :, active_indices]``)."""

    def __init__(self, base_layer: nn.Module, memory: Callable[[], torch.Tensor],
                 route: Callable[[], MemoirRoute | None]) -> None:
        super().__init__()
        self.base_layer, self.memory, self.route = base_layer, memory, route

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        y = self.base_layer(x)
        r = self.route()
        if r is None:
            return y
        active = r.active.to(y.device)
        if not bool(active.any()):
            return y
        xs = x.float() * r.masks.to(device=x.device, dtype=torch.float32)[:, None, :]
        delta = F.linear(xs, self.memory())  # (B, T, d_out) float32
        return torch.where(active[:, None, None], y + delta.to(y.dtype), y)


class PromptFeatureQuery(MaskedSequenceQuery):
    """Each row's feature at the memory's input: the mean over its real tokens up to its last prompt token, float32
    (``last``: that token alone), once per scope (decoding steps reuse the prompt's route)."""

    def __init__(self, stack: nn.Module, layer: nn.Module, aggregation: str,
                 on_query: Callable[[torch.Tensor], object]) -> None:
        super().__init__(stack, layer, on_query=on_query)
        self.aggregation = aggregation

    def read(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.aggregation == "last":
            return super().read(x, positions)  # the model's dtype, as every other reader of this site
        return prompt_mean(x.detach(), positions, self.padding(x))


def read_background(path: str, n: int) -> list[str]:
    """The first ``n`` texts of the background file (``editor.background``)."""
    return read_texts(path, "editor.background", n, instead=f"'{MODEL_BACKGROUND}' (texts the model samples itself)")
