"""Item-by-item check of the retention suite's authors'-code scores against Gu et al.'s own scripts.

    python -m benchmarks.check_authors_scores --authors-repo PATH [--model smollm2] [--limit 25] [--threads 1] \
        [--out results/authors_check_smollm2.md]

PATH is a clone of JasonForJoy/Model-Editing-Hurt. Their unedited-model scripts
(``test-task-code/test-*.py``) are run as they are, each in a scratch folder that holds their data paths,
with GPT-2's tokenizer and model replaced by stand-ins (their ``from transformers import ...`` lines are
dropped and the stand-ins put in their globals; nothing else in their text changes):

* ``model.generate`` is our model's greedy continuation of that one prompt, from transformers'
  ``generate`` called with the one prompt as they did (no padding: greedy tokens do not depend on it up to
  float ties), so it stops at the model's end token where the model does;
* ``tokenizer.decode`` is the whole sequence decoded with special tokens kept, the model's end token
  written as GPT-2's ``<|endoftext|>`` (their pad and end token), one pad in front, then transformers'
  ``clean_up_tokenization`` (on by default in their 4.x decode).

Their counters (TP, correct, rouge_score_total, count_per, ...) are read each time their script calls
``generate``: the change between two calls is what one item added. The harness's side is the suite's
unedited pass through its batched generator and the per-item rows it writes. For each task the check
prints how many items it compared, on how many the continuation (text and stop reason) agrees, and on
how many the authors'-code value agrees, with every mismatch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA_DIR = os.environ.get("RETENTION_DATA_DIR", str(ROOT.parent / "shared" / "data" / "retention"))
EOT = "<|endoftext|>"

# task -> (their script, their counters: what one item adds to our row's fields)
SCRIPTS: dict[str, str] = {"gsm8k": "test-reasoning.py", "rte": "test-NLI.py", "nq": "test-OpenDomainQA.py",
                           "boolq": "test-ClosedDomainQA.py", "mutual": "test-dialogue.py",
                           "samsum": "test-summarization.py", "conll03": "test-NER.py",
                           "sst2": "test-SentimentAnalysis.py"}
# our row's field -> the sum of their counters it equals. BoolQ and MuTual: their unedited-model scripts
# are the `authors_before` rule (the after-edit scripts' rule is `authors`, checked by unit tests).
FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "gsm8k": {"authors": ("correct",)},
    "rte": {"authors": ("TP", "FN"), "authors_denominator": ("TP", "FN", "TN", "FP", "others")},
    "nq": {"authors": ("exact_match_count",)},
    "boolq": {"authors_before": ("TP", "FN")},
    "mutual": {"authors_before": ("correct",)},
    "samsum": {"authors": ("rouge_score_total",)},
    "sst2": {"authors": ("TP", "FN")},
}
NER_TYPES = {"Person": ("PER", "per"), "Location": ("LOC", "loc"), "Organization": ("ORG", "org"),
             "Miscellaneous": ("MISC", "misc")}
_NER_PROMPT = re.compile(r"^Please identify (\w+) Entity from the given text\. Text: (.*) Entity:$", re.S)


class _Enough(Exception):
    """Raised from the stand-in model once the items to compare are done: ends their script."""


@dataclass
class _Value:
    """What flows through their tensors: a prompt, then a generated sequence; ``.to().detach()...`` keep it."""

    prompt: str
    max_new_tokens: int = 0

    def to(self, *_: Any) -> "_Value":
        return self

    detach = cpu = numpy = to

    def tolist(self) -> list["_Value"]:
        return [self]


@dataclass
class _Oracle:
    """Our model, one prompt per call, decoded as their GPT-2 decode would show it."""

    model: Any
    tokenizer: Any
    seen: list[dict[str, Any]] = field(default_factory=list)

    def continue_(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        import torch
        from transformers import PreTrainedTokenizerBase

        tok = self.tokenizer
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        ended = bool(new) and new[-1] == tok.eos_token_id
        whole = tok.decode(out[0].tolist(), skip_special_tokens=False)
        for special in {tok.eos_token, tok.pad_token} - {None}:
            whole = whole.replace(special, EOT)
        text = PreTrainedTokenizerBase.clean_up_tokenization(None, EOT + whole)
        return {"prompt": prompt, "string": text, "continuation": tok.decode(new, skip_special_tokens=True),
                "stop": "eos" if ended else "budget"}


def _stand_ins(oracle: _Oracle, on_generate: Callable[[str], None]) -> dict[str, Any]:
    """``GPT2Tokenizer`` and ``GPT2LMHeadModel`` for their globals."""

    class Tokenizer:
        pad_token_id = eos_token_id = None
        padding_side = "left"

        @classmethod
        def from_pretrained(cls, *_: Any, **__: Any) -> "Tokenizer":
            return cls()

        def __call__(self, prompts: Sequence[str], **_: Any) -> dict[str, _Value]:
            assert len(prompts) == 1, "their scripts prompt one at a time"
            return {"input_ids": _Value(prompts[0]), "attention_mask": _Value(prompts[0])}

        def decode(self, value: _Value) -> str:
            return oracle.seen[-1]["string"] if oracle.seen[-1]["prompt"] == value.prompt else ""

    class Model:
        @classmethod
        def from_pretrained(cls, *_: Any, **__: Any) -> "Model":
            return cls()

        def to(self, *_: Any) -> "Model":
            return self

        def generate(self, input_ids: _Value, max_new_tokens: int, **_: Any) -> _Value:
            on_generate(input_ids.prompt)  # their counters so far: the items before this one are done
            oracle.seen.append(oracle.continue_(input_ids.prompt, max_new_tokens))
            return _Value(input_ids.prompt, max_new_tokens)

    return {"GPT2Tokenizer": Tokenizer, "GPT2LMHeadModel": Model}


class _JsonLines:
    """``jsonlines.Reader(f)``: one JSON value per line (their scripts' only use of the package)."""

    @staticmethod
    def Reader(f: Any) -> Any:  # noqa: N802 (their name)
        return (json.loads(line) for line in f if line.strip())


def run_their_script(source: str, data_dir: str, oracle: _Oracle, stop_after: Callable[[list[str]], bool]
                     ) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    """Run one of their scripts until ``stop_after(prompts so far)``; their numeric globals at each
    ``generate`` call (and once more at the stop), and the oracle's view of each prompt."""
    snapshots: list[dict[str, float]] = []
    prompts: list[str] = []
    env: dict[str, Any] = {"__name__": "__their_script__", "jsonlines": _JsonLines}

    def snapshot() -> None:
        snapshots.append({k: v for k, v in env.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def on_generate(prompt: str) -> None:
        snapshot()
        if stop_after(prompts):
            raise _Enough
        prompts.append(prompt)

    env.update(_stand_ins(oracle, on_generate))
    kept = "\n".join(line for line in source.splitlines()
                     if not re.match(r"\s*(from transformers import|import jsonlines)", line))
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "data").mkdir()
        os.symlink(os.path.abspath(data_dir), Path(scratch) / "data" / "task-data")
        for name in SCRIPTS.values():
            (Path(scratch) / "test-result" / name[:-3]).mkdir(parents=True)
        os.chdir(scratch)
        try:
            exec(compile(kept, "their-script", "exec"), env)
            snapshot()  # the file ran out first: the counters after its last item
        except _Enough:
            pass
        finally:
            os.chdir(cwd)
    return snapshots, oracle.seen[:len(prompts)]


def _added(snapshots: list[dict[str, float]], i: int, names: Sequence[str]) -> float:
    return sum(snapshots[i + 1].get(n, 0) - snapshots[i].get(n, 0) for n in names)


def their_rows(task: str, snapshots: list[dict[str, float]], seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each of our rows' fields is under their script, with the oracle's continuation."""
    if task != "conll03":
        return [{**{f: _added(snapshots, i, names) for f, names in FIELDS[task].items()},
                 "continuation": seen[i]["continuation"], "stop": seen[i]["stop"]} for i in range(len(seen))]
    rows: list[dict[str, Any]] = []
    carry: dict[str, list[float]] = {}  # a -DOCSTART- prompt's counts go to the next sentence's row of its type
    for i, s in enumerate(seen):
        word, sentence = _NER_PROMPT.match(s["prompt"]).groups()
        _, short = NER_TYPES[word]
        hits, total = _added(snapshots, i, [f"count_{short}"]), _added(snapshots, i, [f"total_{short}"])
        if sentence == "-DOCSTART-":
            carry.setdefault(short, [0.0, 0.0])
            carry[short][0] += hits
            carry[short][1] += total
            continue
        before = carry.pop(short, [0.0, 0.0])
        rows.append({"authors_hits": hits + before[0], "authors_denominator": total + before[1],
                     "continuation": s["continuation"], "stop": s["stop"]})
    return rows


def _ner_real_prompts(prompts: list[str]) -> int:
    return sum(_NER_PROMPT.match(p).group(2) != "-DOCSTART-" for p in prompts)


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    same_text = [o["continuation"] == t["continuation"] and o["stop"] == t["stop"] for o, t in zip(ours, theirs)]
    mismatched = [(o["id"], f, o[f], t[f]) for o, t in zip(ours, theirs) for f in fields
                  if not math.isclose(float(o[f]), float(t[f]), rel_tol=0, abs_tol=1e-9)]
    return {"items": len(theirs), "rows": len(ours), "same_continuation": sum(same_text),
            "differ_continuation": [o["id"] for o, s in zip(ours, same_text) if not s],
            "mismatched": mismatched, "eos_stops": sum(o["stop"] == "eos" for o in ours)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-repo", required=True, type=Path, help="a clone of JasonForJoy/Model-Editing-Hurt")
    ap.add_argument("--model", default="smollm2", help="a choice of the model config group (conf/model/*.yaml)")
    ap.add_argument("--limit", type=int, default=25, help="items per task (CoNLL03: sentences)")
    ap.add_argument("--tasks", default=",".join(SCRIPTS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    ap.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) here")
    ap.add_argument("--infer-stops", action="store_true",
                    help="score our rows with the stop reason inferred from the text (empty: the end token, else "
                         "the budget), as before stop reasons were recorded: shows what the check catches")
    args = ap.parse_args(argv)
    if not (args.authors_repo / "test-task-code").is_dir():
        raise SystemExit(f"error: {args.authors_repo} has no test-task-code/ folder: pass a clone of "
                         f"JasonForJoy/Model-Editing-Hurt with --authors-repo")

    import torch
    from hydra.utils import instantiate

    from evaluation.editing.generation import make_generate_fn
    from evaluation.editing.unedited import Unedited
    from evaluation.retention.outputs import item_rows
    from evaluation.retention.suite import Gu2024Suite
    from evaluation.run.compose import compose_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}"])
    loaded = instantiate(cfg.model)
    tasks = args.tasks.split(",")
    suite = Gu2024Suite(args.data_dir, tasks=tasks, limit=args.limit)
    report = suite.evaluate(make_generate_fn(loaded.model, loaded.tokenizer, Unedited(loaded), cfg.eval_batch_size,
                                             progress=False, token_budget=cfg.generation_token_budget))
    inferred = ", our stop reasons inferred from the text (--infer-stops)" if args.infer_stops else ""
    lines = [f"## Authors'-code scores item by item: {args.model}, unedited, first {args.limit} items per task"
             f"{inferred}\n",
             "| task | their script | rows | continuation equal | stopped at the end token | authors' value equal |",
             "|---|---|---:|---:|---:|---:|"]
    details = []
    for task in tasks:
        stops = report.stops[task]
        scored = ["budget" if text else "eos" for text in report.outputs[task]] if args.infer_stops else stops
        ours = item_rows(suite.tasks[task], suite.examples(task), report.outputs[task], scored, report.tokens[task])
        for row, stop in zip(ours, stops):
            row["stop"] = stop
        source = (args.authors_repo / "test-task-code" / SCRIPTS[task]).read_text(encoding="utf-8")
        n = len(ours)
        stop_after = ((lambda prompts: _ner_real_prompts(prompts) >= n) if task == "conll03"
                      else (lambda prompts: len(prompts) >= n))
        snapshots, seen = run_their_script(source, args.data_dir, _Oracle(loaded.model, loaded.tokenizer),
                                           stop_after)
        fields = ("authors_hits", "authors_denominator") if task == "conll03" else tuple(FIELDS[task])
        res = compare(ours, their_rows(task, snapshots, seen), fields)
        lines.append(f"| {task} | {SCRIPTS[task]} ({', '.join(fields)}) | {res['rows']} | {res['same_continuation']} "
                     f"| {res['eos_stops']} | {res['rows'] - len({m[0] for m in res['mismatched']})} |")
        if res["differ_continuation"]:
            details.append(f"- {task}: continuations differ (batched vs one prompt per call) on "
                           f"{', '.join(res['differ_continuation'])}")
        for iid, f, o, t in res["mismatched"]:
            details.append(f"- {task} item {iid}: {f} ours {o!r}, their script {t!r}")
        print(lines[-1], flush=True)
    text = "\n".join(lines + [""] + (details or ["Every item agrees."])) + "\n"
    print(text)
    if args.out is not None:
        from evaluation.common.atomic import write_text_atomic

        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
