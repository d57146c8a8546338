"""ROME (Meng et al. 2022): a rank-one closed-form update of one MLP output matrix per edit.

For an edit (subject s, prompt p, target o):
1. key k* = mean input of the matrix at s's last token over p and p behind random prefixes
   (compute_key); the direction u = C^-1 k* / ||C^-1 k*|| with C the inputs' second moment
   (``mom2_adjustment``; covariance.py), else u = k* / ||k*||;
2. value v* = v_0 + delta optimised so that the model says o (compute_value);
3. W <- W + (v* - W k) u^T / (u . k), with k and W k the matrix's input and output at s in the bare
   prompt, so that the edited matrix maps k exactly to v*. The update has rank one.
Edits are sequential (each on the weights the earlier ones left), as in EasyEdit's sequential mode.
Steps 1-3 for any matrix are ``rank_one_update`` (applied by ``apply_rank_one``); WilKE reuses them.

The prefixes are generated once, by the model itself with a fixed seed, at the first edit (ROME and
EasyEdit also generate them once, on the unedited model, and cache them), and are saved in the state.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from baselines.rome.compute_key import (
    SEED_WORDS,
    KeyReprs,
    generate_prefixes,
    key_reprs,
)
from baselines.rome.compute_value import (
    StepBatch,
    ValueResult,
    compute_value,
    step_batch,
    value_rows,
)
from baselines.rome.covariance import (
    MODEL_CORPUS,
    Corpus,
    SecondMoment,
    inverse,
    second_moments,
)
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import resolve_rewrite_module
from evaluation.editing.editor import Editor, EditStats, FloorSpec
from evaluation.editing.models import LoadedModel
from evaluation.editing.prefix_cache import frozen_prefix

log = logging.getLogger(__name__)

FACT_TOKENS = ("subject_last", "last")
#: the key the rank-one update is solved at (RankOneConfig.update_key)
UPDATE_KEYS = ("prompt", "average")


@dataclass
class RankOneUpdate:
    """One edit's rank-one update of a matrix, not yet applied: W <- W + outer(right, u) (``apply_rank_one``)."""

    u: torch.Tensor  # (d_in,) the unit direction: C^-1 k* / ||C^-1 k*||, or k* / ||k*||
    right: torch.Tensor  # (d_out,) (v* - W k) / (u . k)
    found: bool  # False: the subject was not in the prompt (the last prompt token was used)
    nll: float
    kl: float
    iterations: int
    delta_norm: float  # ||v* - v_0||


def value_batch(model: nn.Module, tokenizer: Any, prefixes: Sequence[str], request: EditRequest, c: Any) -> StepBatch:
    """The value loop's batch for ``request`` (``c``: fact_token, v_from_subject); it holds for every module
    rewritten on the current weights."""
    rows = value_rows(tokenizer, prefixes, request.prompt, request.subject, request.target, c.fact_token)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return step_batch(model, rows, pad_id, c.v_from_subject)


def optimise_value(model: nn.Module, module: nn.Module, batch: StepBatch, c: Any, frozen: Any = None,
                   width: int | None = None) -> ValueResult:
    """``compute_value`` with the settings of ``c`` (v_num_grad_steps, v_lr, v_weight_decay, clamp_norm_factor,
    kl_factor, early_stop_loss)."""
    return compute_value(model, module, batch, frozen=frozen, width=width, v_num_grad_steps=c.v_num_grad_steps,
                         v_lr=c.v_lr, v_weight_decay=c.v_weight_decay, clamp_norm_factor=c.clamp_norm_factor,
                         kl_factor=c.kl_factor, early_stop_loss=c.early_stop_loss)


def left_vector(key: torch.Tensor, inv_mom2: torch.Tensor | None) -> torch.Tensor:
    """ROME's u: C^-1 k* / ||C^-1 k*|| (``inv_mom2`` None: k* / ||k*||, no covariance adjustment)."""
    u = key if inv_mom2 is None else inv_mom2 @ key
    return u / u.norm()


def solved_key(update_key: str, prompt_key: torch.Tensor, average_key: torch.Tensor) -> torch.Tensor:
    """The key the update writes the whole delta at: the bare prompt's k0 (``prompt``, kmeng01/rome) or the
    prefix-averaged k* (``average``, r-ROME)."""
    return prompt_key if update_key == "prompt" else average_key


