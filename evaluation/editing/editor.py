"""The one interface every editing method implements.

The stream, the metrics and the loggers only ever talk to an :class:`Editor`; they never ask which
method it is. An editor owns the (edited) model, edits it one batch of requests at a time, and
tells the evaluation code where each input's "query" token is through :meth:`Editor.scope`, so
that sequence-level routers (ELDER, GRACE, MELO, Defer) act per example in batched evaluation.

An editor is an ``nn.Module`` built from one typed config: its class names a dataclass ``Config``
(every hyper-parameter, its type and its default, written once), and the constructor takes either
that config or its fields as keywords (Hydra passes the YAML's keys). What it registers (adapters,
routers, codebooks; ``get_extra_state`` for what is not a tensor of fixed shape) is its state; the
base model is held beside it, never registered, so it stays out of ``state_dict()``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import KEY_POSITIONS, EncodedBatch, encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel
from evaluation.editing.query import RouteTaken, SequenceQuery


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


def check_batch_limit(editor_class: type["Editor"], config: Any, num_edits: int) -> None:
    """One line, before any work, where a stream of ``num_edits`` needs more edit batches than the editor has
    slots for (:meth:`Editor.batch_limit`), rather than a failure when the slots run out mid-stream."""
    limit_of = getattr(editor_class, "batch_limit", None)  # a duck-typed editor (e.g. a test's) has none
    limit = limit_of(config) if limit_of is not None else None
    if limit is None:
        return
    slots, setting = limit
    size = getattr(config, "batch_size", 1)
    needed = -(-num_edits // size)
    if needed > slots:
        raise ConfigError(f"{editor_class.__name__} takes at most {setting}={slots} edit batches of "
                          f"editor.batch_size={size} ({slots * size} edits), but the stream has {num_edits} edits "
                          f"({needed} batches): set {setting}={needed} (or a larger editor.batch_size)")


def make_config(config_class: type, config: Any = None, fields: dict[str, Any] | None = None) -> Any:
    """``config`` (a ``config_class``) with ``fields`` replaced, or a new one from ``fields``; a field the
    class does not have is named in one line (Hydra's schema catches it earlier for configs it composes)."""
    fields = dict(fields or {})
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"editor.{unknown[0]} is not a setting of {config_class.__qualname__} "
                          f"(its settings: {', '.join(sorted(known))})")
    try:
        made = dataclasses.replace(config, **fields) if config is not None else config_class(**fields)
    except TypeError as err:  # a required field left out
        raise ConfigError(f"{config_class.__qualname__}: {err}") from None
    # a field whose default is OmegaConf's MISSING must be given, as Hydra requires when it composes
    unset = [f.name for f in dataclasses.fields(made) if isinstance(getattr(made, f.name), str)
             and getattr(made, f.name) == MISSING]
    if unset:
        raise ConfigError(f"editor.{unset[0]} must be set ({config_class.__qualname__} has no default for it)")
    return made


