"""Tokenising "{prompt} {target}" pairs into padded teacher-forcing batches.

Prompt and target are tokenised separately and concatenated, so the prompt's length in tokens is
exact and the loss covers the target tokens only (prompt and padding are -100), as in GRACE, MELO
and EasyEdit. Position ids are derived from the attention mask, so left and right padding give the
same hidden states at every real token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

IGNORE = -100

#: where a sequence-level router or key reads its one vector per sequence (issue 18's reading):
#: ``prompt_last``: the last prompt token (the router never sees the answer);
#: ``sequence_last``: the last real token of the sequence as fed (the authors' ``key_id = -1`` for
#: ELDER, GRACE and MELO). Under teacher forcing on "{prompt} {target}" that is the last target token.
KEY_POSITIONS = ("prompt_last", "sequence_last")


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): target token ids at target positions, IGNORE elsewhere
    query_positions: torch.Tensor  # (B,): index of each row's last prompt token

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    @property
    def last_positions(self) -> torch.Tensor:
        """(B,) index of each row's last real (unpadded) token, for either padding side."""
        cols = torch.arange(self.attention_mask.shape[1], device=self.attention_mask.device)
        return (self.attention_mask.bool() * (cols + 1)).argmax(-1)

    def key_positions(self, reading: str) -> torch.Tensor:
        """The (B,) token each row's router/key reads under ``reading`` (one of :data:`KEY_POSITIONS`)."""
        if reading == "prompt_last":
            return self.query_positions
        if reading == "sequence_last":
            return self.last_positions  # never a pad token, unlike a plain index -1 under right padding
        raise ValueError(f"unknown key position {reading!r}; expected one of {KEY_POSITIONS}")

    def to(self, device: torch.device | str) -> "EncodedBatch":
        return EncodedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.query_positions)))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    padding_side: str = "right",
) -> EncodedBatch:
    """Encode ``prompt + " " + target`` rows; labels mark the target tokens."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows: list[tuple[list[int], int, int]] = []
    for prompt, target in zip(prompts, targets):
        p_ids = tokenizer(prompt).input_ids
        t_ids = tokenizer(" " + target, add_special_tokens=False).input_ids
        if not p_ids or not t_ids:
            raise ValueError(f"empty tokenisation for prompt {prompt!r} / target {target!r}")
        rows.append((p_ids + t_ids, len(p_ids), len(t_ids)))
    width = max(len(ids) for ids, _, _ in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    query = torch.zeros(B, dtype=torch.long)
    for b, (ids, n_prompt, n_target) in enumerate(rows):
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[b, start:start + len(ids)] = torch.tensor(ids)
        mask[b, start:start + len(ids)] = 1
        labels[b, start + n_prompt:start + len(ids)] = torch.tensor(ids[n_prompt:])
        query[b] = start + n_prompt - 1
    return EncodedBatch(input_ids, mask, labels, query)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position whose *next* token is a target token, and those tokens."""
    nxt = labels[:, 1:]
    rows, cols = (nxt != IGNORE).nonzero(as_tuple=True)
    return torch.stack([rows, cols]), nxt[rows, cols]
