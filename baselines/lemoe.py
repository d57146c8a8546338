"""LEMoE (Wang & Li, EMNLP 2024, arXiv 2406.20030): a mixture-of-experts adaptor for lifelong model editing.

No code is public (github.com/rzhwang/LEMoE holds a README only); this follows the paper as summarised in
public copies. The experts bypass one FFN block: h(x) = FFN(x) + lambda * sum_{i in Top-k} g(i|x) f_i(x),
lambda = 1, top-1, LLaMA2-7B's layer 18, AdamW lr 2e-4, at most 5 experts (their compute limit).
- Module insertion (sec. 4.1): each edit batch gets a new expert; every earlier expert is frozen. Here the
  experts are pre-allocated (``max_experts``) and only the current one (and its router) is in the optimizer,
  so earlier ones stay bit for bit.
- KV anchor routing (sec. 4.2): routing reads an instance-level embedding, the mean of the input token
  embeddings of the sentence (here: of each row's real tokens up to its last prompt token, so generation and
  teacher forcing read the same), against keys kept per expert, so an input routes the same way in training
  and at inference. The paper's router is learned, g = Top_k(softmax_i(k_i . W_up SiLU(W_down e))), with the
  new expert's key and the projection trained on its batch (``routing: learned``; shared or per expert is not
  said: here per expert, frozen with it, so old scores never move; a later expert can still outscore an old
  edit). ``routing: anchor`` (default) keeps each edit's unit embedding as an anchor of its expert and routes to
  the expert of the nearest anchor: an edited prompt finds its own anchor, so its route at inference is its
  route in training, by construction.
- Clustering-based editing order planning (sec. 4.3) orders the stream, not the editor: ``dataset.order=
  lemoe_cluster`` (data/order.py).
Open choices, each a key: expert form (``expert``: a copy of the FFN block, or a LoRA bypass as in the
paper's appendix C.4), its start (``expert_init``), the "no expert" threshold (``threshold``, none in the
paper), the projection width, weight decay, iterations and the batch size (1000 edits over 5 experts).
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from baselines.distances import euclidean
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_choice, check_layer, check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec, optimise
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import (
    LoadedModel,
    get_module,
    model_device,
    replace_module,
)
from evaluation.editing.prefix_cache import frozen_prefix, replaying
from evaluation.editing.query import RouteTaken, SequenceQuery, prompt_mean

log = logging.getLogger(__name__)

EXPERTS = ("ffn", "lora")
EXPERT_INITS = ("zero_out", "copy")
ROUTINGS = ("anchor", "learned")


@dataclass
class LEMoEConfig:
    """LEMoE's hyper-parameters. Paper: arXiv 2406.20030 (sec. 4, 5.1); "open" = not stated there."""

    layer: int  # the FFN block that gets the experts (conf/editor/lemoe.yaml: LLaMA2-7B's layer 18 of 32, paper)
    # the FFN's output projection ({i}: the layer); the experts bypass its parent, the FFN block. null: the
    # parent of the model's ffn_template and its last child with weights (conf/editor/lemoe.yaml passes the model's)
    out_template: Optional[str] = None
    expert: str = "ffn"  # ffn: a copy of the FFN block (paper: "a new FFN expert") | lora: x A B (paper App. C.4)
    # open. zero_out: the FFN's weights with its output projection zeroed (starts as a no-op) | copy: exact copy
    expert_init: str = "zero_out"
    rank: int = 8  # expert=lora: its rank (open)
    max_experts: int = 5  # pre-allocated experts, one per edit batch (paper: at most 5, compute-limited)
    batch_size: int = 200  # edits per expert: the paper's 1000 edits over its 5 experts (open)
    routing: str = "anchor"  # anchor: the nearest stored edit embedding's expert | learned: the paper's formula
    top_k: int = 1  # experts per input (paper: 1)
    # null: every input goes to an expert (paper). anchor: none beyond this distance between unit embeddings
    # (0..2; 2 - 2 cos); learned: none when the top softmax weight is below it. No expert: FFN(x) bit for bit
    threshold: Optional[float] = None
    projection_dim: Optional[int] = None  # routing=learned: W_down's width; null: hidden/4 (open)
    scale: float = 1.0  # lambda, the experts' weight (paper: 1)
    lr: float = 2e-4  # AdamW (paper)
    weight_decay: float = 0.01  # AdamW's (open: torch's default)
    iterations: int = 50  # the most optimiser steps per batch, whole batch each (open)
    # stop a batch's training once its loss is below this: the batch fits (open; null: always `iterations` steps).
    # The final loss and the batch's exact-match share after training are in each batch's EditStats.extra
    stop_below: Optional[float] = None
    prefix_cache: bool = True  # replay the frozen blocks below the layer during an edit (exact, faster)
    seed: int = 0  # the LoRA experts' and routers' initialisation


