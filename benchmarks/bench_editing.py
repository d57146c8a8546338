"""Editing-speed benchmark: seconds per edit of every editor against the floor of its own work.

    python -m benchmarks.bench_editing                          # all editors, smollm2, 100 ZsRE edits
    python -m benchmarks.bench_editing --editors elder,grace --num-edits 20 --model tiny_llama
    make bench ARGS="--editors elder --num-edits 40"
    python -m benchmarks.bench_editing --editors wilke --model gpt2xl_random --work-only editor.mom2_adjustment=false

For each editor, in one invocation on one machine, it measures:
- ``seconds_per_edit`` over a stream of ``--num-edits`` edits;
- ``eval_seconds``: the batched evaluation after the stream;
- ``peak_rss_mb``: each measurement runs in its own process, so this is that editor's own peak;
- ``floor_seconds_per_edit``: the unavoidable work, i.e. the editor's ``FloorSpec().passes``
  forward+backward passes per batch from the lowest block that carries gradients to the output,
  with the frozen blocks below replayed, divided by the batch size, over one sequence per request and
  ``FloorSpec().prompt_prefixes`` entry (ROME: the bare prompt and its 20 prefixed copies). Each figure
  is also printed as a ratio to this floor. Early stopping (FT-L, ROME) can make an editor beat its floor.
Editors with a ``prefix_cache`` switch are measured with it off ("before") and on ("after"); the
locate-then-edit editors (ROME, WilKE, MEMIT, AlphaEdit) also with their value loop over whole rows
("whole_rows", ``editor.v_from_subject=false``: the original code path), and beside a second floor, the
value loop's own: the measured seconds of one of its steps (forward+backward, as "after" runs it) times the
steps each variant took (``step_floor_seconds_per_edit``; WilKE: summed over its candidates), and that loop's
work per edit: its FLOPs and its non-view operators (each at least one kernel on a GPU), counted, not timed
(``step_flops_per_edit``, ``step_kernels_per_edit``).
``--compile`` adds a "compiled" variant (``compile.enabled=true``; its s/edit includes compilation,
so it pays off only over streams long enough to amortise it).
Results are written to ``<out>/bench.json`` and ``<out>/bench.md``; ``--merge`` re-measures the given
editors and keeps the other editors' rows already there.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from evaluation.run.schema import editor_names

REPO = Path(__file__).resolve().parent.parent


def _compose(overrides: list[str]) -> Any:
    from evaluation.run.compose import compose_config  # the same composition as run.py

    return compose_config(overrides)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_floor(overrides: list[str], batches: int = 3) -> dict[str, float]:
    """Time the editor's FloorSpec on the unedited model (a fresh process: it wraps the blocks)."""
    import torch
    from hydra.utils import instantiate

    from evaluation.editing.encoding import encode_pairs
    from evaluation.editing.forward import target_logits
    from evaluation.editing.prefix_cache import FrozenPrefix

    cfg = _compose(overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = instantiate(cfg.model)
    requests = instantiate(cfg.dataset).load()
    # the spec needs an editor instance; build it on a second copy so this model stays unwrapped
    probe = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    spec, bs = probe.floor_spec(), max(1, int(probe.batch_size))
    del probe
    if spec is None:
        return {"floor_seconds_per_edit": float("nan")}
    batches = max(1, min(batches, len(requests) // bs))
    prefix = FrozenPrefix(loaded.model, loaded.block_template, spec.first_layer)
    block = loaded.model.get_submodule(loaded.block_template.format(i=spec.first_layer))
    seconds = 0.0
    for b in range(batches):
        chunk = requests[b * bs:(b + 1) * bs]
        batch = encode_pairs(loaded.tokenizer, [p + r.prompt for r in chunk for p in spec.prompt_prefixes],
                             [r.target for r in chunk for _ in spec.prompt_prefixes])
        delta = torch.zeros(1, requires_grad=True)  # makes every block from first_layer up carry gradients

        def inject(module: Any, args: tuple, kwargs: dict) -> tuple:
            if args:
                return (args[0] + delta, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta}

        handle = block.register_forward_pre_hook(inject, with_kwargs=True)
        with prefix.cache():
            target_logits(loaded.model, batch)  # records the frozen prefix (not timed: done once per batch)
            start = time.perf_counter()
            for _ in range(spec.passes):
                target_logits(loaded.model, batch).loss().backward()
            seconds += time.perf_counter() - start
        handle.remove()
    return {"floor_seconds_per_edit": seconds / (batches * bs), "floor_passes": spec.passes,
            "floor_first_layer": spec.first_layer, "floor_rows_per_edit": len(spec.prompt_prefixes)}


def count_work(fn: Any) -> tuple[float, int]:
    """(FLOPs, operators) of ``fn()``, backward passes included (both modes see the autograd engine). Operators:
    the aten operators dispatched that are not views; on a GPU each launches at least one kernel, so their count
    times a launch's cost bounds a step that small matrices leave launch-bound."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    kernels = 0

    class KernelCount(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            nonlocal kernels
            kernels += not func.is_view
            return func(*args, **(kwargs or {}))

    flops = FlopCounterMode(display=False)
    with flops, KernelCount():
        fn()
    return float(flops.get_total_flops()), kernels


def measure_value_step(overrides: list[str], requests_measured: int = 3, steps: int = 5,
                       timed: bool = True) -> dict[str, float]:
    """Locate-then-edit editors: the seconds of one step (forward+backward) of their value loop, as the editor
    runs it (``value_sites``: every module whose delta an edit optimises, with its replay), on the unedited model:
    the difference of ``compute_value`` over ``steps + 1`` and over 1 iteration, without early stopping. Beside
    it, the step's work, counted the same way (2 iterations against 1, on the first request): its FLOPs and its
    non-view operators (``count_work``), the figures a projection to another device starts from. ``timed=False``:
    the counts alone (``--work-only``: for shapes too large to time on this machine)."""
    import torch
    from hydra.utils import instantiate

    from baselines.rome.editor import optimise_value, value_batch

    cfg = _compose(overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    c = editor.config
    prefixes = editor.context_prefixes()
    per_step, flops, kernels = [], [], []
    for index, r in enumerate(instantiate(cfg.dataset).load()[:requests_measured]):
        batch = value_batch(editor.model, editor.tokenizer, prefixes, r, c)
        for module, replay, width in editor.value_sites():
            loop = lambda n: optimise_value(editor.model, module, batch,  # noqa: E731
                                            replace(c, v_num_grad_steps=n, early_stop_loss=float("-inf")), replay, width)
            if timed:
                times = []
                for n in (1, steps + 1):
                    start = time.perf_counter()
                    loop(n)
                    times.append(time.perf_counter() - start)
                per_step.append((times[1] - times[0]) / steps)
            if index == 0:
                (f1, k1), (f2, k2) = count_work(lambda: loop(1)), count_work(lambda: loop(2))
                flops.append(f2 - f1)
                kernels.append(k2 - k1)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"step_seconds": mean(per_step), "step_flops": mean(flops), "step_kernels": mean(kernels)}


def measure_stream(overrides: list[str]) -> dict[str, float]:
    import torch
    from hydra.utils import instantiate

    from evaluation.editing.compilation import compile_blocks
    from evaluation.editing.unedited import Unedited
    from evaluation.run.experiment import autocast_context
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import locality_inputs, predict
    from evaluation.run.stream import run_stream

    cfg = _compose(overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = instantiate(cfg.model)
    compile_blocks(loaded, **cfg.compile)  # as run.py does: before the editor wraps anything
    requests = instantiate(cfg.dataset).load()
    with autocast_context(cfg.autocast, str(cfg.model.get("device", "cpu"))):
        base = predict(Unedited(loaded), *locality_inputs(requests), batch_size=cfg.eval_batch_size)
        editor = instantiate(cfg.editor, _partial_=True)(model=loaded)
        iterations = 0
        edit = editor.edit

        def counted(batch: Any) -> Any:  # the value-loop (or training) iterations the stream takes
            nonlocal iterations
            stats = edit(batch)
            iterations += stats.iterations
            return stats

        editor.edit = counted
        result = run_stream(editor, requests, base, NullLogger(), eval_batch_size=cfg.eval_batch_size, progress=False)
    return {"seconds_per_edit": result.edit_seconds / len(requests), "eval_seconds": result.eval_seconds,
            "peak_rss_mb": _peak_rss_mb(), "iterations_per_edit": iterations / len(requests),
            **{k: result.metrics[k] for k in ("reliability", "generalization")}}


def _child(mode: str, overrides: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.bench_editing", "--child", mode, "--", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def variants(overrides: list[str], compiled: bool) -> list[tuple[str, list[str]]]:
    """The settings each editor is measured under: "before" without the frozen-prefix replay, "whole_rows"
    (locate-then-edit editors) with the value loop over whole rows (the original code path), "after" as
    configured, and "compiled" with torch.compile of the blocks (compilation time included)."""
    editor = _compose(overrides).editor
    out = [("before", ["editor.prefix_cache=false"])] if "prefix_cache" in editor else []
    if "v_from_subject" in editor:
        out.append(("whole_rows", ["editor.v_from_subject=false"]))
    out.append(("after", []))
    if compiled:
        out.append(("compiled", ["compile.enabled=true"]))
    return out


def _write(rows: list[dict[str, Any]], base: list[str], out: Path) -> None:
    """bench.json (per editor: the "after" figures, plus every variant) and bench.md, rewritten per row."""
    import platform

    import torch

    by_editor: dict[str, Any] = {}
    for row in rows:
        by_editor.setdefault(row["editor"], {"variants": {}})["variants"][row["variant"]] = row
        if row["variant"] == "after":
            by_editor[row["editor"]].update({k: row[k] for k in ("seconds_per_edit", "floor_seconds_per_edit", "peak_rss_mb")})
    meta = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "overrides": base}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "editors": by_editor}, indent=2))
    lines = ["| editor | variant | s/edit | floor s/edit | step floor s/edit | ratio to floor | eval s | peak RSS MB | "
             "rel | gen |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step_floor = r.get("step_floor_seconds_per_edit", float("nan"))
        lines.append(f"| {r['editor']} | {r['variant']} | {r['seconds_per_edit']:.3f} | {r['floor_seconds_per_edit']:.3f} | "
                     f"{step_floor:.3f} | "
                     f"{r['ratio_to_floor']:.2f} | {r['eval_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['reliability']:.2f} | {r['generalization']:.2f} |")
    (out / "bench.md").write_text("\n".join(lines) + f"\n\n{json.dumps(meta)}\n")


def previous_rows(out: Path, editors: list[str]) -> list[dict[str, Any]]:
    """The rows of ``out/bench.json`` for editors not measured again (``--merge``)."""
    path = out / "bench.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())["editors"]
    return [row for name, entry in saved.items() if name not in editors for row in entry["variants"].values()]


def run(editors: list[str], base: list[str], out: Path, keep: list[dict[str, Any]] | None = None,
        compiled: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = list(keep or [])
    for editor in editors:
        overrides = [f"editor={editor}", *base]
        floor = _child("floor", overrides)
        if "v_from_subject" in _compose(overrides).editor:
            floor.update(_child("steps", overrides))
        for label, extra in variants(overrides, compiled):
            row = {"editor": editor, "variant": label, **_child("stream", overrides + extra), **floor}
            row["ratio_to_floor"] = row["seconds_per_edit"] / row["floor_seconds_per_edit"]
            # the value loop's floor: its measured step (as "after" runs it) x the steps this variant took
            row["step_floor_seconds_per_edit"] = row.get("step_seconds", float("nan")) * row["iterations_per_edit"]
            # the value loop's work per edit, for projecting it to another device (docs/locate_then_edit.md)
            for work in ("flops", "kernels"):
                row[f"step_{work}_per_edit"] = row.get(f"step_{work}", float("nan")) * row["iterations_per_edit"]
            rows.append(row)
            _write(rows, base, out)  # a stopped benchmark keeps what it measured
            print(f"{editor:6s} {label:10s} {row['seconds_per_edit']:.3f} s/edit  floor {row['floor_seconds_per_edit']:.3f}"
                  f"  step floor {row['step_floor_seconds_per_edit']:.3f}"
                  f"  value loop {row['step_flops_per_edit'] / 1e12:.2f} TFLOP, {row['step_kernels_per_edit']:.0f} kernels"
                  f"  x{row['ratio_to_floor']:.2f}  peak {row['peak_rss_mb']:.0f} MB  rel {row['reliability']:.2f}"
                  f"  gen {row['generalization']:.2f}", flush=True)
    print((out / "bench.md").read_text())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--editors", default=",".join(editor_names()), help="comma-separated (default: every editor in conf/editor/)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--num-edits", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the other editors already in <out>/bench.json (re-measure a few)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure each editor with compile.enabled=true (variant 'compiled')")
    parser.add_argument("--work-only", action="store_true",
                        help="only count each locate-then-edit editor's value-loop step (FLOPs, kernels) on one "
                             "request, untimed: for shapes too large to time here, e.g. --model gpt2xl_random")
    parser.add_argument("--child", choices=("floor", "stream", "steps"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. threads=2 model.device=cuda")
    args = parser.parse_args()
    if args.child:
        measure = {"floor": measure_floor, "stream": measure_stream, "steps": measure_value_step}[args.child]
        result = measure(args.overrides)
        print(json.dumps(result))
        return
    base = [f"model={args.model}", f"dataset={args.dataset}", f"dataset.num_edits={args.num_edits}",
            "retention=none", "logger=none", *args.overrides]
    editors = [e.strip() for e in args.editors.split(",") if e.strip()]
    if args.work_only:
        for editor in editors:
            if "v_from_subject" not in _compose([f"editor={editor}", *base]).editor:
                print(f"{editor}: no value loop (not a locate-then-edit editor)")
                continue
            work = measure_value_step([f"editor={editor}", *base], requests_measured=1, timed=False)
            print(f"{editor}: {work['step_flops'] / 1e9:.1f} GFLOP and {work['step_kernels']:.0f} kernels per value-loop "
                  f"step (mean over its value sites)", flush=True)
        return
    run(editors, base, args.out, previous_rows(args.out, editors) if args.merge else None, compiled=args.compile)


if __name__ == "__main__":
    main()
