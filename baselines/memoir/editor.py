"""MEMOIR behind the shared Editor interface (the method, its sources and departures: baselines/memoir/__init__.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from baselines.context_templates import SEED_WORDS, seed_word_continuations
from baselines.memoir.memory import (
    MODEL_BACKGROUND,
    MemoirRoute,
    PromptFeatureQuery,
    ResidualMemoryLayer,
    read_background,
)
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_choice, check_layer, check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import (
    LoadedModel,
    get_module,
    layer_dims,
    model_device,
    replace_module,
)
from evaluation.editing.prefix_cache import frozen_prefix, replaying

log = logging.getLogger(__name__)

AGGREGATIONS = ("last", "mean", "mean_decentered")
OVERLAPS = ("ratio", "jaccard")
ROW_LOSSES = ("authors", "mean", "token")
#: WISE's get_context_templates starts the model's texts from these (easyeditor/models/wise/utils.py)


@dataclass
class MEMOIRConfig:
    """MEMOIR's hyper-parameters. Source: qym7/MEMOIR hparams/MEMOIR/llama3-8b.yaml and memoir_main.py."""

    layer: int  # the FFN whose output projection gets the memory (conf/editor/memoir.yaml: 27 of 32, authors)
    # the output projection ({i}: the layer); null: the model's ffn_template (LLaMA's down_proj). The YAML
    # passes the model's ffn_out_template (GPT-2: c_proj)
    module_template: Optional[str] = None
    top_k: Optional[int] = None  # active input dims per mask (authors: 4096 on LLaMA-3-8B); null: top_k_fraction
    top_k_fraction: float = 4096 / 14336  # of the projection's input width, where top_k is null (4096/14336)
    threshold: float = 0.4  # irr_threshold: the memory is on when the best overlap reaches it (authors: 0.4 ZsRE)
    overlap: str = "ratio"  # ratio: |m_q & m_e| / k (authors) | jaccard: |m_q & m_e| / |m_q | m_e|
    # mean_decentered (authors' default): prompt-token mean minus the background mean | mean | last (prompt token)
    prompt_feature_agg: str = "mean_decentered"
    # texts whose mean feature is the background: "model" (texts the unedited model samples itself, seeded) or a
    # text file (data.text_corpus.read_texts: .txt, one text per line, or .jsonl) (authors: 100 ZsRE locality
    # prompts saved by an earlier run)
    background: str = MODEL_BACKGROUND
    background_samples: int = 100  # texts averaged (authors: the first 100 saved)
    background_length: int = 24  # tokens per sampled text (background=model; open)
    lr: float = 1.0  # edit_lr, SGD (authors)
    weight_decay: float = 1e-5  # SGD's, over the whole memory (authors)
    max_grad_norm: float = 1.0  # gradient clipping of the memory (authors)
    iterations: int = 30  # n_iter: the most steps per edit (authors)
    # WISE's EarlyStopMeter: stop before a step once the last two losses differ by <= stop_delta and the last
    # is <= stop_loss (authors). stop_loss null: always `iterations` steps
    stop_loss: Optional[float] = 0.02
    stop_delta: float = 1e-4
    row_loss: str = "authors"  # authors: per row sum / (targets + 1), mean over rows | mean | token
    # [new tokens, how many] groups of the model's own prefixes (WISE: [[5,5],[10,5]]; "how many" split over
    # its five seed words); every edit trains on the bare prompt and on each prefixed copy
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[5, 5], [10, 5]])
    batch_size: int = 1  # edits per call of edit (authors: 1)
    prefix_cache: bool = True  # replay the frozen blocks below the layer during an edit (exact, faster)
    seed: int = 0  # the permutation and the background texts


