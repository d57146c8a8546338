"""Which inputs a finished run's router treats as edited: edit prompts, paraphrases, unrelated prompts.

    python -m evaluation.scope_report outputs/runs/<run> [--limit 300]   (finished, or stopped mid-stream)

For editors that route (ELDER's deferral, GRACE's codebook radii, MELO's cluster radii, Defer's
deferral unit) it rebuilds the editor from the run's last checkpoint and reports the share of each
group that its router puts in scope (``Editor.in_scope``). Ideal: edit prompts and paraphrases 1.0,
locality prompts 0.0. Low paraphrase coverage means the edits cannot generalise whatever was learned;
high locality coverage means unrelated inputs get edited. Writes ``<run>/scope.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evaluation.common.errors import HarnessError
from evaluation.reporting.saved_run import load_saved_run, prompt_groups


def report(run_dir: Path, limit: int | None = None) -> dict[str, Any]:
    run = load_saved_run(run_dir)
    sample = run.requests[:limit] if limit else run.requests
    prompts = prompt_groups(sample)
    out: dict[str, Any] = {"run": str(run_dir), "editor": run.cfg.editor._target_, "edits": len(run.requests),
                           "groups": {}}
    for name, group in prompts.items():
        mask = run.editor.in_scope(group)
        if mask is None:
            raise HarnessError(f"{run.cfg.editor._target_} has no router: its edits are in the weights and act on "
                               f"every input, so every prompt is in scope")
        out["groups"][name] = {"n": len(mask), "in_scope": float(mask.float().mean()) if len(mask) else 0.0}
    (run_dir / "scope.json").write_text(json.dumps(out, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--limit", type=int, default=None, help="first N edits of each group")
    args = parser.parse_args()
    from evaluation.run.compose import compose_config

    compose_config([])  # registers the config resolvers and schemas the saved config relies on
    print("| run | editor | edits | edit prompts in scope | paraphrases in scope | locality prompts in scope |")
    print("|---|---|---:|---:|---:|---:|")
    for run_dir in args.run_dirs:
        try:
            out = report(run_dir, args.limit)
        except HarnessError as err:
            raise SystemExit(f"error: {err}") from None
        shares = " | ".join(f"{g['in_scope']:.2f}" for g in out["groups"].values())
        print(f"| {run_dir.name} | {out['editor'].rsplit('.', 1)[-1]} | {out['edits']} | {shares} |", flush=True)


if __name__ == "__main__":
    main()
