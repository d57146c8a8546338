"""Edit metrics under teacher forcing, batched (spec section 6), and from the model's own answers.

Per request: reliability on the edit prompt, generalization on the held-out paraphrases (mean over
them), each as sequence-level exact match (every target token is the argmax: the headline) and token
accuracy (EasyEdit's variant); locality as agreement of argmax tokens with the unedited model on each
locality prompt + its answer (mean over the request's probes). Each metric is the mean over requests.

Where several requests phrase one fact (``dataset.protocol=grouped``, ``dataset.revisit>1``; data/protocol.py),
each distinct trained phrasing (fact, prompt) counts once for reliability and each fact once for generalization
and locality (its held-out phrasings and probes, shared by all its requests): the means are over those, and
only those rows are predicted. By default every request is its own fact, so these are the means over requests.

With an :class:`~evaluation.run.answer_metrics.AnswerScorer`, :func:`evaluate_edits` also generates the model's
answer to every prompt and scores it (``*_generated``, ``*_generated_contains``, ``locality_generated``;
docs/answers.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import torch
from tqdm.auto import tqdm

from data.requests import EditRequest
from evaluation.common.evaluation_parts import (
    BatchRecord,
    Codec,
    EvaluationParts,
    batches_with,
)
from evaluation.common.list_cache import SealedListCache, digest_of
from evaluation.editing.editor import Editor
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits

if TYPE_CHECKING:  # answer_metrics uses this module's helpers
    from evaluation.run.answer_metrics import Answer, AnswerScorer, BaseAnswers

Scorer = Callable[[torch.Tensor, torch.Tensor, int], Any]


@dataclass
class RowPredictions:
    """Argmax predictions and targets of one row's target tokens."""

    predicted: torch.Tensor  # (n_tokens,)
    target: torch.Tensor  # (n_tokens,)

    @property
    def exact(self) -> float:
        return float(bool((self.predicted == self.target).all()))

    @property
    def token_accuracy(self) -> float:
        return float((self.predicted == self.target).float().mean())


@torch.no_grad()
def predict(editor: Editor, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32,
            desc: str | None = None, record: BatchRecord[RowPredictions] | None = None) -> list[RowPredictions]:
    """Teacher-forced argmax predictions at the target tokens, batched, routed per row. ``record``: batches saved
    before are read from it, and those computed are added to it (evaluation.common.evaluation_parts)."""
    device = next(editor.model.parameters()).device
    # sort by length so batches pad little; restore the order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

    def compute(idx: list[int]) -> list[RowPredictions]:
        batch = encode_pairs(editor.tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx]).to(device)
        with editor.batch_scope(batch):
            tl = target_logits(editor.model, batch)
        pred = tl.logits.argmax(-1)
        return [RowPredictions(pred[tl.rows == j].cpu(), tl.targets[tl.rows == j].cpu()) for j in range(len(idx))]

    out: list[RowPredictions | None] = [None] * len(prompts)
    for idx, rows in tqdm(batches_with(record, batches, compute), total=len(batches), desc=desc,
                          disable=desc is None, leave=False):
        for i, row in zip(idx, rows):
            out[i] = row
    return out  # type: ignore[return-value]


#: a row of :func:`predict` as JSON and back (the saved parts of a long evaluation)
PREDICTIONS = Codec[RowPredictions](
    encode=lambda r: [r.predicted.tolist(), r.target.tolist()],
    decode=lambda v: RowPredictions(torch.tensor(v[0], dtype=torch.long), torch.tensor(v[1], dtype=torch.long)))


