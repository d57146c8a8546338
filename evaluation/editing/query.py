"""Capture one query vector per sequence from a module's input (the "query layer").

ELDER, GRACE, MELO and Defer all route a whole sequence on one vector: the input of a given layer
at the last prompt token. :class:`SequenceQuery` is a forward pre-hook that stores it. It lives on
the editor instance (never at module level) and is reset at the start of every :meth:`scope`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


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
        rows = torch.arange(x.shape[0], device=x.device)
        q = x[rows, self.positions.to(x.device)]
        self.value = q.detach() if self.detach else q
        if self.on_query is not None:
            self.derived = self.on_query(self.value)
        if self.stop_after_route:
            raise RouteTaken

    @contextlib.contextmanager
    def scope(self, positions: torch.Tensor) -> Iterator[None]:
        self.positions, self.value, self.derived = positions, None, None
        try:
            yield
        finally:
            self.positions, self.value, self.derived = None, None, None

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
