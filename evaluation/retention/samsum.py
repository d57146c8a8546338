"""SAMSum (test, 818 dialogues) as Gu et al. 2024 run it: "TL;DR:" and 25 new tokens, ROUGE."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from evaluation.retention.base import check_outputs, data_path, malformed, require

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class SAMSumExample:
    id: str
    dialogue: str  # verbatim, "\r\n" line ends kept
    summary: str


def _scorer():
    from rouge_score import rouge_scorer  # imported lazily: nltk import is slow

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


@dataclass
class SAMSum:
    name: str = "samsum"
    max_new_tokens: int = 25
    files: tuple[str, ...] = ("test-summarization.json",)

    def load(self, data_dir: str, limit: int | None = None) -> list[SAMSumExample]:
        path = data_path(data_dir, self.files[0])
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise malformed(path, f"line {e.lineno}", f"not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise malformed(path, "top level", "expected a JSON list of records")
        out = []
        for i, rec in enumerate(data[:limit] if limit is not None else data):
            where = f"record {i}"
            if not isinstance(rec, dict):
                raise malformed(path, where, "expected a JSON object")
            out.append(SAMSumExample(str(rec.get("id", i)), require(rec, "dialogue", str, path, where),
                                     require(rec, "summary", str, path, where)))
        return out

    def prompts(self, examples: Sequence[SAMSumExample]) -> list[str]:
        return [f"{e.dialogue}\nTL;DR:" for e in examples]

    def score(self, examples: Sequence[SAMSumExample], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        scorer = _scorer()
        sums = dict.fromkeys(ROUGE_TYPES, 0.0)
        total = 0.0
        empty = 0
        for e, o in zip(examples, outputs):
            # The authors keep the text after the last "DR:" and then cut 13 characters, the
            # "<|endoftext|>" that GPT-2's decode leaves in; the generator here already skips
            # special tokens, so nothing is cut. An output with nothing in it scores 0 (their
            # `len(predict) <= 1` guard, taken on the stripped text).
            p = o.split("DR:")[-1]
            if not p.strip():
                empty += 1
                continue
            s = scorer.score(e.summary, p)
            f = {k: s[k].fmeasure for k in ROUGE_TYPES}
            for k in ROUGE_TYPES:
                sums[k] += f[k]
            total += sum(f.values()) / len(ROUGE_TYPES)
        n = len(examples)
        mean = total / n if n else 0.0
        details = {"rouge_mean": mean}
        details.update({k: v / n if n else 0.0 for k, v in sums.items()})
        details.update({"n_items": float(n), "n_empty": float(empty)})
        return mean, details
