"""ROME (Meng et al. 2022): a rank-one closed-form update of one MLP output matrix per edit.

For an edit (subject s, prompt p, target o):
1. key k* = mean input of the matrix at s's last token over p and p behind random prefixes
   (compute_key); the direction u = C^-1 k* / ||C^-1 k*|| with C the inputs' second moment
   (``mom2_adjustment``; covariance.py), else u = k* / ||k*||;
2. value v* = v_0 + delta optimised so that the model says o (compute_value);
3. W <- W + (v* - W k) u^T / (u . k), with k and W k the matrix's input and output at s in the bare
   prompt, so that the edited matrix maps k exactly to v*. The update has rank one.
Edits are sequential (each on the weights the earlier ones left), as in EasyEdit's sequential mode.

The prefixes are generated once, by the model itself with a fixed seed, at the first edit (ROME and
EasyEdit also generate them once, on the unedited model, and cache them), and are saved in the state.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from baselines.ft_l import resolve_rewrite_module
from baselines.rome.compute_key import SEED_WORDS, generate_prefixes, key_reprs
from baselines.rome.compute_value import compute_value
from baselines.rome.covariance import inverse, second_moment
from data.requests import EditRequest
from evaluation.editor import EditStats, Editor, FloorSpec
from evaluation.errors import ConfigError
from evaluation.models import LoadedModel
from evaluation.prefix_cache import frozen_prefix

log = logging.getLogger(__name__)

FACT_TOKENS = ("subject_last", "last")


@dataclass
class ROMEConf:
    """Hydra schema of :class:`ROMEEditor` (conf/editor/rome.yaml; layer choices in editor_model/)."""

    _target_: str = "baselines.rome.ROMEEditor"
    layer: int = MISSING
    module_template: str = MISSING
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_template_top_k: int = 5
    mom2_adjustment: bool = False
    mom2_corpus: Optional[str] = None
    mom2_text_field: str = "text"
    mom2_n_samples: int = 100000
    mom2_max_length: Optional[int] = None
    mom2_dtype: str = "float32"
    mom2_batch_size: int = 16
    cache_dir: str = "${paths.cache_dir}/rome_stats"
    batch_size: int = 1
    prefix_cache: bool = True
    seed: int = "${seed}"  # type: ignore[assignment]


class ROMEEditor(Editor):
    """Rank-one model editing of ``module_template.format(i=layer)``, one request at a time."""

    def __init__(
        self,
        model: LoadedModel,
        layer: int,
        module_template: str,
        fact_token: str = "subject_last",
        v_num_grad_steps: int = 20,
        v_lr: float = 0.5,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 4.0,
        kl_factor: float = 0.0625,
        early_stop_loss: float = 5e-2,
        context_template_length_params: Sequence[Sequence[int]] = ((5, 10), (10, 10)),
        context_template_top_k: int = 5,
        mom2_adjustment: bool = False,
        mom2_corpus: Optional[str] = None,
        mom2_text_field: str = "text",
        mom2_n_samples: int = 100000,
        mom2_max_length: Optional[int] = None,
        mom2_dtype: str = "float32",
        mom2_batch_size: int = 16,
        cache_dir: Optional[str] = None,
        batch_size: int = 1,
        prefix_cache: bool = True,
        seed: int = 0,
    ) -> None:
        if fact_token not in FACT_TOKENS:
            raise ConfigError(f"editor.fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
        if v_num_grad_steps < 1:
            raise ConfigError(f"editor.v_num_grad_steps must be at least 1, got {v_num_grad_steps}")
        if batch_size < 1:
            raise ConfigError(f"editor.batch_size must be at least 1, got {batch_size}")
        lengths = [list(p) for p in context_template_length_params]
        if any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in lengths):
            raise ConfigError(f"editor.context_template_length_params must be [tokens, count] pairs, got {lengths}")
        if mom2_adjustment and (not mom2_corpus or not cache_dir):
            raise ConfigError("editor.mom2_adjustment=true needs editor.mom2_corpus (a local .txt/.jsonl file) "
                             "and editor.cache_dir")
        self.loaded, self.model, self.tokenizer = model, model.model, model.tokenizer
        self.layer = layer
        self.module_name, self.module = resolve_rewrite_module(model, layer, module_template)
        # GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in)
        # (resolve_rewrite_module admits only these two kinds)
        self.transposed = not isinstance(self.module, nn.Linear)
        self.fact_token = fact_token
        self.value_args = dict(fact_token=fact_token, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr,
                               v_weight_decay=v_weight_decay, clamp_norm_factor=clamp_norm_factor,
                               kl_factor=kl_factor, early_stop_loss=early_stop_loss)
        self.length_params, self.top_k, self.seed = lengths, context_template_top_k, seed
        self.mom2_adjustment = mom2_adjustment
        self.mom2_args = dict(corpus=mom2_corpus, n_samples=mom2_n_samples, dtype=mom2_dtype,
                              text_field=mom2_text_field, batch_size=mom2_batch_size, cache_dir=cache_dir,
                              max_length=mom2_max_length)
        self.batch_size = batch_size
        self.prefixes: list[str] | None = None
        self.inv_mom2: torch.Tensor | None = None  # C^-1, on this instance only
        self.mom2_path: str | None = None
        self.num_edits = 0
        self.subject_fallbacks = 0  # edits whose subject was not found in the prompt
        self.last_update: tuple[torch.Tensor, torch.Tensor] | None = None  # (u, right vector) of the last edit
        # the value loop's rows are the same at every step below the edited layer: run those blocks once
        self.prefix = frozen_prefix(model, prefix_cache, layer)

    # --- pieces ------------------------------------------------------------------------------
    def context_prefixes(self) -> list[str]:
        if self.prefixes is None:
            self.prefixes = generate_prefixes(self.model, self.tokenizer, self.length_params, self.top_k, self.seed,
                                              SEED_WORDS)
        return self.prefixes

    def inverse_second_moment(self) -> torch.Tensor:
        if self.inv_mom2 is None:
            args = dict(self.mom2_args)
            if args["max_length"] is None:
                cfg = self.model.config
                args["max_length"] = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
            stats = second_moment(self.model, self.tokenizer, self.module, model_name=self.loaded.name,
                                  module_name=self.module_name, **args)
            self.mom2_path = str(stats.path)
            self.inv_mom2 = inverse(stats).to(self.module.weight.device)
        return self.inv_mom2

    def _apply(self, u: torch.Tensor, right: torch.Tensor) -> None:
        w = self.module.weight
        update = torch.outer(u, right) if self.transposed else torch.outer(right, u)  # (in, out) or (out, in)
        with torch.no_grad():
            w.add_(update.to(w.dtype))

    # --- editing ---------------------------------------------------------------------------
    def edit_one(self, request: EditRequest) -> dict[str, float]:
        prefixes = self.context_prefixes()
        reprs = key_reprs(self.model, self.tokenizer, self.module, prefixes, request.prompt, request.subject,
                          self.fact_token)
        if not reprs.found:
            self.subject_fallbacks += 1
            log.warning("ROME: subject %r not found in prompt %r; using the last prompt token "
                        "(%d of %d edits so far)", request.subject, request.prompt, self.subject_fallbacks,
                        self.num_edits + 1)
        u = reprs.key
        if self.mom2_adjustment:
            u = self.inverse_second_moment() @ u
        u = u / u.norm()
        value = compute_value(self.model, self.tokenizer, self.module, prefixes, request.prompt, request.subject,
                              request.target, frozen=self.prefix,
                              **self.value_args)  # type: ignore[arg-type]
        cur_input, cur_output = reprs.inputs[0], reprs.outputs[0]  # the bare prompt (prefix "")
        right = (value.target - cur_output) / torch.dot(cur_input, u)
        self._apply(u, right)
        self.last_update = (u.detach().cpu(), right.detach().cpu())
        self.num_edits += 1
        return {"nll": value.nll, "kl": value.kl, "iterations": value.iterations,
                "delta_norm": float((value.target - value.init).norm())}

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        results = [self.edit_one(r) for r in requests]
        mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
        return EditStats(loss=mean("nll"), iterations=int(sum(r["iterations"] for r in results)),
                         extra={"kl": mean("kl"), "delta_norm": mean("delta_norm"),
                                "subject_fallbacks": float(self.subject_fallbacks)})

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        # value optimisation: v_num_grad_steps passes from the edited layer up over the bare and the
        # prefixed prompts (keys are forward-only; the short KL row is left out, so this is a lower bound)
        return FloorSpec(first_layer=self.layer, passes=int(self.value_args["v_num_grad_steps"]),
                         prompt_prefixes=tuple(self.context_prefixes()))

    def trainable_params(self) -> int:
        """The elements of the rewritten matrix: every edit writes a rank-one update into all of it.

        (The numbers optimised per edit are only the d_out entries of delta; the stored factors of one
        edit are d_in + d_out. Counting the matrix matches FT-L, which writes the same kind of matrix.)
        """
        return self.module.weight.numel()

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module_name,
            "weight": self.module.weight.detach().clone(),
            "prefixes": list(self.prefixes) if self.prefixes is not None else None,
            "num_edits": self.num_edits,
            "subject_fallbacks": self.subject_fallbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["module"] != self.module_name:
            raise ConfigError(f"saved ROME state edits {state['module']} but this editor rewrites {self.module_name}")
        with torch.no_grad():
            self.module.weight.copy_(state["weight"])
        self.prefixes = list(state["prefixes"]) if state["prefixes"] is not None else None
        self.num_edits = state["num_edits"]
        self.subject_fallbacks = state["subject_fallbacks"]
