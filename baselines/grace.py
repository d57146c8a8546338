"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key-value codebook at one layer.

The chosen layer is wrapped untouched. Its codebook holds keys (the layer's input at a sequence's
last prompt token), values (a trained replacement of the layer's output) and one radius per key.
A sequence whose key lies within the radius of its nearest stored key gets that key's value as the
layer output; every other sequence gets the unedited output bit for bit. Each new edit either adds
a key (radius ``eps``), widens a same-label neighbour, or adds a key and halves both radii when the
neighbour has a different label; then the chosen value is trained on the edit with Adam.

Follows the authors' ``grace/editors/grace.py`` (Thartvigsen/GRACE) and EasyEdit's
``easyeditor/models/grace/GRACE.py`` + ``hparams/GRACE/{gpt2-xl,llama-7b}.yaml``; differences:
labels are compared as target strings (the authors compare the mean of the label token ids),
ties between equidistant keys go to the newest key (the authors take the oldest, which makes a
re-edit of the same prompt unreachable), and the query token is per row (``Editor.scope``) instead
of one position shared by the whole batch. The query token is the last prompt token by default;
``key_position=sequence_last`` reads the last token as fed (``key_id = -1``), which under teacher
forcing is the last target token; the replaced token(s) follow the query token, as in the authors' code.

The value-replacement layer (baselines/value_replacement.py) is shared with ``baselines.defer``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from baselines.distances import euclidean
from baselines.value_replacement import REPLACEMENTS, Replacement, ValueReplacementLayer
from data.requests import EditRequest
from evaluation.editing.checks import check_choice, check_layer, check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec, optimise
from evaluation.editing.encoding import EncodedBatch, encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import (
    LoadedModel,
    layer_dims,
    model_device,
    replace_module,
)
from evaluation.editing.prefix_cache import frozen_prefix, replaying
from evaluation.editing.query import SequenceQuery

DIST_FNS = ("euc",)
EPS_EXPANDS = ("coverage", "moving_average")
VALUE_INITS = ("cold", "warm")


# --- the codebook --------------------------------------------------------------------------------
class Codebook(nn.Module):
    """GRACE's keys, values, radii (epsilons) and key labels, with the authors' update rules.

    A module whose whole state is extra state: it grows by one key per new edit, which fixed-shape
    parameters and buffers cannot."""

    def __init__(self, key_dim: int, value_dim: int, init_eps: float, eps_expand: str = "coverage",
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        check_choice("eps_expand", eps_expand, EPS_EXPANDS)
        self.init_eps, self.eps_expand = float(init_eps), eps_expand
        self.keys = torch.zeros(0, key_dim, device=device)  # (K, d_in) float32
        self.values = torch.zeros(0, value_dim, device=device)  # (K, d_out) float32
        self.radii = torch.zeros(0, device=device)  # (K,)
        self.labels: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) distance to and index of each query's nearest key; ties go to the newest key."""
        dist = euclidean(queries.to(self.keys.device), self.keys).flip(-1)  # (B, K), newest first
        d, j = dist.min(-1)
        return d, len(self) - 1 - j

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) in-scope mask (nearest key within its radius) and (B,) index of that key."""
        d, j = self.nearest(queries)
        return d <= self.radii[j], j

    def _append(self, key: torch.Tensor, value: torch.Tensor, label: str) -> int:
        self.keys = torch.cat([self.keys, key.detach().float().to(self.keys.device)[None]])
        self.values = torch.cat([self.values, value.detach().float().to(self.values.device)[None]])
        self.radii = torch.cat([self.radii, self.radii.new_full((1,), self.init_eps)])
        self.labels.append(label)
        return len(self) - 1

    def insert(self, key: torch.Tensor, label: str, new_value: Callable[[], torch.Tensor]) -> tuple[int, str]:
        """Place one edit's key; returns (index of the value to train, action).

        Actions: ``new`` (no key within eps + its radius: add one), ``split`` (the nearest key has a
        different label: add one and cut both radii to half their distance), ``expand`` (same label,
        outside its radius: widen it to reach the new key; ``moving_average`` also moves the key
        half-way), ``reuse`` (same label, already covered).
        """
        if len(self) == 0:
            return self._append(key, new_value(), label), "new"
        d, j = (t.item() for t in self.nearest(key[None]))
        if d > self.init_eps + self.radii[j].item():
            return self._append(key, new_value(), label), "new"
        if self.labels[j] != label:
            index = self._append(key, new_value(), label)
            self.radii[j] = d / 2 - 1e-5
            self.radii[index] = d / 2
            return index, "split"
        if d > self.radii[j].item():
            if self.eps_expand == "moving_average":
                self.keys[j] = 0.5 * self.keys[j] + 0.5 * key.float().to(self.keys.device)
            self.radii[j] = d
            return j, "expand"
        return j, "reuse"

    def get_extra_state(self) -> dict[str, Any]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii, "labels": list(self.labels)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.keys.device
        self.keys, self.values = state["keys"].to(device).clone(), state["values"].to(device).clone()
        self.radii, self.labels = state["radii"].to(device).clone(), list(state["labels"])


# --- the editor ----------------------------------------------------------------------------------
@dataclass
class GraceConfig:
    """GRACE's hyper-parameters. Defaults: the authors' repo (Thartvigsen/GRACE
    grace/config/editor/grace.yaml) and EasyEdit's hparams/GRACE/*.yaml."""

    layer: int  # the FFN layer whose input is the key (conf/editor/grace.yaml: LLaMA-2-7B's relative depth)
    eps: float = 1.0  # initial radius of a new key
    dist_fn: str = "euc"  # euclidean (the only distance the authors implement)
    eps_expand: str = "coverage"  # coverage | moving_average: how a same-label neighbour widens
    value_init: str = "cold"  # cold: U[0,1) (authors' and EasyEdit's default) | warm: the layer's own output
    # replace_last (EasyEdit gpt2-xl/llama-7b): the query token only; the authors' repo config says
    # replace_prompt (the tokens before it); replace_all: every token
    replacement: str = "replace_last"
    lr: float = 1.0
    iterations: int = 100  # authors' repo; EasyEdit: 200 for GPT2-XL, 50 for LLaMA-2-7B (conf/editor_model)
    batch_size: int = 1  # GRACE edits one request at a time
    prefix_cache: bool = True  # replay the frozen blocks below the edited layer during an edit (exact, faster)
    # the key is read at the last prompt token | sequence_last: the last token as fed (the authors'
    # key_id=-1): under teacher forcing, the last target token
    key_position: str = "prompt_last"
    seed: int = 0  # cold value init


