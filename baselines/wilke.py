"""WilKE (Hu, Cao, Chen, Liu, Zhao 2024, "WilKE: Wise-Layer Knowledge Editor for Lifelong Knowledge
Editing", Findings of ACL; arXiv 2402.10987; the authors' code: github.com/ChenhuiHu/WilKE, wilke/).

ROME with the edited layer chosen per edit (the "wise layer"). For each edit and every candidate layer l
(``layers``):
1. ROME's rank-one update of layer l's FFN output matrix is computed on the current weights, without
   applying it (``baselines.rome.editor.rank_one_update``: key at the subject's last token, value
   optimisation, closed form ``W_l <- W_l + (v* - W_l k) u^T / (u . k)``);
2. its pattern-matching score is the size of that update relative to the matrix (the authors'
   ``wilke_main.py``, where it is called LA): ``score_l = ||dW_l||_F / ||W_l||_F`` (``selection: relative``;
   ``absolute``: ``||dW_l||_F``). A layer whose pattern already matches the edited knowledge needs the
   smallest change;
3. the update of the layer with the lowest score is applied (on a tie, the lowest such layer, as the
   authors' ``list.index(min(...))``); the other layers are left as they are.

From the authors' code (hparams/WilKE/gpt2-xl.json, EleutherAI_gpt-j-6B.json; wilke/*.py):
- candidates are layers 0 .. scanning_ceiling-1: 0..23 on GPT2-XL (the first half of 48), 0..6 on GPT-J
  (7 of 28). conf/editor/wilke.yaml takes GPT2-XL's rule (the first half) on every model;
- the update at a layer is ROME's, with ROME's GPT2-XL value settings (20 steps, lr 0.5, weight decay 0.5,
  clamp 4, KL 0.0625, the loss on the last layer) and the covariance adjustment on (Wikipedia statistics of
  every candidate layer): on for GPT2-XL here (conf/editor_model/wilke_gpt2xl.yaml), from ``editor.mom2_corpus``
  (by default texts the model writes itself; covariance.py); off on the LLaMA-architecture models, as ROME's
  LLaMA file;
- the authors apply each candidate's update, measure it, restore the weights, then recompute the chosen
  layer's update and apply it. Here the scan's update is kept and applied: the same computation on the
  same weights.

The random prefixes are ROME's (generated once, seeded, saved in the state). The second-moment statistics
of every candidate layer are loaded or computed when the editor is built, on the unedited model: an edit
at layer l changes the inputs of the layers above it (the authors compute them at the first edit, before
any change; a resumed run builds its editor on the unedited model too, so it reads the same cache files).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from baselines.rome.compute_key import key_reprs_at
from baselines.rome.covariance import inverse
from baselines.rome.editor import (
    LocateEditor,
    RankOneConfig,
    apply_rank_one,
    check_rank_one,
    checked_layers,
    load_second_moments,
    rank_one_update,
    value_batch,
)
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import resolve_rewrite_module
from evaluation.editing.editor import EditStats, FloorSpec
from evaluation.editing.models import LoadedModel
from evaluation.editing.prefix_cache import frozen_prefix

log = logging.getLogger(__name__)

SELECTIONS = ("relative", "absolute")


@dataclass
class WilKEConfig(RankOneConfig):
    """WilKE's hyper-parameters: the rank-one update's (ROME's; the authors' hparams/WilKE/gpt2-xl.json holds the
    same values), and the candidate layers and the score that picks one."""

    # the candidate layers scanned per edit (conf/editor/wilke.yaml places them; the authors: layers
    # 0..scanning_ceiling-1, GPT2-XL 0..23, GPT-J 0..6)
    layers: List[int] = MISSING
    # the score minimised over the candidates: relative = ||dW_l||_F / ||W_l||_F (the authors' code, "LA");
    # absolute = ||dW_l||_F. The paper describes it as the pattern matching degree; the code is followed.
    selection: str = "relative"


class WilKEEditor(LocateEditor):
    """ROME at the candidate layer whose update is smallest, chosen per edit, one request at a time.

    Its state (all extra state): every applied update as its rank-one factors (candidate index, u, right), in
    order, and the modules' names, the prefixes, the layer chosen and the candidates' scores at every edit,
    and the subject fallbacks. The factors, not the rewritten matrices: 2 vectors per edit instead of every
    candidate matrix (100 edits of smollm2: under 1 MB instead of 53 MB), small enough to carry a stopped
    stream to another machine. Loading resets the candidates to their unedited values and replays the
    factors; the same float operations on the same values, so the matrices are equal bit for bit."""

    Config = WilKEConfig

    def __init__(self, model: LoadedModel, config: WilKEConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        check_rank_one(c)
        if c.selection not in SELECTIONS:
            raise ConfigError(f"editor.selection must be one of {SELECTIONS}, got {c.selection!r}")
        self.layers = checked_layers(model, c.layers)  # scanned in this order: a tie goes to the lowest layer
        resolved = [resolve_rewrite_module(model, layer, c.module_template) for layer in self.layers]
        self.module_names = [name for name, _ in resolved]
        self._held = [module for _, module in resolved]  # the model's own modules: held, not registered
        # GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in)
        self.transposed = [not isinstance(module, nn.Linear) for module in self._held]
        # the model's parameters themselves (each edit writes a rank-one update into one of them), held, not
        # registered: the state is the updates' factors; the unedited values (on the CPU: 53 MB on smollm2, about
        # 1 GB for GPT2-XL's 24 candidates, 1.4 GB for LLaMA2-7B's 16 in fp16) let a load replay them exactly
        self.weights: list[nn.Parameter] = [module.weight for module in self._held]
        self._unedited = [w.detach().to("cpu", copy=True) for w in self.weights]
        self.updates: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (candidate index, u, right) per edit
        self.prefixes: list[str] | None = None
        self.chosen: list[int] = []  # the layer edited at each edit of the stream
        self.scores: list[list[float]] = []  # each edit's score of every candidate (order of ``layers``)
        self.subject_fallbacks = 0  # edits whose subject was not found in the prompt
        # C_l^-1 of every candidate, on the unedited model (see the module docstring)
        self.inv_mom2: list[torch.Tensor | None] = [None] * len(self.layers)
        self.mom2_paths: list[str] | None = None
        if c.mom2_adjustment:
            stats = load_second_moments(model, self._held, self.module_names, c)
            self.inv_mom2 = [inverse(s).to(m.weight.device) for s, m in zip(stats, self._held)]
            self.mom2_paths = [str(s.path) for s in stats]
        # the blocks below the highest candidate are wrapped once; each candidate replays those below it
        prefix = frozen_prefix(model, c.prefix_cache, max(self.layers))
        self.replays = [prefix.below(layer) if prefix is not None and layer > 0 else None for layer in self.layers]

    @property
    def candidate_modules(self) -> list[nn.Module]:
        """The rewritten module of every candidate layer (order of ``layers``)."""
        return list(self._held)

    def value_sites(self) -> list[tuple[nn.Module, Any, int | None]]:
        return [(module, replay, None) for module, replay in zip(self._held, self.replays)]

    @property
    def num_edits(self) -> int:
        return len(self.chosen)

    @property
    def last_update(self) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """(layer, u, right) of the last edit."""
        if not self.updates:
            return None
        i, u, right = self.updates[-1]
        return self.layers[i], u, right

    def trainable_params(self) -> int:
        return sum(w.numel() for w in self.weights)  # every candidate matrix may be rewritten

    def layer_counts(self) -> dict[int, int]:
        """How many edits of the stream went to each candidate layer."""
        counts = Counter(self.chosen)
        return {layer: counts[layer] for layer in self.layers}

    def score(self, index: int, u: torch.Tensor, right: torch.Tensor) -> float:
        """The selection score of the update outer(right, u) of candidate ``index`` (lower: better match)."""
        change = float(right.float().norm() * u.float().norm())  # ||outer(right, u)||_F
        if self.config.selection == "absolute":
            return change
        return change / float(self.weights[index].detach().float().norm())

    # --- editing ---------------------------------------------------------------------------
    def edit_one(self, request: EditRequest) -> dict[str, float]:
        c = self.config
        prefixes = self.context_prefixes()
        best, best_score, scores, iterations = None, float("inf"), [], 0
        # every candidate is scanned on the same weights: one key pass and one value batch serve them all
        reprs = key_reprs_at(self.model, self.tokenizer, self._held, prefixes, request.prompt, request.subject,
                             c.fact_token)
        batch = value_batch(self.model, self.tokenizer, prefixes, request, c)
        for i, module in enumerate(self._held):
            upd = rank_one_update(self.model, self.tokenizer, module, prefixes, request, c, frozen=self.replays[i],
                                  inv_mom2=self.inv_mom2[i], reprs=reprs[i], batch=batch)
            iterations += upd.iterations
            scores.append(self.score(i, upd.u, upd.right))
            if best is None or scores[-1] < best_score:  # strict: a tie keeps the lower layer
                best, best_score = (i, upd), scores[-1]
        assert best is not None
        i, upd = best
        if not upd.found:
            self.subject_fallbacks += 1
            log.warning("WilKE: subject %r not found in prompt %r; using the last prompt token "
                        "(%d of %d edits so far)", request.subject, request.prompt, self.subject_fallbacks,
                        self.num_edits + 1)
        apply_rank_one(self.weights[i], upd.u, upd.right, self.transposed[i])
        layer = self.layers[i]
        self.chosen.append(layer)
        self.scores.append(scores)
        self.updates.append((i, upd.u.detach().to("cpu", copy=True), upd.right.detach().to("cpu", copy=True)))
        return {"nll": upd.nll, "kl": upd.kl, "iterations": iterations, "delta_norm": upd.delta_norm,
                "layer": float(layer), "score": best_score}

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        results = [self.edit_one(r) for r in requests]
        mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
        # iterations: the value-loop iterations of every candidate (the scan's work); loss: the chosen layer's
        return EditStats(loss=mean("nll"), iterations=int(sum(r["iterations"] for r in results)),
                         extra={"layer": mean("layer"), "score": mean("score"), "kl": mean("kl"),
                                "delta_norm": mean("delta_norm"), "subject_fallbacks": float(self.subject_fallbacks)})

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        # one ROME value optimisation per candidate; counted from the highest candidate up, so a lower bound
        # (the lower candidates' passes run through more blocks)
        return FloorSpec(first_layer=max(self.layers), passes=int(self.config.v_num_grad_steps) * len(self.layers),
                         prompt_prefixes=tuple(self.context_prefixes()))

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "modules": list(self.module_names),
            "prefixes": list(self.prefixes) if self.prefixes is not None else None,
            "chosen": list(self.chosen),
            "scores": [list(s) for s in self.scores],
            "subject_fallbacks": self.subject_fallbacks,
            "updates": list(self.updates),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["modules"]) != self.module_names:
            raise ConfigError(f"saved WilKE state edits {state['modules']} but this editor's candidates are "
                              f"{self.module_names}")
        self.prefixes = list(state["prefixes"]) if state["prefixes"] is not None else None
        self.chosen = [int(layer) for layer in state["chosen"]]
        self.scores = [list(s) for s in state["scores"]]
        self.subject_fallbacks = int(state["subject_fallbacks"])
        self.updates = [(int(i), u.detach().to("cpu", copy=True), right.detach().to("cpu", copy=True))
                        for i, u, right in state["updates"]]
        with torch.no_grad():  # from the unedited matrices, so a load into an edited editor (on_nan=skip) is exact
            for weight, unedited in zip(self.weights, self._unedited):
                weight.copy_(unedited)
            for i, u, right in self.updates:
                device = self.weights[i].device
                apply_rank_one(self.weights[i], u.to(device), right.to(device), self.transposed[i])
