"""ROME's value: the output vector v* the rewritten matrix must give for the key (ROME's compute_v).

A vector ``delta`` is added to the rewritten module's output at the subject's last token of every
prompt and optimised with Adam so that the model predicts the target after each prefixed prompt:

    loss = NLL(target | prefix + prompt)                                   (mean over target tokens)
         + kl_factor * KL(p_delta || p_0) on "{subject} is a"              (essence drift)
         + v_weight_decay * ||delta|| / ||v_0||^2

where v_0 is the module's original output at the subject of the bare prompt. After each step
``delta`` is projected into the L2 ball of radius clamp_norm_factor * ||v_0||. v* = v_0 + delta.

Two details follow ROME's code exactly: the KL distribution is read at the subject's last token of
"{subject} is a" (the lookup index), not at the last token; and the loop checks the loss before
stepping and never steps on its last iteration, so ``v_num_grad_steps`` iterations take at most
``v_num_grad_steps - 1`` optimiser steps. The loss is on the final logits (ROME's ``v_loss_layer``
is the last layer in every published hparams file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines.rome.compute_key import hidden_states, locate, pad
from evaluation.editing.models import layer_dims
from evaluation.editing.prefix_cache import FrozenPrefix, replaying


@dataclass
class ValueResult:
    target: torch.Tensor  # (d_out,) v* = v_0 + delta
    init: torch.Tensor  # (d_out,) v_0
    nll: float
    kl: float
    iterations: int


def _add_at(positions: torch.Tensor, delta: torch.Tensor):
    """A forward hook adding ``delta`` to the module output at (row, positions[row]) of every row."""

    def hook(_: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(output.shape[:2], dtype=output.dtype, device=output.device)  # (B, T)
        onehot[torch.arange(output.shape[0], device=output.device), positions] = 1
        return output + onehot.unsqueeze(-1) * delta.to(output.dtype)

    return hook


def compute_value(model: nn.Module, tokenizer: Any, module: nn.Module, prefixes: list[str], prompt: str,
                  subject: str, target: str, *, fact_token: str = "subject_last", v_num_grad_steps: int = 20,
                  v_lr: float = 0.5, v_weight_decay: float = 0.5, clamp_norm_factor: float = 4.0,
                  kl_factor: float = 0.0625, early_stop_loss: float = 5e-2,
                  frozen: FrozenPrefix | None = None) -> ValueResult:
    """``frozen``: replays the frozen blocks below ``module``'s layer across the steps (bit-identical)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # rewriting rows: "{prefix}{prompt} {target}" tokenised as encode_pairs does (prompt, then " target")
    t_ids = tokenizer(" " + target, add_special_tokens=False).input_ids
    rows, lookup, tgt_rows, tgt_cols, tgt_ids = [], [], [], [], []
    for b, prefix in enumerate(prefixes):
        loc = locate(tokenizer, prefix, prompt, subject, fact_token)
        n = len(loc.ids)
        rows.append(loc.ids + t_ids)
        lookup.append(loc.index)
        for j, tok in enumerate(t_ids):  # position n - 1 + j predicts target token j
            tgt_rows.append(b)
            tgt_cols.append(n - 1 + j)
            tgt_ids.append(tok)
    # the KL row: "{subject} is a", read at the subject's last token
    kl = locate(tokenizer, "", subject + " is a", subject, fact_token)
    rows.append(kl.ids)
    lookup.append(kl.index)
    ids, mask = pad(rows, pad_id, device)
    positions = torch.tensor(lookup, device=device)
    t_rows, t_cols = torch.tensor(tgt_rows, device=device), torch.tensor(tgt_cols, device=device)
    targets = torch.tensor(tgt_ids, device=device)
    head = model.get_output_embeddings()
    kl_row = len(rows) - 1

    delta = torch.zeros(layer_dims(module)[1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=v_lr)
    init: torch.Tensor | None = None
    kl_init: torch.Tensor | None = None
    nll = kl_loss = torch.zeros(())
    iterations = 0

    def record_init(_: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal init
        if init is None:  # v_0: the clean output at the bare prompt's lookup token
            init = output[0, lookup[0]].detach().float().clone()

    handles = [module.register_forward_hook(record_init), module.register_forward_hook(_add_at(positions, delta))]
    try:
        with torch.enable_grad(), replaying(frozen):
            for it in range(v_num_grad_steps):
                iterations = it + 1
                hidden = hidden_states(model, ids, mask)  # (B, T, d)
                logits = head(torch.cat([hidden[t_rows, t_cols], hidden[kl_row, lookup[-1]].unsqueeze(0)])).float()
                nll = F.cross_entropy(logits[:-1], targets)  # every row has the same target length
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

