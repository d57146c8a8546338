"""Throughput of the retention suite: one prompt per call, fixed batches, token-budget batches.

    python -m benchmarks.bench_retention --model smollm2 --limit 16 --threads 1
    python -m benchmarks.bench_retention --model smollm2 --limit 16 --threads 1 --token-budget 1024 2048
    python -m benchmarks.bench_retention --model gpt2xl --limit 64 --batch-size 32   # needs the weights

For every task it generates the same prompts once per way: one prompt per call (the reference), fixed
batches of ``--batch-size`` (the old way), and batches cut by each ``--token-budget`` (at most
``--batch-size`` rows). It prints a Markdown table of examples/s, the speed-up of each way over one
prompt per call, whether it gave the same continuations, the scores, and an overall line.

The ``reuse`` section then makes ``--reuse-edits`` edits with a routed editor (``--reuse-editor``, MELO
by default) and times its edited pass three ways: every row generated again; the unedited continuation
reused for the rows its router leaves out of scope (``retention.reuse_unedited``), the routing forwards
included (a model's first edited pass); and the same with the routing queries read from the query store
that pass filled (every later edited pass on the model: other editors reading the same site, seeds,
numbers of edits; evaluation.retention.query_store).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluation.retention.query_store import QueryStore  # noqa: E402
from evaluation.retention.suite import TASK_NAMES, GenerateFn, Gu2024Suite  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get("RETENTION_DATA_DIR", str(ROOT.parent / "shared" / "data" / "retention"))
SINGLE = "one-at-a-time"


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


def _timed(generate: GenerateFn, prompts: list[str], max_new_tokens: int, desc: str) -> tuple[list[Any], float]:
    _sync()
    t0 = time.perf_counter()
    out = list(generate(prompts, max_new_tokens, desc=desc))
    _sync()
    return out, time.perf_counter() - t0


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds else float("inf")


def measure_throughput(ways: Mapping[str, GenerateFn], tasks: Sequence[str] = TASK_NAMES, limit: int | None = 32,
                       data_dir: str = DEFAULT_DATA_DIR, warmup: bool = True) -> dict[str, dict[str, Any]]:
    """Per task (and ``"total"``): for each named way, seconds, examples/s and the speed-up over the
    first way (the reference, normally one prompt per call), the fraction of continuations identical to
    the reference's, and the task score.

    ``results[task]`` holds ``n_examples``, ``n_prompts`` and one dict per way. Examples are the suite's
    items (a CoNLL03 sentence is one example and four prompts).
    """
    suite = Gu2024Suite(data_dir, tasks=tasks, limit=limit)
    names = list(ways)
    if warmup:  # first calls pay allocator growth (and CUDA kernel selection); keep them out of the timings
        first = suite.tasks[suite.task_names[0]]
        p = first.prompts(suite.examples(suite.task_names[0]))[:2]
        for generate in ways.values():
            generate(p, first.max_new_tokens, desc="warmup")
    results: dict[str, dict[str, Any]] = {}
    total: dict[str, Any] = {"n_examples": 0, **{w: {"seconds": 0.0} for w in names}}
    for name in suite.task_names:
        task = suite.tasks[name]
        examples = suite.examples(name)
        prompts = task.prompts(examples)
        row: dict[str, Any] = {"n_examples": len(examples), "n_prompts": len(prompts)}
        outputs: dict[str, list[Any]] = {}  # Continuations: a way agrees when text, length and stop agree
        for way in names:
            outputs[way], seconds = _timed(ways[way], prompts, task.max_new_tokens, f"{name} {way}")
            row[way] = {"seconds": seconds, "examples_per_s": _rate(len(examples), seconds),
                        "score": task.score(examples, [c.text for c in outputs[way]],
                                            [c.stop == "eos" for c in outputs[way]])[0],
                        "agreement": (sum(a == b for a, b in zip(outputs[way], outputs[names[0]])) / len(prompts)
                                      if prompts else 1.0)}
            total[way]["seconds"] += seconds
        for way in names:
            row[way]["speedup"] = row[names[0]]["seconds"] / row[way]["seconds"] if row[way]["seconds"] else float("inf")
        results[name] = row
        total["n_examples"] += len(examples)
    for way in names:
        total[way]["examples_per_s"] = _rate(total["n_examples"], total[way]["seconds"])
        total[way]["speedup"] = total[names[0]]["seconds"] / total[way]["seconds"] if total[way]["seconds"] else float("inf")
    results["total"] = total
    return results


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per task: examples/s of every way with its speed-up over the first, identical outputs, scores."""
    names = [k for k, v in results["total"].items() if isinstance(v, dict)]
    head = ["task", "examples", f"{names[0]} ex/s"] + [f"{w} ex/s (speed-up)" for w in names[1:]] + \
           ["same outputs (" + " / ".join(names[1:]) + ")", "score (" + " / ".join(names) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for task, r in results.items():
        cells = [task, str(int(r["n_examples"])), f"{r[names[0]]['examples_per_s']:.2f}"]
        cells += [f"{r[w]['examples_per_s']:.2f} ({r[w]['speedup']:.2f}x)" for w in names[1:]]
        cells.append(" / ".join(f"{r[w]['agreement']:.0%}" for w in names[1:]) if "agreement" in r[names[0]] else "")
        cells.append(" / ".join(f"{r[w]['score']:.3f}" for w in names) if "score" in r[names[0]] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overall_line(results: Mapping[str, Mapping[str, Any]]) -> str:
    """``overall: N examples; <way> S s = R ex/s (Xx, identical outputs); ...`` from ``results["total"]``."""
    total = results["total"]
    names = [k for k, v in total.items() if isinstance(v, dict)]
    tasks = [t for t in results if t != "total"]
    parts = []
    for way in names:
        r = total[way]
        same = "" if way == names[0] else (", identical outputs" if all(results[t][way]["agreement"] == 1.0
                                                                         for t in tasks) else ", DIFFERENT outputs")
        parts.append(f"{way} {r['seconds']:.1f} s = {r['examples_per_s']:.2f} ex/s ({r['speedup']:.2f}x{same})")
    return f"overall: {int(total['n_examples'])} examples; " + "; ".join(parts)


def throughput_section(loaded: Any, cfg: Any, args: argparse.Namespace) -> str:
    """Unedited generation: one prompt per call vs fixed batches vs token-budget batches."""
    from evaluation.editing.generation import make_generate_fn

    model, tokenizer = loaded.model, loaded.tokenizer
    budgets = args.token_budget if args.token_budget is not None else [cfg.generation_token_budget]
    ways: dict[str, GenerateFn] = {
        SINGLE: one_at_a_time(make_generate_fn(model, tokenizer, batch_size=1, progress=False)),
        f"fixed {args.batch_size}": make_generate_fn(model, tokenizer, batch_size=args.batch_size, progress=False),
    }
    for budget in budgets:
        ways[f"budget {budget}"] = make_generate_fn(model, tokenizer, batch_size=args.batch_size, progress=False,
                                                    token_budget=budget)
    results = measure_throughput(ways, tasks=args.tasks.split(","), limit=args.limit, data_dir=args.data_dir)
    device = next(model.parameters()).device
    return (f"## Generation throughput: {args.model}, {args.limit} items per task, at most {args.batch_size} rows "
            f"per batch, device {device}\n\n{markdown_table(results)}\n\n{overall_line(results)}\n")


def _edited_pass(suite: Gu2024Suite, in_scope: Callable[[list[str]], Any], generate: GenerateFn, base: Any,
                 reuse: bool) -> dict[str, tuple[list[str], list[bool], float]]:
    """The edited pass task by task: per task its continuations, routing and seconds (routing included)."""
    out = {}
    for name in suite.task_names:
        one = Gu2024Suite(suite.data_dir, tasks=[name], limit=suite.limit, reuse_unedited=reuse)
        _sync()
        t0 = time.perf_counter()
        report = one.evaluate(generate, in_scope=in_scope, unedited=base)
        _sync()
        out[name] = (report.outputs[name], report.routed[name], time.perf_counter() - t0)
    return out


def reuse_section(loaded: Any, cfg: Any, args: argparse.Namespace) -> str:
    """The edited pass of a routed editor's state (GRACE/MELO), with the unedited continuation reused for
    rows out of scope vs every row generated again."""
    from hydra.utils import instantiate

    from evaluation.editing.generation import make_generate_fn
    from evaluation.editing.unedited import Unedited
    from evaluation.run.compose import compose_config

    tasks = args.tasks.split(",")
    suite = Gu2024Suite(args.data_dir, tasks=tasks, limit=args.limit)
    budget = (args.token_budget or [cfg.generation_token_budget])[0]
    base = suite.evaluate(make_generate_fn(loaded.model, loaded.tokenizer, Unedited(loaded), args.batch_size,
                                           progress=False, token_budget=budget))
    ecfg = compose_config([f"model={args.model}", f"editor={args.reuse_editor}", f"dataset={args.reuse_dataset}",
                           f"dataset.num_edits={args.reuse_edits}"])
    editor = instantiate(ecfg.editor, _partial_=True)(model=loaded)
    requests = instantiate(ecfg.dataset).load()
    t0 = time.perf_counter()
    step = getattr(editor.config, "batch_size", 1)
    for i in range(0, len(requests), step):
        editor.edit(requests[i:i + step])
    edit_seconds = time.perf_counter() - t0
    generate = make_generate_fn(editor.model, editor.tokenizer, editor, args.batch_size, progress=False,
                                token_budget=budget)
    live = partial(editor.in_scope, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        store = QueryStore(folder, args.model)
        runs = {"all": _edited_pass(suite, live, generate, base, reuse=False),
                "reuse": _edited_pass(suite, live, generate, base, reuse=True)}
        _edited_pass(suite, store.scope_fn(editor, args.batch_size), generate, base, reuse=True)  # fills the store
        runs["stored"] = _edited_pass(suite, store.scope_fn(editor, args.batch_size), generate, base, reuse=True)
    lines = [f"## Edited pass, {args.reuse_editor} after {len(requests)} {args.reuse_dataset} edits "
             f"({edit_seconds:.0f} s of editing), {args.limit} items per task, token budget {budget}\n",
             "| task | rows | in scope | regenerate all s | reuse s (routing forwards) | speed-up | "
             "reuse s (stored queries) | speed-up | same outputs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    routed_total = rows_total = 0
    for name in tasks:
        (all_out, routed_rows, slow), (reuse_out, _, fast), (stored_out, _, fastest) = (
            runs[way][name] for way in ("all", "reuse", "stored"))
        routed = sum(routed_rows)
        routed_total, rows_total = routed_total + routed, rows_total + len(all_out)
        lines.append(f"| {name} | {len(all_out)} | {routed} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x | "
                     f"{fastest:.2f} | {slow / fastest:.0f}x | "
                     f"{'yes' if all_out == reuse_out == stored_out else 'NO'} |")
    slow, fast, fastest = (sum(r[2] for r in runs[way].values()) for way in ("all", "reuse", "stored"))
    lines.append(f"\noverall: {rows_total} rows, {routed_total} in scope; regenerate all {slow:.1f} s, reuse with "
                 f"routing forwards {fast:.1f} s ({slow / fast:.1f}x), reuse with stored queries {fastest:.2f} s "
                 f"({slow / fastest:.0f}x)")
    return "\n".join(lines) + "\n"


#: the benchmark's parts, run in order on one loaded model; each returns the Markdown it prints
SECTIONS: dict[str, Callable[[Any, Any, argparse.Namespace], str]] = {"throughput": throughput_section,
                                                                       "reuse": reuse_section}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a choice of the model config group (conf/model/*.yaml)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument("--limit", type=int, default=32, help="items per task")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per batch (the fixed way; the cap under a budget)")
    ap.add_argument("--token-budget", type=int, nargs="+", default=None,
                    help="padded prompt tokens per batch, one or more to compare (default: generation_token_budget "
                         "from conf/config.yaml)")
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which parts to run, of {','.join(SECTIONS)}")
    ap.add_argument("--reuse-editor", default="melo", help="the routed editor whose edited pass is timed")
    ap.add_argument("--reuse-edits", type=int, default=20, help="edits made before the edited pass")
    ap.add_argument("--reuse-dataset", default="zsre")
    args = ap.parse_args(argv)

    import torch
    from hydra.utils import instantiate

    from evaluation.run.compose import compose_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}"])
    loaded = instantiate(cfg.model)
    for name in args.sections.split(","):
        print(SECTIONS[name](loaded, cfg, args), flush=True)  # reuse attaches an editor: it runs last


if __name__ == "__main__":
    main()
