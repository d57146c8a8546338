"""CoNLL-2003 NER (English dev, 3,250 sentences) as Gu et al. 2024 run it: one prompt per sentence
and entity type, 10 new tokens, a gold entity counts as found when its string is in the output."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from evaluation.retention.base import check_outputs, data_path, malformed
from evaluation.retention.text import split_entity_list

# (tag, the word in the prompt), in the order the authors prompt them.
TYPES = (("PER", "Person"), ("LOC", "Location"), ("ORG", "Organization"), ("MISC", "Miscellaneous"))
_LABEL = re.compile(r"O|[BI]-(PER|LOC|ORG|MISC)")


@dataclass(frozen=True)
class CoNLLExample:
    words: tuple[str, ...]
    labels: tuple[str, ...]  # IOB2 NER tags
    line: int  # line number of the sentence's first word


def authors_sentence(words: Sequence[str]) -> str:
    """The authors' detokenisation: "," and "." attach to the previous word, everything else gets
    a space before it; then the leading character is dropped (``sentence[1:]``)."""
    s = ""
    for w in words:
        s = s + w if w in (",", ".") else s + " " + w
    return s[1:]


def authors_entities(words: Sequence[str], labels: Sequence[str], tag: str) -> list[str]:
    """Their gold entity strings for ``tag``, replayed exactly: from each ``B-tag`` up to (not
    including) the next ``O`` label, whatever the labels in between. Quirks kept: adjacent
    entities with no ``O`` between them merge; when no ``O`` follows, the last word of the sentence
    is left out (and an entity on the last word alone becomes the empty string)."""
    out = []
    n = len(labels)
    k = 0
    while k < n:
        if labels[k] == "B-" + tag:
            m = k
            for m in range(k, n):
                if labels[m] == "O":
                    break
            out.append(" ".join(words[k:m]))
            k = m
        k += 1
    return out


def iob_chunks(words: Sequence[str], labels: Sequence[str], tag: str) -> list[str]:
    """Standard entity spans of type ``tag`` (CoNLL/seqeval semantics: ``B-X`` or an ``I-X`` not
    continuing an ``X`` span starts one; ``I-X`` continues), as space-joined strings."""
    out: list[list[str]] = []
    prev = "O"
    for w, lab in zip(words, labels):
        if lab == "B-" + tag or (lab == "I-" + tag and prev[2:] != tag):
            out.append([w])
        elif lab == "I-" + tag:
            out[-1].append(w)
        prev = lab
    return [" ".join(c) for c in out]


@dataclass
class CoNLL03:
    name: str = "conll03"
    max_new_tokens: int = 10
    files: tuple[str, ...] = ("test-NER.txt",)

    def load(self, data_dir: str, limit: int | None = None) -> list[CoNLLExample]:
        """Sentences in file order. ``-DOCSTART-`` lines are document separators, not sentences
        (the authors' reader kept each as a one-word sentence and prompted it; see docs)."""
        path = data_path(data_dir, self.files[0])
        out: list[CoNLLExample] = []
        words: list[str] = []
        labels: list[str] = []
        start = 0

        def flush() -> None:
            nonlocal words, labels
            if words:
                out.append(CoNLLExample(tuple(words), tuple(labels), start))
            words, labels = [], []

        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if limit is not None and len(out) >= limit:
                    break
                line = line.strip()
                if not line:
                    flush()
                    continue
                fields = line.split()
                if len(fields) != 4:
                    raise malformed(path, f"line {lineno}", f"expected 'word POS chunk NER', got {len(fields)} fields")
                if fields[0] == "-DOCSTART-":
                    flush()
                    continue
                if not _LABEL.fullmatch(fields[3]):
                    raise malformed(path, f"line {lineno}", f"unknown NER tag {fields[3]!r}")
                if not words:
                    start = lineno
                words.append(fields[0])
                labels.append(fields[3])
            else:
                flush()
        return out[:limit] if limit is not None else out

    def prompts(self, examples: Sequence[CoNLLExample]) -> list[str]:
        return [f"Please identify {word} Entity from the given text. Text: {authors_sentence(e.words)} Entity:"
                for e in examples for _, word in TYPES]

    def score(self, examples: Sequence[CoNLLExample], outputs: Sequence[str]) -> tuple[float, dict[str, float]]:
        check_outputs(self.name, len(TYPES) * len(examples), outputs)
        details: dict[str, float] = {}
        hit_rates, recalls = [], []
        tp_all = pred_all = gold_all = 0
        for t, (tag, _) in enumerate(TYPES):
            count = total = 0  # the authors' counters
            found = n_gold = 0  # plain recall over standard spans
            tp = n_pred = 0
            for i, e in enumerate(examples):
                o = outputs[len(TYPES) * i + t]
                ents = authors_entities(e.words, e.labels, tag)
                if not ents and len(o) == 0:
                    count += 1
                    total += 1
                elif ents:
                    total += len(ents)
                elif tag == "MISC":
                    total += 1  # their MISC branch; the PER/LOC/ORG copies test len(x)==0 and len(x)!=0
                count += sum(ent in o for ent in ents)

                gold = iob_chunks(e.words, e.labels, tag)
                n_gold += len(gold)
                found += sum(g in o for g in gold)
                pred = split_entity_list(o)
                n_pred += len(pred)
                tp += sum((Counter(gold) & Counter(pred)).values())
            if total:
                details[f"hit_rate_{tag}"] = count / total
                hit_rates.append(count / total)
            if n_gold:
                details[f"recall_{tag}"] = found / n_gold
                recalls.append(found / n_gold)
            p = tp / n_pred if n_pred else 0.0
            r = tp / n_gold if n_gold else 0.0
            details[f"entity_f1_{tag}"] = 2 * p * r / (p + r) if p + r else 0.0
            details[f"n_gold_{tag}"] = float(n_gold)
            tp_all, pred_all, gold_all = tp_all + tp, pred_all + n_pred, gold_all + n_gold
        hit_rate = sum(hit_rates) / len(hit_rates) if hit_rates else 0.0
        p = tp_all / pred_all if pred_all else 0.0
        r = tp_all / gold_all if gold_all else 0.0
        details.update({
            "hit_rate": hit_rate,
            "recall_macro": sum(recalls) / len(recalls) if recalls else 0.0,
            "entity_precision": p,
            "entity_recall": r,
            "entity_f1": 2 * p * r / (p + r) if p + r else 0.0,
            "n_items": float(len(examples)),
            "n_prompts": float(len(outputs)),
            "n_gold": float(gold_all),
            "n_predicted": float(pred_all),
        })
        return hit_rate, details
