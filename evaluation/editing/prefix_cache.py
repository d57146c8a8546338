"""Run the frozen decoder blocks below the edited layers once per edit batch, then replay them.

Editors train for many iterations on the same batch; every block below the first trainable one
(and below the query layer) computes the same output each time. Inside :meth:`FrozenPrefix.cache`
each such block records its output on the first forward and returns the recorded object on later
forwards without computing, so results are bit-identical and the iterations only pay for the
blocks that carry gradients.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from evaluation.common.errors import ConfigError
from evaluation.editing.models import LoadedModel, replace_module


class _Replay(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.enabled = False
        self.shape: torch.Size | None = None
        self.output: Any = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.block(hidden_states, *args, **kwargs)
        if self.output is not None:
            if hidden_states.shape != self.shape:
                raise RuntimeError("prefix cache replayed on a batch of another shape; "
                                   "open a new FrozenPrefix.cache() for each batch")
            return self.output
        self.shape = hidden_states.shape
        self.output = self.block(hidden_states, *args, **kwargs)
        return self.output

    def reset(self, enabled: bool) -> None:
        self.enabled, self.shape, self.output = enabled, None, None


class FrozenPrefix:
    """Wraps blocks ``0..num_blocks-1`` (named by ``block_template``) of ``model`` for replay."""

    def __init__(self, model: nn.Module, block_template: str, num_blocks: int) -> None:
        self.wrappers: list[_Replay] = []
        for i in range(num_blocks):
            name = block_template.format(i=i)
            wrapper = _Replay(model.get_submodule(name))
            replace_module(model, name, wrapper)
            self.wrappers.append(wrapper)

    @contextlib.contextmanager
    def cache(self) -> Iterator[None]:
        """Within the block, all forwards must be on the same input batch (one edit batch)."""
        for w in self.wrappers:
            w.reset(True)
        try:
            yield
        finally:
            for w in self.wrappers:
                w.reset(False)

    def below(self, n: int) -> "FrozenPrefix":
        """The replay of blocks ``0..n-1`` only, sharing these wrappers: an editor whose candidate layers lie at
        several depths (WilKE) wraps the blocks below the highest once and replays those below each."""
        view = copy.copy(self)
        view.wrappers = self.wrappers[:n]
        return view

    @staticmethod
    def blocks_below(layers: Sequence[int]) -> int:
        return min(layers)


def frozen_prefix(model: LoadedModel, enabled: bool, num_blocks: int) -> FrozenPrefix | None:
    """Replay of the frozen blocks below ``num_blocks`` during one edit's iterations (``editor.prefix_cache``)."""
    if not enabled or num_blocks == 0:
        return None
    if not model.block_template:
        raise ConfigError(f"editor.prefix_cache=true needs the model config's block_template (model '{model.name}' "
                          f"has none); set it or editor.prefix_cache=false")
    return FrozenPrefix(model.model, model.block_template, num_blocks)


def replaying(prefix: FrozenPrefix | None) -> contextlib.AbstractContextManager[None]:
    """``prefix.cache()``, or nothing when the replay is off."""
    return prefix.cache() if prefix is not None else contextlib.nullcontext()