def rank_one_update(model: nn.Module, tokenizer: Any, module: nn.Module, prefixes: list[str], request: EditRequest,
                    c: Any, *, frozen: Any = None, inv_mom2: torch.Tensor | None = None,
                    reprs: KeyReprs | None = None, batch: StepBatch | None = None) -> RankOneUpdate:
    """ROME's steps 1-3 for ``module`` on the current weights: key, value, and the closed-form update.

    ``c``: a config with ROME's key and value fields (``RankOneConfig``). ``inv_mom2``: C^-1 (None: no covariance
    adjustment). ``frozen``: the prefix replay for the value loop. ``reprs`` and ``batch``: the key
    representations and the value batch, when the caller has them already (WilKE shares them across layers)."""
    if reprs is None:
        reprs = key_reprs(model, tokenizer, module, prefixes, request.prompt, request.subject, c.fact_token)
    u = left_vector(reprs.key, inv_mom2)
    value = optimise_value(model, module, batch or value_batch(model, tokenizer, prefixes, request, c), c, frozen)
    cur_input, cur_output = reprs.inputs[0], reprs.outputs[0]  # the bare prompt (prefix "")
    right = (value.target - cur_output) / torch.dot(solved_key(c.update_key, cur_input, reprs.key), u)
    return RankOneUpdate(u, right, reprs.found, value.nll, value.kl, value.iterations,
                         float((value.target - value.init).norm()))


def apply_rank_one(weight: torch.Tensor, u: torch.Tensor, right: torch.Tensor, transposed: bool) -> None:
    """W += outer(right, u) in place; ``transposed``: GPT-2's Conv1D stores W as (in, out)."""
    update = torch.outer(u, right) if transposed else torch.outer(right, u)
    with torch.no_grad():
        weight.add_(update.to(weight.dtype))


def corpus_of(c: LocateConfig) -> Corpus:
    """The statistics' corpus named by ``c``'s mom2_* fields."""
    return Corpus(c.mom2_corpus, n_samples=c.mom2_n_samples, text_field=c.mom2_text_field,
                  generated_texts=c.mom2_generated_texts, generated_length=c.mom2_generated_length, seed=c.seed)


def load_second_moments(loaded: LoadedModel, modules: Sequence[nn.Module], module_names: Sequence[str],
                        c: LocateConfig) -> list[SecondMoment]:
    """The input statistics of each of ``modules`` (covariance.py; from ``c.cache_dir`` or computed)."""
    if not c.cache_dir:
        raise ConfigError("editor.cache_dir must be set: the second-moment statistics are kept there")
    max_length = c.mom2_max_length
    if max_length is None:
        cfg = loaded.model.config
        max_length = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
    return second_moments(loaded.model, loaded.tokenizer, modules, model_name=loaded.name, module_names=module_names,
                          corpus=corpus_of(c), max_length=max_length, dtype=c.mom2_dtype, batch_size=c.mom2_batch_size,
                          cache_dir=c.cache_dir)


def load_inverse_second_moment(loaded: LoadedModel, module: nn.Module, module_name: str,
                               c: LocateConfig) -> tuple[torch.Tensor, str]:
    """C^-1 of ``module``'s input, and its cache file."""
    stats = load_second_moments(loaded, [module], [module_name], c)[0]
    return inverse(stats).to(module.weight.device), str(stats.path)


@dataclass
class LocateConfig:
    """The key, value and statistics settings shared by the locate-then-edit editors (ROME, WilKE, MEMIT,
    AlphaEdit). Defaults: ROME's (EasyEdit hparams/ROME/gpt2-xl.json and kmeng01/rome hparams/ROME/gpt2-xl.json,
    identical; the WilKE authors' hparams use the same values); each editor's own YAML and
    conf/editor_model/<editor>_<model>.yaml set its authors' values."""

    module_template: str = MISSING  # the rewritten module's name, {i} for the layer (e.g. transformer.h.{i}.mlp.c_proj)
    fact_token: str = "subject_last"  # key/value at the subject's last token (last: the last prompt token)
    v_num_grad_steps: int = 20  # steps of the value optimisation (compute_v)
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2  # compute_v stops when the value loss drops below 5e-2
    # [tokens, how many] random prefixes (EasyEdit)
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_template_top_k: int = 5  # ROME's generate_fast samples prefixes with top-k 5
    # The second-moment statistics' corpus (covariance.py): "model" = texts the unedited model writes itself
    # (no download; mom2_generated_texts x mom2_generated_length tokens), or a local .txt (one text per line) /
    # .jsonl (field mom2_text_field) file, of which the first mom2_n_samples texts are used. The authors use
    # 100,000 Wikipedia texts, which are not here.
    mom2_corpus: str = MODEL_CORPUS
    mom2_text_field: str = "text"
    mom2_n_samples: int = 100000
    mom2_generated_texts: int = 1000
    mom2_generated_length: int = 128
    mom2_max_length: Optional[int] = None  # tokens per text; None = the model's context length (as ROME)
    mom2_dtype: str = "float32"
    mom2_batch_size: int = 16
    # where the statistics (and the model's sampled texts) are cached (the editor YAML: under paths.cache_dir)
    cache_dir: Optional[str] = None
    batch_size: int = 1
    # replay the frozen blocks below the edited layer in the value loop (bit-identical, faster)
    prefix_cache: bool = True
    # the value loop runs the tokens before each row's subject token once per edit and steps only the rest
    # (compute_value.py; the same numbers up to float rounding). false: every step runs whole rows, as ROME's code
    v_from_subject: bool = True
    seed: int = 0  # the sampling of the context prefixes and of the model's texts


