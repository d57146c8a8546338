"""RTE (GLUE dev, 2,489 pairs) as Gu et al. 2024 run it: one new token, "true" means entailment."""
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

    def score(self, examples: Sequence[RTEExample], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        valid = correct = 0
        for e, o in zip(examples, outputs):
            p = o.lower()
            says_true, says_false = "true" in p, "false" in p
            if not (says_true or says_false):
                continue  # the authors' `others`
            valid += 1
            if e.label == "entailment":
                correct += says_true  # their TP
            else:
                correct += says_false  # their FN (a correct "not entailed")
        return label_accuracy(len(examples), valid, correct)
