"""Natural Questions (open, 3,610 questions with one retrieved passage each) as Gu et al. 2024 run it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from evaluation.retention.base import (
    check_outputs,
    data_path,
    malformed,
    read_jsonl,
    require,
)
from evaluation.retention.text import (
    authors_nq_loop,
    contains_answer_span,
    exact_match_any,
    normalize_answer,
)


@dataclass(frozen=True)
class NQExample:
    question: str
    passage: str  # output[0], verbatim (starts with "\n\n")
    answers: tuple[str, ...]


def _prediction(output: str) -> str:
    # The authors: Outputs[-1].split("Answer:")[-1].replace("\n", " ") on prompt + continuation; no
    # passage or question holds "Answer:", so on the continuation alone this is the same text.
    return output.split("Answer:")[-1].replace("\n", " ")


@dataclass
class NQ:
    name: str = "nq"
    max_new_tokens: int = 20
    files: tuple[str, ...] = ("test-OpenDomainQA.jsonl",)

    def load(self, data_dir: str, limit: int | None = None) -> list[NQExample]:
        path = data_path(data_dir, self.files[0])
        out = []
        for lineno, rec in read_jsonl(path, limit):
            where = f"line {lineno}"
            question = require(rec, "question", str, path, where)
            answers = require(rec, "answer", list, path, where)
            passages = require(rec, "output", list, path, where)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise malformed(path, where, "field 'answer' should be a non-empty list of strings")
            if not passages or not isinstance(passages[0], str):
                raise malformed(path, where, "field 'output' should be a list holding the passage string")
            out.append(NQExample(question, passages[0], tuple(answers)))
        return out

    def prompts(self, examples: Sequence[NQExample]) -> list[str]:
        return [f"Refer to the passage below and answer the following question. Passage: {e.passage} "
                f"Question: {e.question}" for e in examples]

    def score(self, examples: Sequence[NQExample], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        preds = [_prediction(o) for o in outputs]
        golds = [e.answers for e in examples]
        hits = sum(contains_answer_span(p, g) for p, g in zip(preds, golds))
        exact = sum(exact_match_any(p, g) for p, g in zip(preds, golds))
        n = len(examples)
        rate = hits / n if n else 0.0
        return rate, {
            "span_match": rate,
            "exact_match": exact / n if n else 0.0,
            "authors_loop_rate": authors_nq_loop(preds, golds) / n if n else 0.0,
            "mean_output_words": sum(len(normalize_answer(p).split()) for p in preds) / n if n else 0.0,
            "n_items": float(n),
            "n_correct": float(hits),
        }
