"""The order of the edit stream (``dataset.order``): the file's, or LEMoE's clustering-based editing order planning.

LEMoE (Wang & Li, EMNLP 2024, section 4.3) finds lifelong editing sensitive to the order of the edits and
plans it: the edit set is clustered with k-means on semantic representations and batches are made of edits
from the same cluster (high similarity within a batch, low between batches). The paper leaves open which
representation, how many clusters and in which order the clusters come; here (each a dataset key):

- the representation is the model's own instance-level embedding, the mean input-token embedding of the
  edit prompt (what LEMoE's router reads), unit-normalised so k-means works on cosine geometry;
- ``dataset.order_clusters``: k; null: one cluster per edit batch, ceil(num_edits / editor.batch_size)
  (the paper's 1000 edits over 5 experts);
- ``dataset.order_sequence``: ``first`` (clusters in the file order of their first edit) | ``size``
  (largest first); within a cluster the file order is kept. The stream then cuts the sequence into batches
  of ``editor.batch_size``, so a batch holds one cluster wherever the cluster sizes allow.

k-means is seeded (k-means++ start, Lloyd's iterations in float64 on the CPU), so a run and its resumption
plan the same order. Requests keep their ``uid`` (the record's file position); results.json records the
planned order as ``dataset_order``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from data.requests import EditRequest
from evaluation.common.errors import ConfigError

ORDERS = ("file", "lemoe_cluster")
SEQUENCES = ("first", "size")


def check_order(order: str, clusters: int | None, sequence: str) -> None:
    if order not in ORDERS:
        raise ConfigError(f"dataset.order must be one of {ORDERS}, got {order!r}")
    if sequence not in SEQUENCES:
        raise ConfigError(f"dataset.order_sequence must be one of {SEQUENCES}, got {sequence!r}")
    if clusters is not None and (isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1):
        raise ConfigError(f"dataset.order_clusters must be null or a positive integer, got {clusters!r}")


@torch.no_grad()
def prompt_embeddings(prompts: Sequence[str], tokenizer: Any, embeddings: torch.nn.Module) -> torch.Tensor:
    """(N, d) float64 on the CPU: the mean input embedding of each prompt's tokens (``tokenizer(prompt)``)."""
    device = next(embeddings.parameters()).device
    rows = [embeddings(torch.tensor(tokenizer(p).input_ids, device=device)).double().mean(0).cpu() for p in prompts]
    return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """(N,) cluster of each row of ``x`` (N, d): k-means++ start from a seeded generator, Lloyd's iterations
    until no assignment changes (at most ``iterations``); an emptied cluster keeps its centre."""
    x = x.double().cpu()
    n, k = x.shape[0], min(k, x.shape[0])
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(1).values.pow(2)
        pick = torch.multinomial(d2, 1, generator=g) if float(d2.sum()) > 0 else torch.randint(n, (1,), generator=g)
        centres = torch.cat([centres, x[pick]])
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = members.mean(0)
    return labels


def cluster_order(representations: torch.Tensor, batch_size: int, clusters: int | None = None,
                  sequence: str = "first", seed: int = 0) -> list[int]:
    """A permutation of range(N): the edits grouped by k-means cluster of their (unit-normalised)
    representations (N, d), clusters in ``sequence`` order, file order within a cluster."""
    n = representations.shape[0]
    if n == 0:
        return []
    k = clusters if clusters is not None else math.ceil(n / batch_size)
    labels = kmeans(torch.nn.functional.normalize(representations.double(), dim=-1), k, seed).tolist()
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)  # dicts keep insertion order: clusters by their first edit
    ordered = list(groups.values())
    if sequence == "size":
        ordered.sort(key=len, reverse=True)  # stable: equal sizes keep the order of their first edit
    return [i for group in ordered for i in group]


def plan_order(requests: list[EditRequest], order: str, tokenizer: Any, embeddings: torch.nn.Module, *,
               batch_size: int, clusters: int | None = None, sequence: str = "first",
               seed: int = 0) -> list[EditRequest]:
    """The stream in ``order``: ``file`` returns ``requests`` as they are (no model work); ``lemoe_cluster``
    orders them by :func:`cluster_order` on :func:`prompt_embeddings` of the edit prompts."""
    check_order(order, clusters, sequence)
    if order == "file":
        return requests
    reps = prompt_embeddings([r.prompt for r in requests], tokenizer, embeddings)
    return [requests[i] for i in cluster_order(reps, batch_size, clusters, sequence, seed)]
