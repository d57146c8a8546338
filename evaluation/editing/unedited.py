"""The unedited model as an editor that edits nothing: the paper's "Base" row, and the reference
for locality and retention."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from data.requests import EditRequest
from evaluation.editing.editor import Editor, EditStats


@dataclass
class UneditedConfig:
    batch_size: int = 4  # requests per (empty) edit call: only how the stream walks the data


class Unedited(Editor):
    """Registers nothing: its state is empty and the model's forward is the base model's."""

    Config = UneditedConfig

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        return EditStats(loss=float("nan"), iterations=0)
