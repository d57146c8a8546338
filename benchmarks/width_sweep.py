"""The width sweep: does forgetting of earlier edits shrink as the model gets wider (the size hypothesis)?

    python -m benchmarks.width_sweep --out outputs/width_sweep                    # the defaults (below)
    python -m benchmarks.width_sweep --editors elder --widths 128,256 --num-edits 40 --out outputs/ws
    python -m benchmarks.width_sweep --estimate-only                              # time a small point, print estimates
    python -m benchmarks.width_sweep elder:editor.lr=1e-3 --out outputs/ws_lr     # an override for one editor

On SmolLM2-135M (576 wide), ELDER forgets earlier batches as later ones are trained (docs/editors.md, "Earlier
batches are forgotten"), and it is tempting to blame the model's size: the paper's LLaMA2-7B is 4096
wide. This sweep holds everything else fixed and varies only the width:

- **models**: random-weight LLaMA-shaped models built the way ``conf/model/tiny_llama.yaml`` builds
  its model (``evaluation.editing.models.build_random``, byte-level tokenizer), of the same depth
  (``--depth``, default 8) and growing width (``--widths``). Intermediate size 8/3 x width (rounded up
  to a multiple of 32), one attention head per 64 dimensions (at least one), initialiser standard
  deviation 1.6/sqrt(width) (``--init-std`` fixes one value instead). That is tiny_llama's 0.2 at
  width 64, about LLaMA's 0.02 at 4096, and it keeps the logits' scale the same at every width.
- **the stream**: FIXED and synthetic, deterministic from ``--seed``, the same at every width and for
  every editor. Prompts are ``--prompt-words`` random lower-case words, and targets one random word.
  With the byte-level tokenizer every letter is one token. The paraphrase is the prompt with one
  random word put in front (``--paraphrase prefix``) or with one letter of one word changed
  (``perturb``). Locality probes are unrelated random prompts with a random answer; locality compares
  the edited model's argmax with the unedited model's, so the answer's content does not matter.
- **editors**: composed with :func:`evaluation.run.compose.compose_config`, like ``run.py``. They use
  tiny_llama's editor configs (``conf/editor_model/<editor>_tiny_llama.yaml``). Those configs are
  written for depth 8; at another depth the query/edited layer is scaled to the depth and ELDER's and
  MELO's adapter layers stay a contiguous block just above it (the paper's layout). ELDER is the
  subject; GRACE and MELO are controls, since they key each edit and should not forget.
- **the loop**: :func:`evaluation.run.stream.run_stream`, the loop ``run.py`` uses. ``--eval-every``
  (default 4, ELDER's batch size) gives the forgetting record: every earlier batch's accuracy at each
  curve point.

What it reports: how much of the first ``--first-edits`` edits (whole batches only) survives the
later ones. That is their reliability and generalization just after they were edited, ``--ages``
edits later (default 4, 8 and 16), at every later curve point and at the end, and the retained
fraction (end ÷ just after). Two batches are few, so it also reports every batch's accuracy ``a``
edits after it was edited (a = 0 and ``--ages``), averaged over all batches. Outputs under ``--out``:

- ``runs/<editor>_w<width>/results.json``: each point, as a run folder, with its ``forgetting``
  record. ``python -m evaluation.tables forgetting OUT/runs`` reads these; this script runs that at
  the end and writes ``forgetting.*`` (heatmaps, accuracy by age, CSVs).
- ``sweep.csv`` and ``sweep.json``: one row per (editor, width), plus the settings and the estimates.
- ``width_sweep.png`` and ``.pdf``. Left: reliability of the first edits against width, per editor:
  just after editing, ``--ages`` edits later and at the end. Middle: every batch's reliability at
  those ages, against width. Right: the first edits' reliability against edits done, per (editor,
  width).

A point whose ``results.json`` is already there with the same settings is reused (``--fresh`` redoes
it), so a stopped sweep goes on where it was.

Before the sweep, the script times a short stream (two batches) per editor at the two smallest
widths. It fits seconds = a + b * (FLOPs per token) and prints the estimated time of every point
(``--estimate-only`` stops there). Defaults: widths 128, 256, 512, 768, depth 8, 100 edits,
``eval_every`` 4, one thread. See docs/findings.md ("Is it the model's size?") for measured times.

Caveats, both part of the design:

- **Random weights.** An untrained model's hidden states are not a trained model's. They carry no
  knowledge, inputs are not organised by meaning, and the activation statistics differ (no outlier
  features, near-isotropic directions). A paraphrase is close to its prompt only as far as the two
  token strings overlap. What this sweep measures is how the *mechanics* of each editor (shared
  routers and LoRAs for ELDER, keys and radii for GRACE and MELO) interact with width, not how a
  trained model of that width would behave.
- **Fixed hyper-parameters.** Learning rates, iterations and ranks are the tiny_llama configs' at
  every width. With Adam, a fixed learning rate changes a wider layer's output more per step, so
  width also changes the effective step size. ``editor:key=value`` overrides change that for one
  editor, for example ``elder:editor.lr=1e-3``.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
EDITORS = ("elder", "grace", "melo")
DEFAULT_WIDTHS = (128, 256, 512, 768)
REFERENCE_DEPTH = 8  # the depth conf/editor_model/*_tiny_llama.yaml is written for


# --- the model and the stream ----------------------------------------------------------------------
def intermediate_size(width: int) -> int:
    """8/3 x width, rounded up to a multiple of 32 (LLaMA's SwiGLU proportion)."""
    return 32 * math.ceil(8 * width / 3 / 32)


def heads(width: int) -> int:
    return max(1, width // 64)


def init_std(width: int, fixed: float | None = None) -> float:
    """1.6/sqrt(width): tiny_llama's 0.2 at width 64, the same logit scale at every width."""
    return fixed if fixed is not None else 1.6 / math.sqrt(width)


def model_overrides(width: int, depth: int, std: float | None = None) -> list[str]:
    """Hydra overrides that turn ``model=tiny_llama`` into a random LLaMA of this width and depth."""
    return [f"model.name=random_llama_w{width}", f"model.config.hidden_size={width}",
            f"model.config.intermediate_size={intermediate_size(width)}",
            f"model.config.num_attention_heads={heads(width)}", f"model.config.num_key_value_heads={heads(width)}",
            f"model.config.num_hidden_layers={depth}", f"model.num_layers={depth}",
            f"model.config.initializer_range={init_std(width, std)}"]


def flops_per_token(width: int, depth: int, vocab: int = 257) -> float:
    """Multiply-adds per token of a forward pass (attention projections, SwiGLU MLP, LM head)."""
    return depth * (4 * width * width + 3 * width * intermediate_size(width)) + width * vocab


def parameter_count(width: int, depth: int, vocab: int = 257) -> dict[str, int]:
    per_layer = 4 * width * width + 3 * width * intermediate_size(width) + 2 * width
    return {"non_embedding": depth * per_layer + width, "total": depth * per_layer + width + 2 * vocab * width}


def layer_overrides(editor_cfg: Any, depth: int, reference: int = REFERENCE_DEPTH) -> tuple[list[str], list[str]]:
    """The editor config's layer choices scaled from ``reference`` layers to ``depth``; and notes on what changed.

    A single edited layer (``layer``) and the query layer are scaled in proportion; adapter layers
    (``layers``) keep their offsets above the query layer (a contiguous block just above it), cut at the
    top of the model. If ELDER loses layers that way, its epsilon shrinks in proportion (the paper's 12 =
    2L at L=6).
    """
    if depth == reference:
        return [], []
    scale = lambda i: min(depth - 1, max(0, round(int(i) * depth / reference)))  # noqa: E731
    out, notes = [], []
    if "layer" in editor_cfg:
        out.append(f"editor.layer={scale(editor_cfg.layer)}")
    if "query_layer" in editor_cfg and "layers" in editor_cfg:
        q0, layers = int(editor_cfg.query_layer), [int(i) for i in editor_cfg.layers]
        q = min(scale(q0), depth - 2)
        new = [q + (i - q0) for i in layers if q + (i - q0) <= depth - 1]
        if not new:
            raise SystemExit(f"error: depth {depth} leaves no layer above query layer {q}")
        out += [f"editor.query_layer={q}", f"editor.layers=[{','.join(map(str, new))}]"]
        if len(new) < len(layers):
            notes.append(f"only {len(new)} of {len(layers)} adapter layers fit above query layer {q} at depth {depth}")
            if "epsilon" in editor_cfg:
                eps = max(0, round(int(editor_cfg.epsilon) * len(new) / len(layers)))
                out.append(f"editor.epsilon={eps}")
                notes.append(f"epsilon {editor_cfg.epsilon} -> {eps}")
    return out, notes


def synthetic_stream(n: int, seed: int = 0, prompt_words: int = 4, paraphrase: str = "prefix") -> list[Any]:
    """``n`` edit requests of random words, the same for a given seed whatever the model."""
    from data.requests import EditRequest

    if paraphrase not in ("prefix", "perturb"):
        raise ValueError(f"paraphrase must be prefix or perturb, got {paraphrase!r}")
    rng = random.Random(f"width-sweep:{seed}")

    def word(lo: int = 3, hi: int = 6) -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))

    requests = []
    for uid in range(n):
        words = [word() for _ in range(prompt_words)]
        prompt, target = " ".join(words), word(3, 5)
        if paraphrase == "prefix":
            para = f"{word()} {prompt}"
        else:
            i = rng.randrange(len(words))
            j = rng.randrange(len(words[i]))
            letter = rng.choice([c for c in string.ascii_lowercase if c != words[i][j]])
            changed = words[:i] + [words[i][:j] + letter + words[i][j + 1:]] + words[i + 1:]
            para = " ".join(changed)
        locality = (" ".join(word() for _ in range(prompt_words)), word(3, 5))
        requests.append(EditRequest.make(uid, prompt, target, [para], [locality]))
    return requests


