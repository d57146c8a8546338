"""The unedited model as an editor that edits nothing: the paper's "Base" row, and the reference
for locality and retention."""
from __future__ import annotations

from typing import Any, Sequence

from data.requests import EditRequest
from evaluation.editor import EditStats, Editor
from evaluation.models import LoadedModel


class Unedited(Editor):
    def __init__(self, model: LoadedModel, batch_size: int = 1) -> None:
        self.model, self.tokenizer, self.batch_size = model.model, model.tokenizer, batch_size

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        return EditStats(loss=float("nan"), iterations=0)

    def trainable_params(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
