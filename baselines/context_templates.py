"""The context prefixes WISE's code puts before each edit prompt (EasyEdit ``easyeditor/models/wise/utils.py``
``get_context_templates``; MEMOIR reuses it): seed words continued by the unedited model itself."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from evaluation.editing.models import model_device

#: the authors' seed words
SEED_WORDS = ("I", "You", "Because", "Yes", "Q: ")


@torch.no_grad()
def seed_word_continuations(model: nn.Module, tokenizer: Any, specs: Sequence[tuple[int, int]]) -> list[str]:
    """For each ``(length, per_word)`` and each seed word, the ``per_word`` best continuations of ``length`` new
    tokens (a beam of ``per_word``; 1: greedy), decoded with the seed word. Call it outside any editor scope: the
    unedited model writes them."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for length, per_word in specs:
        for word in SEED_WORDS:
            ids = torch.tensor([tokenizer(word).input_ids], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 num_beams=int(per_word), num_return_sequences=int(per_word),
                                 max_new_tokens=int(length), pad_token_id=pad)
            texts += [tokenizer.decode(row, skip_special_tokens=True) for row in out]
    return texts
