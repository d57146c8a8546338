"""MEMIT (Meng, Sharma, Andonian, Belinkov, Bau 2023, "Mass-Editing Memory in a Transformer", ICLR;
github.com/kmeng01/memit): a batch of edits written into the FFN output matrices of several layers at once.

For a batch of requests (subject s_j, prompt p_j, target o_j), on the current weights:
1. target z_j = z0_j + delta_j: ROME's value optimisation (``baselines.rome.compute_value``), with delta added
   to the residual stream, the output of the last edited layer L's whole block, at s_j's last token of p_j and
   of p_j behind the model's own prefixes (MEMIT's context templates: the bare prompt and 5 texts of 10 tokens);
2. for each edited layer l in ascending order, on the weights the lower layers' updates left:
   keys K_l (d_in, n): the matrix's input at each subject's last token, averaged within each group of prefixes
   and then over the groups (MEMIT's compute_ks: the bare prompt weighs 1/2, each generated prefix 1/10);
   residual R = (Z - Z_cur) / (number of layers left), with Z_cur layer L's output now;
   update  dW_l = R K_l^T (mom2_update_weight * C_l + K_l K_l^T)^-1   (double precision, as the authors),
   C_l the second moment of the matrix's input (covariance.py, on the unedited model);
3. batches are sequential, each on the weights the earlier ones left (100 edits per batch by default).

Hyper-parameters (``MEMITConfig``): the authors' hparams/MEMIT/gpt2-xl.json (layers 13-17, clamp 0.75, 20 value
steps, lr 0.5, weight decay 0.5, KL 0.0625, mom2_update_weight 20000); LLaMA2-7B: EasyEdit
hparams/MEMIT/llama-7b.yaml (layers 4-8, clamp 4, 25 steps, weight decay 1e-3, mom2_update_weight 15000), in
conf/editor_model/. The statistics come from ``mom2_corpus`` (by default the model's own text; the authors
use 100,000 Wikipedia texts). AlphaEdit (baselines/alphaedit.py) is this editor with another ``layer_update``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch
from omegaconf import MISSING
from torch import nn
from tqdm.auto import tqdm

from baselines.rome.compute_key import SEED_WORDS, key_reprs_at
from baselines.rome.covariance import SecondMoment
from baselines.rome.editor import (
    LocateConfig,
    LocateEditor,
    check_locate,
    checked_layers,
    load_second_moments,
    optimise_value,
    value_batch,
)
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import resolve_rewrite_module
from evaluation.editing.editor import EditStats, FloorSpec
from evaluation.editing.models import LoadedModel, get_module
from evaluation.editing.prefix_cache import frozen_prefix

log = logging.getLogger(__name__)


@dataclass
class BatchedConfig(LocateConfig):
    """What MEMIT and AlphaEdit share: several layers, batches of edits, MEMIT's context templates and clamp."""

    layers: List[int] = MISSING  # the edited layers; the last one's block output is where the targets are set
    batch_size: int = 100  # edits per closed-form update (AlphaEdit's sequential batches; its README: 100)
    clamp_norm_factor: float = 0.75
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[10, 5]])


@dataclass
class MEMITConfig(BatchedConfig):
    """MEMIT's hyper-parameters (module docstring)."""

    mom2_update_weight: float = 20000.0  # lambda of the covariance term


def apply_update(weight: torch.Tensor, update: torch.Tensor, transposed: bool) -> None:
    """W += update (d_out, d_in) in place; ``transposed``: GPT-2's Conv1D stores W as (in, out)."""
    with torch.no_grad():
        weight.add_((update.T if transposed else update).to(weight.dtype))