@dataclass
class RankOneConfig(LocateConfig):
    """The settings of ROME's rank-one update, shared by every editor that makes one (ROME, WilKE)."""

    # Second-moment (covariance) adjustment u = C^-1 k. kmeng01/rome and EasyEdit's gpt2-xl files turn it on
    # (Wikipedia statistics; here mom2_corpus's), EasyEdit's llama-7b file turns it off: conf/editor_model/.
    mom2_adjustment: bool = False
    # The key whose output the update sets to the value. "prompt": the bare prompt's k0 (kmeng01/rome compute_v:
    # right = (v* - W k0) / (k0 . u)), beside the prefix-averaged k* in u. "average": k* in both (r-ROME, Gupta et
    # al. 2024, "Rebuilding ROME", arXiv 2403.07175: right = (v* - W k0) / (k* . u), whose denominator k*^T C^-1 k*
    # cannot vanish; they trace sequential ROME's collapse on CounterFact to the mix).
    update_key: str = "prompt"


@dataclass
class ROMEConfig(RankOneConfig):
    """ROME's hyper-parameters: the rank-one update's, at one layer."""

    layer: int = MISSING  # the layer of the rewritten matrix (conf/editor/rome.yaml; gpt2xl: conf/editor_model/)


def check_locate(c: LocateConfig) -> None:
    """The shared settings, each named with what it may be."""
    if c.fact_token not in FACT_TOKENS:
        raise ConfigError(f"editor.fact_token must be one of {FACT_TOKENS}, got {c.fact_token!r}")
    if c.v_num_grad_steps < 1:
        raise ConfigError(f"editor.v_num_grad_steps must be at least 1, got {c.v_num_grad_steps}")
    if c.batch_size < 1:
        raise ConfigError(f"editor.batch_size must be at least 1, got {c.batch_size}")
    lengths = [list(p) for p in c.context_template_length_params]
    if any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in lengths):
        raise ConfigError(f"editor.context_template_length_params must be [tokens, count] pairs, got {lengths}")
    for key in ("v_lr", "clamp_norm_factor"):
        value = getattr(c, key)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"editor.{key} must be a positive number, got {value}")
    for key in ("v_weight_decay", "kl_factor"):
        value = getattr(c, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"editor.{key} must be a number >= 0, got {value}")


def checked_layers(model: LoadedModel, layers: Sequence[int]) -> list[int]:
    """``editor.layers`` sorted, or a ConfigError unless they are distinct layers of ``model`` (at least one)."""
    chosen = [int(layer) for layer in layers]
    n = model.num_layers
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= layer < n for layer in chosen):
        raise ConfigError(f"editor.layers must be distinct layers of model '{model.name}' (0..{n - 1}), "
                          f"at least one, got {list(layers)}")
    return sorted(chosen)


def check_rank_one(c: RankOneConfig) -> None:
    check_locate(c)
    if c.update_key not in UPDATE_KEYS:
        raise ConfigError(f"editor.update_key must be one of {'|'.join(UPDATE_KEYS)}, got {c.update_key!r}")
    if c.mom2_adjustment:
        if not c.cache_dir:
            raise ConfigError("editor.mom2_adjustment=true needs editor.cache_dir (where the statistics are kept)")
        corpus_of(c).check()