class Editor(nn.Module, ABC):
    """Base class of ELDER and every baseline: ``Editor(model, config)`` or ``Editor(model, **fields)``.

    ``self.config`` holds the hyper-parameters; ``self.model`` and ``self.tokenizer`` are the loaded
    model's (held, not registered: the base model is not the editor's state).
    """

    #: the dataclass of this editor's hyper-parameters (the one place each is written)
    Config: ClassVar[type]
    #: the sequence-level router's query hook (ELDER, GRACE, MELO, Defer); None: the edit is in the weights
    query: SequenceQuery | None = None
    #: settings read only when inputs are routed, never while editing: a trained editor may take other values
    #: of them (``python -m evaluation.scope_report RUN --sweep threshold=...`` measures their trade-off)
    inference_settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def batch_limit(cls, config: Any) -> tuple[int, str] | None:
        """How many edit batches an editor of ``config`` (its Config, or the composed ``editor`` node) can take,
        and the setting that raises it, for editors that pre-allocate one slot per batch; None: no limit."""
        return None

    def __init__(self, model: LoadedModel, config: Any = None, **fields: Any) -> None:
        super().__init__()
        self.config = make_config(type(self).Config, config, fields)
        self.loaded = model  # a dataclass, not a Module: nothing of the base model is registered

    @property
    def model(self) -> nn.Module:
        """The causal LM whose forward applies the edits."""
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def batch_size(self) -> int:
        """Edits per call of :meth:`edit` in the stream (ELDER: 4, GRACE: 1, ...)."""
        return getattr(self.config, "batch_size", 1)  # checked where the stream uses it

    @property
    def key_position(self) -> str:
        """Which token of a teacher-forced "{prompt} {target}" row the router reads (see KEY_POSITIONS)."""
        return getattr(self.config, "key_position", "prompt_last")

    @staticmethod
    def checked_key_position(value: str) -> str:
        if value not in KEY_POSITIONS:
            raise ConfigError(f"editor.key_position must be one of {KEY_POSITIONS}, got {value!r}")
        return value

    @abstractmethod
    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        """Apply one batch of edits to ``self.model`` (sequentially after all earlier batches)."""

    def trainable_params(self) -> int:
        """Parameters the method trains or writes (a count, as in the paper's Table 3): by default the
        parameters it registers."""
        return sum(p.numel() for p in self.parameters())

    def stored_params(self) -> int:
        """Extra numbers the method keeps besides the model (codebooks, codes, keys); 0 by default."""
        return 0

    def floor_spec(self) -> FloorSpec | None:
        """What the speed benchmark compares this editor with; None if not defined."""
        return None

    def scope(self, query_positions: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Forward passes inside this block read sequence b's query at ``query_positions[b]``.

        ``query_positions`` is a (B,) long tensor: the last prompt token of each row. The first
        forward in the block fixes each sequence's route; later forwards in the same block (the
        decoding steps of ``generate`` with a KV cache) reuse it. Editors without routing ignore it.
        """
        return self.query.scope(query_positions) if self.query is not None else contextlib.nullcontext()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Inside :meth:`scope`, after its first forward: the batch goes on with ``rows`` only ((b,) long indices
        into it; generation drops the rows that have ended), so the routes taken are cut to them."""
        if self.query is not None:
            self.query.select(rows)

    def batch_scope(self, batch: EncodedBatch) -> contextlib.AbstractContextManager[None]:
        """:meth:`scope` for a teacher-forced batch, reading each row at ``self.key_position``.

        Generation has no teacher-forced target: the sequence as fed is the prompt, so both readings
        read its last token there (evaluation.editing.generation passes the prompt's positions to ``scope``).
        """
        return self.scope(batch.key_positions(self.key_position))

    def batch_loss(self, batch: EncodedBatch) -> torch.Tensor:
        """The teacher-forced target loss of ``batch`` through the edited model, routed per row."""
        with self.batch_scope(batch):
            return target_logits(self.model, batch).loss()

    def query_site(self) -> str | None:
        """Where the router reads its query, named, when nothing this editor changes runs before that
        point: the query is then the unedited model's, equal after any edits and for every editor that
        reads the same site, so a run may take it from an earlier run on the same model
        (evaluation.retention.query_store). None when the edits can move it, and without a router."""
        return None

    def ffn_input_site(self, layer: int) -> str:
        """:meth:`query_site` of a query read at FFN ``layer``'s input, for an editor whose edited FFNs are
        all at that layer or above it (an FFN's own edit does not change its input)."""
        return f"{self.loaded.ffn_name(layer)}:input"

    @torch.no_grad()
    def in_scope(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor | None:
        """(B,) bool: whether the editor's router applies its edits to each prompt.

        Read from the route the query hook derives at the last prompt token (its ``active`` mask;
        no route: nothing stored yet, so nothing in scope). None for editors without a router
        (FT-L, ROME): their edits are in the weights and act on every input.
        """
        if self.query is None:
            return None
        return self.scope_of(self.query_vectors(prompts, batch_size), batch_size)

    @torch.no_grad()
    def query_vectors(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(B, d) each prompt's query vector (on the CPU), from routing forwards that stop at the query layer."""
        assert self.query is not None, "query_vectors needs an editor with a router"
        # batches of similar lengths: less padding in the routing forwards
        lengths = [len(ids) for ids in self.tokenizer(list(prompts)).input_ids] if prompts else []
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        out = torch.empty(0, 0)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            q = self._routing_forward([prompts[j] for j in idx])[0].cpu()
            if i == 0:
                out = q.new_empty(len(prompts), q.shape[1])
            out[idx] = q
        return out

    @torch.no_grad()
    def scope_of(self, queries: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """:meth:`in_scope` from the prompts' query vectors (B, d), without a forward through the model."""
        assert self.query is not None, "scope_of needs an editor with a router"
        device = next(self.model.parameters()).device
        mask = torch.zeros(len(queries), dtype=torch.bool)
        for i in range(0, len(queries), batch_size):
            route = self.query.derive(queries[i:i + batch_size].to(device))
            if route is None:  # nothing stored yet: nothing in scope
                continue
            active = getattr(route, "active", None)
            mask[i:i + batch_size] = True if active is None else active.bool().cpu()
        return mask

    @torch.no_grad()
    def routes_for(self, prompts: Sequence[str]) -> Any:
        """The route the query hook derives for each prompt's last token (one batch, one forward)."""
        return self._routing_forward(prompts)[1]

    def _routing_forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, Any]:
        """One batch's query vectors and derived route, from a forward that stops at the query layer."""
        assert self.query is not None, "routing needs an editor with a router"
        device = next(self.model.parameters()).device
        enc = encode_pairs(self.tokenizer, list(prompts), ["x"] * len(prompts)).to(device)  # the target is not read
        self.query.stop_after_route = True  # the route is known at the query layer: skip the rest
        try:
            with self.scope(enc.query_positions):
                try:
                    target_logits(self.model, enc)
                except RouteTaken:
                    pass
                assert self.query.value is not None
                return self.query.value, self.query.derived
        finally:
            self.query.stop_after_route = False

    def write_artifacts(self, run_dir: Path, requests: Sequence[EditRequest], retention_data_dir: str) -> None:
        """Write method-specific files into the finished run's folder (ELDER: Figure 4's codes); none by default."""

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