# --- one point ----------------------------------------------------------------------------------------
def compose(editor: str, width: int, args: argparse.Namespace, eval_every: int) -> tuple[Any, list[str]]:
    """The composed config of one (editor, width) point, as run.py would compose it; and layer notes."""
    from evaluation.run.compose import compose_config

    base = ["model=tiny_llama", f"editor={editor}", *model_overrides(width, args.depth, args.init_std),
            "retention=none", "logger=none", "progress=false", f"seed={args.seed}", f"threads={args.threads}",
            f"eval_every={eval_every}", "checkpoint.every=0"]
    mine = [o.split(":", 1)[1] for o in args.overrides if o.split(":", 1)[0] == editor and ":" in o.split("=", 1)[0]]
    common = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]
    cfg = compose_config(base + common + mine)
    scaled, notes = layer_overrides(cfg.editor, args.depth)
    if scaled:
        cfg = compose_config(base + common + scaled + mine)  # the user's own overrides win
    return cfg, notes


def run_point(cfg: Any, requests: Sequence[Any]) -> tuple[Any, Any, float]:
    """Build the model and editor from ``cfg`` and stream ``requests`` through run_stream (no checkpoints)."""
    import torch

    from evaluation.editing.unedited import Unedited
    from evaluation.run.experiment import build, seed_everything, set_deterministic
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import base_locality_predictions
    from evaluation.run.stream import run_stream

    torch.set_num_threads(int(cfg.threads))
    previous = set_deterministic(cfg.deterministic)
    start = time.perf_counter()
    try:
        seed_everything(cfg.seed)
        loaded = build(cfg.model)
        base = base_locality_predictions(Unedited(loaded), requests, batch_size=cfg.eval_batch_size)
        editor = build(cfg.editor, model=loaded)
        stream = run_stream(editor, requests, base, NullLogger(), cfg.eval_every, cfg.eval_batch_size,
                            progress=False, handle_signals=False)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    return stream, editor, time.perf_counter() - start


