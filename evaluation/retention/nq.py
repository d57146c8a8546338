"""Natural Questions (open, 3,610 questions with one retrieved passage each) as Gu et al. 2024 run it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import authors_texts, mean
from evaluation.retention.base import (
    check_outputs,
    data_path,
    malformed,
    read_jsonl,
    require,
)
from evaluation.retention.text import (
    authors_nq_counts,
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
    # The headline's prediction: the continuation after its last "Answer:" (the whole continuation
    # when it has none). The authors split their whole decoded string instead, see authors_item_scores.
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

    def score(self, examples: Sequence[NQExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        preds = [_prediction(o) for o in outputs]
        n = len(examples)
        rate = mean(r["score"] for r in rows)
        return rate, {
            "span_match": rate,
            "exact_match": mean(r["standard"] for r in rows),
            "authors_score": mean(r["authors"] for r in rows),  # their exact_match_count / 3610
            "mean_output_words": mean(len(normalize_answer(p).split()) for p in preds),
            "n_items": float(n),
            "n_correct": float(sum(r["score"] for r in rows)),
        }

    def item_scores(self, examples: Sequence[NQExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """``authors`` is what the item adds to their count: 0, 1 or more, and it depends on the items
        before it (their loop's ``flag``), so rows must come in file order, from the file's first item."""
        check_outputs(self.name, len(examples), outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        rows = []
        for e, o, a in zip(examples, outputs, authors):
            p = _prediction(o)
            rows.append({"score": float(contains_answer_span(p, e.answers)), "authors": a,
                         "standard": float(exact_match_any(p, e.answers)), "reference": list(e.answers),
                         "prediction": p})
        return rows


def authors_item_scores(examples: Sequence[NQExample], texts: Sequence[str]) -> list[float]:
    """test-OpenDomainQA(-after).py per item, in file order: what each adds to their count.

    Their prediction is ``text.split("Answer:")[-1].replace("\n", " ")`` on the whole decoded string.
    The prompt holds no "Answer:" (no passage or question does), so when the continuation has none
    either, their prediction is pad + prompt + continuation and the span search runs over the passage
    and question too (a gold answer in the passage counts). Their loop's bugs are replayed
    (:func:`authors_nq_counts`): double counts, and a ``flag`` never reset between items.
    """
    preds = [text.split("Answer:")[-1].replace("\n", " ") for text in texts]  # their decoded strings
    return [float(c) for c in authors_nq_counts(preds, [e.answers for e in examples])]
