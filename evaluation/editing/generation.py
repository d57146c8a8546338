"""Batched greedy generation through the edited model (left padding, KV cache, sorted by length).

Each row's query token is its last prompt token (the rightmost column under left padding), given to
the editor's :meth:`~evaluation.editing.editor.Editor.scope`, so routing and deferral act per example
exactly as they would one prompt at a time.

Batches are cut from the length-sorted prompts either every ``batch_size`` rows or by a token budget
(:func:`token_budget_batches`). On a CPU prefill is compute-bound, so a batch pays only for what it
shares (the decoding steps) and loses what it pads; a budget on ``rows * longest prompt`` keeps long
prompts in small batches and short ones in large batches. The LM head runs only where a token is
generated: ``GenerationMixin.generate`` passes ``logits_to_keep=1`` to models whose ``forward`` takes it
(LlamaForCausalLM and GPT2LMHeadModel do), so prefill projects the last position alone.

A batch's rows end at different steps (a short answer, a long one); every :data:`PRUNE_EVERY` steps the rows
that have ended leave it, with their KV cache, attention mask and routes (``Editor.select_rows``), so the
decoding steps are paid only by rows still generating. A row computes the same beside any other rows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from evaluation.common.evaluation_parts import BatchRecord, Codec, batches_with
from evaluation.editing.editor import Editor

#: generation steps between the moments rows that have ended leave their batch (evaluation.editing.generation)
PRUNE_EVERY = 4


def token_budget_batches(lengths: Sequence[int], budget: int | None, max_rows: int) -> list[list[int]]:
    """Indices of ``lengths``, shortest first (ties in input order), cut into batches.

    A batch takes the next prompts while ``rows * longest <= budget`` and ``rows <= max_rows``; a prompt
    longer than ``budget`` forms a batch of its own. ``budget=None``: batches of ``max_rows``.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if budget is not None and budget < 1:
        raise ValueError(f"token budget must be at least 1 (or None), got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:  # ascending, so prompt i is the longest of the batch it joins
        full = len(batch) >= max_rows or (budget is not None and (len(batch) + 1) * lengths[i] > budget)
        if batch and full:
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


@dataclass(frozen=True)
class Continuation:
    """One prompt's generated continuation: its text (special tokens dropped), how many tokens the model
    produced before it stopped, and why it stopped (``eos``: its end token; ``stop``: the caller's stop
    rule; ``budget``: ``max_new_tokens``)."""

    text: str
    tokens: int
    stop: str


class _StopRule(StoppingCriteria):
    """Ends a row once ``stops(text generated so far)`` holds (the rows of a batch end one by one)."""

    def __init__(self, tokenizer: Any, width: int, stops: Callable[[str], bool]) -> None:
        self.tokenizer, self.width, self.stops = tokenizer, width, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([self.stops(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def _ended(tokens: list[int], end_ids: set[int]) -> int | None:
    """Index of the first end token among a row's generated tokens, None where there is none."""
    return next((k for k, t in enumerate(tokens) if t in end_ids), None)


#: what ``generate`` calls its KV cache, in its output and as an argument (``cache`` since transformers 5.x,
#: ``past_key_values`` before)
_CACHE_FIELD = ("cache" if "cache" in getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {})
                else "past_key_values")


def _generate_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int,
                    scope: Editor | None, ended: Callable[[list[int]], bool],
                    criteria: StoppingCriteriaList | None, prune_every: int | None) -> list[list[int]]:
    """Each row's generated tokens (greedy, KV cache), run until it ends (``ended(tokens)``) or has
    ``max_new_tokens``.

    With ``prune_every``, generation goes in segments of that many steps and the rows that have ended leave the
    batch between segments (their cache, attention mask and routes cut away): the rows left compute what they
    would have beside them, and a batch stops paying for its early finishers. None: one ``generate`` call, which
    runs every row until the last one ends."""
    width = ids.shape[1]
    out: list[list[int] | None] = [None] * ids.shape[0]
    live = torch.arange(ids.shape[0])  # the batch row of each row still generating
    extra: dict[str, Any] = {}
    remaining = max_new_tokens
    while True:
        step = remaining if prune_every is None else min(prune_every, remaining)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=step, do_sample=False,
                             pad_token_id=pad, use_cache=True, stopping_criteria=criteria,
                             return_dict_in_generate=True, **extra)
        seqs, new = gen.sequences, gen.sequences.shape[1] - ids.shape[1]
        remaining -= new
        tokens = seqs[:, width:].tolist()
        # fewer steps than asked: every row had ended (generate stops there)
        done = [remaining <= 0 or new < step or ended(t) for t in tokens]
        for j, row in enumerate(live.tolist()):
            if done[j]:
                out[row] = tokens[j]
        if all(done):
            return out  # type: ignore[return-value]
        cache = getattr(gen, _CACHE_FIELD)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], new))], dim=1)
        if any(done):
            keep = torch.tensor([j for j, d in enumerate(done) if not d], dtype=torch.long, device=seqs.device)
            cache.batch_select_indices(keep)
            if scope is not None:
                scope.select_rows(keep)
            seqs, mask, live = seqs[keep], mask[keep], live[keep.cpu()]
        ids, extra = seqs, {_CACHE_FIELD: cache}


