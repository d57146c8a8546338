"""The model's own answer to an edit prompt: where it ends, how it is compared, how it is prompted.

Teacher forcing feeds the target and checks each of its tokens under argmax; it leaks the answer's
content and length (Yang et al. 2025, "The Mirage of Model Editing", arXiv 2502.11177). Here the model
generates from the prompt alone (greedy) and the answer is cut where the model stops, never at the
target's length. Each reading is a setting of :class:`AnswerReading` (``conf/answers/``):

- ``stop``: where a continuation ends (besides the end token and the ``max_new_tokens`` cap):
  ``eos`` (nowhere else), ``line`` (the first line break), ``sentence`` (the first line break or the first
  ".", "!" or "?" followed by white space or the end), each after leading white space;
  ``wild`` (the WILD paper's stop strings, "." and "\\n", anywhere, leading white space included).
- ``normalise``: ``squad`` (lower case, no punctuation, no articles a/an/the, white space folded: the
  SQuAD/NQ answer normaliser, as the WILD code uses it) or ``none`` (outer white space stripped).
- ``context``: ``none`` (the prompt as it is), ``qa_inst`` (the WILD code's
  "Please answer the question:\\n\\nQ: {prompt}\\nA:"), or any template with ``{prompt}``.

An answer is scored by exact match after normalisation and by whether the normalised target stands in
the normalised answer as a whole run of words ("contains"). No torch here.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Literal

from evaluation.common.errors import ConfigError

STOP_RULES = ("eos", "line", "sentence", "wild")
NORMALISERS = ("squad", "none")
#: named prompt templates (``context``); any other value is a template of its own
CONTEXTS = {"none": "{prompt}", "qa_inst": "Please answer the question:\n\nQ: {prompt}\nA:"}

#: why a continuation ended: the model's end token, the stop rule, or the token cap
StopReason = Literal["eos", "stop", "budget"]

_SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")
_SENTENCE_END_FINAL = re.compile(r"[.!?](?=\s|$)|\n")
_LINE_END = re.compile(r"\n")
_WILD_STOP = re.compile(r"[.\n]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def squad_normalise(text: str) -> str:
    """SQuAD's ``normalize_answer``: lower case, punctuation removed, articles removed, white space folded."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass
class AnswerReading:
    """How an answer is generated, cut and compared (one config group, ``conf/answers/``)."""

    enabled: bool = True
    stop: str = "sentence"
    max_new_tokens: int = 32
    normalise: str = "squad"
    context: str = "none"
    #: the unedited model's answers to the locality prompts, kept across runs (None: not kept)
    cache_dir: str | None = None
    #: not part of the reading: a locality prompt the editor's router leaves out of scope takes the unedited
    #: model's answer (equal bit for bit) instead of being generated again, as the retention suite does
    reuse_unedited: bool = True

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ConfigError(f"answers.stop must be one of {'|'.join(STOP_RULES)}, got {self.stop!r}")
        if self.normalise not in NORMALISERS:
            raise ConfigError(f"answers.normalise must be one of {'|'.join(NORMALISERS)}, got {self.normalise!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"answers.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if "{prompt}" not in self.template:
            raise ConfigError(f"answers.context must be one of {'|'.join(CONTEXTS)} or a template with {{prompt}}, "
                              f"got {self.context!r}")

    @property
    def template(self) -> str:
        return CONTEXTS.get(self.context, self.context)

    def prompt(self, prompt: str) -> str:
        """What the model is given: ``prompt`` in the context template."""
        return self.template.replace("{prompt}", prompt)

    def generation_key(self) -> tuple[str, int, str]:
        """The settings a generated continuation depends on (a cache of answers is keyed by them)."""
        return self.stop, self.max_new_tokens, self.template

    def cut_at(self, text: str, final: bool = True) -> int | None:
        """Where the stop rule ends ``text`` (an index into it), or None where it does not end it.

        ``final=False`` while generating: a "." at the very end of the text so far may still be "3.5"."""
        if self.stop == "eos":
            return None
        if self.stop == "wild":
            found = _WILD_STOP.search(text)
            return found.start() if found else None
        start = len(text) - len(text.lstrip())
        pattern = _LINE_END if self.stop == "line" else _SENTENCE_END_FINAL if final else _SENTENCE_END
        found = pattern.search(text, start)
        return found.start() if found else None

    def stops(self, text: str) -> bool:
        """Whether generation may stop after ``text`` (the stop rule has ended it)."""
        return self.cut_at(text, final=False) is not None

    def answer(self, continuation: str) -> str:
        """The answer in a continuation: the text before the stop, outer white space stripped."""
        cut = self.cut_at(continuation)
        return (continuation if cut is None else continuation[:cut]).strip()

    def normalised(self, text: str) -> str:
        return squad_normalise(text) if self.normalise == "squad" else text.strip()

    def exact(self, answer: str, target: str) -> bool:
        return self.normalised(answer) == self.normalised(target)

    def contains(self, answer: str, target: str) -> bool:
        """The normalised target is a whole run of words of the normalised answer (or, unnormalised, a
        substring); an empty target is never contained."""
        a, t = self.normalised(answer), self.normalised(target)
        if not t:
            return False
        return f" {t} " in f" {a} " if self.normalise == "squad" else t in a