class MEMOIREditor(Editor):
    """MEMOIR behind the shared Editor interface. State: the memory, the permutation (registered), the stored
    masks, the background mean, the context templates and the edit count (extra state)."""

    Config = MEMOIRConfig
    inference_settings = ("threshold", "overlap")  # read only when an input is routed

    def __init__(self, model: LoadedModel, config: MEMOIRConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        self.module_name, base = self._module(model)
        d_in, d_out = layer_dims(base)
        self.top_k = self._check(d_in)
        device = model_device(model.model)
        self.memory = nn.Parameter(torch.zeros(d_out, d_in, device=device), requires_grad=False)  # (out, in)
        generator = torch.Generator().manual_seed(c.seed)
        self.register_buffer("permutation", torch.randperm(d_in, generator=generator).to(device))
        adapter = ResidualMemoryLayer(base, lambda: self.memory, self._current)
        replace_module(model.model, self.module_name, adapter)
        self.adapters = [adapter]  # in the model, not registered here: it holds the base layer
        self.query = PromptFeatureQuery(model.model.base_model, adapter, c.prompt_feature_agg, self._route)
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)
        self.masks = torch.zeros(0, d_in, dtype=torch.bool, device=device)  # (M, D) the edits' stored masks
        self.background_mean: torch.Tensor | None = None  # (D,) made at the first edit (mean_decentered)
        self.prefixes: list[str] | None = None  # "" and the model's own texts + " ", made at the first edit
        self.num_edits = 0
        self._train_masks: torch.Tensor | None = None  # (R, D) the masks of the requests being edited
        self._train_rows: torch.Tensor | None = None  # (B,) which request each training row belongs to
        self._bare_rows: torch.Tensor | None = None  # (R,) the row of each request's bare prompt

    def _module(self, model: LoadedModel) -> tuple[str, nn.Module]:
        c = self.config
        check_layer(model, "layer", c.layer)
        template = c.module_template if c.module_template is not None else model.ffn_template
        if "{i}" not in template:
            raise ConfigError(f"editor.module_template must contain '{{i}}' for the layer, got {template!r}")
        name = template.format(i=c.layer)
        module = get_module(model.model, name, model.num_layers)
        try:
            layer_dims(module)
        except TypeError as err:
            raise ConfigError(f"editor.module_template={template!r}: {err}") from None
        return name, module

    def _check(self, d_in: int) -> int:
        """Every setting checked (one ConfigError line each); returns k."""
        c = self.config
        check_choice("prompt_feature_agg", c.prompt_feature_agg, AGGREGATIONS)
        check_choice("overlap", c.overlap, OVERLAPS)
        check_choice("row_loss", c.row_loss, ROW_LOSSES)
        for key in ("lr", "iterations", "max_grad_norm", "batch_size", "background_samples", "background_length"):
            check_positive(key, getattr(c, key))
        if not 0 < c.threshold <= 1:
            raise ConfigError(f"editor.threshold must be in (0, 1] (an overlap score), got {c.threshold}")
        if c.weight_decay < 0 or c.stop_delta < 0:
            raise ConfigError(f"editor.weight_decay and editor.stop_delta must be >= 0, got {c.weight_decay} "
                              f"and {c.stop_delta}")
        if c.stop_loss is not None:
            check_positive("stop_loss", c.stop_loss)
        lengths = [list(p) for p in c.context_template_length_params]
        if any(len(p) != 2 or min(p) < 1 for p in lengths):
            raise ConfigError(f"editor.context_template_length_params must be [new tokens, how many] pairs of "
                              f"positive numbers, got {lengths}")
        if c.prompt_feature_agg == "mean_decentered" and c.background != MODEL_BACKGROUND:
            read_background(c.background, 1)
        if c.top_k is not None:
            if not 1 <= c.top_k <= d_in:
                raise ConfigError(f"editor.top_k={c.top_k} must be between 1 and the memory's input width {d_in}")
            return int(c.top_k)
        if not 0 < c.top_k_fraction <= 1:
            raise ConfigError(f"editor.top_k_fraction must be in (0, 1], got {c.top_k_fraction}")
        return max(1, round(c.top_k_fraction * d_in))

    @property
    def adapter(self) -> ResidualMemoryLayer:
        return self.adapters[0]

    # --- TopHash and routing -------------------------------------------------------------------
    def hash_masks(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) bool: TopHash of (B, D) raw features: the permuted top-k of |feature - background|."""
        f = features.float().to(self.memory.device)
        if self.config.prompt_feature_agg == "mean_decentered":
            assert self.background_mean is not None, "the background is made at the first edit"
            f = f - self.background_mean
        top = f.abs().topk(self.top_k, dim=-1).indices  # (B, k)
        masks = torch.zeros(f.shape, dtype=torch.bool, device=f.device)
        return masks.scatter_(1, self.permutation[top], True)

    def overlaps(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, M) the overlap score of each mask with each stored mask."""
        shared = masks.float() @ self.masks.float().T
        if self.config.overlap == "ratio":
            return shared / self.top_k
        return shared / (masks.sum(-1, keepdim=True).float() + self.masks.sum(-1).float()[None] - shared)

    def _current(self) -> MemoirRoute | None:
        derived = self.query.derived
        return derived if isinstance(derived, MemoirRoute) else None

    def _route(self, q: torch.Tensor) -> MemoirRoute | None:  # q: (B, D) raw prompt features
        if self._train_rows is not None:  # training: every row under its own request's mask
            assert self._bare_rows is not None
            self._train_masks = self.hash_masks(q[self._bare_rows])
            B = q.shape[0]
            return MemoirRoute(torch.ones(B, dtype=torch.bool, device=q.device),
                               self._train_masks[self._train_rows], torch.full((B,), -1, device=q.device),
                               torch.ones(B, device=q.device))
        if len(self.masks) == 0:
            return None
        score = self.overlaps(self.hash_masks(q))  # (B, M)
        best, match = score.max(-1)  # the first maximum: ties go to the oldest mask
        return MemoirRoute(best >= self.config.threshold, self.masks[match], match, best)

    def query_site(self) -> str | None:
        # the memory's own input: nothing this editor changes runs before it
        agg = self.config.prompt_feature_agg
        return f"{self.module_name}:input" + ("" if agg == "last" else ":prompt_mean")

    # --- what the first edit makes ---------------------------------------------------------------
    def context_prefixes(self) -> list[str]:
        """"" and the model's own greedy texts from WISE's seed words, each followed by " " (WISE's templates)."""
        if self.prefixes is None:
            # WISE: n_gen // 5 beams and returns per seed word
            specs = [(n, int(count) // len(SEED_WORDS)) for n, count in self.config.context_template_length_params]
            texts = seed_word_continuations(self.model, self.tokenizer, [s for s in specs if s[1] >= 1])
            self.prefixes = [""] + [t + " " for t in texts]
        return self.prefixes

    @torch.no_grad()
    def _make_background(self) -> None:
        c = self.config
        if c.prompt_feature_agg != "mean_decentered" or self.background_mean is not None:
            return
        if c.background == MODEL_BACKGROUND:
            from baselines.rome.covariance import MODEL_CORPUS, Corpus, sample_texts

            corpus = Corpus(MODEL_CORPUS, generated_texts=c.background_samples, generated_length=c.background_length,
                            seed=c.seed)
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True)
                     for ids in sample_texts(self.model, self.tokenizer, corpus)]
            texts = [t for t in texts if t.strip()] or ["."]
        else:
            texts = read_background(c.background, c.background_samples)
        # the memory is still zero and no mask is stored: these are the unedited model's features
        self.background_mean = self.query_vectors(texts).to(self.memory.device).mean(0)

    # --- editing -------------------------------------------------------------------------------
    def _loss(self, batch: Any) -> torch.Tensor:
        with self.batch_scope(batch):
            out = target_logits(self.model, batch)
        if self.config.row_loss == "token":
            return out.loss()
        nll = F.cross_entropy(out.logits.float(), out.targets, reduction="none")
        B = batch.input_ids.shape[0]
        sums = nll.new_zeros(B).index_add(0, out.rows, nll)
        counts = nll.new_zeros(B).index_add(0, out.rows, torch.ones_like(nll))
        extra = 1.0 if self.config.row_loss == "authors" else 0.0
        return (sums / (counts + extra).clamp(min=1))[counts > 0].mean()

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        device = model_device(self.model)
        self._make_background()
        prefixes = self.context_prefixes()
        R, P = len(requests), len(prefixes)
        # rows: request-major, its bare prompt first, then each prefixed copy (WISE's template order)
        prompts = [p + r.prompt for r in requests for p in prefixes]
        targets = [r.target for r in requests for _ in prefixes]
        batch = encode_pairs(self.tokenizer, prompts, targets).to(device)
        self._train_rows = torch.arange(R, device=device).repeat_interleave(P)
        self._bare_rows = torch.arange(R, device=device) * P
        self.memory.requires_grad_(True)
        optimizer = torch.optim.SGD([self.memory], lr=c.lr, weight_decay=c.weight_decay)
        losses: list[float] = []  # the loss of every step taken
        final = float("nan")  # the last loss computed (after the last step, where the early stop ended it)
        pre, val = 0.0, 1e9  # WISE's EarlyStopMeter
        try:
            with replaying(self.prefix):
                for _ in range(c.iterations):
                    loss = self._loss(batch)
                    final = float(loss.detach())
                    if c.stop_loss is not None and abs(val - pre) <= c.stop_delta and val <= c.stop_loss:
                        break
                    losses.append(float(loss.detach()))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([self.memory], max_norm=c.max_grad_norm)
                    optimizer.step()
                    pre, val = val, losses[-1]
            train_masks = self._train_masks
            if train_masks is None:  # no step ran (iterations >= 1 is checked): cannot happen, but be plain
                raise RuntimeError("MEMOIR's training forward derived no masks")
        finally:
            self.memory.requires_grad_(False)
            self.memory.grad = None
            self._train_rows = self._bare_rows = self._train_masks = None
        nearest = float(self.overlaps(train_masks).max()) if len(self.masks) else 0.0
        for m in train_masks:  # each new mask once (the authors skip one equal to a stored mask)
            if not (self.masks == m).all(-1).any():
                self.masks = torch.cat([self.masks, m[None]])
        self.num_edits += R
        return EditStats(loss=final, iterations=len(losses),
                         extra={"stored_masks": float(len(self.masks)), "first_loss": losses[0] if losses else 0.0,
                                "nearest_stored_overlap": nearest})

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.iterations,
                         prompt_prefixes=tuple(self.context_prefixes()))

    def trainable_params(self) -> int:
        return self.memory.numel()  # the residual memory (each edit writes k of its columns)

    def stored_params(self) -> int:
        background = self.background_mean.numel() if self.background_mean is not None else 0
        return self.masks.numel() + background

    def get_extra_state(self) -> dict[str, Any]:
        return {"masks": self.masks.clone(), "num_edits": self.num_edits,
                "background_mean": None if self.background_mean is None else self.background_mean.clone(),
                "prefixes": None if self.prefixes is None else list(self.prefixes)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.memory.device
        self.masks = state["masks"].to(device).clone()
        self.num_edits = int(state["num_edits"])
        bg = state["background_mean"]
        self.background_mean = None if bg is None else bg.to(device).clone()
        self.prefixes = None if state["prefixes"] is None else list(state["prefixes"])
