"""How well a finished ELDER run's codes separate edits from unrelated inputs.

    python -m elder.deferral_report outputs/runs/<run> [--limit 300]

Loads the run's resolved config (results.json) and its last checkpoint, computes the allocation codes
of the edit prompts, the held-out paraphrases and the locality prompts, and reports the distribution
of their distance to the nearest stored code: the share each group keeps in scope (distance below
epsilon) at the run's epsilon and at every other value. Ideal deferral keeps edits and paraphrases in
scope and defers every locality prompt. Writes ``<run>/deferral.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from elder.editor import ElderEditor
from elder.routing import min_hamming
from evaluation.common.errors import HarnessError
from evaluation.reporting.saved_run import load_saved_run, prompt_groups


def report(run_dir: Path, limit: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    run = load_saved_run(run_dir)
    editor, requests = run.editor, run.requests
    if not isinstance(editor, ElderEditor):
        raise HarnessError(f"{run_dir} is not an ELDER run (editor {run.cfg.editor._target_}); "
                           f"python -m evaluation.scope_report works for every editor")
    sample = requests[:limit] if limit else requests
    groups = prompt_groups(sample)
    bits = editor.stored_codes.shape[1]
    out: dict[str, Any] = {"run": str(run_dir), "edits_stored": len(editor.stored_codes), "epsilon": editor.config.epsilon,
                           "bits": bits, "groups": {}}
    for name, prompts in groups.items():
        dist = torch.cat([min_hamming(editor.codes_for(prompts[i:i + batch_size]), editor.stored_codes)
                          for i in range(0, len(prompts), batch_size)])
        out["groups"][name] = {
            "n": len(prompts),
            "mean_distance": float(dist.float().mean()),
            "histogram": {int(d): int((dist == d).sum()) for d in dist.unique()},
            "in_scope_at": {eps: float((dist < eps).float().mean()) for eps in range(0, bits + 1, 2)},
        }
    (run_dir / "deferral.json").write_text(json.dumps(out, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="first N edits of each group")
    args = parser.parse_args()
    from evaluation.run.compose import compose_config

    compose_config([])  # registers the config resolvers and schemas the saved config relies on
    try:
        out = report(args.run_dir, args.limit)
    except HarnessError as err:
        raise SystemExit(f"error: {err}") from None
    eps = out["epsilon"]
    print(f"{out['run']}: {out['edits_stored']} stored codes of {out['bits']} bits, epsilon {eps}")
    print("| group | n | mean distance to nearest code | in scope at epsilon | in scope at each epsilon 0..bits |")
    print("|---|---:|---:|---:|---|")
    for name, g in out["groups"].items():
        curve = " ".join(f"{e}:{v:.2f}" for e, v in g["in_scope_at"].items())
        print(f"| {name} | {g['n']} | {g['mean_distance']:.2f} | {g['in_scope_at'][eps]:.2f} | {curve} |")


if __name__ == "__main__":
    main()