@torch.no_grad()
def generate_continuations(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                           scope: Editor | None = None, batch_size: int = 32, token_budget: int | None = None,
                           stops: Callable[[str], bool] | None = None, progress: bool = False,
                           desc: str = "", prune_every: int | None = PRUNE_EVERY,
                           record: BatchRecord[Continuation] | None = None) -> list[Continuation]:
    """Greedy continuations of ``prompts`` through ``model`` (routed by ``scope``), batched and cached.

    ``stops(text so far) -> bool`` ends a row early (besides its end token and ``max_new_tokens``). Batches:
    see :func:`token_budget_batches`; rows that have ended leave their batch every ``prune_every`` steps (None:
    a batch runs until its last row ends). Continuations depend on neither. ``record``: batches saved before are
    read from it, and those computed are added to it (evaluation.common.evaluation_parts)."""
    device = next(model.parameters()).device
    encoded = [tokenizer(p).input_ids for p in prompts]
    out: list[Continuation | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id
    # a row ends at its end token; the rows ended before the batch's last are padded after it (a pad token
    # that is special is dropped from the text like the end token, so it ends a row too)
    end_ids = {i for i in (tokenizer.eos_token_id, pad) if i is not None and i in tokenizer.all_special_ids}

    def ended(tokens: list[int]) -> bool:
        end = _ended(tokens, end_ids)
        return end is not None or (stops is not None and stops(tokenizer.decode(tokens, skip_special_tokens=True)))

    def compute(idx: list[int]) -> list[Continuation]:
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[j, width - len(encoded[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.full((len(idx),), width - 1, dtype=torch.long, device=device)
        ctx = scope.scope(positions) if scope is not None else contextlib.nullcontext()
        criteria = StoppingCriteriaList([_StopRule(tokenizer, width, stops)]) if stops is not None else None
        with ctx:
            rows = _generate_batch(model, ids, mask, max_new_tokens, pad, scope, ended, criteria, prune_every)
        found = []
        for tokens in rows:
            end = _ended(tokens, end_ids)
            kept = tokens if end is None else tokens[:end]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            # a row cut short by the stop rule is padded after it: no end token of its own
            reason = ("stop" if stops is not None and stops(text) else
                      "eos" if end is not None else "budget")
            found.append(Continuation(text, len(kept), reason))
        return found

    bar = tqdm(total=len(prompts), desc=desc or "generate", disable=not progress, leave=False)
    batches = token_budget_batches([len(e) for e in encoded], token_budget, batch_size)
    for idx, found in batches_with(record, batches, compute):
        for i, continuation in zip(idx, found):
            out[i] = continuation
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


#: a :class:`Continuation` as JSON and back (the saved parts of a long evaluation)
CONTINUATIONS = Codec[Continuation](encode=lambda c: [c.text, c.tokens, c.stop],
                                    decode=lambda v: Continuation(str(v[0]), int(v[1]), str(v[2])))


GenerateFn = Callable[..., "list[Continuation]"]


def make_generate_fn(model: nn.Module, tokenizer: Any, scope: Editor | None = None, batch_size: int = 32,
                     progress: bool = True, token_budget: int | None = None) -> GenerateFn:
    """``generate(prompts, max_new_tokens, desc="") -> continuations`` for ``model`` (routed by ``scope``):
    one :class:`Continuation` per prompt (its text, token count and stop reason).

    Batches hold at most ``batch_size`` prompts and, with ``token_budget``, at most ``token_budget``
    padded prompt tokens (see :func:`token_budget_batches`). Continuations do not depend on either.
    """

    def generate(prompts: Sequence[str], max_new_tokens: int, desc: str = "") -> list[Continuation]:
        return generate_continuations(model, tokenizer, prompts, max_new_tokens, scope, batch_size, token_budget,
                                      progress=progress, desc=desc)

    return generate
