"""Where one ROME update lands, per covariance corpus and update key (docs/locate_then_edit.md, "Which text").

    python -m benchmarks.update_reach --corpora none,model,FILE --out results/update_reach_smollm2_zsre \\
        model=smollm2 dataset=zsre dataset.num_edits=100
    python -m benchmarks.update_reach --corpora none --update-keys prompt,average --out OUT model=smollm2 ...

ROME's update W += (v* - W k0) u^T / (u^T ks), with u = C^-1 k* / ||C^-1 k*||, changes the matrix's output at
any input k by r(k) (v* - W k0), where r(k) = u^T k / u^T ks: 1 at the key ks the update is solved at, and at any
other input the fraction of the written value it receives. ks is the edited prompt's key k0 under
``editor.update_key=prompt`` (the original, the default) and the prefix-averaged k* under ``average`` (r-ROME).
The corpus enters only through C, so r says where each corpus sends an update. Measured on the unedited model,
for the first ``dataset.num_edits`` requests, per corpus (``none``: no adjustment, u = k*; ``model``: the text
the model writes itself; a path: that text file), at:

- the edited prompt's own key k0 (1 under ``prompt``; under ``average`` what the edit itself receives, and 1/r
  the factor by which the original's update is the larger: its smallest r is where the original blows up),
  apart for prompts that open with the subject (k0 then read at the sequence's first tokens, where a prefixed
  copy's key differs most) and the others;
- the paraphrase's subject token (generalization wants r near 1);
- the positions after the subject in the prompt and its target (teacher forcing reads them; the value loop
  wrote its delta at the subject alone);
- every position of the locality prompt and answer (locality wants r near 0);
- the other requests' keys (what a later edit writes into an earlier one), those about the same subject (ZsRE
  asks several questions about one subject) apart from the rest;

and each C's spectrum (condition number; effective rank (sum l)^2 / sum l^2). ``--run DIR`` (repeatable) adds what a
finished run of any editor did: its edits split by whether a later edit of the stream is about the same subject,
with their teacher-forced reliability just after each was edited and at the end (the forgetting record). Writes
OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from baselines.rome.compute_key import capture, key_reprs, locate, run_until
from baselines.rome.covariance import MODEL_CORPUS, inverse
from baselines.rome.editor import UPDATE_KEYS, left_vector, load_second_moments, solved_key
from evaluation.run.forgetting import cells, point_ranges

# how the table names the key each ``editor.update_key`` solves at
SOLVED_AT = {"prompt": "k0", "average": "k*"}
SITES = ("prompt", "paraphrase", "after_subject", "locality", "same_subject", "other_subjects")


def reach(u: torch.Tensor, solved_at: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """r(k) = u.k / u.ks for each row of ``keys``: the share of the written value (v* - W k0) that input k gets,
    ``solved_at`` being ks, the key the update writes it whole at (``solved_key``)."""
    return (keys @ u) / torch.dot(u, solved_at)


def spectrum(mom2: torch.Tensor) -> dict[str, float]:
    eig = torch.linalg.eigvalsh(mom2.double())
    return {"condition": float(eig.max() / eig.min()), "effective_rank": float(eig.sum() ** 2 / (eig ** 2).sum())}


@torch.no_grad()
def _inputs(editor: Any, text: str) -> torch.Tensor:
    """The rewritten matrix's input at every position of ``text`` (T, d_in)."""
    device = next(editor.model.parameters()).device
    ids = torch.tensor([editor.tokenizer(text)["input_ids"]], device=device)
    with capture(editor.module, stop=True) as seen:
        run_until(editor.model, ids, torch.ones_like(ids))
    return seen["in"][0].float()


def request_keys(editor: Any, request: Any, prefixes: Sequence[str]) -> dict[str, Any]:
    """k*, k0 and the inputs ``SITES`` reads, for one request."""
    model, tok, module = editor.model, editor.tokenizer, editor.module
    own = key_reprs(model, tok, module, prefixes, request.prompt, request.subject, editor.config.fact_token)
    para = key_reprs(model, tok, module, [""], request.paraphrase, request.subject, editor.config.fact_token)
    at = locate(tok, "", request.prompt, request.subject, editor.config.fact_token).index
    return {"subject": request.subject, "opens_with_subject": request.prompt.startswith(request.subject),
            "key": own.key, "k0": own.inputs[0], "paraphrase": para.inputs[:1],
            "after_subject": _inputs(editor, f"{request.prompt} {request.target}")[at + 1:],
            "locality": _inputs(editor, f"{request.locality_prompt} {request.locality_answer}")}


