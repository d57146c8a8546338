"""Which inputs a finished run's router treats as edited: edit prompts, paraphrases, unrelated prompts.

    python -m evaluation.scope_report outputs/runs/<run> [--limit 300]   (finished, or stopped mid-stream)

For editors that route (ELDER's deferral, GRACE's codebook radii, MELO's cluster radii, Defer's
deferral unit) it rebuilds the editor from the run's last checkpoint and reports the share of each
group that its router puts in scope (``Editor.in_scope``). Ideal: edit prompts and paraphrases 1.0,
locality prompts 0.0. Low paraphrase coverage means the edits cannot generalise whatever was learned;
high locality coverage means unrelated inputs get edited. Writes ``<run>/scope.json``.

    python -m evaluation.scope_report RUN --sweep threshold=0.1,0.2,0.3 [--metrics]

measures the trade-off of a setting the router reads only at inference (``Editor.inference_settings``, e.g.
LEMoE's anchor threshold) on the trained editor: the scope shares for each value, and with ``--metrics`` the
teacher-forced edit metrics (reliability, generalization, locality) as the run computes them. Writes
``<run>/scope_sweep_<setting>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from evaluation.common.atomic import write_json_atomic
from evaluation.common.errors import HarnessError
from evaluation.editing.editor import Editor
from evaluation.editing.unedited import Unedited
from evaluation.reporting.saved_run import SavedRun, load_saved_run, prompt_groups
from evaluation.run.metrics import base_locality_predictions, evaluate_edits


def _scope_shares(run: SavedRun, limit: int | None) -> dict[str, dict[str, float]]:
    sample = run.requests[:limit] if limit else run.requests
    shares: dict[str, dict[str, float]] = {}
    for name, group in prompt_groups(sample).items():
        mask = run.editor.in_scope(group)
        if mask is None:
            raise HarnessError(f"{run.cfg.editor._target_} has no router: its edits are in the weights and act on "
                               f"every input, so every prompt is in scope")
        shares[name] = {"n": len(mask), "in_scope": float(mask.float().mean()) if len(mask) else 0.0}
    return shares


def report(run_dir: Path, limit: int | None = None) -> dict[str, Any]:
    run = load_saved_run(run_dir)
    out: dict[str, Any] = {"run": str(run_dir), "editor": run.cfg.editor._target_, "edits": len(run.requests),
                           "groups": _scope_shares(run, limit)}
    write_json_atomic(run_dir / "scope.json", out)
    return out


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``"threshold=0.1,0.2,null"`` -> ("threshold", [0.1, 0.2, None]) (each value read as YAML)."""
    name, sep, values = text.partition("=")
    if not sep or not name or not values:
        raise HarnessError(f"--sweep takes SETTING=V1,V2,... (e.g. threshold=0.1,0.2), got {text!r}")
    return name.removeprefix("editor."), [yaml.safe_load(v) for v in values.split(",")]


def with_setting(editor: Editor, name: str, value: Any) -> None:
    """Give a trained editor another value of a setting its router reads only at inference."""
    allowed = tuple(editor.inference_settings)
    if name not in allowed:
        raise HarnessError(f"editor.{name} is not read only at inference by {type(editor).__name__} (changing it "
                           f"after the edits would not show what a run with it does); its inference settings: "
                           f"{', '.join(allowed) or 'none'}")
    editor.config = dataclasses.replace(editor.config, **{name: value})


def sweep(run_dir: Path, name: str, values: Sequence[Any], limit: int | None = None, metrics: bool = False,
          batch_size: int = 32) -> dict[str, Any]:
    """Scope shares (and, with ``metrics``, the teacher-forced edit metrics of the first ``limit`` edits) of the
    run's trained editor for each value of the inference setting ``name``."""
    run = load_saved_run(run_dir)
    requests = run.requests[:limit] if limit else run.requests
    base = base_locality_predictions(Unedited(run.editor.loaded), requests, batch_size) if metrics else None
    rows = []
    for value in values:
        with_setting(run.editor, name, value)
        row: dict[str, Any] = {name: value, "groups": _scope_shares(run, limit)}
        if base is not None:
            row["metrics"] = evaluate_edits(run.editor, requests, base, batch_size, progress=False)
        rows.append(row)
    out = {"run": str(run_dir), "editor": run.cfg.editor._target_, "edits": len(requests), "setting": name,
           "trained_with": run.cfg.editor.get(name), "rows": rows}
    write_json_atomic(run_dir / f"scope_sweep_{name}.json", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--limit", type=int, default=None, help="first N edits of each group")
    parser.add_argument("--sweep", default=None, help="SETTING=V1,V2,...: an inference setting's values to compare")
    parser.add_argument("--metrics", action="store_true", help="with --sweep: the edit metrics for each value too")
    args = parser.parse_args()
    from evaluation.run.compose import compose_config

    compose_config([])  # registers the config resolvers and schemas the saved config relies on
    try:
        if args.sweep is not None:
            name, values = parse_sweep(args.sweep)
            for run_dir in args.run_dirs:
                _print_sweep(sweep(run_dir, name, values, args.limit, args.metrics))
            return
        print("| run | editor | edits | edit prompts in scope | paraphrases in scope | locality prompts in scope |")
        print("|---|---|---:|---:|---:|---:|")
        for run_dir in args.run_dirs:
            out = report(run_dir, args.limit)
            shares = " | ".join(f"{g['in_scope']:.2f}" for g in out["groups"].values())
            print(f"| {run_dir.name} | {out['editor'].rsplit('.', 1)[-1]} | {out['edits']} | {shares} |", flush=True)
    except HarnessError as err:
        raise SystemExit(f"error: {err}") from None


def _print_sweep(out: dict[str, Any]) -> None:
    name, with_metrics = out["setting"], "metrics" in out["rows"][0]
    extra = " reliability | generalization | locality |" if with_metrics else ""
    print(f"\n{out['run']} ({out['edits']} edits, trained with {name}={out['trained_with']})\n")
    print(f"| {name} | edit prompts in scope | paraphrases in scope | locality prompts in scope |{extra}")
    print("|---:|---:|---:|---:|" + ("---:|---:|---:|" if with_metrics else ""))
    for row in out["rows"]:
        cells = [f"{g['in_scope']:.3f}" for g in row["groups"].values()]
        if with_metrics:
            cells += [f"{row['metrics'][k]:.3f}" for k in ("reliability", "generalization", "locality")]
        print(f"| {row[name]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