class LocateEditor(Editor):
    """What every locate-then-edit editor shares: the context prefixes, generated once."""

    config: LocateConfig
    prefixes: list[str] | None = None

    @property
    def length_params(self) -> list[list[int]]:
        """``context_template_length_params`` as lists: [tokens, how many] per group of prefixes."""
        return [list(p) for p in self.config.context_template_length_params]

    def value_sites(self) -> list[tuple[nn.Module, Any, int | None]]:
        """Where the value loops of one edit add their delta: (module, its frozen-prefix replay, width or None
        for a matrix's output size), one per value loop an edit runs (the speed benchmark times their steps)."""
        raise NotImplementedError

    def context_prefixes(self) -> list[str]:
        if self.prefixes is None:
            c = self.config
            self.prefixes = generate_prefixes(self.model, self.tokenizer, self.length_params,
                                              c.context_template_top_k, c.seed, SEED_WORDS)
        return self.prefixes


class ROMEEditor(LocateEditor):
    """Rank-one model editing of ``module_template.format(i=layer)``, one request at a time.

    Its state: the rewritten matrix, registered as the model's own parameter (``weight``), and the
    module's name, the context prefixes and the edit counts (extra state)."""

    Config = ROMEConfig

    def __init__(self, model: LoadedModel, config: ROMEConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        check_rank_one(c)
        self.module_name, module = resolve_rewrite_module(model, c.layer, c.module_template)
        self._module = [module]  # the model's own module: held, not registered
        # GPT-2's Conv1D stores its weight as (in, out), nn.Linear as (out, in)
        # (resolve_rewrite_module admits only these two kinds)
        self.transposed = not isinstance(module, nn.Linear)
        # the model's parameter itself: every edit writes a rank-one update into all of it, so the default
        # trainable_params() (the registered parameters) counts the matrix. (The numbers optimised per edit
        # are only the d_out entries of delta; the stored factors of one edit are d_in + d_out. Counting the
        # matrix matches FT-L, which writes the same kind of matrix.)
        self.register_parameter("weight", module.weight)
        self.prefixes: list[str] | None = None
        self.inv_mom2: torch.Tensor | None = None  # C^-1, on this instance only
        self.mom2_path: str | None = None
        self.num_edits = 0
        self.subject_fallbacks = 0  # edits whose subject was not found in the prompt
        self.last_update: tuple[torch.Tensor, torch.Tensor] | None = None  # (u, right vector) of the last edit
        # the value loop's rows are the same at every step below the edited layer: run those blocks once
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)

    @property
    def module(self) -> nn.Module:
        """The module whose weight is rewritten."""
        return self._module[0]

    # --- pieces ------------------------------------------------------------------------------

    def value_sites(self) -> list[tuple[nn.Module, Any, int | None]]:
        return [(self.module, self.prefix, None)]

    def inverse_second_moment(self) -> torch.Tensor:
        if self.inv_mom2 is None:
            self.inv_mom2, self.mom2_path = load_inverse_second_moment(self.loaded, self.module, self.module_name,
                                                                       self.config)
        return self.inv_mom2

    def _apply_update(self, u: torch.Tensor, right: torch.Tensor) -> None:
        apply_rank_one(self.weight, u, right, self.transposed)

    # --- editing ---------------------------------------------------------------------------
    def edit_one(self, request: EditRequest) -> dict[str, float]:
        c = self.config
        upd = rank_one_update(self.model, self.tokenizer, self.module, self.context_prefixes(), request, c,
                              frozen=self.prefix, inv_mom2=self.inverse_second_moment() if c.mom2_adjustment else None)
        if not upd.found:
            self.subject_fallbacks += 1
            log.warning("ROME: subject %r not found in prompt %r; using the last prompt token "
                        "(%d of %d edits so far)", request.subject, request.prompt, self.subject_fallbacks,
                        self.num_edits + 1)
        self._apply_update(upd.u, upd.right)
        self.last_update = (upd.u.detach().cpu(), upd.right.detach().cpu())
        self.num_edits += 1
        return {"nll": upd.nll, "kl": upd.kl, "iterations": upd.iterations, "delta_norm": upd.delta_norm}

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
        return FloorSpec(first_layer=self.config.layer, passes=int(self.config.v_num_grad_steps),
                         prompt_prefixes=tuple(self.context_prefixes()))

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "module": self.module_name,
            "prefixes": list(self.prefixes) if self.prefixes is not None else None,
            "num_edits": self.num_edits,
            "subject_fallbacks": self.subject_fallbacks,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["module"] != self.module_name:
            raise ConfigError(f"saved ROME state edits {state['module']} but this editor rewrites {self.module_name}")
        self.prefixes = list(state["prefixes"]) if state["prefixes"] is not None else None
        self.num_edits = state["num_edits"]
        self.subject_fallbacks = state["subject_fallbacks"]
