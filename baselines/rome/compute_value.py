"""ROME's value: the output vector v* the rewritten module must give for the key (ROME's compute_v).

A vector ``delta`` is added to the module's output at the subject's last token of every prompt and
optimised with Adam so that the model predicts the target after each prefixed prompt:

    loss = NLL(target | prefix + prompt)                                   (mean over target tokens)
         + kl_factor * KL(p_delta || p_0) on "{subject} is a"              (essence drift)
         + v_weight_decay * ||delta|| / ||v_0||^2

where v_0 is the module's original output at the subject of the bare prompt. After each step
``delta`` is projected into the L2 ball of radius clamp_norm_factor * ||v_0||. v* = v_0 + delta.
ROME hooks the FFN's output matrix; MEMIT and AlphaEdit hook the whole block (the residual stream).

Two details follow ROME's code exactly: the KL distribution is read at the subject's last token of
"{subject} is a" (the lookup index), not at the last token; and the loop checks the loss before
stepping and never steps on its last iteration, so ``v_num_grad_steps`` iterations take at most
``v_num_grad_steps - 1`` optimiser steps. The loss is on the final logits (ROME's ``v_loss_layer``
is the last layer in every published hparams file).

Where the work goes (``from_subject``): delta enters only at each row's lookup token, and attention is
causal, so every token before it has the same hidden states at every layer in every step. With
``from_subject`` those tokens run once per edit (their keys and values kept as an attention cache) and
each step runs only the lookup token and what follows it: the same numbers up to float rounding, for
about a quarter of the tokens (ROME's 20 prefixes put most of each row before the subject).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from baselines.rome.compute_key import locate, pad
from evaluation.editing.encoding import position_ids_from_mask
from evaluation.editing.models import layer_dims
from evaluation.editing.prefix_cache import FrozenPrefix, replaying


@dataclass
class ValueResult:
    target: torch.Tensor  # (d_out,) v* = v_0 + delta
    init: torch.Tensor  # (d_out,) v_0
    nll: float
    kl: float
    iterations: int


@dataclass
class ValueRows:
    """The value loop's token rows for one edit: each prefixed prompt followed by the target, then the KL row."""

    rows: list[list[int]]
    lookup: list[int]  # each row's lookup token (the subject's last token)
    target_rows: list[int]  # (row, column) of every position that predicts a target token, and that token
    target_cols: list[int]
    target_ids: list[int]


def value_rows(tokenizer: Any, prefixes: Sequence[str], prompt: str, subject: str, target: str,
               fact_token: str = "subject_last") -> ValueRows:
    """``"{prefix}{prompt} {target}"`` tokenised as encode_pairs does (prompt, then " target"), and the KL row
    ``"{subject} is a"`` read at the subject's last token."""
    t_ids = tokenizer(" " + target, add_special_tokens=False).input_ids
    out = ValueRows([], [], [], [], [])
    for b, prefix in enumerate(prefixes):
        loc = locate(tokenizer, prefix, prompt, subject, fact_token)
        out.rows.append(loc.ids + t_ids)
        out.lookup.append(loc.index)
        for j, tok in enumerate(t_ids):  # position len(prompt) - 1 + j predicts target token j
            out.target_rows.append(b)
            out.target_cols.append(len(loc.ids) - 1 + j)
            out.target_ids.append(tok)
    kl = locate(tokenizer, "", subject + " is a", subject, fact_token)
    out.rows.append(kl.ids)
    out.lookup.append(kl.index)
    return out


@dataclass
class StepBatch:
    """What every step of the value loop runs: token ids (B, T) with their mask and positions, each row's
    lookup column, the target positions, and (``from_subject``) the attention cache of the tokens before
    each row's lookup token, whose columns then come first in ``mask``."""

    ids: torch.Tensor
    mask: torch.Tensor  # (B, cached + T)
    position_ids: torch.Tensor
    lookup: torch.Tensor  # (B,)
    target_rows: torch.Tensor
    target_cols: torch.Tensor
    targets: torch.Tensor
    past: list[tuple[torch.Tensor, torch.Tensor]] | None
    config: Any = None  # the model config, for the cache's layer kinds

    @property
    def kl_row(self) -> int:
        return self.ids.shape[0] - 1

    def hidden_states(self, model: nn.Module) -> torch.Tensor:
        """Last hidden states (B, T, d) of the transformer body at ``ids``."""
        # a fresh cache per step: the forward appends this step's keys to it
        cache = DynamicCache(ddp_cache_data=self.past, config=self.config) if self.past is not None else None
        return model.base_model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.position_ids,
                                cache=cache, use_cache=cache is not None).last_hidden_state