def curve_positions(n: int, batch_size: int, eval_every: int) -> list[int]:
    """Where run_stream evaluates: batch ends crossing a multiple of eval_every, and the end."""
    points, done = [], 0
    while done < n:
        before, done = done, min(n, done + batch_size)
        if eval_every and done // eval_every > before // eval_every and done < n:
            points.append(done)
    return points + [n]


# --- estimates ---------------------------------------------------------------------------------------
def estimate(editors: Sequence[str], widths: Sequence[int], args: argparse.Namespace,
             requests: Sequence[Any]) -> dict[str, Any]:
    """Time two batches per editor at the two smallest widths; extrapolate every point's seconds."""
    measured: dict[str, list[dict[str, float]]] = {}
    rows_per_request = 3  # edit prompt, one paraphrase, one locality probe
    for editor in editors:
        for width in sorted(widths)[:2]:
            cfg, _ = compose(editor, width, args, eval_every=0)
            bs = max(1, int(cfg.editor.batch_size))
            cfg.eval_every = bs
            sample = requests[:2 * bs]
            stream, _, wall = run_point(cfg, sample)
            rows = rows_per_request * sum(curve_positions(len(sample), bs, bs)) + len(sample)
            measured.setdefault(editor, []).append({
                "width": width, "batch_size": bs, "edits": len(sample), "wall_seconds": wall,
                "edit_seconds_per_edit": stream.edit_seconds / len(sample),
                "eval_seconds_per_row": stream.eval_seconds / rows,
                "flops_per_token": flops_per_token(width, args.depth)})
            m = measured[editor][-1]
            print(f"timed {editor} at width {width}: {m['edit_seconds_per_edit']:.2f} s/edit, "
                  f"{1000 * m['eval_seconds_per_row']:.1f} ms per evaluated row ({len(sample)} edits, {wall:.1f} s)",
                  flush=True)

    def fit(points: list[dict[str, float]], key: str) -> tuple[float, float]:
        xs, ys = [p["flops_per_token"] for p in points], [p[key] for p in points]
        if len(points) >= 2 and xs[1] > xs[0]:
            b = (ys[1] - ys[0]) / (xs[1] - xs[0])
            a = ys[0] - b * xs[0]
            if b > 0 and a >= 0:
                return a, b
        return 0.0, ys[-1] / xs[-1]  # proportional to the larger width's (an over-estimate when overhead dominates)

    table: dict[str, dict[int, float]] = {}
    for editor in editors:
        bs = measured[editor][0]["batch_size"]
        ea, eb = fit(measured[editor], "edit_seconds_per_edit")
        va, vb = fit(measured[editor], "eval_seconds_per_row")
        rows = rows_per_request * sum(curve_positions(args.num_edits, bs, args.eval_every)) + args.num_edits
        for width in widths:
            c = flops_per_token(width, args.depth)
            table.setdefault(editor, {})[width] = args.num_edits * (ea + eb * c) + rows * (va + vb * c)
    total = sum(s for by_width in table.values() for s in by_width.values())
    print(f"\nestimated seconds ({args.num_edits} edits, eval_every {args.eval_every}, {args.threads} thread(s)):")
    print("editor  " + "".join(f"{f'w{w}':>10}" for w in widths) + f"{'all':>10}")
    for editor in editors:
        print(f"{editor:8s}" + "".join(f"{table[editor][w]:10.0f}" for w in widths)
              + f"{sum(table[editor].values()):10.0f}")
    print(f"total about {total / 60:.1f} min\n", flush=True)
    return {"measured": measured, "seconds": {e: {str(w): s for w, s in t.items()} for e, t in table.items()},
            "total_seconds": total}


