"""MELO (Yu et al., AAAI 2024): neuron-indexed dynamic LoRA with a vector database of cluster keys.

LoRA layers wrap some feed-forward layers untouched; their rank is cut into ``num_blocks`` blocks of
``rank_per_block`` ranks. Every edit batch trains a block of its own. A vector database at a
"query layer" below them holds clusters of keys (one key per edit: the query layer's output at
the edit's last prompt token), each key pointing at the block that learned it. At inference a
sequence's key selects the nearest cluster centre; inside that cluster's radius it uses the block
of the cluster's nearest key, outside it gets no LoRA at all: the unedited output, bit for bit.

Database rules, as ``VecDB``/``GraceLinear`` in MELO's PEFT fork (ECNU-ICALK/MELO and EasyEdit's
``easyeditor/models/melo/peft_egg/src/peft/tuners/melo.py``), applied once per batch against the
database as it stood before the batch: the first batch makes one cluster per key; later, a key
farther than (nearest radius + ``radius``) from the nearest centre starts a cluster of radius
``radius``; a key with the nearest cluster's label joins it (centre = mean of its keys, radius =
max(farthest key, ``radius``)); a key with another label starts a cluster and both radii are cut to
half the distance (-/+ 1e-5), the old cluster forgetting keys now outside it.

Differences from the released code, all on purpose: the key token is the last prompt token of
each row by default (MELO's ``key_id: -1`` takes the last token of "{prompt} {target}", which
``key_position=sequence_last`` reproduces, without ever reading a pad token); labels are compared
as target strings (MELO compares the sums of the label token ids); running out of blocks is an
error (MELO silently indexes past its rank).

Scaling: MELO builds one LoRA of rank ``num_blocks * rank_per_block`` with lora_alpha equal to that
rank and multiplies each selected block of A and of B by sqrt(num_blocks), so a block's update is
``num_blocks * x A_b B_b``; here ``alpha / rank_per_block * x A_b B_b`` with ``alpha`` defaulting to
``num_blocks * rank_per_block`` gives the same. A starts as in that LoRA (Kaiming-uniform over the
whole rank: U(+-1/sqrt(num_blocks * rank_per_block))), B at zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from baselines.distances import euclidean
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
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

NO_LORA = -1
KEY_SOURCES = ("output", "input")


# --- the vector database -------------------------------------------------------------------------
class ClusterDB(nn.Module):
    """Clusters of edit keys: centres, radii and labels; every key remembers the block that learned it.

    A module whose whole state is extra state: it grows with every edit batch, which fixed-shape
    parameters and buffers cannot."""

    _TENSORS = ("centers", "radii", "point_keys", "point_blocks", "point_cluster")

    def __init__(self, key_dim: int, init_radius: float, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.init_radius = float(init_radius)
        self.centers = torch.zeros(0, key_dim, device=device)  # (C, d) float32
        self.radii = torch.zeros(0, device=device)  # (C,)
        self.labels: list[str] = []
        self.point_keys = torch.zeros(0, key_dim, device=device)  # (P, d)
        self.point_blocks = torch.zeros(0, dtype=torch.long, device=device)  # (P,) NO_LORA = forgotten
        self.point_cluster = torch.zeros(0, dtype=torch.long, device=device)  # (P,)
        self.conflicts = 0
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self.labels)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) block of each query (NO_LORA where none) and (B,) mask of queries that get a block."""
        B = queries.shape[0]
        if len(self) == 0:
            return torch.full((B,), NO_LORA, dtype=torch.long, device=self.centers.device), \
                torch.zeros(B, dtype=torch.bool, device=self.centers.device)
        q = queries.to(self.centers.device)
        d, c = euclidean(q, self.centers).min(-1)  # nearest centre
        inside = d <= self.radii[c]
        dp = euclidean(q, self.point_keys)  # (B, P)
        dp = dp.masked_fill(self.point_cluster[None, :] != c[:, None], float("inf"))
        blocks = self.point_blocks[dp.argmin(-1)]  # the cluster's nearest key
        active = inside & (blocks != NO_LORA)
        return torch.where(active, blocks, torch.full_like(blocks, NO_LORA)), active

    def _add_point(self, key: torch.Tensor, block: int, cluster: int) -> None:
        self.point_keys = torch.cat([self.point_keys, key[None]])
        self.point_blocks = torch.cat([self.point_blocks, self.point_blocks.new_tensor([block])])
        self.point_cluster = torch.cat([self.point_cluster, self.point_cluster.new_tensor([cluster])])

    def _add_cluster(self, key: torch.Tensor, label: str, block: int) -> int:
        self.centers = torch.cat([self.centers, key[None]])
        self.radii = torch.cat([self.radii, self.radii.new_full((1,), self.init_radius)])
        self.labels.append(label)
        self._add_point(key, block, len(self) - 1)
        return len(self) - 1

    def _join(self, j: int, key: torch.Tensor, block: int) -> None:
        self._add_point(key, block, j)
        members = self.point_keys[self.point_cluster == j]
        self.centers[j] = members.mean(0)
        farthest = euclidean(members, self.centers[j][None]).max()
        self.radii[j] = max(float(farthest), self.init_radius)

    def _split(self, j: int, new: int, dist: float) -> None:
        self.radii[j] = dist / 2 - 1e-5
        self.radii[new] = dist / 2 + 1e-5
        mine = self.point_cluster == j
        outside = mine & (euclidean(self.point_keys, self.centers[j][None])[:, 0] > self.radii[j])
        keep = ~outside
        self.forgotten += int(outside.sum())
        self.point_keys, self.point_blocks = self.point_keys[keep], self.point_blocks[keep]
        self.point_cluster = self.point_cluster[keep]
        if not bool((self.point_cluster == j).any()):  # MELO keeps the centre as a key without a block
            self._add_point(self.centers[j].clone(), NO_LORA, j)
        self.conflicts += 1

    def add_batch(self, keys: torch.Tensor, labels: Sequence[str], block: int) -> list[str]:
        """Place one batch's keys (all learned by ``block``); returns the action taken for each."""
        keys = keys.detach().float().to(self.centers.device)
        if len(self) == 0:
            for key, label in zip(keys, labels):
                self._add_cluster(key, label, block)
            return ["new"] * len(labels)
        dist, nearest = euclidean(keys, self.centers).min(-1)  # against the database before this batch
        actions = []
        for key, label, d, j in zip(keys, labels, dist.tolist(), nearest.tolist()):
            if d > self.radii[j].item() + self.init_radius:
                self._add_cluster(key, label, block)
                actions.append("new")
            elif self.labels[j] == label:
                self._join(j, key, block)
                actions.append("join")
            else:
                self._split(j, self._add_cluster(key, label, block), d)
                actions.append("split")
        return actions

    def num_stored(self) -> int:
        return self.centers.numel() + self.radii.numel() + self.point_keys.numel() + self.point_blocks.numel()

    def get_extra_state(self) -> dict[str, Any]:
        # copies: _join and _split change centres and radii in place
        return {**{k: getattr(self, k).clone() for k in self._TENSORS},
                "labels": list(self.labels), "conflicts": self.conflicts, "forgotten": self.forgotten}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.centers.device
        for k in self._TENSORS:
            setattr(self, k, state[k].to(device).clone())
        self.labels, self.conflicts, self.forgotten = list(state["labels"]), state["conflicts"], state["forgotten"]


