"""The one record type every editor and metric consumes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditRequest:
    """One fact to edit, with its held-out paraphrase and an unrelated locality probe.

    The model is trained on ``"{prompt} {target}"``; ``paraphrase`` is never trained on and only
    measures generalization; ``locality_prompt``/``locality_answer`` measure drift on unrelated input.
    """

    uid: int  # position in the stream; also the fact label for ELDER's preset allocation
    prompt: str
    target: str
    paraphrase: str
    locality_prompt: str
    locality_answer: str
    subject: str = ""
    ground_truth: str = ""
