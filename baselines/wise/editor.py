"""WISE behind the shared Editor interface (the method, its sources and departures: baselines/wise/__init__.py)."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from baselines.context_templates import seed_word_continuations
from baselines.wise.config import WISEConfig
from baselines.wise.merge import MERGE_ALGS, gta_merge, merge_into_side
from baselines.wise.parts import (
    MAIN,
    NO_EDIT,
    ActivationQuery,
    MemoryRoute,
    SideMemoryLayer,
    mean_positive,
    read_loc_corpus,
)
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_choice, check_layer, check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec
from evaluation.editing.encoding import IGNORE, EncodedBatch, encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel, model_device, replace_module
from evaluation.editing.prefix_cache import frozen_prefix, replaying
from evaluation.editing.query import prompt_span


class WISEEditor(Editor):
    """WISE behind the shared Editor interface. State: the working side memory and its shard mask (registered);
    the put-away / merged memories, their thresholds, the counters, the generator and the context prefixes
    (extra state)."""

    Config = WISEConfig
    inference_settings = ("act_ratio",)  # read only when an input is routed (training sends every row to the side)

    def __init__(self, model: LoadedModel, config: WISEConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        self._validate(model)
        base = model.ffn_module(c.layer)
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ConfigError(f"editor.layer={c.layer}: {model.ffn_name(c.layer)} is a {type(base).__name__}; WISE "
                              f"needs a Linear or Conv1D matrix (the model's ffn_template)")
        self._conv = isinstance(base, Conv1D)
        self._bias = None if base.bias is None else base.bias.detach().float()
        self.main = base.weight.detach().float()  # the main memory (the model's, never written; not state)
        act_name = getattr(model.model.config, "hidden_act", None) or getattr(model.model.config,
                                                                             "activation_function", None)
        if act_name not in ACT2FN:
            raise ConfigError(f"model '{model.name}': its FFN activation {act_name!r} is not one transformers knows")
        self._act = ACT2FN[act_name]
        self.loc_texts = read_loc_corpus(c.loc_corpus)

        self.working = nn.Parameter(self.main.clone(), requires_grad=False)  # the authors' new_weight
        self.register_buffer("weight_mask", torch.zeros(self.main.shape, dtype=torch.bool, device=self.main.device))
        self.memories: list[torch.Tensor] = []  # retrieve: every memory; merge: shards awaiting the merge
        self.memory_min_act: list[float] = []  # retrieve: each memory's min recorded in-scope score
        self.merged: torch.Tensor | None = None if c.retrieve else self.main.clone()  # merge: the merged memory
        self.min_act = NO_EDIT  # the working shard's (retrieve) or every edit's (merge) min in-scope score
        self.batches_done = 0  # the authors' editing_total_cnt (edit() calls)
        self.requests_done = 0  # which loc_corpus text the next request takes
        self.merge_count = 0
        self.prefixes: list[str] | None = None  # "" + the generated context prefixes (made at the first edit)
        self.generator = torch.Generator().manual_seed(c.seed)

        adapter = SideMemoryLayer(base, self._apply)
        replace_module(model.model, model.ffn_name(c.layer), adapter)
        self.adapters = [adapter]  # in the model, not registered here: it holds the base layer
        self.query = ActivationQuery(model.model.base_model, adapter, self._score, self._route)
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)
        self._train: dict[str, Any] | None = None  # edit(): the training forward's per-token distances
        self._view: tuple[int, list[torch.Tensor]] | None = None  # the cached merge-mode memories

    def _validate(self, model: LoadedModel) -> None:
        c = self.config
        check_layer(model, "layer", c.layer)
        check_choice("merge_alg", c.merge_alg, tuple(MERGE_ALGS))
        self.checked_key_position(c.key_position)
        for key in ("lr", "iterations", "act_ratio", "save_freq", "merge_freq", "weights", "batch_size"):
            check_positive(key, getattr(c, key))
        for key in ("mask_ratio", "densities"):
            if not 0 < getattr(c, key) <= 1:
                raise ConfigError(f"editor.{key} must be in (0, 1], got {getattr(c, key)}")
        if c.merge_freq % c.save_freq:
            raise ConfigError(f"editor.merge_freq={c.merge_freq} must be a multiple of editor.save_freq={c.save_freq}")
        if c.weight_decay < 0:
            raise ConfigError(f"editor.weight_decay must be >= 0, got {c.weight_decay}")
        for key in ("norm_constraint", "long_input_tokens"):
            if getattr(c, key) is not None:
                check_positive(key, getattr(c, key))
        if any(int(n) <= 0 for n in c.template_lengths):
            raise ConfigError(f"editor.template_lengths must be positive token counts, got {list(c.template_lengths)}")

    # --- the matrices --------------------------------------------------------------------------
    def _side(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's output with ``weight`` in place of its own (float32)."""
        x = x.float()
        if self._conv:  # Conv1D stores (in, out)
            y = x @ weight
            return y + self._bias if self._bias is not None else y
        return F.linear(x, weight, self._bias)

    def _distance(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token activation distance ||act(x W_side) - act(x W_main)|| (the authors' euc)."""
        return (self._act(self._side(x, weight)) - self._act(y.float())).norm(dim=-1)

    def candidates(self) -> tuple[list[torch.Tensor], list[float]]:
        """The side memories a route may pick, and their thresholds (act_ratio * min recorded score)."""
        r = self.config.act_ratio
        if self.config.retrieve:
            return [self.working.detach(), *self.memories], [r * self.min_act] + [r * a for a in self.memory_min_act]
        if self._view is None or self._view[0] != self.batches_done:
            self._view = (self.batches_done, list(self._merge_view()))
        return self._view[1], [r * self.min_act]

    def _merge_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """WISE-Merge's (merged, working) memories as the authors' inference sees them: past one shard, their
        ``WISE.__call__`` first folds the working shard and any waiting ones into the merged memory. Read here
        without changing the state (a copy of the generator for the random merges)."""
        assert self.merged is not None
        working = self.working.detach()
        if self.batches_done < self.config.save_freq:
            return self.merged, working
        pending = list(self.memories) + ([working] if not torch.equal(working, self.main) else [])
        if not pending:
            return self.merged, working
        generator = torch.Generator().set_state(self.generator.get_state())
        return merge_into_side(self.main, self.merged, pending, self.config.weights, self.config.densities,
                               self.config.merge_alg, generator), self.main

    # --- routing -------------------------------------------------------------------------------
    @staticmethod
    def _mean(dist: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        span = span.to(dist.device)
        return torch.where(span, dist, 0).sum(-1) / span.sum(-1).clamp(min=1)

    @torch.no_grad()
    def _score(self, x: torch.Tensor, mask: Optional[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """(B, M) each row's activation score against each candidate memory."""
        y = self.adapters[0].base_layer(x)
        span = prompt_span(positions, x.shape[1], mask).to(x.device)
        long_rows = (span.sum(-1) > self.config.long_input_tokens if self.config.long_input_tokens is not None
                     else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        scores = []
        for weight in self.candidates()[0]:
            dist = self._distance(x, y, weight)
            top = dist.masked_fill(~span, -math.inf).amax(-1)
            scores.append(torch.where(long_rows, top, self._mean(dist, span)))
        return torch.stack(scores, -1)

    def _route(self, scores: torch.Tensor) -> MemoryRoute:
        """The authors' choice (WISEAdapter.forward) from (B, M) scores."""
        _, thresholds = self.candidates()
        B = scores.shape[0]
        if self.config.retrieve:  # working shard if over its threshold; a memory that beats the best and its own
            memory = torch.where(scores[:, 0] >= thresholds[0], 0, MAIN)
            best = scores[:, 0].clone()
            for i in range(1, scores.shape[1]):
                take = (scores[:, i] > best) & (scores[:, i] > thresholds[i])
                memory = torch.where(take, i, memory)
                best = torch.where(take, scores[:, i], best)
        else:  # merged (0) or working (1): the higher, unless both are under the threshold
            under = (scores[:, 0] < thresholds[0]) & (scores[:, 1] < thresholds[0])
            memory = torch.where(under, MAIN, torch.where(scores[:, 0] > scores[:, 1], 0, 1))
        memory = memory.to(device=scores.device, dtype=torch.long).view(B)
        return MemoryRoute(memory, memory != MAIN)

    def _current(self) -> MemoryRoute | None:
        derived = self.query.derived
        return derived if isinstance(derived, MemoryRoute) else None

    def _apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output: the working side memory for every row while an edit trains (the authors'
        ``editing`` branch); else each routed row's memory, and the main memory's own output elsewhere."""
        if self._train is not None:
            side = self._side(x, self.working)
            with torch.no_grad():
                main_act = self._act(y.float())
            self._train["dist"] = (self._act(side) - main_act).norm(dim=-1)
            return side.to(y.dtype)
        route = self._current()
        if route is None or not bool(route.active.any()):
            return y
        active, memory = route.active.to(y.device), route.memory.to(y.device)
        weights = self.candidates()[0]
        out = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        for m in memory[active].unique().tolist():
            rows = active & (memory == m)
            out[rows] = self._side(x[rows], weights[m])
        return torch.where(active[:, None, None], out.to(y.dtype), y)

    def query_site(self) -> str | None:
        return None  # the scores depend on the side memories, which every edit changes

    # --- editing -------------------------------------------------------------------------------
    def context_prefixes(self) -> list[str]:
        """"" and the context prefixes (the authors' get_context_templates: each seed word continued greedily by
        the unedited model), generated once at the first edit and kept in the state."""
        if self.prefixes is None:
            texts = seed_word_continuations(self.model, self.tokenizer, [(n, 1) for n in self.config.template_lengths])
            self.prefixes = [""] + [t.strip() for t in texts]
        return self.prefixes

    def _training_batch(self, requests: Sequence[EditRequest]) -> tuple[EncodedBatch, torch.Tensor, int]:
        """Every request under every prefix (its target as labels), then one unrelated text per request (no
        labels). Returns the batch, the (R, T) scored span of each row and the number of prefixes."""
        prefixes = self.context_prefixes()
        prompts = [f"{p} {r.prompt}" if p else r.prompt for r in requests for p in prefixes]
        edits = encode_pairs(self.tokenizer, prompts, [r.target for r in requests for _ in prefixes])
        n = len(self.loc_texts)
        locs = [self.tokenizer(self.loc_texts[(self.requests_done + i) % n]).input_ids for i in range(len(requests))]
        width = max(edits.input_ids.shape[1], *(len(ids) for ids in locs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(t, (0, width - t.shape[1]), value=value)

        loc_ids = torch.full((len(locs), width), pad, dtype=torch.long)
        loc_mask = torch.zeros((len(locs), width), dtype=torch.long)
        for i, ids in enumerate(locs):
            loc_ids[i, :len(ids)], loc_mask[i, :len(ids)] = torch.tensor(ids), 1
        batch = EncodedBatch(
            torch.cat([widen(edits.input_ids, pad), loc_ids]),
            torch.cat([widen(edits.attention_mask, 0), loc_mask]),
            torch.cat([widen(edits.labels, IGNORE), torch.full((len(locs), width), IGNORE, dtype=torch.long)]),
            torch.cat([edits.query_positions, torch.tensor([len(ids) - 1 for ids in locs])]),
        )
        ends = torch.cat([edits.key_positions(self.key_position), batch.query_positions[len(prompts):]])
        span = prompt_span(ends, width, batch.attention_mask)
        device = model_device(self.model)
        return batch.to(device), span.to(device), len(prefixes)

    def _losses(self, batch: EncodedBatch, span: torch.Tensor, n_req: int, n_pre: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(edit loss, margin loss, per-row scores) of one training forward."""
        c = self.config
        assert self._train is not None
        logits = target_logits(self.model, batch)
        ce = F.cross_entropy(logits.logits.float(), logits.targets, reduction="none")
        rows = n_req * n_pre
        sums = torch.zeros(rows, device=ce.device).index_add(0, logits.rows, ce)
        counts = torch.bincount(logits.rows, minlength=rows).clamp(min=1)
        ft = (sums / counts).mean()  # each row's mean target-token loss, averaged over the rows
        scores = self._mean(self._train["dist"], span)  # (R,)
        margin = []
        for i in range(n_req):  # the authors' _cal_activation_loss for each request and its unrelated text
            inside, out = scores[i * n_pre:(i + 1) * n_pre], scores[rows + i:rows + i + 1]
            margin.append(mean_positive(out.view(-1, 1) - inside + c.gamma) + mean_positive(out - c.alpha)
                          + mean_positive(c.beta - inside))
        return ft, torch.stack(margin).mean(), scores.detach()

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        if self.batches_done % c.save_freq == 0:  # a new shard: a new gradient mask
            self.weight_mask = (torch.rand(self.main.shape, generator=self.generator) < c.mask_ratio
                                ).to(self.weight_mask.device)
        batch, span, n_pre = self._training_batch(requests)
        n_req, rows = len(requests), len(requests) * n_pre
        optimizer = torch.optim.SGD([self.working], lr=c.lr, weight_decay=c.weight_decay)
        mask = self.weight_mask.to(self.working.dtype)
        pre, val = 0.0, 1e9  # the authors' EarlyStopMeter
        recorded: torch.Tensor | None = None
        steps, loss_value, ft_value, margin_value = 0, float("nan"), float("nan"), float("nan")
        self.working.requires_grad_(True)
        self._train = {}
        try:
            with replaying(self.prefix):
                for i in range(c.iterations):
                    ft, margin, scores = self._losses(batch, span, n_req, n_pre)
                    loss = ft + margin
                    loss_value, ft_value, margin_value = float(loss.detach()), float(ft.detach()), float(margin.detach())
                    if c.early_stop and abs(val - pre) <= 1e-4 and val <= 0.02:
                        recorded = scores
                        break
                    if i == c.iterations - 1:
                        recorded = scores  # the authors record before the last step
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    assert self.working.grad is not None
                    self.working.grad.mul_(mask)  # knowledge sharding: only this shard's entries learn
                    optimizer.step()
                    steps += 1
                    if c.norm_constraint is not None:
                        with torch.no_grad():
                            self.working.copy_(torch.clamp(self.working, self.main - c.norm_constraint,
                                                           self.main + c.norm_constraint))
                    pre, val = val, loss_value
        finally:
            self._train = None
            self.working.requires_grad_(False)
            self.working.grad = None
        assert recorded is not None
        in_scope = [float(recorded[i * n_pre:(i + 1) * n_pre].mean()) for i in range(n_req)]
        self.min_act = min([self.min_act, *in_scope])  # EditingMeanAct.min_act
        self.batches_done += 1
        self.requests_done += n_req
        if self.batches_done % c.save_freq == 0:
            self._save_shard()
        if self.batches_done % c.merge_freq == 0:
            self._merge_shards()
        self._view = None
        return EditStats(loss=loss_value, iterations=steps, extra={
            "edit_loss": ft_value, "margin_loss": margin_value, "in_scope_score": min(in_scope),
            "loc_score": float(recorded[rows:].max()), "threshold": c.act_ratio * self.min_act,
            "memories": float(len(self.memories)), "merges": float(self.merge_count)})

    def _save_shard(self) -> None:
        """The authors' save_weight: put the working shard away; a new one starts from the main memory."""
        self.memories.append(self.working.detach().clone())
        with torch.no_grad():
            self.working.copy_(self.main)
        if self.config.retrieve:
            self.memory_min_act.append(self.min_act)
            self.min_act = NO_EDIT

    def _merge_shards(self) -> None:
        """The authors' merge_weight: retrieve merges the last merge_freq/save_freq shards into one memory (its
        threshold the lowest of theirs); merge folds every waiting shard into the merged memory."""
        c = self.config
        if c.retrieve:
            n = c.merge_freq // c.save_freq
            merged = gta_merge([c.weights / n] * n, self.main, self.memories[-n:], c.densities, c.merge_alg,
                               self.generator)
            self.memories, low = self.memories[:-n] + [merged], min(self.memory_min_act[-n:])
            self.memory_min_act = self.memory_min_act[:-n] + [low]
        else:
            self.merged = merge_into_side(self.main, self.merged, self.memories, c.weights, c.densities, c.merge_alg,
                                         self.generator)
            self.memories = []
        with torch.no_grad():
            self.working.copy_(self.main)
        self.merge_count += 1

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.iterations,
                         prompt_prefixes=tuple(self.context_prefixes()))

    def trainable_params(self) -> int:
        return self.working.numel()  # the side memory SGD trains

    def stored_params(self) -> int:
        kept = sum(m.numel() for m in self.memories)
        return kept + (self.merged.numel() if self.merged is not None else 0) + self.weight_mask.numel()

    def get_extra_state(self) -> dict[str, Any]:
        return {"memories": [m.clone() for m in self.memories], "memory_min_act": list(self.memory_min_act),
                "merged": None if self.merged is None else self.merged.clone(), "min_act": self.min_act,
                "batches_done": self.batches_done, "requests_done": self.requests_done,
                "merge_count": self.merge_count, "prefixes": None if self.prefixes is None else list(self.prefixes),
                "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.main.device
        self.memories = [m.to(device).clone() for m in state["memories"]]
        self.memory_min_act = list(state["memory_min_act"])
        self.merged = None if state["merged"] is None else state["merged"].to(device).clone()
        self.min_act = float(state["min_act"])
        self.batches_done, self.requests_done = int(state["batches_done"]), int(state["requests_done"])
        self.merge_count = int(state["merge_count"])
        self.prefixes = None if state["prefixes"] is None else list(state["prefixes"])
        self.generator.set_state(state["generator"])
        self._view = None
