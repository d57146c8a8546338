"""SAMSum (test, 818 dialogues) as Gu et al. 2024 run it: "TL;DR:" and 25 new tokens, ROUGE."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import EOT, authors_texts, mean
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


def _authors_rouge():
    from rouge import Rouge  # pltrdy's `rouge`, the authors' package

    return Rouge()


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

    def score(self, examples: Sequence[SAMSumExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        per_type = _rouge_score_rows(examples, outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        n = len(examples)
        mean_f = mean(sum(f.values()) / len(ROUGE_TYPES) for f in per_type)
        details = {"rouge_mean": mean_f}
        details.update({k: mean(f[k] for f in per_type) for k in ROUGE_TYPES})
        details.update({"authors_score": mean(authors), "n_items": float(n),
                        "n_empty": float(sum(not o.split("DR:")[-1].strip() for o in outputs))})
        return mean_f, details

    def item_scores(self, examples: Sequence[SAMSumExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        check_outputs(self.name, len(examples), outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        rows = []
        for e, o, f, a in zip(examples, outputs, _rouge_score_rows(examples, outputs), authors):
            s = sum(f.values()) / len(ROUGE_TYPES)
            # the headline is rouge-score's mean F
            rows.append({"score": s, "authors": a, "standard": s, "reference": e.summary,
                         "prediction": o.split("DR:")[-1]})
        return rows


def _rouge_score_rows(examples: Sequence[SAMSumExample], outputs: Sequence[str]) -> list[dict[str, float]]:
    """Per item, rouge-score's F of rouge1/rouge2/rougeL on the text after the last "DR:" (as theirs),
    uncut: the generator already skips special tokens. An output with nothing in it scores 0 (their
    `len(predict) <= 1` guard, taken on the stripped text)."""
    scorer = _scorer()
    rows = []
    for e, o in zip(examples, outputs):
        p = o.split("DR:")[-1]
        if not p.strip():
            rows.append(dict.fromkeys(ROUGE_TYPES, 0.0))
            continue
        s = scorer.score(e.summary, p)
        rows.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return rows


def authors_item_scores(examples: Sequence[SAMSumExample], texts: Sequence[str]) -> list[float]:
    """test-summarization(-after).py per item: (ROUGE-1 F + ROUGE-2 F + ROUGE-L F) / 3 from pltrdy's
    ``Rouge().get_scores(predict, summary)`` (case- and punctuation-sensitive whitespace tokens,
    sentences split on ".", summary-level ROUGE-L), on ``predict = text.split("DR:")[-1][:-13]``.

    The cut of 13 characters always happens: it removes "<|endoftext|>" when the model stopped at its end
    token (their string, ``texts`` from authors_texts, ends with it) and real text when it ran the 25
    tokens. A prediction of at most 1 character scores 0 (their guard). One whose every
    sentence is empty (only full stops) makes pltrdy raise, which would have stopped their run: 0 here.
    """
    rouge = _authors_rouge()
    out = []
    for e, text in zip(examples, texts):
        pred = text.split("DR:")[-1][:-len(EOT)]
        if len(pred) <= 1:
            out.append(0.0)
            continue
        try:
            sc = rouge.get_scores(pred, e.summary)[0]
        except ValueError:  # "Hypothesis is empty."
            out.append(0.0)
            continue
        out.append((sc["rouge-1"]["f"] + sc["rouge-2"]["f"] + sc["rouge-l"]["f"]) / 3)
    return out