def measure(keys: list[dict[str, Any]], inv_mom2: torch.Tensor | None, update_key: str = "prompt") -> dict[str, float]:
    """Per site, the mean over requests of the mean |r| (prompt and paraphrase: the median r); and the median over
    requests of the largest |r| a request about another subject gets (how far an edit reaches its nearest one)."""
    k0s = torch.stack([k["k0"] for k in keys])
    subjects = [k["subject"] for k in keys]
    per_site: dict[str, list[float]] = {s: [] for s in (*SITES, "nearest", "prompt_opening", "prompt_later")}
    for i, k in enumerate(keys):
        u, solved_at = left_vector(k["key"], inv_mom2), solved_key(update_key, k["k0"], k["key"])
        # a request without a subject (a data set that names none) shares it with nobody
        same = [j for j, s in enumerate(subjects) if j != i and s and s == subjects[i]]
        other = [j for j, s in enumerate(subjects) if j != i and j not in same]
        own = float(reach(u, solved_at, k["k0"].unsqueeze(0))[0])
        # k0 read at the sequence's first tokens, or after some context
        for site in ("prompt", "prompt_opening" if k["opens_with_subject"] else "prompt_later"):
            per_site[site].append(own)
        sites = {"paraphrase": k["paraphrase"], "after_subject": k["after_subject"], "locality": k["locality"],
                 "same_subject": k0s[same], "other_subjects": k0s[other]}
        for site, rows in sites.items():
            if len(rows):
                r = reach(u, solved_at, rows)
                per_site[site].append(float(r[0]) if site == "paraphrase" else float(r.abs().mean()))
                if site == "other_subjects":
                    per_site["nearest"].append(float(r.abs().max()))
    # a site no request has (CounterFact's streams repeat no subject) is left out: "—" in the table
    summaries = {"prompt_median_r": ("prompt", torch.median), "prompt_min_r": ("prompt", torch.min),
                 "prompt_opening_median_r": ("prompt_opening", torch.median),
                 "prompt_later_median_r": ("prompt_later", torch.median),
                 "paraphrase_median_r": ("paraphrase", torch.median),
                 **{f"{s}_mean_abs_r": (s, torch.mean) for s in SITES[2:]},
                 "nearest_other_subject_abs_r_median": ("nearest", torch.median)}
    return {name: float(f(torch.tensor(per_site[site]))) for name, (site, f) in summaries.items() if per_site[site]}


