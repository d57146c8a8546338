"""MuTual (dev, 886 dialogues, one JSON object per file) as Gu et al. 2024 run it."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import authors_texts, mean
from evaluation.retention.base import (
    check_outputs,
    data_path,
    label_accuracy,
    malformed,
    require,
)

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MuTualExample:
    id: str
    article: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"


def _files(folder: str) -> list[str]:
    """dev_1.txt, dev_2.txt, ... in numeric order (the authors loop i = 1..886)."""
    names = []
    for name in os.listdir(folder):
        m = re.fullmatch(r"dev_(\d+)\.txt", name)
        if m:
            names.append((int(m.group(1)), name))
    return [os.path.join(folder, n) for _, n in sorted(names)]


@dataclass
class MuTual:
    name: str = "mutual"
    max_new_tokens: int = 1
    files: tuple[str, ...] = ("test-dialogue",)

    def load(self, data_dir: str, limit: int | None = None) -> list[MuTualExample]:
        folder = data_path(data_dir, self.files[0])
        paths = _files(folder)
        if not paths:
            raise malformed(folder, "folder", "holds no dev_<n>.txt files")
        out = []
        for path in paths[:limit] if limit is not None else paths:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise malformed(path, "record 1", f"not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise malformed(path, "record 1", "expected a JSON object")
            answer = require(rec, "answers", str, path, "record 1")
            options = require(rec, "options", list, path, "record 1")
            article = require(rec, "article", str, path, "record 1")
            if answer not in LETTERS:
                raise malformed(path, "record 1", f"field 'answers' should be one of A-D, got {answer!r}")
            if len(options) != 4 or not all(isinstance(o, str) for o in options):
                raise malformed(path, "record 1", "field 'options' should hold four strings")
            out.append(MuTualExample(str(rec.get("id", os.path.basename(path))), article, tuple(options), answer))
        return out

    def prompts(self, examples: Sequence[MuTualExample]) -> list[str]:
        return [f"Q: {e.article} Which choice is correct? Answer Chioces: (A){e.options[0]}(B){e.options[1]}"
                f"(C){e.options[2]}(D){e.options[3]} A: Among A through D, the answer is" for e in examples]

    def score(self, examples: Sequence[MuTualExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        valid = sum(_judge(e.answer, o)[0] for e, o in zip(examples, outputs))
        headline, details = label_accuracy(len(examples), valid, int(sum(r["score"] for r in rows)))
        details["authors_score"] = mean(r["authors"] for r in rows)  # after-edit script: correct / 886
        details["authors_score_before"] = mean(r["authors_before"] for r in rows)  # unedited script's
        return headline, details

    def item_scores(self, examples: Sequence[MuTualExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """Rows add ``authors_before``: the unedited-model script's test, without the "Chi" rule."""
        check_outputs(self.name, len(examples), outputs)
        after, before = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        return [{"score": float(_judge(e.answer, o)[1]), "authors": a, "authors_before": b, "standard": None,
                 "reference": e.answer, "prediction": o.split("the answer is")[-1]}
                for e, o, a, b in zip(examples, outputs, after, before)]


def _judge(answer: str, output: str) -> tuple[bool, bool]:
    """(valid, correct). Case-sensitive, as theirs. Their post-edit script also sends a " Chi" token
    (the model copying "Chioces") to `other` before the letter test, since it contains "C"."""
    p = output.split("the answer is")[-1]
    if "Chi" in p or not any(letter in p for letter in LETTERS):
        return False, False
    return True, answer in p


def authors_item_scores(examples: Sequence[MuTualExample], texts: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per item, 1 when their ``correct`` counts it, under (after, before) = test-dialogue-after.py and
    test-dialogue.py. Their prediction is ``text.split("the answer is")[-1]``: the prompt ends with the
    marker, so that is the one new token (or ``<|endoftext|>``, which holds no capital A-D). Only the
    after-edit script sends an output holding "Chi" to `other` first."""
    after, before = [], []
    for e, text in zip(examples, texts):  # their decoded strings (authors_texts)
        pred = text.split("the answer is")[-1]
        hit = any(letter in pred for letter in LETTERS) and e.answer in pred
        before.append(float(hit))
        after.append(float(hit and "Chi" not in pred))
    return after, before
