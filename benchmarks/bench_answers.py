"""What scoring edits from generated answers costs: one curve point and one edit-time point, with and
without generation, measured in one run on one edited model.

    python -m benchmarks.bench_answers --model smollm2 --editor elder --dataset zsre --edits 100 --threads 1

It edits ``--edits`` requests with the editor (not timed against anything: setup), then times

- a curve point over every edit: teacher-forced only (the metrics before generated answers existed) and
  teacher-forced plus generated (reliability, generalization and locality answers);
- an edit-time point (one batch right after it is edited: reliability and generalization, no locality),
  both ways, averaged over the last ``--edit-time-points`` batches;
- the unedited model's locality answers: generated, and read back from the answer cache;
- a curve point's answers alone, with rows that have ended leaving their batch (the default) and kept to its end;

and prints a Markdown table of seconds, the ratio with generation over without, and the overhead per edit.
Every figure is measured in this one process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
    """``fn()``'s result and its mean seconds over ``repeat`` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - start) / repeat


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a choice of the model config group (conf/model/*.yaml)")
    ap.add_argument("--editor", default="elder")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--edits", type=int, default=100, help="edits made before the points are timed")
    ap.add_argument("--edit-time-points", type=int, default=5, help="edit-time points timed (the last batches)")
    ap.add_argument("--answers", default="harness", help="the answer reading (conf/answers/*.yaml)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=32, help="eval_batch_size")
    args = ap.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from evaluation.editing.unedited import Unedited
    from evaluation.run.answer_metrics import (
        AnswerCache,
        AnswerScorer,
        base_locality_answers,
    )
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.metrics import (
        base_locality_predictions,
        evaluate_edits,
        locality_inputs,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}", f"editor={args.editor}", f"dataset={args.dataset}",
                          f"dataset.num_edits={args.edits}", f"answers={args.answers}"])
    seed_everything(cfg.seed)
    requests, loaded = build(cfg.dataset).load(), build(cfg.model)
    reading = build(cfg.answers)
    scorer = AnswerScorer(reading, args.batch_size, cfg.generation_token_budget)
    unedited = Unedited(loaded)
    base = base_locality_predictions(unedited, requests, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cache = AnswerCache(tmp, "bench")
        base_answers, generate_s = _timed(lambda: base_locality_answers(unedited, requests, scorer, cache))
        _, read_s = _timed(lambda: base_locality_answers(unedited, requests, scorer, cache), repeat=3)

    editor = build(cfg.editor, model=loaded)
    bs = editor.batch_size
    start = time.perf_counter()
    for i in tqdm(range(0, len(requests), bs), desc="editing", unit="batch"):
        editor.edit(requests[i:i + bs])
    edit_s = time.perf_counter() - start

    def point(with_answers: bool, lo: int = 0, hi: int = len(requests), locality: bool = True) -> dict[str, float]:
        extra: dict[str, Any] = {"scorer": scorer, "base_answers": base_answers[lo:hi]} if with_answers else {}
        return evaluate_edits(editor, requests[lo:hi], base[lo:hi], args.batch_size, progress=False,
                              locality=locality, **extra)

    rows = []
    tf, tf_s = _timed(lambda: point(False))
    both, both_s = _timed(lambda: point(True))
    assert all(both[k] == v for k, v in tf.items()), "the teacher-forced metrics changed with generation"
    rows.append(("curve point, all edits", tf_s, both_s, len(requests)))
    last = [(lo, min(lo + bs, len(requests))) for lo in range(0, len(requests), bs)][-args.edit_time_points:]
    et_tf = sum(_timed(lambda: point(False, lo, hi, False))[1] for lo, hi in last) / len(last)
    et_both = sum(_timed(lambda: point(True, lo, hi, False))[1] for lo, hi in last) / len(last)
    rows.append((f"edit-time point, one batch of {bs}", et_tf, et_both, bs))
    # the answers alone: rows that have ended leave their batch (the default) or stay to its end
    prompts = [r.prompt for r in requests] + [p for r in requests for p in r.paraphrases] + locality_inputs(requests)[0]
    kept_scorer = AnswerScorer(reading, args.batch_size, cfg.generation_token_budget, prune_every=None)
    kept, kept_s = _timed(lambda: kept_scorer.answers(editor, prompts))
    left, left_s = _timed(lambda: scorer.answers(editor, prompts))
    assert left == kept, "rows leaving their batch changed an answer"

    print(f"\n{args.editor} on {args.model}, {args.dataset}, {len(requests)} edits ({edit_s:.1f} s of editing, "
          f"{edit_s / len(requests):.2f} s/edit); torch threads {torch.get_num_threads()}; answers={args.answers} "
          f"(stop {reading.stop}, at most {reading.max_new_tokens} new tokens)\n")
    print("| evaluation | teacher-forced only (s) | with generated answers (s) | ratio | overhead per edit (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, a, b, n in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {(b - a) / n:.3f} |")
    print(f"| unedited locality answers: generated / read from the cache | {generate_s:.2f} | {read_s:.4f} | "
          f"{generate_s / read_s:.0f}x faster read | |")
    print(f"\nThe {len(prompts)} answers of a curve point alone: {kept_s:.2f} s with every row kept to the end of its "
          f"batch, {left_s:.2f} s with rows leaving every {scorer.prune_every} steps once they end "
          f"({kept_s / left_s:.2f}x; the same answers).")
    per_edit_time = (et_both - et_tf) / bs
    print(f"\nEdit-time points over a stream: {et_both:.2f} s per batch with generation ({et_tf:.2f} s "
          f"teacher-forced only), {per_edit_time:.3f} s per edit of generation beside "
          f"{edit_s / len(requests):.2f} s per edit of editing ({per_edit_time / (edit_s / len(requests)):.0%}).")
    print(f"Scores: teacher-forced reliability {tf['reliability']:.3f}, generated {both['reliability_generated']:.3f}.")


if __name__ == "__main__":
    main()
