"""SST-2 (GLUE dev, 872 sentences) as Gu et al. 2024 run it: one new token, positive/negative."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from evaluation.retention.base import (
    check_outputs,
    data_path,
    label_accuracy,
    malformed,
    read_tsv,
)


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

    def score(self, examples: Sequence[SST2Example], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        valid = correct = 0
        for e, o in zip(examples, outputs):
            p = o.lower()
            pos, neg = "positive" in p, "negative" in p
            if not (pos or neg):
                continue  # the authors' `others`
            valid += 1
            correct += (pos and e.label == 1) or (neg and e.label == 0)  # their TP + FN
        return label_accuracy(len(examples), valid, correct)
