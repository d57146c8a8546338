"""Save ELDER's allocation codes after a stream, for the paper's Figure 4 (t-SNE of codes).

After the stream, :func:`dump_codes` computes the allocation code (L*N bits, ones at each layer's
top-k router indices) of
- ``n_groups`` paraphrase groups: for edits spread evenly over the stream, the edit prompt (trained on)
  and its held-out paraphrase (never trained on); and
- ``n_task`` NQ task inputs, prompted exactly as the retention suite prompts them,
and writes them to an ``.npz`` with each input's nearest Hamming distance to the codes ELDER stored
during the stream and whether the deferral would switch ELDER off for it (distance >= epsilon).
``python -m evaluation.tables figure4 RUN_DIR`` draws the figure from these files.

Called by :meth:`ElderEditor.write_artifacts` when a run finishes. A failure here is logged and never
fails the run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from evaluation.common.atomic import write_atomic
from evaluation.common.errors import HarnessError

log = logging.getLogger(__name__)


def _codes(editor: Any, prompts: Sequence[str], batch_size: int) -> np.ndarray:
    out = [np.asarray(editor.codes_for(list(prompts[i:i + batch_size])).cpu().numpy(), dtype=bool)
           for i in range(0, len(prompts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=bool)


def _nq_prompts(retention_data_dir: Optional[str | Path], n_task: int) -> list[str]:
    if not retention_data_dir or n_task <= 0:
        return []
    from evaluation.retention.nq import NQ

    task = NQ()
    try:
        examples = task.load(str(retention_data_dir), limit=n_task)
    except Exception as err:  # noqa: BLE001 - a missing file only drops the task inputs from the figure
        log.warning("codes dump: no NQ task inputs (%s)", err)
        return []
    return task.prompts(examples)


def _min_distance(codes: np.ndarray, stored: Optional[np.ndarray]) -> np.ndarray:
    if codes.size == 0:
        return np.zeros(len(codes), dtype=np.int64)
    if stored is None or stored.size == 0:  # nothing stored: as the editor does, farther than any code
        return np.full(len(codes), codes.shape[1] + 1, dtype=np.int64)
    stored = stored.astype(bool)
    out = np.empty(len(codes), dtype=np.int64)
    for i in range(0, len(codes), 64):  # (64, M, bits) at a time: fine for millions of stored bits
        out[i:i + 64] = (codes[i:i + 64, None, :] != stored[None, :, :]).sum(-1).min(-1)
    return out


def dump_codes(editor: Any, requests: Sequence[Any], retention_data_dir: Optional[str | Path], out_path: str | Path,
               n_groups: int = 5, n_task: int = 20, batch_size: int = 8) -> Optional[Path]:
    """Write the codes of ``n_groups`` edit/paraphrase groups and ``n_task`` NQ inputs to ``out_path``.

    Returns the path written, or None when the editor has no codes or the dump failed (logged).
    """
    if not hasattr(editor, "codes_for"):
        return None
    try:
        picks = sorted({int(round(i)) for i in np.linspace(0, len(requests) - 1, min(n_groups, len(requests)))}) \
            if requests else []
        texts, kinds, groups, uids = [], [], [], []
        for g, index in enumerate(picks):
            request = requests[index]
            for kind, text in (("edit", request.prompt), ("paraphrase", request.paraphrase)):
                texts.append(text)
                kinds.append(kind)
                groups.append(g)
                uids.append(int(request.uid))
        for text in _nq_prompts(retention_data_dir, n_task):
            texts.append(text)
            kinds.append("task")
            groups.append(-1)
            uids.append(-1)
        codes = _codes(editor, texts, batch_size)
        stored_np = editor.stored_codes.cpu().numpy()
        min_distance = _min_distance(codes, stored_np)
        c = editor.config
        epsilon = int(c.epsilon)
        # the editor's rule: an input whose nearest stored code is >= epsilon bits away is a task input
        deferred = (min_distance >= epsilon) if c.deferral else np.zeros(len(codes), dtype=bool)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(
            codes=codes.astype(np.uint8), group=np.asarray(groups, dtype=np.int64),
            kind=np.asarray(kinds, dtype=str), text=np.asarray(texts, dtype=str), uid=np.asarray(uids, dtype=np.int64),
            min_distance=min_distance, deferred=deferred, epsilon=np.int64(epsilon),
            num_layers=np.int64(len(c.layers)), num_loras=np.int64(c.num_loras), top_k=np.int64(c.top_k),
            num_stored=np.int64(len(stored_np)),
        )
        # whole or not at all: a kill mid-write leaves the previous file, never a truncated archive
        write_atomic(out_path, lambda f: np.savez_compressed(f, **arrays), binary=True)
        log.info("allocation codes of %d inputs written to %s", len(texts), out_path)
        return out_path
    except Exception as err:  # noqa: BLE001 - the figure's data must never cost the run its results
        if isinstance(err, HarnessError):  # e.g. a signal the user sent: a stop asked for, not a failed figure
            raise
        log.exception("could not dump allocation codes to %s", out_path)
        return None
