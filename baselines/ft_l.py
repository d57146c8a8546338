"""FT-L: constrained fine-tuning of one MLP weight matrix (Meng et al. 2022, "FT+L"; EasyEdit "FT-L").

Each call of :meth:`FTLEditor.edit` runs a fresh Adam optimiser for ``steps`` steps on the loss of
the batch's edits and clamps the tuned matrix into an L-infinity ball of radius ``norm_constraint``
after every step. The stream is sequential: each call starts from the weights the previous calls
left, so earlier edits can be overwritten (the forgetting the paper's Table 1 shows).

Where the ball is centred (``clamp_reference``):
- ``"edit"`` (default, what EasyEdit does): EasyEdit's ``execute_ft`` copies the weights at the
  start of every call (``weights_copy``) and clamps around that copy; its sequential mode calls it
  once per edit on the already-edited model, so the ball moves with the stream and the total drift
  after T edits can reach T * norm_constraint per element.
- ``"original"``: around the weights before the first edit of the stream, so
  max |W - W_0| <= norm_constraint holds for the whole stream.

Objective (``objective``):
- ``"target_new"`` (default): cross entropy on the target tokens of "{prompt} {target}" under
  teacher forcing (the harness's input format; EasyEdit's ``target_new`` objective).
- ``"prompt_last"``: every target token predicted from the last prompt position (ROME's original
  FT code and EasyEdit's ``prompt_last``, which EasyEdit's hparams call "FT-L").

Early stop as in EasyEdit: a step whose loss is below ``early_stop_loss`` is not taken and the
loop ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_positive, resolve_rewrite_module
from evaluation.editing.editor import Editor, EditStats, FloorSpec, optimise
from evaluation.editing.encoding import EncodedBatch, encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel
from evaluation.editing.prefix_cache import frozen_prefix, replaying

CLAMP_REFERENCES = ("edit", "original")
OBJECTIVES = ("target_new", "prompt_last")


@dataclass
class FTLConfig:
    """FT-L's hyper-parameters. Defaults: EasyEdit hparams/FT/gpt2-xl.yaml (num_steps 25, lr 5e-4,
    weight_decay 0, norm_constraint 5e-4) and easyeditor/models/ft/ft_main.py (fresh Adam per edit call,
    clamp after every step, early stop at loss 1e-2)."""

    layer: int  # the layer of the tuned matrix (per model: conf/editor_model/ft_l_<model>.yaml)
    module_template: str  # the tuned module's name, {i} for the layer (e.g. transformer.h.{i}.mlp.c_proj)
    steps: int = 25  # Adam steps per edit call (at most: early stop)
    lr: float = 5e-4
    weight_decay: float = 0.0
    norm_constraint: Optional[float] = 5e-4  # L-infinity radius; None = unconstrained FT (EasyEdit's llama-7b FT file)
    # edit: ball around the weights at the start of each edit call, as EasyEdit's sequential mode does
    # (drift can grow by norm_constraint per edit); original: ball around the pre-stream weights for the whole stream
    clamp_reference: str = "edit"
    # target_new: CE on the target tokens of "{prompt} {target}" (harness format); prompt_last: all target
    # tokens from the last prompt position (EasyEdit "FT-L")
    objective: str = "target_new"
    early_stop_loss: float = 1e-2  # a step whose loss is below this is not taken and the loop ends
    include_bias: bool = False  # EasyEdit's name match on GPT-2 also tunes c_proj.bias; False = the matrix only
    batch_size: int = 1
    prefix_cache: bool = True  # replay the frozen blocks below the tuned layer during an edit (bit-identical, faster)


class FTLEditor(Editor):
    """Fine-tunes ``module_template.format(i=layer)``'s weight with an L-infinity clamp.

    Its state: the tuned matrix (and bias with ``include_bias``), registered as the model's own parameters
    (``weight``, ``bias``), and the module's name and the number of edits (extra state)."""

    Config = FTLConfig

    def __init__(self, model: LoadedModel, config: FTLConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        if c.clamp_reference not in CLAMP_REFERENCES:
            raise ConfigError(f"editor.clamp_reference must be one of {CLAMP_REFERENCES}, got {c.clamp_reference!r}")
        if c.objective not in OBJECTIVES:
            raise ConfigError(f"editor.objective must be one of {OBJECTIVES}, got {c.objective!r}")
        if c.norm_constraint is not None and c.norm_constraint <= 0:
            raise ConfigError(f"editor.norm_constraint must be positive or null (no clamp), got {c.norm_constraint}")
        check_positive("lr", c.lr)
        if c.steps < 1:
            raise ConfigError(f"editor.steps must be at least 1, got {c.steps}")
        if c.batch_size < 1:
            raise ConfigError(f"editor.batch_size must be at least 1, got {c.batch_size}")
        self.module_name, module = resolve_rewrite_module(model, c.layer, c.module_template)
        self._module = [module]  # the model's own module: held, not registered
        bias = getattr(module, "bias", None)
        if c.include_bias and bias is None:
            raise ConfigError(f"editor.include_bias=true but {self.module_name} has no bias")
        self.register_parameter("weight", module.weight)  # the model's parameter itself: the edit
        if c.include_bias:
            self.register_parameter("bias", bias)
        # the stream's starting point (the clamp centre when clamp_reference == "original")
        self.original = [p.detach().clone() for p in self.tuned] if c.clamp_reference == "original" else None
        self.num_edits = 0
        # the blocks below the tuned layer see the same batch at every step: run them once per edit
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)

    @property
    def module(self) -> nn.Module:
        """The module whose weight is tuned."""
        return self._module[0]

    @property
    def tuned(self) -> list[nn.Parameter]:
        """The tuned parameters: the weight, then the bias with ``include_bias``."""
        return list(self.parameters())

    # --- editing ---------------------------------------------------------------------------
    def _loss(self, batch: EncodedBatch) -> torch.Tensor:
        if self.config.objective == "target_new":
            return target_logits(self.model, batch).loss()
        # prompt_last: each target token from the last prompt position, mean per row then over rows
        hidden = self.model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            position_ids=batch.position_ids, use_cache=False,
        ).last_hidden_state  # (B, T, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logp = F.log_softmax(self.model.get_output_embeddings()(hidden[rows, batch.query_positions]).float(), -1)  # (B, V)
        labels = batch.labels  # (B, T)
        mask = labels != -100
        picked = logp.gather(1, labels.clamp(min=0))  # (B, T): log p(token at t | prompt)
        return -((picked * mask).sum(1) / mask.sum(1)).mean()

    @torch.no_grad()
    def _clamp(self, centres: list[torch.Tensor]) -> None:
        eps = self.config.norm_constraint
        for p, c in zip(self.tuned, centres):
            p.sub_(c).clamp_(-eps, eps).add_(c)  # type: ignore[arg-type]

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        device = self.weight.device
        batch = encode_pairs(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests]).to(device)
        tuned = self.tuned
        if c.norm_constraint is None:
            centres = None
        elif self.original is not None:
            centres = self.original
        else:
            centres = [p.detach().clone() for p in tuned]
        optimizer = torch.optim.Adam(tuned, lr=c.lr, weight_decay=c.weight_decay)
        for p in tuned:
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), replaying(self.prefix):
                losses = optimise(optimizer, c.steps, lambda: self._loss(batch), stop_below=c.early_stop_loss,
                                  after_step=None if centres is None else lambda: self._clamp(centres))
        finally:
            for p in tuned:
                p.requires_grad_(False)
                p.grad = None
        self.num_edits += len(requests)
        extra = {"first_loss": losses[0]}
        if self.original is not None:
            extra["max_abs_drift"] = float((self.weight.detach() - self.original[0]).abs().max())
        return EditStats(loss=losses[-1], iterations=len(losses), extra=extra)

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.steps)

    # trainable_params: the registered parameters, i.e. the elements of the tuned matrix (and bias)

    def get_extra_state(self) -> dict[str, Any]:
        return {"module": self.module_name, "num_edits": self.num_edits}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["module"] != self.module_name:
            raise ConfigError(f"saved FT-L state edits {state['module']} but this editor tunes {self.module_name}")
        self.num_edits = state["num_edits"]