# --- the sweep ---------------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What fixes a point's numbers besides (editor, width): a saved point with other settings is redone."""
    return {"num_edits": args.num_edits, "depth": args.depth, "seed": args.seed, "eval_every": args.eval_every,
            "prompt_words": args.prompt_words, "paraphrase": args.paraphrase, "init_std": args.init_std,
            "overrides": list(args.overrides)}


def after_later_edits(first: dict[str, Any], later: int, metric: str) -> float:
    """The first edits' ``metric`` once ``later`` more edits were made after them (at the last curve point
    up to then; NaN if the stream or the record does not reach that far)."""
    upto = first["edits_counted"] + later
    seen = [p for p in first["by_point"] if p["edits"] <= upto]
    reached = any(p["edits"] >= upto for p in first["by_point"])
    return seen[-1][metric] if seen and reached else math.nan


def by_age(points: Sequence[dict[str, Any]], age: int, span: int, metric: str) -> float:
    """Every batch's ``metric`` ``age`` to ``age + span - 1`` edits after it was edited, averaged with batch
    sizes as weights over all (batch, curve point) pairs of that age (NaN where there is none)."""
    from evaluation.run.forgetting import cells

    chosen = [c for c in cells(points) if age <= c.age < age + max(1, span)]
    size = sum(c.size for c in chosen)
    return sum(getattr(c, metric) * c.size for c in chosen) / size if size else math.nan


