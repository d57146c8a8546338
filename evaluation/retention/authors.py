"""What the authors' scripts saw: the string GPT-2's ``tokenizer.decode`` gave them for one prompt.

Gu et al. 2024 decode the whole generated sequence, ``[<|endoftext|>] * k + prompt + continuation``
(left padding to 1,024 tokens with the end token as pad), with the transformers 4.x defaults of their
time: special tokens kept and ``clean_up_tokenization_spaces=True``. Each task then splits its
prediction off that string with a marker. The harness's generator returns the continuation alone,
special tokens skipped, decoded without the clean-up (transformers 5), so the authors'-code scores
rebuild their string with :func:`authors_text` (the end token added where the generator says the
model stopped at its own) before applying their tests.
"""
from __future__ import annotations

from typing import Iterable, Sequence

EOT = "<|endoftext|>"  # GPT-2's end token: their pad, and the last token when the model stopped

# transformers 4.x ``clean_up_tokenization`` (on by default in ``decode`` then): a space before
# these is dropped; it changes substring tests, e.g. a copied CoNLL entity "Queen 's Park".
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def gpt2_cleanup(text: str) -> str:
    """The space clean-up their ``tokenizer.decode`` applied, replacements in the same order."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def authors_text(prompt: str, output: str, ended: bool | None = None) -> str:
    """Their decoded string for ``prompt`` and our continuation ``output``.

    * One leading ``<|endoftext|>`` stands for the k pad tokens (k >= 1: every prompt of the suite is
      shorter than 1,024 GPT-2 tokens). Only NQ, whose prompt lacks its marker, ever reads it; there
      the k copies fuse with the prompt's first word into one word that matches no answer, as one does.
    * ``ended``: the model stopped at its end token (the generator's stop reason ``eos``). They
      generated one prompt at a time, so generation stopped there and their string ends with one
      ``<|endoftext|>`` after the text; a continuation that ran its token budget has none. This matters
      for NQ (the end token fuses with the last word) and SAMSum (their 13-character cut).
      ``None`` (outputs stored without a stop reason): inferred as before stop reasons were recorded,
      an empty continuation ended at once and a non-empty one ran its budget.
    """
    if ended is None:
        ended = not output
    return gpt2_cleanup(EOT + prompt + output + (EOT if ended else ""))


def authors_texts(prompts: Sequence[str], outputs: Sequence[str], ended: Sequence[bool] | None = None) -> list[str]:
    """:func:`authors_text` of every row; ``ended`` per row (None: inferred, see there)."""
    if ended is not None and len(ended) != len(outputs):
        raise ValueError(f"{len(ended)} stop reasons for {len(outputs)} outputs")
    flags = [None] * len(outputs) if ended is None else [bool(e) for e in ended]
    return [authors_text(p, o, e) for p, o, e in zip(prompts, outputs, flags)]


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values (a task with no items)."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0
