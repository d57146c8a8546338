"""GSM8K (test, 1,319 problems) as Gu et al. 2024 run it: the gold rationale is given in the
prompt and the model only has to state the final number."""
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

MARKER = "Therefore, the answer (arabic numerals) is:"


@dataclass(frozen=True)
class GSM8KExample:
    question: str
    rationale: str  # the answer text before "#### ", trailing newline kept (it is in their prompt)
    answer: str  # the text after "#### ", verbatim (may contain thousands commas, e.g. "2,125")


@dataclass
class GSM8K:
    name: str = "gsm8k"
    max_new_tokens: int = 5
    files: tuple[str, ...] = ("test-reasoning.jsonl",)

    def load(self, data_dir: str, limit: int | None = None) -> list[GSM8KExample]:
        path = data_path(data_dir, self.files[0])
        out = []
        for lineno, rec in read_jsonl(path, limit):
            where = f"line {lineno}"
            question = require(rec, "question", str, path, where)
            answer = require(rec, "answer", str, path, where)
            parts = answer.split("#### ")
            if len(parts) < 2 or not parts[1].strip():
                raise malformed(path, where, "field 'answer' has no '#### N' final answer")
            out.append(GSM8KExample(question, parts[0], parts[1]))
        return out

    def prompts(self, examples: Sequence[GSM8KExample]) -> list[str]:
        return [f"Q: {e.question} A:Let's think step by step. {e.rationale} Therefore, the answer (arabic numerals) is:"
                for e in examples]

    def score(self, examples: Sequence[GSM8KExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        # The authors: `if answers in predict` -- the gold string is a substring of the output.
        rate = mean(r["score"] for r in rows)
        with_digit = sum(any(c.isdigit() for c in o) for o in outputs)
        n = len(examples)
        return rate, {
            "solve_rate": rate,
            # beside it, the same test with thousands separators removed from both sides
            "solve_rate_commas_ignored": mean(r["standard"] for r in rows),
            "authors_score": mean(r["authors"] for r in rows),
            "n_items": float(n),
            "n_correct": float(sum(r["score"] for r in rows)),
            "n_with_digit": float(with_digit),
        }

    def item_scores(self, examples: Sequence[GSM8KExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        check_outputs(self.name, len(examples), outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        return [{"score": float(e.answer in o),
                 "authors": a,
                 "standard": float(e.answer.replace(",", "") in o.replace(",", "")),
                 "reference": e.answer, "prediction": o}
                for e, o, a in zip(examples, outputs, authors)]


def authors_item_scores(examples: Sequence[GSM8KExample], texts: Sequence[str]) -> list[float]:
    """test-reasoning(-after).py per item: ``answers in text.split(MARKER)[1]``. The marker occurs once in
    their string (no question or rationale holds it, and 5 new tokens cannot repeat it), so the split
    gives the continuation: equal to the headline's test on every output but for the decode clean-up."""
    return [float(e.answer in text.split(MARKER)[1]) for e, text in zip(examples, texts)]  # authors_texts