def summarise(editor: str, width: int, args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    from evaluation.run.forgetting import first_edits_accuracy

    first = first_edits_accuracy(payload["forgetting"], args.first_edits)
    metrics, timings = payload["metrics"], payload["timings"]
    params = parameter_count(width, args.depth)
    row = {"editor": editor, "width": width, "intermediate": intermediate_size(width), "heads": heads(width),
           "depth": args.depth, "init_std": init_std(width, args.init_std), "params": params["total"],
           "params_non_embedding": params["non_embedding"], "num_edits": metrics["num_edits"],
           "batch_size": payload["forgetting"][-1]["batch_size"], "eval_every": args.eval_every,
           "first_edits": args.first_edits, "edits_counted": first["edits_counted"]}
    for metric in ("reliability", "generalization"):
        row[f"{metric}_first_just_after"] = first["just_after"][metric]
        for age in args.ages:
            row[f"{metric}_first_after_{age}"] = after_later_edits(first, age, metric)
        row[f"{metric}_first_end"] = first["end"][metric]
        row[f"{metric}_first_retained"] = first["retained"][metric]
        for age in (0, *args.ages):  # every batch, not only the first: many more batches per value
            row[f"{metric}_all_age_{age}"] = by_age(payload["forgetting"], age, args.eval_every, metric)
    row.update({k: metrics[k] for k in ("reliability", "generalization", "locality")})
    row.update({"seconds_per_edit": metrics["seconds_per_edit"], "edit_seconds": timings["edit_seconds"],
                "eval_seconds": timings["eval_seconds"], "wall_seconds": timings["wall_seconds"]})
    row["first_by_point"] = first["by_point"]
    return row


def sweep_point(editor: str, width: int, args: argparse.Namespace, requests: Sequence[Any],
                out: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from evaluation.run.results import git_commit, write_results

    run_dir = out / "runs" / f"{editor}_w{width}"
    path = run_dir / "results.json"
    if path.is_file() and not args.fresh:
        payload = json.loads(path.read_text())
        if payload.get("sweep") == settings(args) and payload.get("forgetting"):
            print(f"{editor} width {width}: reusing {path}", flush=True)
            return summarise(editor, width, args, payload)
    cfg, notes = compose(editor, width, args, args.eval_every)
    for note in notes:
        print(f"{editor} width {width}: {note}", flush=True)
    commit = git_commit()
    stream, edited, wall = run_point(cfg, requests)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["dataset"] = {"name": "synthetic", "num_edits": len(requests), "seed": args.seed,
                           "prompt_words": args.prompt_words, "paraphrase": args.paraphrase}
    metrics = {**stream.metrics, "seconds_per_edit": stream.edit_seconds / len(requests),
               "trainable_params": edited.trainable_params(), "stored_params": edited.stored_params(),
               "num_edits": len(requests), "skipped_edits": sum(len(s["uids"]) for s in stream.skipped)}
    timings = {"edit_seconds": stream.edit_seconds, "eval_seconds": stream.eval_seconds, "wall_seconds": wall}
    extra = {"choices": {"editor": editor, "model": f"random_llama_w{width}", "dataset": "synthetic"},
             "forgetting": stream.forgetting, "sweep": settings(args), "layer_notes": notes}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_results(run_dir, resolved, metrics, stream.curves, timings, extra, commit=commit)
    row = summarise(editor, width, args, json.loads(path.read_text()))
    print(f"{editor} width {width}: {wall:.0f} s; first {row['edits_counted']} edits: reliability "
          f"{row['reliability_first_just_after']:.2f} just after -> {row['reliability_first_end']:.2f} after "
          f"{len(requests)} edits; all: reliability {row['reliability']:.2f}, generalization "
          f"{row['generalization']:.2f}, locality {row['locality']:.2f}", flush=True)
    return row


def write_outputs(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path,
                  estimates: dict[str, Any] | None) -> list[Path]:
    import pandas as pd

    from evaluation.common.atomic import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"settings": {**settings(args), "widths": args.widths,
                                                        "editors": args.editors, "threads": args.threads,
                                                        "first_edits": args.first_edits},
                                           "estimates": estimates, "points": rows})
    flat = [{k: v for k, v in r.items() if k != "first_by_point"} for r in rows]
    write_text_atomic(out / "sweep.csv", pd.DataFrame(flat).to_csv(index=False))
    written = [out / "sweep.json", out / "sweep.csv"]
    if rows:
        written += [out / name for name in plot_sweep(rows, args, out / "width_sweep")]
    return written