@dataclass
class ExpertRoute:
    """Which experts each sequence of the batch uses."""

    experts: torch.Tensor  # (B, k) long
    weights: torch.Tensor  # (B, k) g(i|x)
    active: torch.Tensor  # (B,) bool: False = no expert, the FFN's output bit for bit


class LoRAExpert(nn.Module):
    """f(x) = x A B, a rank-r bypass of the FFN block; A Kaiming-uniform (as nn.Linear), B zero: starts as a no-op."""

    def __init__(self, d: int, rank: int, generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d)
        self.A = nn.Parameter((torch.rand(d, rank, generator=generator) * 2 * bound - bound).to(device))
        self.B = nn.Parameter(torch.zeros(rank, d, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A @ self.B


class KeyRouter(nn.Module):
    """One expert's learned router (routing=learned): score(x) = key . W_up SiLU(W_down e(x))."""

    def __init__(self, d: int, width: int, generator: torch.Generator, device: torch.device) -> None:
        super().__init__()
        b_down, b_up = 1.0 / math.sqrt(d), 1.0 / math.sqrt(width)
        self.down = nn.Parameter((torch.rand(d, width, generator=generator) * 2 * b_down - b_down).to(device))
        self.up = nn.Parameter((torch.rand(width, d, generator=generator) * 2 * b_up - b_up).to(device))
        self.key = nn.Parameter(torch.zeros(d, device=device))  # set from its batch when its expert is inserted

    def project(self, e: torch.Tensor) -> torch.Tensor:
        return F.silu(e @ self.down) @ self.up


class MoEBlock(nn.Module):
    """y = FFN(x) + scale * sum_j g_j f_j(x) over each sequence's experts; rows without one get FFN(x) exactly."""

    def __init__(self, base_layer: nn.Module, experts: nn.ModuleList, scale: float,
                 route: Callable[[], ExpertRoute | None]) -> None:
        super().__init__()
        self.base_layer, self.experts, self.scale, self.route = base_layer, experts, scale, route

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # x: (B, T, d)
        y = self.base_layer(x, *args, **kwargs)
        r = self.route()
        if r is None:
            return y
        active = r.active.to(y.device)
        xf, delta = x.float(), torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        for slot in range(r.experts.shape[1]):
            chosen = r.experts[:, slot].to(y.device)
            for e in chosen[active].unique().tolist():
                rows = active & (chosen == e)
                delta[rows] = delta[rows] + r.weights[rows, slot, None, None].float() * self.experts[e](xf[rows])
        return torch.where(active[:, None, None], y + (self.scale * delta).to(y.dtype), y)


@torch.no_grad()
def pooled_embedding(embeddings: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     positions: torch.Tensor) -> torch.Tensor:
    """(B, d) float32: the mean input embedding of each row's real tokens up to ``positions`` (its last prompt
    token), the same under left and right padding (:func:`~evaluation.editing.query.prompt_mean`)."""
    return prompt_mean(embeddings(input_ids), positions.to(input_ids.device), attention_mask)


class PromptMeanQuery(SequenceQuery):
    """A :class:`SequenceQuery` whose vector is :func:`pooled_embedding` (LEMoE's instance-level embedding),
    read by a pre-hook on the decoder stack, which sees the ids and the attention mask; ``scope`` as there."""

    def __init__(self, stack: nn.Module, embeddings: nn.Module, on_query: Callable[[torch.Tensor], object]) -> None:
        self.positions = self.value = self.derived = None  # SequenceQuery's state, without its input hook
        self.on_query, self.detach, self._embeddings = on_query, True, [embeddings]
        self.stop_after_route = False
        self._handle = stack.register_forward_pre_hook(self._pool, with_kwargs=True)

    def _pool(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.positions is None or self.value is not None:
            return None  # outside a scope, or a decoding step that reuses the prompt's route
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("LEMoE routes on input ids; this forward passed only inputs_embeds")
        if ids.shape[0] != self.positions.shape[0]:
            raise RuntimeError(f"scope was opened for {self.positions.shape[0]} sequences but the forward has "
                               f"{ids.shape[0]}")
        self.value = pooled_embedding(self._embeddings[0], ids, kwargs.get("attention_mask"), self.positions)
        self.derived = self.on_query(self.value)
        if self.stop_after_route:
            raise RouteTaken
        return None


class LEMoEEditor(Editor):
    """LEMoE behind the shared Editor interface. State: the experts (and learned routers), the number in use,
    the anchors (extra state)."""

    Config = LEMoEConfig

    @property
    def inference_settings(self) -> tuple[str, ...]:  # type: ignore[override]
        # anchor routing sends each training row to its own anchor, so to the new expert, whatever the threshold;
        # a learned router's threshold also decides which training rows reach the expert
        return ("threshold",) if self.config.routing == "anchor" else ()

    @classmethod
    def batch_limit(cls, config: Any) -> tuple[int, str] | None:
        return config.max_experts, "editor.max_experts"  # one pre-allocated expert per batch

    def __init__(self, model: LoadedModel, config: LEMoEConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        self._validate(model)
        generator = torch.Generator().manual_seed(c.seed)
        block_name, out_name = self._block_names(model)
        block = get_module(model.model, block_name, model.num_layers)
        embeddings = model.model.get_input_embeddings()
        d, device = embeddings.embedding_dim, model_device(model.model)
        if c.expert == "ffn":
            experts = [self._ffn_expert(block, out_name) for _ in range(c.max_experts)]
        else:
            experts = [LoRAExpert(d, c.rank, generator, device) for _ in range(c.max_experts)]
        self.experts = nn.ModuleList(experts)
        self.routers = nn.ModuleList(KeyRouter(d, c.projection_dim or max(1, d // 4), generator, device)
                                     for _ in range(c.max_experts)) if c.routing == "learned" else None
        self.requires_grad_(False)  # an expert (and its router) trains only while its batch is edited
        adapter = MoEBlock(block, self.experts, c.scale, self._current)
        replace_module(model.model, block_name, adapter)
        self.adapters: list[MoEBlock] = [adapter]  # in the model, not registered here: it holds the FFN block
        self._embeddings = [embeddings]  # the model's own: held, not registered
        self.query = PromptMeanQuery(model.model.base_model, embeddings, self._route)
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)  # blocks below the experts see one batch
        self.num_experts = 0  # experts 0..num_experts-1 hold edit batches, in order
        self.anchors = torch.zeros(0, d, device=device)  # (P, d) unit embeddings of the edits (routing=anchor)
        self.anchor_experts = torch.zeros(0, dtype=torch.long, device=device)  # (P,) the expert of each
        self.train_route: ExpertRoute | None = None  # the route of the last training forward (not state)
        self._training = False

    def _validate(self, model: LoadedModel) -> None:
        c = self.config
        check_layer(model, "layer", c.layer)
        check_choice("expert", c.expert, EXPERTS)
        check_choice("expert_init", c.expert_init, EXPERT_INITS)
        check_choice("routing", c.routing, ROUTINGS)
        for key in ("rank", "max_experts", "batch_size", "scale", "lr", "iterations"):
            check_positive(key, getattr(c, key))
        if c.projection_dim is not None:
            check_positive("projection_dim", c.projection_dim)
        if c.stop_below is not None:
            check_positive("stop_below", c.stop_below)
        if c.routing == "learned":
            log.warning("LEMoE routing=learned does not keep earlier routes: each new expert's router can take "
                        "inputs of earlier edits (issue 35's probe on SmolLM2: batch 1 from 1.0 to 0.0 once batch 2 "
                        "trained); routing=anchor keeps them")
        if c.weight_decay < 0:
            raise ConfigError(f"editor.weight_decay must be >= 0, got {c.weight_decay}")
        if not 1 <= c.top_k <= c.max_experts:
            raise ConfigError(f"editor.top_k={c.top_k} must be between 1 and editor.max_experts={c.max_experts}")
        if c.out_template is not None and "{i}" not in c.out_template:
            raise ConfigError(f"editor.out_template must contain '{{i}}' for the layer, got {c.out_template!r}")

    def _block_names(self, model: LoadedModel) -> tuple[str, str]:
        """The FFN block's name and its output projection's name inside it."""
        c = self.config
        full = c.out_template.format(i=c.layer) if c.out_template else model.ffn_name(c.layer)
        block, _, out = full.rpartition(".")
        if not block:
            raise ConfigError(f"editor.out_template: {full!r} has no parent module (the FFN block)")
        if c.out_template is None:
            children = get_module(model.model, block, model.num_layers).named_children()
            out = [n for n, m in children if isinstance(getattr(m, "weight", None), torch.Tensor)][-1]
        return block, out

    def _ffn_expert(self, block: nn.Module, out_name: str) -> nn.Module:
        expert = copy.deepcopy(block).float()  # float32 whatever the model's dtype
        if self.config.expert_init == "zero_out":
            with torch.no_grad():
                for p in expert.get_submodule(out_name).parameters():
                    p.zero_()
        return expert

    # --- routing -------------------------------------------------------------------------------
    def _current(self) -> ExpertRoute | None:
        derived = self.query.derived
        return derived if isinstance(derived, ExpertRoute) else None

    def _route(self, e: torch.Tensor) -> ExpertRoute | None:  # e: (B, d) instance embeddings
        n, c = self.num_experts, self.config
        if n == 0:
            return None
        B, k = e.shape[0], min(c.top_k, n)
        if c.routing == "anchor":
            dist = euclidean(F.normalize(e, dim=-1), self.anchors)  # (B, P)
            nearest = dist.new_full((B, n), float("inf")).scatter_reduce(
                1, self.anchor_experts.expand(B, -1), dist, reduce="amin")  # (B, n): each expert's nearest anchor
            score = -nearest.flip(-1)  # newest expert first: ties (a re-edited prompt) go to the newest
            top, idx = score.max(-1, keepdim=True) if k == 1 else score.topk(k, -1)
            experts, weights = n - 1 - idx, torch.softmax(top, -1)
            active = -top[:, 0] <= c.threshold if c.threshold is not None else torch.ones(B, dtype=torch.bool)
        else:
            routers = self.routers[:n]
            v = torch.stack([r.project(e) for r in routers], 1)  # (B, n, d)
            g = torch.softmax((v * torch.stack([r.key for r in routers])).sum(-1), -1)  # (B, n), not renormalised
            weights, experts = g.max(-1, keepdim=True) if k == 1 else g.topk(k, -1)
            active = weights[:, 0] >= c.threshold if c.threshold is not None else torch.ones(B, dtype=torch.bool)
        route = ExpertRoute(experts, weights, active.to(e.device))
        if self._training:
            self.train_route = route
        return route

    def query_site(self) -> str | None:
        return "input_embeddings:prompt_mean"  # the experts are copies of a block; the embeddings are never edited

    # --- editing -------------------------------------------------------------------------------
    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c, t = self.config, self.num_experts
        if t >= c.max_experts:
            raise ConfigError(f"LEMoE has used all editor.max_experts={c.max_experts} experts (one per edit batch "
                              f"of editor.batch_size={c.batch_size}); raise editor.max_experts or editor.batch_size")
        device = model_device(self.model)
        batch = encode_pairs(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests]).to(device)
        e = pooled_embedding(self._embeddings[0], batch.input_ids, batch.attention_mask, batch.query_positions)
        params = list(self.experts[t].parameters())
        if c.routing == "anchor":  # the batch's embeddings become its expert's anchors before it trains
            self.anchors = torch.cat([self.anchors, F.normalize(e, dim=-1)])
            self.anchor_experts = torch.cat([self.anchor_experts, self.anchor_experts.new_full((len(e),), t)])
        else:  # the new key starts at its batch's mean projected embedding (open), then trains with it
            router = self.routers[t]
            with torch.no_grad():
                router.key.copy_(router.project(e).mean(0))
            params += list(router.parameters())
        self.num_experts = t + 1
        for p in params:
            p.requires_grad_(True)
        # a fresh AdamW over the new expert only: earlier experts get no step and no weight decay
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self._training, self.train_route = True, None
        try:
            with replaying(self.prefix):
                losses = optimise(optimizer, c.iterations, lambda: self.batch_loss(batch), stop_below=c.stop_below)
                self._training = False
                with torch.no_grad(), self.batch_scope(batch):  # the batch as inference sees it after training
                    fitted = target_logits(self.model, batch)
        finally:
            self._training = False
            for p in params:
                p.requires_grad_(False)
        r = self.train_route
        on_new = float(((r.experts[:, 0] == t) & r.active).float().mean()) if r is not None else float("nan")
        final_loss = float(fitted.loss())
        steps = len(losses) - (1 if c.stop_below is not None and losses and losses[-1] < c.stop_below else 0)
        return EditStats(loss=final_loss, iterations=steps,
                         extra={"experts_used": float(self.num_experts), "train_rows_on_new_expert": on_new,
                                "final_loss": final_loss, "first_loss": losses[0] if losses else float("nan"),
                                "batch_exact": float(fitted.row_exact(len(requests)).float().mean())})

    # --- accounting and state ------------------------------------------------------------------
    def expert_params(self) -> int:
        """Parameters of one expert (and its router, routing=learned)."""
        n = sum(p.numel() for p in self.experts[0].parameters())
        return n + (sum(p.numel() for p in self.routers[0].parameters()) if self.routers is not None else 0)

    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.iterations)

    def trainable_params(self) -> int:
        """Parameters of the experts inserted so far (one per edit batch), not of all pre-allocated ones."""
        return self.num_experts * self.expert_params()

    def stored_params(self) -> int:
        return self.anchors.numel() + self.anchor_experts.numel()

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "anchors": self.anchors.clone(),
                "anchor_experts": self.anchor_experts.clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.anchors.device
        self.num_experts = int(state["num_experts"])
        self.anchors = state["anchors"].to(device).clone()
        self.anchor_experts = state["anchor_experts"].to(device).clone()
