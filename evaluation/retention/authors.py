"""What the authors' scripts saw: the string GPT-2's ``tokenizer.decode`` gave them for one prompt.

Gu et al. 2024 decode the whole generated sequence, ``[<|endoftext|>] * k + prompt + continuation``
(left padding to 1,024 tokens with the end token as pad), with the transformers 4.x defaults of their
time: special tokens kept and ``clean_up_tokenization_spaces=True``. Each task then splits its
prediction off that string with a marker. The harness's generator returns the continuation alone,
special tokens skipped, decoded without the clean-up (transformers 5), so the authors'-code scores
rebuild their string with :func:`authors_text` before applying their tests.
"""
from __future__ import annotations

from typing import Iterable

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


def authors_text(prompt: str, output: str) -> str:
    """Their decoded string for ``prompt`` and our continuation ``output``.

    * One leading ``<|endoftext|>`` stands for the k pad tokens (k >= 1: every prompt of the suite is
      shorter than 1,024 GPT-2 tokens). Only NQ, whose prompt lacks its marker, ever reads it; there
      the k copies fuse with the prompt's first word into one word that matches no answer, as one does.
    * An empty continuation means the model ended at once: their string ends with ``<|endoftext|>``.
      A non-empty one is taken to have run to the token budget without the end token (the generator
      cannot tell us otherwise); where a model did stop early, their string had ``<|endoftext|>``
      after the text, which matters for NQ (it fuses with the last word) and SAMSum (see there).
    """
    return gpt2_cleanup(EOT + prompt + (output if output else EOT))


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values (a task with no items)."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0
