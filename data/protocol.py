"""The stream protocol (``dataset.protocol``, ``dataset.revisit``): which phrasings of which facts the stream edits.

- ``one_per_fact`` (default): each fact once, in file order; its edit prompt is trained and all its paraphrases
  are held out for generalization. The loader's records are the stream as they are.
- ``grouped`` (GRACE's and MELO's zsRE streams, MELO ``zsRE_balanced``): a fact's phrasings are its prompt and
  its paraphrases ``[prompt, p1, ..., pm]``; the prompt and the first ``floor(m/2)`` paraphrases are trained,
  the other ``ceil(m/2)`` held out (:func:`split_phrasings`, MELO's ``rephrases[:m//2]`` rule). Every trained
  phrasing is one stream entry, and the entries of all facts are shuffled with the seed. ROME's CounterFact
  (two paraphrases) trains the prompt and the first paraphrase and holds out the second; ZsRE and EasyEdit's
  CounterFact here have one paraphrase, so the prompt is trained, the paraphrase held out, and grouping only
  shuffles.
- ``revisit: R`` (either protocol): each trained phrasing appears R times, at seeded random positions:
  rehearsal. R > 1 shuffles a ``one_per_fact`` stream too.

``num_edits`` counts stream entries and must be a multiple of R: facts are taken in file order, each with its
trained phrasings in order, until ``num_edits / R`` phrasings are taken (the last fact may give fewer than all
of its phrasings; its held-out ones stay held out), then each is repeated R times and the whole is shuffled.

Each entry is an :class:`EditRequest` whose ``prompt`` is the phrasing, ``target`` the fact's, ``paraphrases``
the fact's held-out phrasings, ``locality`` the fact's probes, ``fact`` the fact's id (the record's ``uid`` as
loaded, its position among the file's usable records) and ``uid`` the entry's position in the shuffled stream
(unique per entry). ``dataset.order=lemoe_cluster`` then orders these entries (protocol first, then order);
it refuses ``revisit > 1``, whose identical copies it would cluster side by side.

Pure functions over loaded records; :meth:`data.loaders.EditDataset.load` calls :func:`build_stream`.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from data.requests import EditRequest
from evaluation.common.errors import ConfigError, HarnessError

PROTOCOLS = ("one_per_fact", "grouped")


class ShortStream(HarnessError, ValueError):
    """The file's facts give fewer trained phrasings than the stream needs."""


def check_protocol(protocol: str, revisit: int, num_edits: int | None = None, order: str = "file") -> None:
    """One ConfigError line naming the key and its valid values for a bad protocol setting."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"dataset.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if isinstance(revisit, bool) or not isinstance(revisit, int) or revisit < 1:
        raise ConfigError(f"dataset.revisit must be an integer >= 1 (1: each trained phrasing once), got {revisit!r}")
    if num_edits is not None and isinstance(num_edits, int) and num_edits >= 1 and num_edits % revisit:
        raise ConfigError(f"dataset.num_edits={num_edits} must be a multiple of dataset.revisit={revisit}: "
                          f"num_edits counts stream entries and each trained phrasing appears revisit times")
    if revisit > 1 and order != "file":
        raise ConfigError(f"dataset.revisit={revisit} cannot be combined with dataset.order={order!r}: the "
                          f"clustering would put a phrasing's identical copies side by side instead of at random "
                          f"positions; use dataset.order=file with revisit, or revisit=1 with {order}")


def is_plain(protocol: str, revisit: int) -> bool:
    """True for the default stream: the loader's records, unchanged."""
    return protocol == "one_per_fact" and revisit == 1


def split_phrasings(record: EditRequest, protocol: str = "grouped") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(trained phrasings, held-out phrasings) of one fact. ``grouped``: the prompt and the first floor(m/2) of
    its m paraphrases trained, the rest held out; ``one_per_fact``: the prompt trained, every paraphrase held out."""
    paraphrases = record.paraphrases
    if protocol == "one_per_fact":
        return (record.prompt,), paraphrases
    half = len(paraphrases) // 2
    return (record.prompt, *paraphrases[:half]), paraphrases[half:]


def phrasings_needed(num_edits: int, revisit: int) -> int:
    """Distinct trained phrasings a stream of ``num_edits`` entries holds (also an upper bound on its facts)."""
    return num_edits // revisit


def build_stream(records: Sequence[EditRequest], protocol: str, revisit: int, num_edits: int,
                 seed: int = 0, source: str = "the data file") -> list[EditRequest]:
    """The edit stream of ``num_edits`` entries from ``records`` (one fact each, file order; see the module doc).

    The default (``one_per_fact``, revisit 1) returns the first ``num_edits`` records as they are."""
    check_protocol(protocol, revisit, num_edits)
    if is_plain(protocol, revisit):
        return list(records[:num_edits])
    need = phrasings_needed(num_edits, revisit)
    units: list[tuple[EditRequest, str, tuple[str, ...]]] = []
    for record in records:
        trained, held = split_phrasings(record, protocol)
        units.extend((record, phrasing, held) for phrasing in trained[:need - len(units)])
        if len(units) == need:
            break
    if len(units) < need:
        raise ShortStream(f"{source}: dataset.num_edits={num_edits} with dataset.protocol={protocol} and "
                          f"dataset.revisit={revisit} needs {need} trained phrasings, but its {len(records)} facts "
                          f"give only {len(units)}; lower dataset.num_edits")
    entries = [unit for unit in units for _ in range(revisit)]
    random.Random(seed).shuffle(entries)
    return [EditRequest.make(uid, phrasing, record.target, held, record.locality, record.subject,
                             record.ground_truth, fact=record.fact)
            for uid, (record, phrasing, held) in enumerate(entries)]


def describe_stream(requests: Sequence[EditRequest], protocol: str = "one_per_fact", revisit: int = 1
                    ) -> dict[str, Any]:
    """What results.json records of the stream: the protocol, its counts and each entry's fact in stream order."""
    return {"protocol": protocol, "revisit": revisit, "num_edits": len(requests),
            "num_facts": len({r.fact for r in requests}),
            "num_phrasings": len({(r.fact, r.prompt) for r in requests}),  # distinct trained phrasings
            "facts": [r.fact for r in requests]}
