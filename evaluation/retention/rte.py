"""RTE (GLUE dev, 2,489 pairs) as Gu et al. 2024 run it: one new token, "true" means entailment."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import authors_texts
from evaluation.retention.base import (
    check_outputs,
    data_path,
    label_accuracy,
    malformed,
    read_tsv,
)

LABELS = ("entailment", "not_entailment")


@dataclass(frozen=True)
class RTEExample:
    sentence1: str
    sentence2: str
    label: str  # "entailment" | "not_entailment"


@dataclass
class RTE:
    name: str = "rte"
    max_new_tokens: int = 1
    files: tuple[str, ...] = ("test-NLI.tsv",)

    def load(self, data_dir: str, limit: int | None = None) -> list[RTEExample]:
        path = data_path(data_dir, self.files[0])
        out = []
        for lineno, row in read_tsv(path, ("index", "sentence1", "sentence2", "label"), limit):
            if row[3] not in LABELS:
                raise malformed(path, f"line {lineno}", f"label {row[3]!r} is not one of {LABELS}")
            out.append(RTEExample(row[1], row[2], row[3]))
        return out

    def prompts(self, examples: Sequence[RTEExample]) -> list[str]:
        return [f"{e.sentence1} entails the {e.sentence2}. True or False? answer:" for e in examples]

    def score(self, examples: Sequence[RTEExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        valid = sum(_judge(e.label, o.lower())[0] for e, o in zip(examples, outputs))
        headline, details = label_accuracy(len(examples), valid, int(sum(r["score"] for r in rows)))
        # their total_accuracy = (TP + FN) / (TP + FN + TN + FP + others)
        den = sum(r["authors_denominator"] for r in rows)
        details["authors_score"] = sum(r["authors"] for r in rows) / den if den else 0.0
        return headline, details

    def item_scores(self, examples: Sequence[RTEExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """Rows add ``authors_denominator``: the row's count in their denominator (2 when the output holds
        both words); ``authors_score`` is sum(authors) / sum(authors_denominator)."""
        check_outputs(self.name, len(examples), outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        return [{"score": float(_judge(e.label, o.lower())[1]), "authors": num, "authors_denominator": den,
                 "standard": None, "reference": e.label, "prediction": o.lower()}
                for e, o, (num, den) in zip(examples, outputs, authors)]


def _judge(label: str, p: str) -> tuple[bool, bool]:
    """(valid, correct) of a lower-cased output: case-insensitive substring tests, as theirs; correct =
    `true` on an entailment pair (their TP) or `false` on a not_entailment pair (their FN)."""
    says_true, says_false = "true" in p, "false" in p
    if not (says_true or says_false):
        return False, False  # the authors' `others`
    return True, says_true if label == "entailment" else says_false


def authors_item_scores(examples: Sequence[RTEExample], texts: Sequence[str]) -> list[tuple[float, float]]:
    """test-NLI(-after).py per item: (its count in TP + FN, its count in TP + FN + TN + FP + others).

    Their prediction is ``text.split("answer:")[-1]``: the prompt ends with the marker and one new token
    cannot hold it, so that is the continuation (or ``<|endoftext|>``, which holds neither word). Their
    two independent ``if``s count an output holding both words twice (TP and TN, or FP and FN)."""
    out = []
    for e, text in zip(examples, texts):  # their decoded strings (authors_texts)
        pred = text.split("answer:")[-1].lower()
        t, f = "true" in pred, "false" in pred
        if not (t or f):
            out.append((0.0, 1.0))  # others
        else:
            out.append((float(t if e.label == "entailment" else f), float(t + f)))
    return out
