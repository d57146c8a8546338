"""MuTual (dev, 886 dialogues, one JSON object per file) as Gu et al. 2024 run it."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Sequence

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

    def score(self, examples: Sequence[MuTualExample], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(examples), outputs)
        valid = correct = 0
        for e, o in zip(examples, outputs):
            p = o.split("the answer is")[-1]
            # Case-sensitive, as theirs. Their post-edit script also sends a " Chi" token (the model
            # copying "Chioces") to `other` before the letter test, since it contains "C".
            if "Chi" in p or not any(letter in p for letter in LETTERS):
                continue
            valid += 1
            correct += e.answer in p
        return label_accuracy(len(examples), valid, correct)
