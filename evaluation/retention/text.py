"""Text helpers shared by the retention scorers (Gu et al. 2024's normalisation, reproduced)."""
from __future__ import annotations

import re
import string
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation as in the authors' NQ script: lower case, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace (applied in exactly that order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_any(prediction: str, golds: Iterable[str]) -> bool:
    """Normalised ``prediction`` equals some normalised gold answer."""
    p = normalize_answer(prediction)
    return any(p == normalize_answer(g) for g in golds)


def contains_answer_span(prediction: str, golds: Sequence[str]) -> bool:
    """Some contiguous run of words of the normalised prediction equals a normalised gold answer.

    Equivalent to the intent of the authors' nested loop (every span words[i..j]); golds that
    normalise to the empty string can only match an empty prediction, as in their code, where
    ``"".split(" ") == [""]``.
    """
    norm_golds = {normalize_answer(g) for g in golds}
    words = normalize_answer(prediction).split(" ")  # [""] for an empty prediction, as theirs
    n = len(words)
    for i in range(n):
        for j in range(i + 1, n + 1):
            if " ".join(words[i:j]) in norm_golds:
                return True
    return False


def authors_nq_counts(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> list[int]:
    """The authors' NQ counting loop replayed, bugs included: how much each item adds to their count.

    Their loop (test-OpenDomainQA.py) can count one item more than once (``continue`` after a
    single-word hit inside the span loop) and never resets its ``flag`` after the first multi-word
    hit, after which only spans starting at the first word (plus the first/last single words) are
    tried. An item's count depends on the items before it, so feed items in file order.

    Two shortcuts give their results faster (their prompt-long predictions make the span loop
    quadratic): a normalised span is compared with the normalised golds directly (the normalisation
    is idempotent, so their second ``normalize_answer`` of the span changes nothing), and the span
    loop stops once spans are longer than the longest gold (no later span can hit; a hit is its only
    effect).
    """
    counts = []
    flag = False
    for pred, answer in zip(predictions, golds):
        targets = {normalize_answer(g) for g in answer}
        longest = max(len(t.split(" ")) for t in targets)
        words = normalize_answer(pred).split(" ")  # [""] for an empty prediction, as theirs
        if words[0] in targets or words[-1] in targets:
            counts.append(1)
            continue
        n = 0
        for i in range(len(words) - 1):
            if words[i] in targets:
                n += 1
                continue
            for j in range(i + 1, min(len(words), i + longest)):
                if " ".join(words[i:j + 1]) in targets:
                    n += 1
                    flag = True
                    break
            if flag:
                break
        counts.append(n)
    return counts


def authors_nq_loop(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> int:
    """The authors' NQ count over all items (see :func:`authors_nq_counts`)."""
    return sum(authors_nq_counts(predictions, golds))


def split_entity_list(text: str) -> list[str]:
    """Entity strings a model listed after ``Entity:``, for the string-level entity F1.

    Takes the first non-empty line of the output (later lines are the model running on into a new
    prompt), splits it on commas and semicolons, strips whitespace, surrounding quotes/brackets and
    a trailing full stop from each piece, and drops empty pieces and null answers ("none", "n/a",
    "null", "no entity", "-").
    """
    first = next((line for line in text.strip().splitlines() if line.strip()), "")
    out = []
    for piece in re.split(r"[,;]", first):
        piece = piece.strip().strip("\"'()[]{}").strip()
        if piece.endswith(".") and "." not in piece[:-1]:
            # a sentence-final stop; abbreviations like "U.S." keep theirs
            piece = piece[:-1].rstrip()
        if piece and piece.lower() not in _NULL_ANSWERS:
            out.append(piece)
    return out


_NULL_ANSWERS = frozenset({"none", "n/a", "na", "null", "no entity", "no entities", "-", "nothing"})
