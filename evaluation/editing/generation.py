"""Batched greedy generation through the edited model (left padding, KV cache, sorted by length).

Each row's query token is its last prompt token (the rightmost column under left padding), given to
the editor's :meth:`~evaluation.editing.editor.Editor.scope`, so routing and deferral act per example
exactly as they would one prompt at a time.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from evaluation.editing.editor import Editor

GenerateFn = Callable[..., list[str]]


def make_generate_fn(model: nn.Module, tokenizer: Any, scope: Editor | None = None, batch_size: int = 32,
                     progress: bool = True) -> GenerateFn:
    """``generate(prompts, max_new_tokens, desc="") -> continuations`` for ``model`` (routed by ``scope``)."""

    @torch.no_grad()
    def generate(prompts: Sequence[str], max_new_tokens: int, desc: str = "") -> list[str]:
        device = next(model.parameters()).device
        encoded = [tokenizer(p).input_ids for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[str] = [""] * len(prompts)
        pad = tokenizer.pad_token_id
        bar = tqdm(total=len(prompts), desc=desc or "generate", disable=not progress, leave=False)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[j, width - len(encoded[i]):] = 1
            ids, mask = ids.to(device), mask.to(device)
            positions = torch.full((len(idx),), width - 1, dtype=torch.long, device=device)
            ctx = scope.scope(positions) if scope is not None else contextlib.nullcontext()
            with ctx:
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, use_cache=True)
            for j, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True)
            bar.update(len(idx))
        bar.close()
        return out

    return generate
