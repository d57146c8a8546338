"""SST-2 (GLUE dev, 872 sentences) as Gu et al. 2024 run it: one new token, positive/negative."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import authors_texts, mean
from evaluation.retention.base import (
    check_outputs,
    data_path,
    label_accuracy,
    malformed,
    read_tsv,
)

LABELS = {0: "negative", 1: "positive"}


@dataclass(frozen=True)
class SST2Example:
    sentence: str  # verbatim, trailing space included (it is in their prompt)
    label: int  # 1 positive, 0 negative


@dataclass
class SST2:
    name: str = "sst2"
    max_new_tokens: int = 1
    files: tuple[str, ...] = ("test-SentimentAnalysis.tsv",)

    def load(self, data_dir: str, limit: int | None = None) -> list[SST2Example]:
        path = data_path(data_dir, self.files[0])
        out = []
        for lineno, row in read_tsv(path, ("sentence", "label"), limit):
            if row[1].strip() not in ("0", "1"):
                raise malformed(path, f"line {lineno}", f"label {row[1]!r} is not 0 or 1")
            out.append(SST2Example(row[0], int(row[1])))
        return out

    def prompts(self, examples: Sequence[SST2Example]) -> list[str]:
        return [f"For each snippet of text,label the sentiment of the text as positive or negative.The answer should "
                f"be exact 'positive' or 'negative'. text: {e.sentence} answer:" for e in examples]

    def score(self, examples: Sequence[SST2Example], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        valid = sum(_judge(e.label, o.lower())[0] for e, o in zip(examples, outputs))
        headline, details = label_accuracy(len(examples), valid, int(sum(r["score"] for r in rows)))
        details["authors_score"] = mean(r["authors"] for r in rows)  # their total_accuracy
        return headline, details

    def item_scores(self, examples: Sequence[SST2Example], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        check_outputs(self.name, len(examples), outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        return [{"score": float(_judge(e.label, o.lower())[1]), "authors": a, "standard": None,
                 "reference": LABELS[e.label], "prediction": o.lower()}
                for e, o, a in zip(examples, outputs, authors)]


def _judge(label: int, p: str) -> tuple[bool, bool]:
    """(valid, correct) of a lower-cased output, case-insensitive substring tests as theirs."""
    pos, neg = "positive" in p, "negative" in p
    if not (pos or neg):
        return False, False  # the authors' `others`
    return True, (pos and label == 1) or (neg and label == 0)  # their TP + FN


def authors_item_scores(examples: Sequence[SST2Example], texts: Sequence[str]) -> list[float]:
    """test-SentimentAnalysis(-after).py per item: 1 when it lands in their TP or FN. Their prediction is
    ``text.split("answer:")[-1]``, the one new token (the prompt ends with the marker). Their if/elif
    chain counts each valid item once, so their total_accuracy is the mean of these. ``texts``: their decoded
    strings (authors_texts)."""
    out = []
    for e, text in zip(examples, texts):
        pred = text.split("answer:")[-1].lower()
        if "positive" in pred and e.label == 1:
            out.append(1.0)  # TP
        elif "negative" in pred and e.label == 0:
            out.append(1.0)  # FN: a correct "negative"
        else:
            out.append(0.0)  # TN, FP or others
    return out
