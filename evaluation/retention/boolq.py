"""BoolQ (dev, 3,267 questions) as Gu et al. 2024 run it: one new token, exact yes/no."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import authors_texts, mean
from evaluation.retention.base import (
    check_outputs,
    data_path,
    label_accuracy,
    read_jsonl,
    require,
)


@dataclass(frozen=True)
class BoolQExample:
    question: str
    passage: str
    answer: bool


@dataclass
class BoolQ:
    name: str = "boolq"
    max_new_tokens: int = 1
    files: tuple[str, ...] = ("test-ClosedDomainQA.jsonl",)

    def load(self, data_dir: str, limit: int | None = None) -> list[BoolQExample]:
        path = data_path(data_dir, self.files[0])
        out = []
        for lineno, rec in read_jsonl(path, limit):
            where = f"line {lineno}"
            out.append(BoolQExample(require(rec, "question", str, path, where),
                                    require(rec, "passage", str, path, where),
                                    require(rec, "answer", bool, path, where)))
        return out

    def prompts(self, examples: Sequence[BoolQExample]) -> list[str]:
        return [f"Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. "
                f"passage: {e.passage} question: {e.question}. answer:" for e in examples]

    def score(self, examples: Sequence[BoolQExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        valid = sum(_judge(e.answer, o)[0] for e, o in zip(examples, outputs))
        headline, details = label_accuracy(len(examples), valid, int(sum(r["score"] for r in rows)))
        details["authors_score"] = mean(r["authors"] for r in rows)  # after-edit script's total_accuracy
        details["authors_score_before"] = mean(r["authors_before"] for r in rows)  # unedited script's
        return headline, details

    def item_scores(self, examples: Sequence[BoolQExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """Rows add ``authors_before``: the unedited-model script's exact test (see authors_item_scores)."""
        check_outputs(self.name, len(examples), outputs)
        after, before = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        return [{"score": float(_judge(e.answer, o)[1]), "authors": a, "authors_before": b, "standard": None,
                 "reference": "yes" if e.answer else "no", "prediction": o.strip().lower()}
                for e, o, a, b in zip(examples, outputs, after, before)]


def _judge(answer: bool, output: str) -> tuple[bool, bool]:
    """(valid, correct). The authors' unedited-model script: predict.lower() == ' yes' / ' no' on the text
    after "answer:", i.e. the one new token with its leading space. The generator returns the new text
    only, and SentencePiece tokenizers drop that space when decoding a lone token, so compare stripped."""
    p = output.strip().lower()
    if p not in ("yes", "no"):
        return False, False
    return True, (p == "yes") == answer


def authors_item_scores(examples: Sequence[BoolQExample], texts: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per item, 1 when it lands in their TP or FN, under (after, before) = the two scripts' tests.

    Their prediction is ``text.split("answer:")[1]``: the first "answer:" in their string is the
    prompt's last words (no passage or question holds it), so that is the one new token, with its
    leading space when GPT-2 produced one (or ``<|endoftext|>``, which passes neither test).
    test-ClosedDomainQA-after.py tests substrings, ``'yes' in predict.lower()`` / ``'no' in ...``, so
    " Yes", "yes", " not", " None" or " know" all count; test-ClosedDomainQA.py (unedited model)
    tests equality, ``predict.lower() == ' yes'`` / ``' no'``, so "yes" without the space is invalid.
    Both if/elif chains count each valid item once (an output holding both words is correct either way).
    """
    after, before = [], []
    for e, text in zip(examples, texts):  # their decoded strings (authors_texts)
        pred = text.split("answer:")[1].lower()
        after.append(float(("yes" in pred and e.answer) or ("no" in pred and not e.answer)))
        before.append(float((pred == " yes" and e.answer) or (pred == " no" and not e.answer)))
    return after, before
