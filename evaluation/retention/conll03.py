"""CoNLL-2003 NER (English dev, 3,250 sentences) as Gu et al. 2024 run it: one prompt per sentence
and entity type, 10 new tokens, a gold entity counts as found when its string is in the output."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from evaluation.retention.authors import authors_texts, mean
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
    # -DOCSTART- lines since the previous sentence: the authors prompted each as a one-word sentence
    docstarts_before: int = 0


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
        start = docstarts = 0

        def flush() -> None:
            nonlocal words, labels, docstarts
            if words:
                out.append(CoNLLExample(tuple(words), tuple(labels), start, docstarts))
                docstarts = 0
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
                    docstarts += 1
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

    def score(self, examples: Sequence[CoNLLExample], outputs: Sequence[str],
              ended: Sequence[bool] | None = None) -> tuple[float, dict[str, float]]:
        rows = self.item_scores(examples, outputs, ended)
        details: dict[str, float] = {}
        hit_rates, recalls = [], []
        tp_all = pred_all = gold_all = 0
        for t, (tag, _) in enumerate(TYPES):
            found = n_gold = 0  # plain recall over standard spans
            tp = n_pred = 0
            for i, e in enumerate(examples):
                o = outputs[len(TYPES) * i + t]
                gold = iob_chunks(e.words, e.labels, tag)
                n_gold += len(gold)
                found += sum(g in o for g in gold)
                pred = split_entity_list(o)
                n_pred += len(pred)
                tp += sum((Counter(gold) & Counter(pred)).values())
            rate = _type_rate(rows[t::len(TYPES)], "hits", "denominator")
            if rate is not None:
                details[f"hit_rate_{tag}"] = rate
                hit_rates.append(rate)
            if n_gold:
                details[f"recall_{tag}"] = found / n_gold
                recalls.append(found / n_gold)
            p = tp / n_pred if n_pred else 0.0
            r = tp / n_gold if n_gold else 0.0
            details[f"entity_f1_{tag}"] = 2 * p * r / (p + r) if p + r else 0.0
            details[f"n_gold_{tag}"] = float(n_gold)
            tp_all, pred_all, gold_all = tp_all + tp, pred_all + n_pred, gold_all + n_gold
        hit_rate = mean(hit_rates)
        p = tp_all / pred_all if pred_all else 0.0
        r = tp_all / gold_all if gold_all else 0.0
        authors = [_type_rate(rows[t::len(TYPES)], "authors_hits", "authors_denominator") for t in range(len(TYPES))]
        details.update({
            "hit_rate": hit_rate,
            "authors_score": mean(a for a in authors if a is not None),
            "recall_macro": mean(recalls),
            "entity_precision": p,
            "entity_recall": r,
            "entity_f1": 2 * p * r / (p + r) if p + r else 0.0,
            "n_items": float(len(examples)),
            "n_prompts": float(len(outputs)),
            "n_gold": float(gold_all),
            "n_predicted": float(pred_all),
        })
        return hit_rate, details

    def item_scores(self, examples: Sequence[CoNLLExample], outputs: Sequence[str],
                    ended: Sequence[bool] | None = None) -> list[dict[str, Any]]:
        """One row per prompt (four per sentence, in TYPES order). ``hits`` / ``denominator`` are the
        row's share of the headline's per-type counts, ``authors_hits`` / ``authors_denominator`` of the
        authors' code; ``score`` and ``authors`` are their ratios (None when the denominator is 0). Both
        figures are per-type sums of hits over sums of denominators, averaged over the types."""
        check_outputs(self.name, len(TYPES) * len(examples), outputs)
        authors = authors_item_scores(examples, authors_texts(self.prompts(examples), outputs, ended))
        rows = []
        for k, (o, (a_hits, a_den)) in enumerate(zip(outputs, authors)):
            e, (tag, _) = examples[k // len(TYPES)], TYPES[k % len(TYPES)]
            ents = authors_entities(e.words, e.labels, tag)
            if not ents and len(o) == 0:
                hits, den = 1, 1  # an empty output where there is no entity is a hit
            else:
                # their MISC branch; the PER/LOC/ORG copies test len(x)==0 and len(x)!=0
                den = len(ents) if ents else int(tag == "MISC")
                hits = sum(ent in o for ent in ents)
            rows.append({"score": hits / den if den else None, "hits": float(hits), "denominator": float(den),
                         "authors": a_hits / a_den if a_den else None, "authors_hits": a_hits,
                         "authors_denominator": a_den, "standard": None, "reference": ents, "prediction": o})
        return rows


def _type_rate(rows: Sequence[dict[str, float | None]], hits: str, den: str) -> float | None:
    """sum(hits) / sum(denominator) over one type's rows; None where the denominator is 0 (possible only
    with a small limit: the type is left out of the mean instead of dividing by zero as theirs would)."""
    total = sum(r[den] for r in rows)
    return sum(r[hits] for r in rows) / total if total else None


def authors_item_scores(examples: Sequence[CoNLLExample], texts: Sequence[str]) -> list[tuple[float, float]]:
    """test-NER(-after).py per prompt: (what it adds to their count_T, what it adds to their total_T).

    Their prediction is ``text.split("Entity:")[1]``: the continuation, cut at a repeated "Entity:".
    The headline replays their counting on our continuation; the differences are their decoded text:
    * an empty continuation is "<|endoftext|>" to them, so their empty-output branch (a hit) never
      fires; a sentence without entities of T then adds nothing (PER/LOC/ORG) or 1 to total (MISC);
    * the decode clean-up glues " 's" and the like ("Queen 's Park" is no longer found);
    * their reader also prompted each -DOCSTART- line as a sentence with no entities; its prediction
      is never empty (unless the model began with "Entity:"), so each added 1 to total_MISC and
      nothing else: added here to the MISC prompt of the sentence after it.
    """
    out = []
    for k, text in enumerate(texts):  # their decoded strings (authors_texts)
        e, (tag, _) = examples[k // len(TYPES)], TYPES[k % len(TYPES)]
        pred = text.split("Entity:")[1]
        ents = authors_entities(e.words, e.labels, tag)
        count = total = 0
        if not ents and len(pred) == 0:
            count, total = 1, 1
        elif ents:
            total = len(ents)
        elif tag == "MISC" and len(pred) != 0:
            total = 1
        count += sum(ent in pred for ent in ents)
        if tag == "MISC":
            total += e.docstarts_before
        out.append((float(count), float(total)))
    return out