class MEMITEditor(LocateEditor):
    """MEMIT over ``layers``, ``batch_size`` requests per update (module docstring).

    Its state: the rewritten matrix of every edited layer, registered as the model's own parameters
    (``weights``), and the modules' names, the prefixes and the edit counts (extra state)."""

    Config = MEMITConfig
    config: BatchedConfig

    def __init__(self, model: LoadedModel, config: Any = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        check_locate(c)
        if not model.block_template:
            raise ConfigError(f"{type(self).__name__} sets its targets at a block's output: model '{model.name}' "
                              f"needs block_template in its config")
        self.layers = checked_layers(model, c.layers)
        resolved = [resolve_rewrite_module(model, layer, c.module_template) for layer in self.layers]
        self.module_names = [name for name, _ in resolved]
        self._held = [module for _, module in resolved]  # the model's own modules: held, not registered
        self.transposed = [not isinstance(module, nn.Linear) for module in self._held]
        self.weights = nn.ParameterList([module.weight for module in self._held])
        # the targets' site: the output of the last edited layer's block (MEMIT's layer_module_tmp)
        self._block = [get_module(model.model, model.block_template.format(i=self.layers[-1]), model.num_layers)]
        self.width = int(model.model.config.hidden_size)
        self.prefixes: list[str] | None = None
        self.num_edits = 0
        self.subject_fallbacks = 0
        # the statistics of every edited matrix's input, on the unedited model (a resumed run builds its editor
        # on the unedited model too): an update at one layer changes the inputs of the layers above it
        self.stats: list[SecondMoment] = load_second_moments(model, self._held, self.module_names, c)
        self.setup_statistics(self.stats)
        self.replay = frozen_prefix(model, c.prefix_cache, self.layers[-1])

    @property
    def block(self) -> nn.Module:
        return self._block[0]

    def value_sites(self) -> list[tuple[nn.Module, Any, int | None]]:
        return [(self.block, self.replay, self.width)]

    # --- the two places MEMIT and AlphaEdit differ -----------------------------------------------
    def setup_statistics(self, stats: Sequence[SecondMoment]) -> None:
        """Check the update's settings and keep what ``layer_update`` needs of the statistics (MEMIT: C_l as it is)."""
        weight = self.config.mom2_update_weight
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"editor.mom2_update_weight must be a number >= 0, got {weight}")
        self.mom2 = [s.mom2 for s in stats]

    def layer_update(self, index: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """dW (d_out, d_in) of layer ``layers[index]`` for ``keys`` (d_in, n) and residuals ``resid`` (d_out, n):
        R K^T (lambda C + K K^T)^-1, solved in double precision (memit_main.execute_memit)."""
        keys, resid = keys.double(), resid.double()
        cov = self.mom2[index].to(keys.device).double()
        adj = torch.linalg.solve(self.config.mom2_update_weight * cov + keys @ keys.T, keys)  # (d_in, n)
        return (resid @ adj.T).float()

    def after_batch(self, requests: Sequence[EditRequest], prefixes: list[str]) -> None:
        """What to keep of a batch once all its layers are written (AlphaEdit: its keys); nothing for MEMIT."""

    # --- editing ---------------------------------------------------------------------------
    @property
    def group_sizes(self) -> list[int]:
        """The sizes of the prefix groups ``context_prefixes`` returns: the bare prompt, then each length's texts."""
        return [1] + [(count // len(SEED_WORDS)) * len(SEED_WORDS) for _, count in self.length_params
                      if count // len(SEED_WORDS) >= 1]

    def grouped_key(self, inputs: torch.Tensor) -> torch.Tensor:
        """MEMIT's key: the mean within each group of prefixes, then the mean of those means."""
        return torch.stack([part.mean(0) for part in torch.split(inputs, self.group_sizes)]).mean(0)

    def keys_and_targets(self, modules: Sequence[nn.Module], requests: Sequence[EditRequest],
                         prefixes: list[str]) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """Each module's keys (d_in, n), the target site's current output at the bare prompts (d, n), and how many
        subjects were not found in their prompt (their last prompt token was used)."""
        per_module: list[list[torch.Tensor]] = [[] for _ in modules]
        current, missing = [], 0
        for r in requests:
            reprs = key_reprs_at(self.model, self.tokenizer, [*modules, self.block], prefixes, r.prompt, r.subject,
                                 self.config.fact_token)
            for keys, rep in zip(per_module, reprs):
                keys.append(self.grouped_key(rep.inputs))
            current.append(reprs[-1].outputs[0])
            missing += not reprs[-1].found
        return [torch.stack(k, 1) for k in per_module], torch.stack(current, 1), missing

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        prefixes = self.context_prefixes()
        targets, nll, kl, norms, iterations = [], [], [], [], 0
        for r in tqdm(requests, desc="targets", unit="edit", leave=False):  # all on the weights before this batch
            value = optimise_value(self.model, self.block, value_batch(self.model, self.tokenizer, prefixes, r, c), c,
                                   self.replay, width=self.width)
            targets.append(value.target)
            nll.append(value.nll)
            kl.append(value.kl)
            norms.append(float((value.target - value.init).norm()))
            iterations += value.iterations
        zs = torch.stack(targets, 1)  # (d, n)
        fallbacks = 0
        for i, (module, weight) in enumerate(zip(self._held, self.weights)):
            (keys,), current, fallbacks = self.keys_and_targets([module], requests, prefixes)
            resid = (zs - current) / (len(self.layers) - i)  # spread what is left over the layers left
            apply_update(weight, self.layer_update(i, keys, resid), self.transposed[i])
        self.after_batch(requests, prefixes)
        self.num_edits += len(requests)
        self.subject_fallbacks += fallbacks
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return EditStats(loss=mean(nll), iterations=iterations,
                         extra={"kl": mean(kl), "delta_norm": mean(norms),
                                "subject_fallbacks": float(self.subject_fallbacks)})

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        # each request's value optimisation: v_num_grad_steps passes from the target layer up over its prompts
        return FloorSpec(first_layer=self.layers[-1], passes=int(self.config.v_num_grad_steps),
                         prompt_prefixes=tuple(self.context_prefixes()))

    def get_extra_state(self) -> dict[str, Any]:
        return {"modules": list(self.module_names), "prefixes": list(self.prefixes) if self.prefixes is not None else None,
                "num_edits": self.num_edits, "subject_fallbacks": self.subject_fallbacks}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["modules"]) != self.module_names:
            raise ConfigError(f"saved {type(self).__name__} state edits {state['modules']} but this editor rewrites "
                              f"{self.module_names}")
        self.prefixes = list(state["prefixes"]) if state["prefixes"] is not None else None
        self.num_edits = int(state["num_edits"])
        self.subject_fallbacks = int(state["subject_fallbacks"])
