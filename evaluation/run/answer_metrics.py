"""Edit metrics from the model's own answers: generated, cut by the stop rule, compared with the target.

:class:`AnswerScorer` generates answers through an editor (routed at the last prompt token, as every
generation here is) with the settings of an :class:`~evaluation.editing.answers.AnswerReading`, batched
like the retention generator. :func:`base_locality_answers` gives the unedited model's answers to the
locality prompts (the reference the edited answers must equal), kept across runs by
:class:`AnswerCache`. The metrics themselves are computed beside the teacher-forced ones in
:func:`evaluation.run.metrics.evaluate_edits`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from data.requests import EditRequest
from evaluation.common.evaluation_parts import EvaluationParts
from evaluation.common.list_cache import SealedListCache, digest_of
from evaluation.editing.answers import AnswerReading
from evaluation.editing.editor import Editor
from evaluation.editing.generation import (
    CONTINUATIONS,
    PRUNE_EVERY,
    Continuation,
    generate_continuations,
)
from evaluation.run.metrics import first_occurrences, locality_inputs, split_rows

#: the unedited model's locality answers: one tuple per request, one answer per locality probe


@dataclass(frozen=True)
class Answer:
    """One prompt's generated answer: the continuation and the answer the stop rule cut from it."""

    continuation: Continuation
    answer: str


BaseAnswers = Sequence[tuple[Answer, ...]]

class AnswerScorer:
    """Generates answers through an editor's model under ``reading``, in batches of at most ``batch_size``
    rows and ``token_budget`` padded prompt tokens."""

    def __init__(self, reading: AnswerReading, batch_size: int = 32, token_budget: int | None = None,
                 prune_every: int | None = PRUNE_EVERY) -> None:
        self.reading, self.batch_size, self.token_budget = reading, batch_size, token_budget
        self.prune_every = prune_every  # rows that have ended leave their batch (None: kept to its end)

    def answers(self, editor: Editor, prompts: Sequence[str], desc: str | None = None,
                parts: EvaluationParts | None = None) -> list[Answer]:
        """Each prompt's answer (the prompt put in the reading's context first). ``parts``: batches saved before
        are read from there, and those generated are saved there (evaluation.common.evaluation_parts)."""
        inputs = [self.reading.prompt(p) for p in prompts]
        record = parts.record("answers", self.batch_key(inputs), CONTINUATIONS) if parts is not None else None
        found = generate_continuations(editor.model, editor.tokenizer, inputs,
                                       self.reading.max_new_tokens, editor, self.batch_size, self.token_budget,
                                       stops=self.reading.stops, progress=desc is not None, desc=desc or "",
                                       prune_every=self.prune_every, record=record)
        return [Answer(c, self.reading.answer(c.text)) for c in found]


    def batch_key(self, inputs: Sequence[str]) -> list[Any]:
        """What a batch's answers depend on besides the model: the reading, the batches, the inputs."""
        return [list(self.reading.generation_key()), self.batch_size, self.token_budget, digest_of(list(inputs))]


class AnswerCache:
    """The unedited model's continuations of the locality prompts per (model, reading, prompt list), kept across
    runs (:class:`~evaluation.common.list_cache.SealedListCache`)."""

    def __init__(self, directory: str | Path, model_key: str) -> None:
        self.files = SealedListCache(directory, model_key, "locality-continuations", "continuations")

    @staticmethod
    def _key(reading: AnswerReading, prompts: Sequence[str]) -> list[Any]:
        return [list(reading.generation_key()), digest_of(list(prompts))]

    def path(self, reading: AnswerReading, prompts: Sequence[str]) -> Path:
        return self.files.path(self._key(reading, prompts))

    def load(self, reading: AnswerReading, prompts: Sequence[str]) -> list[Continuation] | None:
        kept = self.files.load(self._key(reading, prompts), len(prompts))
        return None if kept is None else [CONTINUATIONS.decode(c) for c in kept]

    def save(self, reading: AnswerReading, prompts: Sequence[str], continuations: Sequence[Continuation]) -> None:
        self.files.save(self._key(reading, prompts), [CONTINUATIONS.encode(c) for c in continuations])


def base_locality_answers(unedited: Editor, requests: Sequence[EditRequest], scorer: AnswerScorer,
                          cache: AnswerCache | None = None, desc: str | None = None) -> list[tuple[Answer, ...]]:
    """The unedited model's answers to each request's locality prompts (one tuple per request; each fact's
    prompts generated once and shared by its requests), read from ``cache`` where it holds them."""
    facts, at_fact = first_occurrences([r.fact for r in requests])
    held = [requests[i] for i in facts]
    prompts, _ = locality_inputs(held)
    kept = cache.load(scorer.reading, prompts) if cache is not None else None
    if kept is None:
        flat = scorer.answers(unedited, prompts, desc)
        if cache is not None:
            cache.save(scorer.reading, prompts, [a.continuation for a in flat])
    else:
        flat = [Answer(c, scorer.reading.answer(c.text)) for c in kept]
    groups = [tuple(group) for group in split_rows(flat, [len(r.locality) for r in held])]
    return [groups[j] for j in at_fact]


def answer_scoring(reading: AnswerReading, unedited: Editor, requests: Sequence[EditRequest], batch_size: int,
                   token_budget: int | None, model_key: str, progress: bool = True
                   ) -> tuple[AnswerScorer | None, list[tuple[Answer, ...]] | None]:
    """A run's scorer and the unedited model's locality answers (cached under ``reading.cache_dir`` for
    ``model_key``); (None, None) where ``reading`` is switched off."""
    if not reading.enabled:
        return None, None
    scorer = AnswerScorer(reading, batch_size, token_budget)
    cache = AnswerCache(reading.cache_dir, model_key) if reading.cache_dir else None
    return scorer, base_locality_answers(unedited, requests, scorer, cache,
                                         desc="unedited locality answers" if progress else None)
