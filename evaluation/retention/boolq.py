"""BoolQ (dev, 3,267 questions) as Gu et al. 2024 run it: one new token, exact yes/no."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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

    def score(self, examples: Sequence[BoolQExample], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        valid = correct = 0
        for e, o in zip(examples, outputs):
            # The authors: predict.lower() == ' yes' / ' no' on the text after "answer:", i.e. the one
            # new token with its leading space. The generator returns the new text only, and
            # SentencePiece tokenizers drop that space when decoding a lone token, so compare stripped.
            p = o.strip().lower()
            if p not in ("yes", "no"):
                continue
            valid += 1
            correct += (p == "yes") == e.answer
        return label_accuracy(len(examples), valid, correct)
