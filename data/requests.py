"""The one record type every editor and metric consumes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, with its held-out paraphrase(s) and unrelated locality probe(s).

    The model is trained on ``"{prompt} {target}"``; the paraphrases are never trained on and only
    measure generalization; the locality probes (prompt, answer) measure drift on unrelated input.

    ``paraphrase``/``locality_prompt``/``locality_answer`` are the first of each (positional, as
    before); ``extra_paraphrases``/``extra_locality`` hold the rest (ROME's CounterFact has two
    paraphrases and ten neighbourhood prompts per record). ``paraphrases`` and ``locality`` give all.

    ``uid`` is unique per stream entry; ``fact`` names the fact the entry phrases (default: ``uid``, each
    record its own fact). Under ``dataset.protocol=grouped`` or ``dataset.revisit>1`` (data/protocol.py)
    several entries share a fact: ELDER's preset allocation and the metrics' deduplication key on it.
    """

    uid: int  # the entry's position in the stream as built (lemoe_cluster reorders, uids stay)
    prompt: str
    target: str
    paraphrase: str
    locality_prompt: str
    locality_answer: str
    subject: str = ""
    ground_truth: str = ""
    extra_paraphrases: tuple[str, ...] = ()
    extra_locality: tuple[tuple[str, str], ...] = ()
    fact: int | None = None  # None: ``uid``

    def __post_init__(self) -> None:
        if self.fact is None:
            object.__setattr__(self, "fact", self.uid)

    @property
    def paraphrases(self) -> tuple[str, ...]:
        """Every held-out paraphrase of the edit prompt, the first being ``paraphrase``."""
        return (self.paraphrase, *self.extra_paraphrases)

    @property
    def locality(self) -> tuple[tuple[str, str], ...]:
        """Every locality probe as (prompt, answer), the first being (locality_prompt, locality_answer)."""
        return ((self.locality_prompt, self.locality_answer), *self.extra_locality)

    @classmethod
    def make(cls, uid: int, prompt: str, target: str, paraphrases: tuple[str, ...] | list[str],
             locality: tuple[tuple[str, str], ...] | list[tuple[str, str]], subject: str = "",
             ground_truth: str = "", fact: int | None = None) -> "EditRequest":
        """Build a request from all its paraphrases and locality probes (at least one of each)."""
        if not paraphrases or not locality:
            raise ValueError("an edit request needs at least one paraphrase and one locality probe")
        (loc_prompt, loc_answer), *more = [tuple(p) for p in locality]
        return cls(uid, prompt, target, paraphrases[0], loc_prompt, loc_answer, subject, ground_truth,
                   tuple(paraphrases[1:]), tuple((p, a) for p, a in more), fact)
