"""Throughput of the retention suite: batched generation vs one prompt per call.

    python -m benchmarks.bench_retention --model smollm2 --limit 32 --threads 1
    python -m benchmarks.bench_retention --model gpt2xl --limit 64 --batch-size 32   # needs the weights

For every task it generates the same prompts twice, once through the batched generator (one call
with all prompts, sorted and batched inside) and once one prompt per call, and prints a Markdown
table of examples/s, the speed-up, and whether both give the same continuations and score.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.retention.suite import TASK_NAMES, Gu2024Suite  # noqa: E402

GenerateFn = Callable[..., list[str]]
DEFAULT_DATA_DIR = os.environ.get("RETENTION_DATA_DIR", str(ROOT.parent / "shared" / "data" / "retention"))


def one_at_a_time(generate: GenerateFn) -> GenerateFn:
    """A generator that calls ``generate`` with a single prompt per call."""

    def single(prompts: Sequence[str], max_new_tokens: int, desc: str = "") -> list[str]:
        out = []
        for p in prompts:
            out.extend(generate([p], max_new_tokens, desc=desc))
        return out

    return single


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def _timed(generate: GenerateFn, prompts: list[str], max_new_tokens: int, desc: str) -> tuple[list[str], float]:
    _sync()
    t0 = time.perf_counter()
    out = list(generate(prompts, max_new_tokens, desc=desc))
    _sync()
    return out, time.perf_counter() - t0


def measure_throughput(generate_batched: GenerateFn, generate_single: GenerateFn | None,
                       tasks: Sequence[str] = TASK_NAMES, limit: int | None = 32,
                       data_dir: str = DEFAULT_DATA_DIR, warmup: bool = True) -> dict[str, dict[str, float]]:
    """Per task (and ``"total"``): examples/s batched and one prompt per call, their ratio.

    ``generate_single`` is wrapped so it receives one prompt per call (``None``: the batched
    generator itself, one prompt per call). Examples are the suite's items (a CoNLL03 sentence is one
    example and four prompts). Also reports the fraction of identical continuations and both scores.
    """
    suite = Gu2024Suite(data_dir, tasks=tasks, limit=limit)
    single = one_at_a_time(generate_single if generate_single is not None else generate_batched)
    if warmup:  # first CUDA call pays kernel selection and allocator growth; keep it out of the timings
        first = suite.tasks[suite.task_names[0]]
        p = first.prompts(suite.examples(suite.task_names[0]))[:2]
        generate_batched(p, first.max_new_tokens, desc="warmup")
        single(p[:1], first.max_new_tokens, desc="warmup")
    results: dict[str, dict[str, float]] = {}
    tot_n = tot_b = tot_s = 0.0
    for name in suite.task_names:
        task = suite.tasks[name]
        examples = suite.examples(name)
        prompts = task.prompts(examples)
        out_b, t_b = _timed(generate_batched, prompts, task.max_new_tokens, name)
        out_s, t_s = _timed(single, prompts, task.max_new_tokens, name)
        n = len(examples)
        results[name] = {
            "n_examples": float(n),
            "n_prompts": float(len(prompts)),
            "batched_s": t_b,
            "single_s": t_s,
            "batched_examples_per_s": n / t_b if t_b else float("inf"),
            "single_examples_per_s": n / t_s if t_s else float("inf"),
            "speedup": t_s / t_b if t_b else float("inf"),
            "agreement": sum(a == b for a, b in zip(out_b, out_s)) / len(prompts) if prompts else 1.0,
            "batched_score": task.score(examples, out_b)[0],
            "single_score": task.score(examples, out_s)[0],
        }
        tot_n, tot_b, tot_s = tot_n + n, tot_b + t_b, tot_s + t_s
    results["total"] = {
        "n_examples": tot_n,
        "batched_s": tot_b,
        "single_s": tot_s,
        "batched_examples_per_s": tot_n / tot_b if tot_b else float("inf"),
        "single_examples_per_s": tot_n / tot_s if tot_s else float("inf"),
        "speedup": tot_s / tot_b if tot_b else float("inf"),
    }
    return results


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| task | examples | batched ex/s | one-at-a-time ex/s | speed-up | same outputs | score (batched / single) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        same = f"{r['agreement']:.1%}" if "agreement" in r else ""
        score = f"{r['batched_score']:.3f} / {r['single_score']:.3f}" if "batched_score" in r else ""
        lines.append(f"| {name} | {int(r['n_examples'])} | {r['batched_examples_per_s']:.2f} | "
                     f"{r['single_examples_per_s']:.2f} | {r['speedup']:.1f}x | {same} | {score} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a choice of the model config group (conf/model/*.yaml)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument("--limit", type=int, default=32, help="items per task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = ap.parse_args(argv)

    import torch
    from hydra.utils import instantiate

    from evaluation.editing.generation import make_generate_fn
    from evaluation.run.compose import compose_config

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = instantiate(compose_config([f"model={args.model}"]).model)
    model, tokenizer = loaded.model, loaded.tokenizer
    batched = make_generate_fn(model, tokenizer, batch_size=args.batch_size, progress=False)
    single = make_generate_fn(model, tokenizer, batch_size=1, progress=False)
    results = measure_throughput(batched, single, tasks=args.tasks.split(","), limit=args.limit, data_dir=args.data_dir)
    device = next(model.parameters()).device
    print(f"retention suite throughput: {args.model}, {args.limit} items per task, batch size "
          f"{args.batch_size}, device {device}\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
