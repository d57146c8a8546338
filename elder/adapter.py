"""The ELDER layer: N LoRAs around a frozen FFN linear layer, mixed by sequence-level gates."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from elder.routing import Routes
from evaluation.editing.models import layer_dims

#: how A is initialised (Kaiming-uniform, a=sqrt(5), on the shape below; B is zero either way):
#: ``authors``: on the (d_in, r) tensor as the authors' ELDER layer creates it, so the fan-in is r and
#: entries are U(+-1/sqrt(r)) (0.354 at r=8); ``peft``: on the (r, d_in) weight of PEFT's LoRA, fan-in
#: d_in, entries U(+-1/sqrt(d_in)).
LORA_INITS = ("authors", "peft")


class LoRAExperts(nn.Module):
    """The N LoRAs of one ELDER layer: A (N, d_in, r) and B (N, r, d_out), B zero at the start.

    Its own module so the editor registers the LoRAs (its state) without the base layer they wrap."""

    def __init__(self, d_in: int, d_out: int, num_loras: int, rank: int, like: torch.Tensor,
                 lora_init: str = "authors") -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(num_loras, d_in, rank, dtype=like.dtype, device=like.device))
        self.lora_B = nn.Parameter(torch.zeros(num_loras, rank, d_out, dtype=like.dtype, device=like.device))
        for j in range(num_loras):  # A Kaiming-uniform, B zero; the fan-in is the reading (LORA_INITS)
            a = self.lora_A.data[j]  # (d_in, r)
            nn.init.kaiming_uniform_(a if lora_init == "authors" else a.T, a=math.sqrt(5))


class MixtureOfLoRA(nn.Module):
    """y = W0 x + b + (alpha/r) * sum_j g_j B_j A_j x, with g the sequence's top-k gates.

    Wraps ``base_layer`` (``nn.Linear`` or GPT-2 ``Conv1D``) untouched. ``routes`` is a callable
    that returns the current batch's :class:`Routes` (or None outside an editing scope, in which
    case the layer is exactly the base layer).
    """

    def __init__(self, base_layer: nn.Module, index: int, num_loras: int, rank: int, alpha: float,
                 routes: Callable[[], Routes | None], lora_init: str = "authors") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index  # which of the L ELDER layers this is
        self.routes = routes
        d_in, d_out = layer_dims(base_layer)
        self.experts = LoRAExperts(d_in, d_out, num_loras, rank, base_layer.weight, lora_init)
        self.scaling = alpha / rank

    @property
    def lora_A(self) -> nn.Parameter:
        return self.experts.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.experts.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)
        routes = self.routes()
        if routes is None:
            return y
        gates = routes.gates[self.index].to(x.dtype)  # (B, N)
        B, T, _ = x.shape
        N, r = self.lora_A.shape[0], self.lora_A.shape[2]
        xa = torch.einsum("btd,ndr->btnr", x, self.lora_A) * gates[:, None, :, None]  # (B, T, N, r)
        delta = xa.reshape(B, T, N * r) @ self.lora_B.reshape(N * r, -1)  # (B, T, d_out)
        out = y + self.scaling * delta
        if routes.active is not None:  # deferred sequences get the base output bit for bit
            out = torch.where(routes.active[:, None, None], out, y)
        return out