def step_batch(model: nn.Module, rows: ValueRows, pad_id: int, from_subject: bool) -> StepBatch:
    """The batch of every step: whole rows, or (``from_subject``) each row from its lookup token on, with the
    tokens before it run here, once (no gradient: nothing before the lookup token depends on delta)."""
    device = next(model.parameters()).device
    as_tensor = lambda xs: torch.tensor(xs, device=device)  # noqa: E731
    targets = as_tensor(rows.target_ids)
    if not from_subject:
        ids, mask = pad(rows.rows, pad_id, device)
        return StepBatch(ids, mask, position_ids_from_mask(mask), as_tensor(rows.lookup), as_tensor(rows.target_rows),
                         as_tensor(rows.target_cols), targets, None)
    heads = [row[:start] for row, start in zip(rows.rows, rows.lookup)]
    tails = [row[start:] for row, start in zip(rows.rows, rows.lookup)]
    width = max(len(h) for h in heads)
    cols = [c - rows.lookup[r] for r, c in zip(rows.target_rows, rows.target_cols)]
    ids, tail_mask = pad(tails, pad_id, device)
    position_ids = as_tensor(rows.lookup).unsqueeze(1) + torch.arange(ids.shape[1], device=device)
    zeros = as_tensor([0] * len(tails))
    if width == 0:
        return StepBatch(ids, tail_mask, position_ids, zeros, as_tensor(rows.target_rows), as_tensor(cols), targets, None)
    head_ids, head_mask = pad(heads, pad_id, device)  # (B, width)
    # Right padding: a real token never attends to the padding after it, so the head pass needs no padding mask
    # (and a row with no head gets no fully masked attention row); the steps' mask hides the padded columns.
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.base_model(input_ids=head_ids, attention_mask=torch.ones_like(head_ids),
                         position_ids=torch.arange(width, device=device).expand_as(head_ids), cache=cache,
                         use_cache=True)
    past = [(layer.keys, layer.values) for layer in cache.layers]
    return StepBatch(ids, torch.cat([head_mask, tail_mask], 1), position_ids, zeros, as_tensor(rows.target_rows),
                     as_tensor(cols), targets, past, model.config)


def _add_at(positions: torch.Tensor, delta: torch.Tensor):
    """A forward hook adding ``delta`` to the module output at (row, positions[row]) of every row."""

    def hook(_: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(output.shape[:2], dtype=output.dtype, device=output.device)  # (B, T)
        onehot[torch.arange(output.shape[0], device=output.device), positions] = 1
        return output + onehot.unsqueeze(-1) * delta.to(output.dtype)

    return hook


def compute_value(model: nn.Module, module: nn.Module, batch: StepBatch, *, v_num_grad_steps: int = 20,
                  v_lr: float = 0.5, v_weight_decay: float = 0.5, clamp_norm_factor: float = 4.0,
                  kl_factor: float = 0.0625, early_stop_loss: float = 5e-2,
                  frozen: FrozenPrefix | None = None, width: int | None = None) -> ValueResult:
    """Optimise delta at ``module``'s output over ``batch`` (``step_batch``). ``frozen``: replays the frozen blocks
    below ``module``'s layer across the steps (bit-identical). ``width``: the output's size where ``module`` is
    not a matrix (a whole block: the hidden size)."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    lookup, kl_row = batch.lookup, batch.kl_row
    kl_col = int(lookup[kl_row])

    delta = torch.zeros(width or layer_dims(module)[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=v_lr)
    init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    nll = kl_loss = torch.zeros(())
    iterations = 0

    def record_init(_: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal init
        if init is None:  # v_0: the clean output at the bare prompt's lookup token
            init = output[0, int(lookup[0])].detach().float().clone()

    handles = [module.register_forward_hook(record_init), module.register_forward_hook(_add_at(lookup, delta))]
    try:
        with torch.enable_grad(), replaying(frozen):
            for it in range(v_num_grad_steps):
                iterations = it + 1
                hidden = batch.hidden_states(model)  # (B, T, d)
                picked = [hidden[batch.target_rows, batch.target_cols], hidden[kl_row, kl_col].unsqueeze(0)]
                logits = head(torch.cat(picked)).float()
                nll = F.cross_entropy(logits[:-1], batch.targets)  # every row has the same target length
                kl_logp = F.log_softmax(logits[-1:], -1)
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                kl_loss = kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
                assert init is not None
                decay = v_weight_decay * delta.norm() / init.norm() ** 2
                loss = nll + kl_loss + decay
                if loss.item() < early_stop_loss or it == v_num_grad_steps - 1:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    max_norm = clamp_norm_factor * init.norm()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    finally:
        for h in handles:
            h.remove()
    assert init is not None
    return ValueResult(init + delta.detach(), init, float(nll.detach()), float(kl_loss.detach()), iterations)