def subject_collisions(subjects: Sequence[str], points: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """A finished stream's batches, split by whether a later edit shares a subject with one of theirs: edits,
    and their mean teacher-forced reliability just after the batch was edited and at the end."""
    final = max((p for p in points if "first_batch" not in p), key=lambda p: p["edits"])
    just_after = {(c.first_edit, c.last_edit): c.reliability_just_after for c in cells(points)}
    groups: dict[str, dict[str, float]] = {}
    for (first, last), end in zip(point_ranges(final), final["reliability"]):
        mine = set(subjects[first - 1:last]) - {""}
        key = "a later edit shares the subject" if mine & set(subjects[last:final["edits"]]) else "no later edit does"
        g = groups.setdefault(key, {"edits": 0, "just_after": 0.0, "end": 0.0})
        size = last - first + 1
        g["edits"] += size
        g["just_after"] += just_after[(first, last)] * size
        g["end"] += float(end) * size
    return {k: {"edits": g["edits"], "just_after": g["just_after"] / g["edits"], "end": g["end"] / g["edits"]}
            for k, g in sorted(groups.items())}


def run_collisions(run_dir: Path) -> tuple[str, dict[str, dict[str, float]]]:
    from hydra.utils import instantiate

    from evaluation.reporting.saved_run import run_config
    from evaluation.run.results import read_results

    if not (run_dir / "results.json").is_file():
        raise SystemExit(f"error: {run_dir} has no results.json; pass the folder of a finished run")
    cfg = run_config(run_dir)
    results = read_results(run_dir / "results.json")
    if not results.get("forgetting"):
        raise SystemExit(f"error: {run_dir} has no forgetting record; pass a finished run of this harness")
    subjects = [r.subject for r in instantiate(cfg.dataset).load()]
    label = f"{run_dir.name} ({cfg.editor._target_.rsplit('.', 1)[-1]}, {cfg.dataset.name})"
    return label, subject_collisions(subjects, results["forgetting"])


def _collisions_table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["\n## What finished runs did to edits a later edit of the same subject follows\n",
             "Teacher-forced reliability (%) of each group, just after its edit and at the end of the stream.\n",
             "| run | edits | later same-subject edit | rel. just after | rel. end |", "|---|---:|---|---:|---:|"]
    for label, groups in runs.items():
        for group, g in groups.items():
            lines.append(f"| {label} | {g['edits']} | {group} | {100 * g['just_after']:.0f} | {100 * g['end']:.0f} |")
    return "\n".join(lines) + "\n"


def _table(rows: dict[tuple[str, str], dict[str, float]], setting: str, command: str) -> str:
    cols = ["prompt_median_r", "prompt_min_r", "prompt_opening_median_r", "prompt_later_median_r",
            "paraphrase_median_r", "after_subject_mean_abs_r", "locality_mean_abs_r", "same_subject_mean_abs_r",
            "other_subjects_mean_abs_r", "nearest_other_subject_abs_r_median", "condition", "effective_rank"]
    head = ["corpus", "solved at", "edited prompt r (median)", "edited prompt r (smallest)",
            "edited prompt r, prompts opening with the subject (median)", "edited prompt r, the others (median)",
            "paraphrase r (median)", "after subject |r|", "locality |r|", "same-subject edits |r|",
            "other-subject edits |r|", "nearest other-subject edit |r| (median)", "C condition", "C effective rank"]
    lines = [f"# Where one ROME update lands, per covariance corpus and update key\n\n{setting}\n",
             "r(k) = u.k / u.ks: the share of the written value an input k receives, 1 at the key ks the update is "
             "solved at (k0, the edited prompt's, under `editor.update_key=prompt`; k*, the prefix-averaged one, under "
             "`average`); the docstring of `benchmarks/update_reach.py` defines each column.\n",
             f"Made by: `{command}`\n",
             "| " + " | ".join(head) + " |", "|---|---" + "|---:" * (len(head) - 2) + "|"]
    digits = {c: 0 if c in ("condition", "effective_rank") else 3 for c in cols}
    for (corpus, update_key), row in rows.items():
        values = [f"{row[c]:.{digits[c]}f}" if c in row else "—" for c in cols]
        lines.append(f"| {corpus} | {SOLVED_AT[update_key]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    from hydra.utils import instantiate
    from tqdm import tqdm

    from evaluation.common.atomic import write_text_atomic
    from evaluation.run.compose import compose_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", default="none,model", help="comma-separated: none, model, or text file paths")
    parser.add_argument("--out", type=Path, required=True, help="OUT.md and OUT.json are written")
    parser.add_argument("--update-keys", default=None,
                        help="comma-separated: prompt, average (default: the composed editor.update_key)")
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="a finished run's folder: its edits split by later same-subject edits (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (model=..., dataset=..., dataset.num_edits=N)")
    args = parser.parse_args(argv)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    for c in corpora:
        if c not in ("none", "model") and not Path(c).expanduser().is_file():
            raise SystemExit(f"error: corpus {c!r} is neither none, model nor a text file; build one with "
                             f"`python -m data.text_corpus counterfact-facts FILE`")

    cfg = compose_config(["editor=rome", "editor.mom2_adjustment=true", *args.overrides])
    update_keys = [k.strip() for k in (args.update_keys or cfg.editor.update_key).split(",") if k.strip()]
    for k in update_keys:
        if k not in UPDATE_KEYS:
            raise SystemExit(f"error: update key {k!r} is not one of {', '.join(UPDATE_KEYS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runs = dict(run_collisions(run) for run in args.run)  # before the keys: a bad folder costs nothing
    editor = instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))
    requests = instantiate(cfg.dataset).load()[:cfg.dataset.num_edits]
    prefixes = editor.context_prefixes()
    keys = [request_keys(editor, r, prefixes) for r in tqdm(requests, desc="keys", unit="request")]
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for corpus in corpora:
        stats = None
        if corpus != "none":
            source = MODEL_CORPUS if corpus == "model" else str(Path(corpus).expanduser())
            config = dataclasses.replace(editor.config, mom2_corpus=source)
            stats = load_second_moments(editor.loaded, [editor.module], [editor.module_name], config)[0]
        inv = None if stats is None else inverse(stats).to(editor.module.weight.device)
        for update_key in update_keys:
            rows[Path(corpus).name, update_key] = {**measure(keys, inv, update_key),
                                                   **(spectrum(stats.mom2) if stats is not None else {})}
    subjects = [r.subject for r in requests]
    shared = sum(subjects.count(s) > 1 for s in subjects)
    setting = (f"{cfg.model.name}, {editor.module_name}, the first {len(requests)} requests of {cfg.dataset.name} "
               f"({len(set(subjects))} subjects; {shared} requests share theirs with another), the unedited model.")
    command = " ".join(["python -m benchmarks.update_reach", *(argv if argv is not None else sys.argv[1:])])
    text = _table(rows, setting, command) + (_collisions_table(runs) if runs else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out.with_suffix(".md"), text)
    saved = {"setting": setting, "overrides": args.overrides,
             "rows": {f"{corpus} @ {key}": row for (corpus, key), row in rows.items()}, "runs": runs}
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(saved, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