class GraceEditor(Editor):
    """GRACE behind the shared Editor interface; its state is the codebook and the init generator."""

    Config = GraceConfig

    def __init__(self, model: LoadedModel, config: GraceConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        check_layer(model, "layer", c.layer)
        check_choice("dist_fn", c.dist_fn, DIST_FNS)
        check_choice("eps_expand", c.eps_expand, EPS_EXPANDS)
        check_choice("value_init", c.value_init, VALUE_INITS)
        check_choice("replacement", c.replacement, REPLACEMENTS)
        check_positive("eps", c.eps)
        check_positive("lr", c.lr)
        check_positive("iterations", c.iterations)
        check_positive("batch_size", c.batch_size)
        self.checked_key_position(c.key_position)
        base = model.ffn_module(c.layer)
        d_in, d_out = layer_dims(base)
        adapter = ValueReplacementLayer(base, c.replacement, self._current)
        replace_module(model.model, model.ffn_name(c.layer), adapter)
        self.adapters = [adapter]  # in the model, not registered here: it holds the base layer
        self.query = SequenceQuery(adapter, on_query=self._route)
        # blocks below the edited layer are frozen and see the same input in every iteration of an edit
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)
        self.codebook = Codebook(d_in, d_out, c.eps, c.eps_expand, model_device(model.model))
        self.generator = torch.Generator().manual_seed(c.seed)  # cold value init, on this instance only
        self._train_value: nn.Parameter | None = None  # the value being trained (edit() only)

    @property
    def adapter(self) -> ValueReplacementLayer:
        """The replacement layer in the model (held in a list: registering it would register the base layer)."""
        return self.adapters[0]

    # --- routing -------------------------------------------------------------------------------
    def _current(self) -> Replacement | None:
        return self.query.derived  # type: ignore[return-value]

    def _route(self, q: torch.Tensor) -> Replacement | None:  # q: (B, d_in) at the query tokens
        positions = self.query.positions
        assert positions is not None
        if self._train_value is not None:  # training: the edit is routed to its own key
            B = q.shape[0]
            return Replacement(torch.ones(B, dtype=torch.bool, device=q.device),
                               self._train_value[None].expand(B, -1), positions)
        if len(self.codebook) == 0:
            return None
        active, index = self.codebook.lookup(q)
        return Replacement(active, self.codebook.values[index], positions)

    def query_site(self) -> str | None:
        return self.ffn_input_site(self.config.layer)

    @torch.no_grad()
    def keys_for(self, batch: EncodedBatch) -> torch.Tensor:
        """(B, d_in) the layer input at each row's query token (the codebook key)."""
        with self.batch_scope(batch):
            target_logits(self.model, batch)
            assert self.query.value is not None
            return self.query.value.clone()

    # --- editing -------------------------------------------------------------------------------
    def _initial_value(self, key: torch.Tensor) -> torch.Tensor:
        if self.config.value_init == "warm":  # the layer's own output for the key
            with torch.no_grad():
                return self.adapter.base_layer(key[None])[0].float()
        d_out = self.codebook.values.shape[1]  # "cold": U[0, 1), as the authors' torch.rand
        return torch.rand(d_out, generator=self.generator)

    def _edit_one(self, request: EditRequest) -> tuple[float, str]:
        device = model_device(self.model)
        batch = encode_pairs(self.tokenizer, [request.prompt], [request.target]).to(device)
        with replaying(self.prefix):
            key = self.keys_for(batch)[0]
            index, action = self.codebook.insert(key, request.target, lambda: self._initial_value(key))
            value = nn.Parameter(self.codebook.values[index].clone())
            optimizer = torch.optim.Adam([value], lr=self.config.lr)
            self._train_value = value
            try:
                losses = optimise(optimizer, self.config.iterations, lambda: self.batch_loss(batch))
            finally:
                self._train_value = None
        self.codebook.values[index] = value.detach()
        return (losses[-1] if losses else 0.0), action

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        results = [self._edit_one(r) for r in requests]  # GRACE edits one at a time
        actions = [a for _, a in results]
        return EditStats(
            loss=sum(l for l, _ in results) / len(results),
            iterations=self.config.iterations * len(results),
            extra={"num_keys": float(len(self.codebook)), **{a: float(actions.count(a))
                                                              for a in ("new", "split", "expand", "reuse")}},
        )

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.iterations)

    def trainable_params(self) -> int:
        return self.codebook.values.numel()  # one value per key (the paper's Table 3 count)

    def stored_params(self) -> int:
        return self.codebook.keys.numel() + self.codebook.radii.numel()

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
