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

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from baselines.value_replacement import Replacement, ValueReplacementLayer
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_layer, check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec, optimise
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.models import (
    LoadedModel,
    layer_dims,
    model_device,
    replace_module,
)
from evaluation.editing.prefix_cache import frozen_prefix, replaying
from evaluation.editing.query import SequenceQuery


@dataclass
class DeferConfig:
    """Defer's hyper-parameters. Defaults: Thartvigsen/GRACE grace/config/editor/defer.yaml."""

    layer: int  # the FFN layer whose input is the key (GRACE's; per model: conf/editor_model/defer_<model>.yaml)
    lr: float = 0.1  # Adam, fresh per edit
    iterations: int = 100  # Adam steps per edit
    threshold: float = 0.5  # a sequence whose deferral is at least this gets the learned value
    batch_size: int = 1  # one edit at a time, as the authors
    prefix_cache: bool = True  # replay the frozen blocks below the edited layer during an edit (exact, faster)
    # the key is read at the last prompt token | sequence_last: the last token as fed (the authors'
    # key_id=-1): under teacher forcing, the last target token
    key_position: str = "prompt_last"
    seed: int = 0  # the heads' initialisation (nn.Linear's default init)


class DeferEditor(Editor):
    """Sigmoid deferral unit + linear value map at one layer. Its state: the two heads (registered) and
    whether any edit was made (extra state)."""

    Config = DeferConfig

    def __init__(self, model: LoadedModel, config: DeferConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        check_layer(model, "layer", c.layer)
        check_positive("lr", c.lr)
        check_positive("iterations", c.iterations)
        check_positive("batch_size", c.batch_size)
        if not 0.0 < c.threshold < 1.0:
            raise ConfigError(f"editor.threshold must lie strictly between 0 and 1 (a sigmoid output), "
                              f"got {c.threshold}")
        self.checked_key_position(c.key_position)
        base = model.ffn_module(c.layer)
        d_in, d_out = layer_dims(base)
        device = model_device(model.model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)  # nn.Linear's default init, as the authors'
            self.defer = nn.Linear(d_in, 1).to(device)  # float32 heads whatever the model's dtype
            self.predict = nn.Linear(d_in, d_out).to(device)
        adapter = ValueReplacementLayer(base, "replace_all", self._current)
        replace_module(model.model, model.ffn_name(c.layer), adapter)
        self.adapters = [adapter]  # in the model, not registered here: it holds the base layer
        self.query = SequenceQuery(adapter, on_query=self._route)
        # blocks below the edited layer are frozen and see the same input in every iteration of an edit
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)
        self.trained = False  # the authors' `untrained` flag: no edit yet, the layer is the base layer
        self._editing = False  # inside edit(): the soft mixture at every token

    # --- routing -------------------------------------------------------------------------------
    def _current(self) -> Replacement | None:
        return self.query.derived  # type: ignore[return-value]

    def deferral(self, q: torch.Tensor) -> torch.Tensor:
        """(B,) the deferral unit's output on keys ``q`` (B, d_in)."""
        return torch.sigmoid(self.defer(q.to(self.defer.weight.dtype))).squeeze(-1)

    def _route(self, q: torch.Tensor) -> Replacement | None:  # q: (B, d_in) at the query tokens
        if not (self.trained or self._editing):
            return None
        positions = self.query.positions
        assert positions is not None
        gate = self.deferral(q)  # (B,)
        values = self.predict(q.to(self.predict.weight.dtype))  # (B, d_out)
        if self._editing:  # soft mixture at every token
            return Replacement(torch.ones_like(gate, dtype=torch.bool), values, positions, gate=gate)
        return Replacement(gate >= self.config.threshold, values, positions)

    def query_site(self) -> str | None:
        return self.ffn_input_site(self.config.layer)

    # --- editing -------------------------------------------------------------------------------
    def _edit_one(self, request: EditRequest) -> float:
        device = model_device(self.model)
        batch = encode_pairs(self.tokenizer, [request.prompt], [request.target]).to(device)
        optimizer = torch.optim.Adam(list(self.parameters()), lr=self.config.lr)  # fresh per edit, as the authors'
        self._editing = True
        try:
            with replaying(self.prefix):
                losses = optimise(optimizer, self.config.iterations, lambda: self.batch_loss(batch))
        finally:
            self._editing = False
        self.trained = True
        return losses[-1] if losses else 0.0

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        losses = [self._edit_one(r) for r in requests]  # one edit at a time, as the authors'
        return EditStats(loss=sum(losses) / len(losses), iterations=self.config.iterations * len(losses))

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.iterations)

    def get_extra_state(self) -> dict[str, Any]:
        return {"trained": self.trained}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.trained = bool(state["trained"])
