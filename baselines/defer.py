"""Defer: the GRACE authors' SERAC-style baseline (Hartvigsen et al., NeurIPS 2023).

At one layer (GRACE's by default) two small heads read the key, the layer input at a sequence's
last prompt token: a deferral unit ``sigmoid(w . key + b)`` and a linear value map
``key -> replacement of the layer output``. At inference a sequence whose deferral is at least
``threshold`` gets the value map's output at every token; every other sequence gets the unedited
output bit for bit.

Training follows the authors' ``grace/editors/defer.py`` + ``grace/config/editor/defer.yaml``
(Thartvigsen/GRACE): one edit at a time, a fresh Adam (lr 0.1) for 100 steps on the LM loss of
"{prompt} {target}", with the layer output replaced by the soft mixture
``d * value + (1 - d) * base`` at every token. There are no negative examples: the deferral unit
only sees edits (pushed towards 1 by the LM loss), so nothing teaches it to stay below the threshold
on unrelated inputs; this is the authors' method, kept as is. Before the first edit the layer is
the base layer (the authors' ``untrained`` flag).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from baselines.value_replacement import Replacement, ValueReplacementLayer
from data.requests import EditRequest
from evaluation.editor import EditStats, Editor, FloorSpec, optimise
from evaluation.editor_checks import check_layer, check_positive
from evaluation.encoding import encode_pairs
from evaluation.errors import ConfigError
from evaluation.prefix_cache import frozen_prefix, replaying
from evaluation.models import LoadedModel, layer_dims, model_device, replace_module
from evaluation.query import SequenceQuery


@dataclass
class DeferConf:
    _target_: str = "baselines.defer.DeferEditor"
    layer: int = MISSING
    lr: float = 0.1
    iterations: int = 100
    threshold: float = 0.5
    batch_size: int = 1
    prefix_cache: bool = True
    key_position: str = "prompt_last"
    seed: int = "${seed}"  # type: ignore[assignment]


class DeferEditor(Editor):
    """Sigmoid deferral unit + linear value map at one layer (hyper-parameters as constructor arguments)."""

    def __init__(
        self,
        model: LoadedModel,
        layer: int,
        lr: float = 0.1,
        iterations: int = 100,
        threshold: float = 0.5,
        batch_size: int = 1,
        prefix_cache: bool = True,
        key_position: str = "prompt_last",
        seed: int = 0,
    ) -> None:
        check_layer(model, "layer", layer)
        check_positive("lr", lr)
        check_positive("iterations", iterations)
        check_positive("batch_size", batch_size)
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"editor.threshold must lie strictly between 0 and 1 (a sigmoid output), got {threshold}")
        self.key_position = self.checked_key_position(key_position)
        self.loaded, self.model, self.tokenizer = model, model.model, model.tokenizer
        self.layer, self.threshold = layer, threshold
        self.lr, self.iterations, self.batch_size = lr, iterations, batch_size
        base = model.ffn_module(layer)
        d_in, d_out = layer_dims(base)
        device = model_device(self.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # nn.Linear's default init, as the authors'
            self.defer = nn.Linear(d_in, 1).to(device)  # float32 heads whatever the model's dtype
            self.predict = nn.Linear(d_in, d_out).to(device)
        self.adapter = ValueReplacementLayer(base, "replace_all", self._current)
        replace_module(self.model, model.ffn_name(layer), self.adapter)
        self.query = SequenceQuery(self.adapter, on_query=self._route)
        # blocks below the edited layer are frozen and see the same input in every iteration of an edit
        self.prefix = frozen_prefix(model, prefix_cache, layer)
        self.trained = False  # the authors' `untrained` flag: no edit yet, the layer is the base layer
        self.training = False

    # --- routing -------------------------------------------------------------------------------
    def _current(self) -> Replacement | None:
        return self.query.derived  # type: ignore[return-value]

    def deferral(self, q: torch.Tensor) -> torch.Tensor:
        """(B,) the deferral unit's output on keys ``q`` (B, d_in)."""
        return torch.sigmoid(self.defer(q.to(self.defer.weight.dtype))).squeeze(-1)

    def _route(self, q: torch.Tensor) -> Replacement | None:  # q: (B, d_in) at the query tokens
        if not (self.trained or self.training):
            return None
        positions = self.query.positions
        assert positions is not None
        gate = self.deferral(q)  # (B,)
        values = self.predict(q.to(self.predict.weight.dtype))  # (B, d_out)
        if self.training:  # soft mixture at every token
            return Replacement(torch.ones_like(gate, dtype=torch.bool), values, positions, gate=gate)
        return Replacement(gate >= self.threshold, values, positions)

    def scope(self, query_positions: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        return self.query.scope(query_positions)

    # --- editing -------------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.defer.parameters()
        yield from self.predict.parameters()

    def _edit_one(self, request: EditRequest) -> float:
        device = model_device(self.model)
        batch = encode_pairs(self.tokenizer, [request.prompt], [request.target]).to(device)
        optimizer = torch.optim.Adam(list(self.parameters()), lr=self.lr)  # fresh per edit, as the authors'
        self.training = True
        try:
            with replaying(self.prefix):
                losses = optimise(optimizer, self.iterations, lambda: self.batch_loss(batch))
        finally:
            self.training = False
        self.trained = True
        return losses[-1] if losses else 0.0

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        losses = [self._edit_one(r) for r in requests]  # one edit at a time, as the authors'
        return EditStats(loss=sum(losses) / len(losses), iterations=self.iterations * len(losses))

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.layer, passes=self.iterations)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {
            "defer": {k: v.clone() for k, v in self.defer.state_dict().items()},
            "predict": {k: v.clone() for k, v in self.predict.state_dict().items()},
            "trained": self.trained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.defer.load_state_dict(state["defer"])
        self.predict.load_state_dict(state["predict"])
        self.trained = bool(state["trained"])