# --- the LoRA layer ------------------------------------------------------------------------------
@dataclass
class BlockRoute:
    """Which LoRA block each sequence of the batch uses."""

    blocks: torch.Tensor  # (B,) long, NO_LORA where inactive
    active: torch.Tensor  # (B,) bool: False = the base output, bit for bit


class LoRABlocks(nn.Module):
    """The LoRA blocks of one MELO layer: A (num_blocks, d_in, r) and B (num_blocks, r, d_out), float32.

    Its own module so the editor registers the blocks (its state) without the base layer they wrap.
    A starts as in MELO's whole-rank LoRA (Kaiming-uniform(a=sqrt(5)): U(+-1/sqrt(num_blocks * r))), B at zero."""

    def __init__(self, d_in: int, d_out: int, num_blocks: int, rank: int, device: torch.device,
                 generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(num_blocks * rank)  # Kaiming-uniform(a=sqrt(5)) of the whole-rank A
        A = torch.rand(num_blocks, d_in, rank, generator=generator) * (2 * bound) - bound
        self.lora_A = nn.Parameter(A.to(device))  # float32 whatever the model's dtype
        self.lora_B = nn.Parameter(torch.zeros(num_blocks, rank, d_out, device=device))


class BlockLoRA(nn.Module):
    """y = W0 x + b + s * x A_k B_k for each sequence's block k (rows without a block: W0 x + b exactly)."""

    def __init__(self, base_layer: nn.Module, num_blocks: int, rank: int, scaling: float,
                 route: Callable[[], BlockRoute | None], generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.route = route
        self.scaling = scaling
        d_in, d_out = layer_dims(base_layer)
        self.lora = LoRABlocks(d_in, d_out, num_blocks, rank, base_layer.weight.device, generator)

    @property
    def lora_A(self) -> nn.Parameter:
        return self.lora.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.lora.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_in)
        y = self.base_layer(x)
        r = self.route()
        if r is None:
            return y
        blocks = r.blocks.clamp(min=0).to(x.device)
        A, B = self.lora_A[blocks], self.lora_B[blocks]  # (B, d_in, r), (B, r, d_out)
        delta = torch.bmm(torch.bmm(x.to(A.dtype), A), B) * self.scaling  # (B, T, d_out)
        return torch.where(r.active.to(x.device)[:, None, None], y + delta.to(y.dtype), y)


# --- the editor ----------------------------------------------------------------------------------
@dataclass
class MeloConfig:
    """MELO's hyper-parameters. Defaults: ECNU-ICALK/MELO melo/config/experiment/hallucination.yaml and
    EasyEdit hparams/MELO/gpt2-xl.yaml (the GPT2-XL setting)."""

    layers: List[int]  # the FFN layers that get block LoRAs (per model: conf/editor_model/melo_<model>.yaml)
    query_layer: int  # the FFN layer whose output is the database key; must lie below every LoRA layer
    rank_per_block: int = 2  # num_rank_per_block
    num_blocks: int = 350  # num_block: at most 350 edit batches
    # the LoRA scale's numerator (scale = alpha / rank_per_block); None: num_blocks * rank_per_block, as
    # MELO's lora_alpha = r (update scale = num_blocks)
    alpha: Optional[float] = None
    radius: float = 0.5  # init_radius of a cluster
    key_source: str = "output"  # MELO keys on the query layer's output; input: its input
    lr: float = 1e-3  # edit_lr, Adam
    lr_step: int = 20  # StepLR(step_size=20, gamma=0.5), as MELO's edit()
    lr_gamma: float = 0.5
    iterations: int = 50  # num_iter
    batch_size: int = 4  # num_edit_per_block: one block per batch of 4 edits
    prefix_cache: bool = True  # replay the frozen blocks below the query layer during an edit (exact, faster)
    # the key is read at the last prompt token | sequence_last: the last token as fed (the authors'
    # key_id=-1): under teacher forcing, the last target token
    key_position: str = "prompt_last"
    seed: int = 0  # the LoRA blocks' A initialisation


class MeloEditor(Editor):
    """MELO behind the shared Editor interface. Its state: the LoRA blocks of every layer (registered),
    the vector database and the count of blocks used (extra state)."""

    Config = MeloConfig

    @classmethod
    def batch_limit(cls, config: Any) -> tuple[int, str] | None:
        return config.num_blocks, "editor.num_blocks"  # one LoRA block per batch

    def __init__(self, model: LoadedModel, config: MeloConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        layers = list(c.layers)
        self._validate(model, layers, c.query_layer, c.key_source)
        for key in ("rank_per_block", "num_blocks", "radius", "lr", "lr_step", "lr_gamma", "iterations", "batch_size"):
            check_positive(key, getattr(c, key))
        if c.alpha is not None:
            check_positive("alpha", c.alpha)
        self.checked_key_position(c.key_position)

        generator = torch.Generator().manual_seed(c.seed)
        self.adapters: list[BlockLoRA] = []  # in the model, not registered here: they hold the base layers
        for layer in layers:
            adapter = BlockLoRA(model.ffn_module(layer), c.num_blocks, c.rank_per_block,
                                self.alpha / c.rank_per_block, self._current, generator)
            replace_module(model.model, model.ffn_name(layer), adapter)
            self.adapters.append(adapter)
        self.loras = nn.ModuleList(a.lora for a in self.adapters)  # the trainable part of each adapter
        query_module = model.ffn_module(c.query_layer)
        self._query_module = [query_module]  # the model's own layer: held, not registered
        d_in, d_out = layer_dims(query_module)
        self.query = SequenceQuery(query_module, on_query=self._route)
        # blocks below the query layer are frozen and see the same batch in every iteration
        self.prefix = frozen_prefix(model, c.prefix_cache, c.query_layer)
        self.db = ClusterDB(d_out if c.key_source == "output" else d_in, c.radius, model_device(model.model))
        self.next_block = 0  # blocks 0..next_block-1 have been trained, one per edit batch
        self._train_block: int | None = None  # the block being trained (edit() only)
        self._capture_keys = False  # keys_for(): capture the keys, route nothing

    @property
    def alpha(self) -> float:
        """The LoRA scale's numerator (editor.alpha; null: num_blocks * rank_per_block)."""
        c = self.config
        return float(c.alpha) if c.alpha is not None else float(c.num_blocks * c.rank_per_block)

    @property
    def query_module(self) -> nn.Module:
        """The query layer (the model's FFN at ``query_layer``)."""
        return self._query_module[0]

    @staticmethod
    def _validate(model: LoadedModel, layers: list[int], query_layer: int, key_source: str) -> None:
        for layer in layers:
            check_layer(model, "layers", layer)
        check_layer(model, "query_layer", query_layer)
        if not layers or len(set(layers)) != len(layers):
            raise ConfigError(f"editor.layers must be distinct layer indices, got {layers}")
        if query_layer >= min(layers):
            raise ConfigError(f"editor.query_layer={query_layer} must lie below the first LoRA layer "
                              f"({min(layers)}): the key must not depend on the LoRAs")
        check_choice("key_source", key_source, KEY_SOURCES)

    # --- routing -------------------------------------------------------------------------------
    def _current(self) -> BlockRoute | None:
        derived = self.query.derived
        return derived if isinstance(derived, BlockRoute) else None

    @torch.no_grad()
    def _key(self, q: torch.Tensor) -> torch.Tensor:
        """(B, d_key) keys from the query layer's input at the query tokens (MELO: the layer's output)."""
        return self.query_module(q).float() if self.config.key_source == "output" else q.float()

    def _route(self, q: torch.Tensor) -> BlockRoute | torch.Tensor | None:  # q: (B, d_in) of the query layer
        B = q.shape[0]
        if self._capture_keys:
            return self._key(q)
        if self._train_block is not None:  # training: the batch is routed to its own block
            return BlockRoute(torch.full((B,), self._train_block, dtype=torch.long, device=q.device),
                              torch.ones(B, dtype=torch.bool, device=q.device))
        if len(self.db) == 0:
            return None
        blocks, active = self.db.search(self._key(q))
        return BlockRoute(blocks, active)

    def query_site(self) -> str | None:
        return self.ffn_input_site(self.config.query_layer)  # below every LoRA layer (_validate)

    @torch.no_grad()
    def keys_for(self, batch: EncodedBatch) -> torch.Tensor:
        """(B, d_key) the database key of each row."""
        self._capture_keys = True
        try:
            with self.batch_scope(batch):
                target_logits(self.model, batch)
                keys = self.query.derived
        finally:
            self._capture_keys = False
        assert isinstance(keys, torch.Tensor)
        return keys

    # --- editing -------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        if self.next_block >= c.num_blocks:
            raise ConfigError(f"MELO has used all editor.num_blocks={c.num_blocks} LoRA blocks (one per edit "
                              f"batch of editor.batch_size={c.batch_size}); raise editor.num_blocks")
        device = model_device(self.model)
        batch = encode_pairs(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests]).to(device)
        block = self.next_block
        with replaying(self.prefix):
            actions = self.db.add_batch(self.keys_for(batch), [r.target for r in requests], block)
            # fresh Adam + StepLR per batch, as MELO; blocks other than this one get zero gradients and,
            # from a fresh Adam state, exactly zero updates
            optimizer = torch.optim.Adam(self.parameters(), lr=c.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=c.lr_step, gamma=c.lr_gamma)
            self._train_block = block
            try:
                losses = optimise(optimizer, c.iterations, lambda: self.batch_loss(batch), scheduler=scheduler)
            finally:
                self._train_block = None
        self.next_block += 1
        return EditStats(loss=losses[-1] if losses else 0.0, iterations=c.iterations, extra={
            "num_clusters": float(len(self.db)), "conflicts": float(self.db.conflicts),
            "forgotten_keys": float(self.db.forgotten), "blocks_used": float(self.next_block),
            **{a: float(actions.count(a)) for a in ("new", "join", "split")}})

    # --- accounting and state ------------------------------------------------------------------
    def block_params(self) -> int:
        """LoRA parameters of one block, over all LoRA layers."""
        return sum(self.config.rank_per_block * (a.lora_A.shape[1] + a.lora_B.shape[2]) for a in self.adapters)

    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=min(self.config.layers), passes=self.config.iterations)

    def trainable_params(self) -> int:
        """Parameters of the blocks trained so far (one block per edit batch), not of all pre-allocated blocks."""
        return self.next_block * self.block_params()

    def stored_params(self) -> int:
        return self.db.num_stored()

    def get_extra_state(self) -> dict[str, Any]:
        return {"next_block": self.next_block}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.next_block = int(state["next_block"])
