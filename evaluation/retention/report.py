"""What a retention pass returns (:class:`RetentionReport`) and what a cache entry stores per task."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from evaluation.editing.generation import Continuation


@dataclass
class RetentionReport:
    scores: dict[str, float]  # headline per task (0..1) and "average"
    details: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # generation + scoring, when it was generated
    reused: list[str] = field(default_factory=list)  # tasks read back from the cache, not generated now
    # per task, one continuation per prompt row (task.prompts order), and per row whether the editor's
    # router put it in scope (None: no router, or the unedited pass)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    routed: dict[str, list[bool] | None] = field(default_factory=dict)
    # per task and row, why generation stopped ("eos": the model's end token; "budget": max_new_tokens)
    # and how many tokens it generated (the end token not counted)
    stops: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    # per task, the rows whose continuation is the unedited pass's (out of scope), not generated again
    reused_rows: dict[str, list[bool]] = field(default_factory=dict)
    # tasks another run was generating, left for ``collect`` (evaluate(defer_others=True)); no average yet
    pending: list[str] = field(default_factory=list)

    def task_fields(self, name: str) -> dict[str, Any]:
        """One task's :data:`TASK_FIELDS` (what a cache entry stores besides its key and settings)."""
        return {key: getattr(self, attr)[name] for key, attr in TASK_FIELDS.items()}

    @property
    def cached(self) -> bool:
        """Every task came from the cache."""
        return bool(self.details) and set(self.reused) >= set(self.details)

    def ratio_to(self, base: "RetentionReport") -> dict[str, float | None]:
        """Each score over ``base``'s; None (JSON null) where the base scores 0 and the ratio is undefined."""
        return {k: (v / base.scores[k] if base.scores.get(k) else None) for k, v in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetentionReport":
        return cls(scores=dict(d["scores"]), details={k: dict(v) for k, v in d.get("details", {}).items()},
                   seconds=dict(d.get("seconds", {})), reused=list(d.get("reused", [])),
                   outputs={k: list(v) for k, v in d.get("outputs", {}).items()},
                   routed={k: (None if v is None else list(v)) for k, v in d.get("routed", {}).items()},
                   stops={k: list(v) for k, v in d.get("stops", {}).items()},
                   tokens={k: list(v) for k, v in d.get("tokens", {}).items()},
                   reused_rows={k: list(v) for k, v in d.get("reused_rows", {}).items()},
                   pending=list(d.get("pending", [])))


#: what a stored task holds besides its key and settings, each with the report's per-task map it fills
TASK_FIELDS = {"score": "scores", "details": "details", "seconds": "seconds", "outputs": "outputs", "stops": "stops",
               "tokens": "tokens", "routed": "routed", "reused_rows": "reused_rows"}


def fill(report: RetentionReport, name: str, blob: Mapping[str, Any]) -> None:
    """One task's :data:`TASK_FIELDS` (stored or just computed) into ``report``, lists and dicts copied."""
    for key, attr in TASK_FIELDS.items():
        value = blob[key]
        getattr(report, attr)[name] = list(value) if isinstance(value, list) else (
            dict(value) if isinstance(value, dict) else value)


def row_of(c: "Continuation") -> tuple[str, str, int]:
    return c.text, c.stop, int(c.tokens)


def rows_of(report: RetentionReport, name: str) -> list[tuple[str, str, int]] | None:
    """``(text, stop, tokens)`` of each of a report's rows of one task; None where it has none (or a report
    made before stop reasons were recorded: its rows are generated again rather than reused without one)."""
    if name not in report.outputs or name not in report.stops or name not in report.tokens:
        return None
    return list(zip(report.outputs[name], report.stops[name], report.tokens[name]))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def valid_stored_fields(blob: dict[str, Any]) -> bool:
    details, outputs, routed, reused, stops, tokens = (
        blob.get(k) for k in ("details", "outputs", "routed", "reused_rows", "stops", "tokens"))
    return (_is_number(blob.get("score")) and _is_number(blob.get("seconds")) and isinstance(details, dict)
            and all(isinstance(k, str) and _is_number(v) for k, v in details.items())
            and isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
            and (routed is None or (isinstance(routed, list) and len(routed) == len(outputs)))
            and isinstance(reused, list) and len(reused) == len(outputs)
            and isinstance(stops, list) and len(stops) == len(outputs) and all(s in STOPS for s in stops)
            and isinstance(tokens, list) and len(tokens) == len(outputs)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in tokens))


STOPS = ("eos", "budget", "stop")  # evaluation.editing.generation.Continuation.stop
