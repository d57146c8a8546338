"""Every text of the edit stream must fit the model: checked once, before any work, naming the record.

An over-long record would otherwise fail deep inside the model (an index past GPT-2's position table)
or, on a rotary model with no such table, grow the attention until the machine runs out of memory.
"""
from __future__ import annotations

from typing import Any, Sequence

from data.loaders import DataError
from data.requests import EditRequest


def model_context(model: Any) -> int | None:
    """The longest input the model's position encoding covers, where its config names one."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(requests: Sequence[EditRequest], tokenizer: Any, max_tokens: int, context: int | None,
                  source: str) -> None:
    """Raise :class:`DataError` for the first record whose prompt + target, paraphrase + target or locality
    prompt + answer is longer than ``max_tokens`` (``dataset.max_tokens``) or the model's ``context``."""
    limit = min(max_tokens, context) if context else max_tokens
    why = "dataset.max_tokens" if limit == max_tokens else "the model's context"
    for r in requests:
        texts = [("prompt + target", f"{r.prompt} {r.target}")]
        texts += [("paraphrase + target", f"{p} {r.target}") for p in r.paraphrases]
        texts += [("locality prompt + answer", f"{p} {a}") for p, a in r.locality]
        lengths = [len(ids) for ids in tokenizer([t for _, t in texts], add_special_tokens=True)["input_ids"]]
        for (what, text), n in zip(texts, lengths):
            if n > limit:
                raise DataError(
                    f"{source}: edit {r.uid} is too long: its {what} is {n} tokens, over the limit of {limit} "
                    f"({why}; dataset.max_tokens={max_tokens}, model context {context or 'unbounded'}). "
                    f"Shorten or drop the record ({text[:60]!r}...), or raise dataset.max_tokens")