def plot_sweep(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> list[str]:
    from evaluation.reporting import paper
    from evaluation.reporting.figures import _pyplot, _save

    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.6))
    editors = list(dict.fromkeys(r["editor"] for r in rows))
    widths = sorted({r["width"] for r in rows})
    counted = sorted({r["edits_counted"] for r in rows})
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v"]
    when = [("just_after", "just after editing", (0, (1, 1.5))),
            *((f"after_{a}", f"{a} edits later", (0, (4 + 2 * k, 2))) for k, a in enumerate(args.ages)),
            ("end", f"after all {args.num_edits} edits", "-")]
    cmap = plt.get_cmap("viridis")
    for i, editor in enumerate(editors):
        mine = sorted((r for r in rows if r["editor"] == editor), key=lambda r: r["width"])
        label = paper.EDITOR_LABELS.get(editor, editor)
        marker = markers[i % len(markers)]
        # editors side by side around each width (log axis), so equal values stay visible
        xs = [r["width"] * 2 ** (0.06 * (i - (len(editors) - 1) / 2)) for r in mine]
        for key, _, style in when:
            ys = [100 * r.get(f"reliability_first_{key}", math.nan) for r in mine]
            left.plot(xs, ys, marker=marker, color=f"C{i}", linestyle=style, markersize=5,
                      markerfacecolor="none" if key == "just_after" else None)
        for (_, _, style), age in zip(when, (0, *args.ages)):
            ys = [100 * r.get(f"reliability_all_age_{age}", math.nan) for r in mine]
            middle.plot(xs, ys, marker=marker, color=f"C{i}", linestyle=style, markersize=5,
                        markerfacecolor="none" if age == 0 else None)
        for r in mine:
            shade = cmap(0.85 * widths.index(r["width"]) / max(1, len(widths) - 1))
            points = r["first_by_point"]
            right.plot([p["edits"] for p in points], [100 * p["reliability"] for p in points], color=shade,
                       linestyle=styles[i % len(styles)], marker=marker if len(points) < 40 else None,
                       markersize=4, label=f"{label}, width {r['width']}")
    first = "/".join(map(str, counted))
    for ax in (left, middle):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
    left.set(xlabel="model width (hidden size)", ylabel=f"reliability of the first {first} edits (%)",
             ylim=(-2, 102), title=f"The first {first} edits against width")
    span = f" (ages a to a+{args.eval_every - 1})" if args.eval_every > 1 else ""
    middle.set(xlabel="model width (hidden size)", ylabel="reliability of a batch (%), mean over all batches",
               ylim=(-2, 102), title=f"Every batch, a edits after it was edited{span}")
    right.set(xlabel="edits done", ylabel=f"reliability of the first {first} edits (%)", ylim=(-2, 102),
              title="The first edits as the stream goes on")
    for ax in (left, middle, right):
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", marker=markers[i % len(markers)], linestyle="none",
                      label=paper.EDITOR_LABELS.get(e, e)) for i, e in enumerate(editors)]
    handles += [Line2D([], [], color="0.3", linestyle=style, label=text) for _, text, style in when]
    left.legend(handles=handles, fontsize=7, handlelength=3.5, loc="best")
    ages = [Line2D([], [], color="0.3", linestyle=style, label=f"a = {age}")
            for (_, _, style), age in zip(when, (0, *args.ages))]
    middle.legend(handles=handles[:len(editors)] + ages, fontsize=7, handlelength=3.5, loc="best")
    right.legend(fontsize=6, ncol=max(1, len(editors) // 2), loc="best", handlelength=3)
    fig.suptitle(f"Width sweep: random LLaMA-shaped models, depth {args.depth}, a fixed synthetic stream of "
                 f"{args.num_edits} edits (seed {args.seed})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.width_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default=",".join(map(str, DEFAULT_WIDTHS)), help="hidden sizes, comma-separated")
    parser.add_argument("--depth", type=int, default=REFERENCE_DEPTH, help="decoder layers (the same at every width)")
    parser.add_argument("--editors", default=",".join(EDITORS), help="comma-separated editor names")
    parser.add_argument("--num-edits", type=int, default=100, help="length of the synthetic stream")
    parser.add_argument("--eval-every", type=int, default=4, help="curve points (and forgetting points) every N edits")
    parser.add_argument("--first-edits", type=int, default=8,
                        help="survival is reported for the first N edits (whole batches: ELDER's first two)")
    parser.add_argument("--ages", default="4,8,16",
                        help="also report the first edits' accuracy this many edits after them (comma-separated)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the stream, the models and the editors")
    parser.add_argument("--prompt-words", type=int, default=4)
    parser.add_argument("--paraphrase", choices=("prefix", "perturb"), default="prefix")
    parser.add_argument("--init-std", type=float, default=None,
                        help="initialiser standard deviation at every width (default: 1.6/sqrt(width))")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "width_sweep")
    parser.add_argument("--estimate-only", action="store_true", help="time a small point, print the estimates, stop")
    parser.add_argument("--no-estimate", action="store_true", help="skip the timing of small points")
    parser.add_argument("--fresh", action="store_true", help="recompute points already saved under --out")
    parser.add_argument("--no-tables", action="store_true", help="skip `evaluation.reporting.tables forgetting` at the end")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for every point (editor.iterations=20), or for one editor "
                             "(elder:editor.lr=1e-3)")
    args = parser.parse_args(argv)
    args.widths = [int(w) for w in str(args.widths).split(",") if w.strip()]
    args.editors = [e.strip() for e in str(args.editors).split(",") if e.strip()]
    args.ages = [int(a) for a in str(args.ages).split(",") if a.strip()]
    if not args.widths or min(args.widths) < 8:
        parser.error("--widths needs hidden sizes of at least 8")
    if args.num_edits < 1 or args.eval_every < 0 or args.depth < 2 or args.threads < 1:
        parser.error("--num-edits, --depth (>= 2) and --threads must be positive and --eval-every >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    requests = synthetic_stream(args.num_edits, args.seed, args.prompt_words, args.paraphrase)
    print(f"width sweep: widths {args.widths}, depth {args.depth}, editors {args.editors}, {args.num_edits} edits, "
          f"eval_every {args.eval_every}, {args.threads} thread(s); e.g. {requests[0].prompt!r} -> "
          f"{requests[0].target!r} (paraphrase {requests[0].paraphrase!r})", flush=True)
    estimates = None if args.no_estimate else estimate(args.editors, args.widths, args, requests)
    if args.estimate_only:
        return 0
    rows: list[dict[str, Any]] = []
    for width in args.widths:
        for editor in args.editors:
            rows.append(sweep_point(editor, width, args, requests, args.out))
            write_outputs(rows, args, args.out, estimates)  # a stopped sweep keeps what it measured
    written = write_outputs(rows, args, args.out, estimates)
    if not args.no_tables:
        from evaluation.reporting.tables import main as tables_main

        tables_main(["forgetting", str(args.out / "runs"), "--out", str(args.out / "forgetting")])
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
