"""The one interface every editing method implements.

The stream, the metrics and the loggers only ever talk to an :class:`Editor`; they never ask which
method it is. An editor owns the (edited) model, edits it one batch of requests at a time, and
tells the evaluation code where each input's "query" token is through :meth:`Editor.scope`, so
that sequence-level routers (ELDER, GRACE, MELO, Defer) act per example in batched evaluation.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from data.requests import EditRequest
from evaluation.encoding import KEY_POSITIONS, EncodedBatch, encode_pairs
from evaluation.errors import ConfigError
from evaluation.forward import target_logits
from evaluation.query import SequenceQuery


@dataclass
class EditStats:
    """What one call of :meth:`Editor.edit` reports (logged per batch)."""

    loss: float = float("nan")
    iterations: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FloorSpec:
    """The unavoidable work of one edit batch: ``passes`` forward+backward passes from block
    ``first_layer`` (the lowest one that carries gradients) to the output. Benchmarks time it.

    ``prompt_prefixes``: the texts the method puts before each edit prompt, one sequence per prefix
    and request in every pass (ROME optimises its value over the bare prompt and 20 prefixed copies;
    the others train on the bare prompt only, ``("",)``).
    """

    first_layer: int
    passes: int
    prompt_prefixes: tuple[str, ...] = ("",)


def optimise(optimizer: torch.optim.Optimizer, steps: int, loss_fn: Callable[[], torch.Tensor], *,
             scheduler: Any = None, after_step: Callable[[], None] | None = None,
             stop_below: float | None = None) -> list[float]:
    """The training loop every gradient editor shares: ``steps`` times compute ``loss_fn()``, then
    zero_grad / backward / step (and ``scheduler.step()``, ``after_step()``). ``stop_below``: stop before
    the step once the loss is under it (FT-L's early stop). Returns the losses computed, in order."""
    losses: list[float] = []
    for _ in range(steps):
        loss = loss_fn()
        losses.append(float(loss.detach()))
        if stop_below is not None and losses[-1] < stop_below:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
    return losses


class Editor(ABC):
    """Base class of ELDER and every baseline.

    Subclasses set ``self.model`` (a causal LM whose forward applies the edits) and ``self.tokenizer``.
    """

    model: nn.Module
    tokenizer: Any
    #: edits per call of :meth:`edit` in the stream (ELDER: 4, GRACE: 1, ...)
    batch_size: int = 1
    #: the sequence-level router's query hook (ELDER, GRACE, MELO, Defer); None: the edit is in the weights
    query: SequenceQuery | None = None
    #: which token of a teacher-forced "{prompt} {target}" row the router reads (see KEY_POSITIONS)
    key_position: str = "prompt_last"

    @staticmethod
    def checked_key_position(value: str) -> str:
        if value not in KEY_POSITIONS:
            raise ConfigError(f"editor.key_position must be one of {KEY_POSITIONS}, got {value!r}")
        return value

    @abstractmethod
    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        """Apply one batch of edits to ``self.model`` (sequentially after all earlier batches)."""

    @abstractmethod
    def trainable_params(self) -> int:
        """Parameters the method trains or writes (a count, as in the paper's Table 3)."""

    def stored_params(self) -> int:
        """Extra numbers the method keeps besides the model (codebooks, codes, keys); 0 by default."""
        return 0

    def floor_spec(self) -> FloorSpec | None:
        """What the speed benchmark compares this editor with; None if not defined."""
        return None

    @contextlib.contextmanager
    def scope(self, query_positions: torch.Tensor) -> Iterator[None]:
        """Forward passes inside this block read sequence b's query at ``query_positions[b]``.

        ``query_positions`` is a (B,) long tensor: the last prompt token of each row. The first
        forward in the block fixes each sequence's route; later forwards in the same block (the
        decoding steps of ``generate`` with a KV cache) reuse it. Editors without routing ignore it.
        """
        yield

    def batch_scope(self, batch: EncodedBatch) -> contextlib.AbstractContextManager[None]:
        """:meth:`scope` for a teacher-forced batch, reading each row at ``self.key_position``.

        Generation has no teacher-forced target: the sequence as fed is the prompt, so both readings
        read its last token there (evaluation.generation passes the prompt's positions to ``scope``).
        """
        return self.scope(batch.key_positions(self.key_position))

    def batch_loss(self, batch: EncodedBatch) -> torch.Tensor:
        """The teacher-forced target loss of ``batch`` through the edited model, routed per row."""
        with self.batch_scope(batch):
            return target_logits(self.model, batch).loss()

    @torch.no_grad()
    def in_scope(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor | None:
        """(B,) bool: whether the editor's router applies its edits to each prompt.

        Read from the route the query hook derives at the last prompt token (its ``active`` mask;
        no route: nothing stored yet, so nothing in scope). None for editors without a router
        (FT-L, ROME): their edits are in the weights and act on every input.
        """
        if self.query is None:
            return None
        masks = []
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            route = self.routes_for(chunk)
            active = getattr(route, "active", None) if route is not None else torch.zeros(len(chunk), dtype=torch.bool)
            masks.append(torch.ones(len(chunk), dtype=torch.bool) if active is None else active.bool().cpu())
        return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)

    @torch.no_grad()
    def routes_for(self, prompts: Sequence[str]) -> Any:
        """The route the query hook derives for each prompt's last token (one batch, one forward)."""
        assert self.query is not None, "routes_for needs an editor with a router"
        device = next(self.model.parameters()).device
        enc = encode_pairs(self.tokenizer, list(prompts), ["x"] * len(prompts)).to(device)  # the target is not read
        with self.scope(enc.query_positions):
            target_logits(self.model, enc)
            return self.query.derived

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the edited model and the editor's memory."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on a freshly built editor of the same config)."""

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