def locality_agreement(base: Sequence[RowPredictions], edited: Sequence[RowPredictions]) -> float:
    """Mean over rows of the share of target positions where edited and unedited argmax agree."""
    if not base:
        return float("nan")
    return sum(float((b.predicted == e.predicted).float().mean()) for b, e in zip(base, edited)) / len(base)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def locality_inputs(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    """Every locality probe of every request, flattened in request order: (prompts, answers)."""
    probes = [probe for r in requests for probe in r.locality]
    return [p for p, _ in probes], [a for _, a in probes]


def first_occurrences(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """(index of each distinct key's first occurrence, in order; for every position, its key's rank in that list)."""
    rank: dict[Hashable, int] = {}
    firsts, where = [], []
    for i, key in enumerate(keys):
        if key not in rank:
            rank[key] = len(firsts)
            firsts.append(i)
        where.append(rank[key])
    return firsts, where


def split_rows(rows: Sequence[Any], counts: Sequence[int]) -> list[Sequence[Any]]:
    """Cut a flat list of rows into consecutive groups of ``counts`` rows."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start:start + n])
        start += n
    return out


#: the unedited model's locality predictions: one entry per request (a RowPredictions when the
#: request has one probe, else a sequence of them, one per probe), or the flat list of all probes
BaseLocality = Sequence["RowPredictions | Sequence[RowPredictions]"]


def locality_prediction_cache(directory: str | Path, model_key: str) -> SealedListCache:
    """Where :func:`base_locality_predictions` keeps the unedited model's predictions across runs."""
    return SealedListCache(directory, model_key, "locality-predictions", "rows")


def base_locality_predictions(editor: Editor, requests: Sequence[EditRequest], batch_size: int = 32,
                              desc: str | None = None, cache: SealedListCache | None = None
                              ) -> list[tuple[RowPredictions, ...]]:
    """The unedited model's locality predictions, grouped per request (one tuple entry per probe).

    One entry per request, so a stream prefix ``requests[:k]`` goes with ``base[:k]``; each fact's probes are
    predicted once and shared by its requests. ``cache`` (:func:`locality_prediction_cache`) keeps them per
    model, batch size (batches pad differently) and probe list."""
    facts, at_fact = first_occurrences([r.fact for r in requests])
    held = [requests[i] for i in facts]
    prompts, targets = locality_inputs(held)
    key = [batch_size, digest_of([prompts, targets])]
    kept = cache.load(key, len(prompts)) if cache is not None else None
    if kept is not None:
        flat = [PREDICTIONS.decode(v) for v in kept]
    else:
        flat = predict(editor, prompts, targets, batch_size=batch_size, desc=desc)
        if cache is not None:
            cache.save(key, [PREDICTIONS.encode(r) for r in flat])
    groups = [tuple(group) for group in split_rows(flat, [len(r.locality) for r in held])]
    return [groups[j] for j in at_fact]


def group_base_locality(base_locality: BaseLocality, requests: Sequence[EditRequest]) -> list[Sequence[RowPredictions]]:
    """``base_locality`` as one sequence of RowPredictions per request, checked against the probes."""
    counts = [len(r.locality) for r in requests]
    if all(isinstance(b, RowPredictions) for b in base_locality):
        if len(base_locality) != sum(counts):
            raise ValueError(f"base_locality holds {len(base_locality)} predictions but the {len(requests)} "
                             f"requests have {sum(counts)} locality probes")
        return split_rows(list(base_locality), counts)
    if len(base_locality) != len(requests):
        raise ValueError(f"base_locality has {len(base_locality)} entries for {len(requests)} requests")
    groups = [(b,) if isinstance(b, RowPredictions) else tuple(b) for b in base_locality]
    for i, (group, n) in enumerate(zip(groups, counts)):
        if len(group) != n:
            raise ValueError(f"base_locality entry {i} holds {len(group)} predictions for {n} locality probes")
    return groups


def evaluate_edits(editor: Editor, requests: Sequence[EditRequest], base_locality: BaseLocality,
                   batch_size: int = 32, progress: bool | str = True,
                   per_request_out: dict[str, list[float]] | None = None, *,
                   scorer: AnswerScorer | None = None, base_answers: BaseAnswers | None = None,
                   locality: bool = True, answers_out: list[dict[str, Any]] | None = None,
                   parts: EvaluationParts | None = None) -> dict[str, float]:
    """All edit metrics for ``requests`` on the editor's current model.

    Per request, generalization (and its token accuracy) is the mean over the request's paraphrases
    and locality the mean agreement over its probes; each metric is then the mean over requests, a
    trained phrasing (reliability) or fact (generalization, locality) repeated in ``requests`` counting once.
    ``per_request_out``, when given, receives "reliability", "generalization" (exact match) and
    "locality", each a list of per-request scores in request order (a repeat has its first occurrence's),
    and with a ``scorer`` "reliability_generated" and "generalization_generated" too.

    ``scorer``: also score the model's own answers (:mod:`evaluation.run.answer_metrics`): ``*_generated``
    (normalised exact match), ``*_generated_contains`` (the target stands in the answer) and
    ``locality_generated`` (share of locality prompts whose answer equals ``base_answers``, the unedited
    model's); each prompt's answer is appended to ``answers_out`` as a row. ``locality=False``: reliability
    and generalization only (the edit-time points). ``progress``: show bars (a string: put before their names). ``parts``: the batches done are saved there as they go, and
    those saved before are read back (evaluation.common.evaluation_parts; the numbers are the same).
    """
    def predicted(call: str, prompts: Sequence[str], targets: Sequence[str]) -> list[RowPredictions]:
        record = parts.record(call, [batch_size, digest_of([list(prompts), list(targets)])], PREDICTIONS) \
            if parts is not None else None
        return predict(editor, prompts, targets, batch_size, tag(f"eval {call}"), record)

    tag = (lambda s: f"{progress}{s}" if isinstance(progress, str) else s) if progress else (lambda s: None)
    base = group_base_locality(base_locality, requests) if locality else []
    phrasings, at_phrasing = first_occurrences([(r.fact, r.prompt) for r in requests])
    facts, at_fact = first_occurrences([r.fact for r in requests])
    trained, held = [requests[i] for i in phrasings], [requests[i] for i in facts]
    rel = predicted("reliability", [r.prompt for r in trained], [r.target for r in trained])
    # all rows of all facts in one batched pass each, then cut back per fact
    gen_flat = predicted("generalization", [p for r in held for p in r.paraphrases],
                         [r.target for r in held for _ in r.paraphrases])
    gen = split_rows(gen_flat, [len(r.paraphrases) for r in held])
    reliability = [p.exact for p in rel]
    generalization = [mean([p.exact for p in g]) for g in gen]
    out = {
        "reliability": mean(reliability),
        "generalization": mean(generalization),
        "reliability_token": mean([p.token_accuracy for p in rel]),
        "generalization_token": mean([mean([p.token_accuracy for p in g]) for g in gen]),
    }
    per_request = {"reliability": [reliability[j] for j in at_phrasing],
                   "generalization": [generalization[j] for j in at_fact]}
    if locality:
        loc_flat = predicted("locality", *locality_inputs(held))
        loc = split_rows(loc_flat, [len(r.locality) for r in held])
        locality_scores = [locality_agreement(base[i], es) for i, es in zip(facts, loc)]
        out["locality"] = mean(locality_scores)
        per_request["locality"] = [locality_scores[j] for j in at_fact]
    if scorer is not None:
        generated, per_fact = _generated(editor, scorer, trained, held, [base_answers[i] for i in facts]
                                         if locality and base_answers is not None else None,
                                         tag("eval generated answers"), answers_out, parts)
        out.update(generated)
        per_request["reliability_generated"] = [per_fact["reliability"][j] for j in at_phrasing]
        per_request["generalization_generated"] = [per_fact["generalization"][j] for j in at_fact]
    if per_request_out is not None:
        per_request_out.update(per_request)
    return out


def _generated(editor: Editor, scorer: AnswerScorer, trained: Sequence[EditRequest], held: Sequence[EditRequest],
               base_answers: BaseAnswers | None, desc: str | None,
               rows_out: list[dict[str, Any]] | None, parts: EvaluationParts | None = None
               ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The generated-answer metrics of the trained phrasings and held facts: the means, and per phrasing
    (reliability) and per fact (generalization) the exact match. Every prompt is generated in one call, but a
    locality prompt the editor's router leaves out of scope, which takes the unedited answer (bit for bit the
    same; ``reading.reuse_unedited``)."""
    reading = scorer.reading
    paraphrases = [p for r in held for p in r.paraphrases]
    probes = locality_inputs(held)[0] if base_answers is not None else []
    routed = _routed(editor, scorer, probes)
    todo = [i for i in range(len(probes)) if routed is None or routed[i]]
    found = scorer.answers(editor, [r.prompt for r in trained] + paraphrases + [probes[i] for i in todo], desc, parts)
    rel_ans, found = found[:len(trained)], found[len(trained):]
    gen_ans, loc_ans = found[:len(paraphrases)], [b for group in base_answers or () for b in group]
    for i, a in zip(todo, found[len(paraphrases):]):
        loc_ans[i] = a

    def scored(kind: str, r: EditRequest, prompt: str, a: Answer) -> tuple[float, float]:
        exact, contains = reading.exact(a.answer, r.target), reading.contains(a.answer, r.target)
        if rows_out is not None:
            rows_out.append({"kind": kind, "uid": r.uid, "prompt": prompt, "target": r.target, "answer": a.answer,
                             "continuation": a.continuation.text, "stop": a.continuation.stop,
                             "tokens": a.continuation.tokens, "exact": exact, "contains": contains})
        return float(exact), float(contains)

    rel = [scored("reliability", r, r.prompt, a) for r, a in zip(trained, rel_ans)]
    gen_rows = [scored("generalization", r, p, a) for r, a, p in
                zip([r for r in held for _ in r.paraphrases], gen_ans, paraphrases)]
    gen = split_rows(gen_rows, [len(r.paraphrases) for r in held])
    out = {"reliability_generated": mean([e for e, _ in rel]),
           "reliability_generated_contains": mean([c for _, c in rel]),
           "generalization_generated": mean([mean([e for e, _ in g]) for g in gen]),
           "generalization_generated_contains": mean([mean([c for _, c in g]) for g in gen])}
    per = {"reliability": [e for e, _ in rel], "generalization": [mean([e for e, _ in g]) for g in gen]}
    if base_answers is not None:
        same: list[list[float]] = []
        counts = [len(r.locality) for r in held]
        loc_groups = split_rows(loc_ans, counts)
        routes = split_rows(routed, counts) if routed is not None else [[None] * n for n in counts]
        for r, answers, before, in_scope in zip(held, loc_groups, base_answers, routes):
            same.append([float(a.answer == b.answer) for a, b in zip(answers, before)])
            if rows_out is not None:
                for (prompt, _), a, b, routed_row in zip(r.locality, answers, before, in_scope):
                    rows_out.append({"kind": "locality", "uid": r.uid, "prompt": prompt, "answer": a.answer,
                                     "continuation": a.continuation.text, "stop": a.continuation.stop,
                                     "tokens": a.continuation.tokens, "unedited": b.answer,
                                     "same": a.answer == b.answer, "routed": routed_row})
        out["locality_generated"] = mean([mean(s) for s in same])
    return out, per


def _routed(editor: Editor, scorer: AnswerScorer, probes: Sequence[str]) -> list[bool] | None:
    """Whether the editor's router acts on each locality prompt as the model is given it (None: every prompt is
    generated: no router (FT-L, ROME), or ``reading.reuse_unedited`` off)."""
    if not probes or not scorer.reading.reuse_unedited:
        return None
    mask = editor.in_scope([scorer.reading.prompt(p) for p in probes], scorer.batch_size)
    return None if mask is None else [bool(x) for x in mask.tolist()]
