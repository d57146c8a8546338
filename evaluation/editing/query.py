"""Capture one query vector per sequence from a module's input (the "query layer").

ELDER, GRACE, MELO and Defer all route a whole sequence on one vector: the input of a given layer
at the last prompt token. :class:`SequenceQuery` is a forward pre-hook that stores it. It lives on
the editor instance (never at module level) and is reset at the start of every :meth:`scope`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import nn


def select_route(route: Any, rows: torch.Tensor) -> Any:
    """``route`` (what a query derives: a dataclass of per-row tensors, a tensor, or None) for ``rows`` of the batch.

    Every tensor field is per row, along dimension 0 unless the class maps the field to another in
    ``ROW_DIMS`` (e.g. ELDER's (L, B, N) scores); other fields are kept (a flag such as "the prompt has run")."""
    if route is None:
        return None
    if isinstance(route, torch.Tensor):
        return route.index_select(0, rows.to(route.device))
    if not dataclasses.is_dataclass(route) or isinstance(route, type):
        raise TypeError(f"cannot select rows of a {type(route).__name__}: a route must be a dataclass of per-row tensors")
    dims = getattr(route, "ROW_DIMS", {})
    cut = {f.name: value.index_select(dims.get(f.name, 0), rows.to(value.device))
           for f in dataclasses.fields(route) if isinstance(value := getattr(route, f.name), torch.Tensor)}
    return dataclasses.replace(route, **cut)


class RouteTaken(Exception):
    """Raised by a query hook whose ``stop_after_route`` is set, once the route is derived: a caller that
    only needs the route (``Editor.routes_for``) skips the layers above the query layer and the LM head."""


class SequenceQuery:
    """Holds the current batch's query vectors (B, d) and anything derived from them.

    ``on_query`` (optional) is called once per scope with the freshly captured (B, d) tensor and its
    result kept in ``self.derived`` (e.g. ELDER's routes), so every edited layer reads the same one.
    """

    def __init__(self, module: nn.Module, on_query: Callable[[torch.Tensor], object] | None = None,
                 detach: bool = True) -> None:
        self.positions: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.derived: object | None = None
        self.on_query = on_query
        self.detach = detach
        self.stop_after_route = False
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.positions is None or self.value is not None:
            return  # outside a scope, or a decoding step that reuses the prompt's query
        x = args[0]  # (B, T, d)
        if x.shape[0] != self.positions.shape[0]:
            raise RuntimeError(
                f"scope was opened for {self.positions.shape[0]} sequences but the forward has {x.shape[0]}"
            )
        q = self.read(x, self.positions.to(x.device))
        self.value = q.detach() if self.detach else q
        if self.on_query is not None:
            self.derived = self.on_query(self.value)
        if self.stop_after_route:
            raise RouteTaken

    def read(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, d) the query vectors from the layer input ``x`` (B, T, d): each row's token at ``positions``."""
        return x[torch.arange(x.shape[0], device=x.device), positions]

    @contextlib.contextmanager
    def scope(self, positions: torch.Tensor) -> Iterator[None]:
        self.positions, self.value, self.derived = positions, None, None
        try:
            yield
        finally:
            self.positions, self.value, self.derived = None, None, None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` ((b,) long indices into the batch) of the scope's queries and routes: the forwards
        that follow (a generation's remaining steps) run those rows alone."""
        if self.positions is None:
            raise RuntimeError("select() outside a scope")
        self.positions = self.positions.index_select(0, rows.to(self.positions.device))
        if self.value is not None:
            self.value = self.value.index_select(0, rows.to(self.value.device))
        self.derived = select_route(self.derived, rows)

    def derive(self, q: torch.Tensor) -> object | None:
        """What ``on_query`` derives from query vectors given directly (B, d): the route a forward that
        captured them takes (positions are placeholders: a route is only read here, never applied)."""
        with self.scope(torch.zeros(q.shape[0], dtype=torch.long, device=q.device)):
            self.value = q
            return self.on_query(q) if self.on_query is not None else None

    @property
    def active(self) -> bool:
        return self.positions is not None

    def remove(self) -> None:
        self._handle.remove()


def prompt_span(positions: torch.Tensor, width: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, width) bool: each row's real tokens (``attention_mask``) up to and including ``positions[b]``."""
    span = torch.arange(width, device=positions.device)[None, :] <= positions[:, None]
    if attention_mask is not None:
        span = span & attention_mask.to(span.device).bool()
    return span


def prompt_mean(x: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) float32: the mean of ``x`` (B, T, d) over each row's :func:`prompt_span`. A running sum read at the
    position, so padding (either side) adds exact zeros only: the same under left and right padding."""
    keep = prompt_span(positions, x.shape[1], attention_mask).float()
    rows = torch.arange(x.shape[0], device=x.device)
    total = (x.float() * keep[..., None]).cumsum(1)[rows, positions]
    return total / keep.sum(1, keepdim=True).clamp(min=1)


class MaskedSequenceQuery(SequenceQuery):
    """A :class:`SequenceQuery` that also knows each row's padding: a pre-hook on the decoder ``stack`` keeps the
    attention mask of the scope's first forward (the query layer sees none), for a :meth:`read` over the prompt's
    tokens (WISE's activation score, MEMOIR's prompt feature). Decoding steps reuse the prompt's route."""

    def __init__(self, stack: nn.Module, module: nn.Module, on_query: Callable[[torch.Tensor], object] | None = None,
                 detach: bool = True) -> None:
        super().__init__(module, on_query, detach)
        self.attention_mask: torch.Tensor | None = None
        self._mask_handle = stack.register_forward_pre_hook(self._read_mask, with_kwargs=True)

    def _read_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.positions is not None and self.value is None:  # the scope's first forward (the prompt)
            mask = kwargs.get("attention_mask")
            self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def padding(self, x: torch.Tensor) -> torch.Tensor | None:
        """The kept attention mask where it fits the layer input ``x`` (B, T, d), else None (no padding known)."""
        mask = self.attention_mask
        return mask if mask is not None and mask.shape == x.shape[:2] else None

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.index_select(0, rows.to(self.attention_mask.device))

    @contextlib.contextmanager
    def scope(self, positions: torch.Tensor) -> Iterator[None]:
        self.attention_mask = None
        try:
            with super().scope(positions):
                yield
        finally:
            self.attention_mask = None

    def remove(self) -> None:
        super().remove()
        self._mask_handle.remove()
