"""WISE's parts around the editor: the route, the activation query, the side-memory layer, the unrelated texts of
the margin loss."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from data.text_corpus import read_texts
from evaluation.common.errors import ConfigError
from evaluation.editing.query import MaskedSequenceQuery

MAIN = -1  # route: the main memory (the unedited layer)
NO_EDIT = 1e9  # the authors' EditingMeanAct(min_a=1e9): a shard without edits routes nothing to itself


@dataclass
class MemoryRoute:
    """Which memory each sequence uses: an index into the editor's candidate memories, MAIN where none."""

    memory: torch.Tensor  # (B,) long
    active: torch.Tensor  # (B,) bool: False = the main memory, bit for bit


class ActivationQuery(MaskedSequenceQuery):
    """The per-sequence query of WISE: each row's activation scores against every candidate side memory,
    averaged over its real tokens up to its query position (the kept attention mask says which are real), on
    the first forward of a scope only, so generation's decoding steps keep the prompt's route."""

    def __init__(self, stack: nn.Module, layer: nn.Module,
                 score: Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor],
                 on_query: Callable[[torch.Tensor], object]) -> None:
        super().__init__(stack, layer, on_query=on_query)
        self._score = score

    def read(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._score(x, self.padding(x), positions)


class SideMemoryLayer(nn.Module):
    """The edited matrix's place in the model: ``apply(x, base_layer(x))`` (the editor picks main or side)."""

    def __init__(self, base_layer: nn.Module, apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.base_layer, self.apply = base_layer, apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.base_layer(x))


def read_loc_corpus(path: str) -> list[str]:
    """The unrelated texts of ``loc_corpus`` (see WISEConfig): a .json of ZsRE/CounterFact records, or a text
    file (:func:`data.text_corpus.read_texts`)."""
    p = Path(path).expanduser()
    if p.suffix.lower() != ".json" or not p.is_file():
        return read_texts(path, "editor.loc_corpus", instead="a .json of CounterFact/ZsRE records")
    texts = []
    for r in json.loads(p.read_text(encoding="utf-8")):
        if "loc" in r and "loc_ans" in r:  # the authors' ZsRE train records
            texts.append(f"{str(r['loc']).strip()} {str(r['loc_ans']).strip()}")
        elif "prompt" in r and "ground_truth" in r:  # CounterFact (EasyEdit's flat format)
            truth = r["ground_truth"][0] if isinstance(r["ground_truth"], list) else r["ground_truth"]
            texts.append(f"{str(r['prompt']).strip()} {str(truth).strip()}")
        else:
            raise ConfigError(f"editor.loc_corpus={path}: a record has neither loc/loc_ans nor prompt/ground_truth")
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError(f"editor.loc_corpus={path} holds no text")
    return texts


def mean_positive(v: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries (0 when there are none), as the authors' margin terms."""
    pos = v > 0
    return torch.where(pos, v, 0).sum() / pos.sum() if bool(pos.any()) else v.new_zeros(())
