"""The lifelong loop: the only place edits are applied, one batch after another, to one model."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from data.requests import EditRequest
from evaluation.editor import Editor
from evaluation.loggers import NullLogger
from evaluation.metrics import RowPredictions, evaluate_edits


@dataclass
class StreamResult:
    metrics: dict[str, float]
    curves: list[dict[str, Any]] = field(default_factory=list)
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0


def run_stream(editor: Editor, requests: Sequence[EditRequest], base_locality: Sequence[RowPredictions],
               logger: NullLogger, eval_every: int = 0, eval_batch_size: int = 32,
               progress: bool = True) -> StreamResult:
    """Edit ``requests`` in batches of ``editor.batch_size``; evaluate every ``eval_every`` edits and at the end."""
    result = StreamResult(metrics={})
    bs = max(1, int(editor.batch_size))
    done = 0
    bar = tqdm(total=len(requests), desc="editing", unit="edit", disable=not progress)
    while done < len(requests):
        batch = requests[done:done + bs]
        start = time.perf_counter()
        stats = editor.edit(batch)
        result.edit_seconds += time.perf_counter() - start
        before, done = done, done + len(batch)
        bar.update(len(batch))
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        logger.log({"edit/loss": stats.loss, **{f"edit/{k}": v for k, v in stats.extra.items()},
                    "edit/seconds_per_edit": result.edit_seconds / done}, step=done)
        if eval_every and done < len(requests) and done // eval_every > before // eval_every:
            start = time.perf_counter()
            point = evaluate_edits(editor, requests[:done], base_locality[:done], eval_batch_size, progress=False)
            result.eval_seconds += time.perf_counter() - start
            result.curves.append({"edits": done, **point})
            logger.log({f"curve/{k}": v for k, v in point.items()}, step=done)
    bar.close()
    start = time.perf_counter()
    result.metrics = evaluate_edits(editor, requests, base_locality, eval_batch_size, progress=progress)
    result.eval_seconds += time.perf_counter() - start
    result.curves.append({"edits": len(requests), **result.metrics})
    return result
