"""Edits scored from the model's own answers (issue 33): stop rules, the normaliser, teacher forcing and
generation disagreeing on hand-made models, deferral, the unedited answers' cache, edit-time points and
an exact resume with the new metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.answers import AnswerReading, squad_normalise
from evaluation.editing.generation import generate_continuations
from evaluation.editing.models import LoadedModel
from evaluation.editing.unedited import Unedited
from evaluation.run import forgetting as fg
from evaluation.run.answer_metrics import (
    AnswerCache,
    AnswerScorer,
    base_locality_answers,
)
from evaluation.run.metrics import base_locality_predictions, evaluate_edits
from tests.conftest import tiny_model


@pytest.mark.parametrize("text, normalised", [
    ("The Beatles", "beatles"),
    ("  an   Apple, a day!  ", "apple day"),
    ("U.S.A.", "usa"),
    ("Théâtre", "théâtre"),  # letters outside ASCII are kept
    ("theatre", "theatre"),  # an article only as a whole word
    ("", ""),
])
def test_the_squad_normaliser(text: str, normalised: str) -> None:
    assert squad_normalise(text) == normalised


@pytest.mark.parametrize("stop, continuation, answer", [
    ("sentence", " Paris. It is big", "Paris"),
    ("sentence", " 3.5 metres. Then", "3.5 metres"),  # a point inside a number ends nothing
    ("sentence", " Paris", "Paris"),  # no end: the whole continuation (the token cap ended it)
    ("sentence", "\n\nParis\nLondon", "Paris"),  # leading white space is not the end of the first line
    ("sentence", " Is it? Yes", "Is it"),
    ("line", " Paris. It is big\nnext", "Paris. It is big"),
    ("eos", " Paris.\nLondon", "Paris.\nLondon"),
    ("wild", " 3.5 metres", "3"),  # WILD's stop strings end at any "."
    ("wild", "\nParis", ""),  # and at a leading line break
])
def test_stop_rules(stop: str, continuation: str, answer: str) -> None:
    assert AnswerReading(stop=stop).answer(continuation) == answer


def test_while_generating_a_final_point_may_still_be_a_number() -> None:
    reading = AnswerReading(stop="sentence")
    assert not reading.stops(" It is 3.")  # "3.5" may follow
    assert reading.stops(" It is 3. Then")
    assert reading.answer(" It is 3.") == "It is 3"  # once generation is over, the final "." ends it


def test_exact_and_contains() -> None:
    reading = AnswerReading()
    assert reading.exact("the Beatles.", "Beatles") and not reading.exact("Beatles band", "Beatles")
    assert reading.contains("It was the Beatles band", "Beatles")
    assert not reading.contains("Beatlesmania", "Beatles")  # whole words only
    assert not reading.contains("anything", "")
    plain = AnswerReading(normalise="none")
    assert not plain.exact("the Beatles", "Beatles") and plain.exact(" Beatles ", "Beatles")


@pytest.mark.parametrize("field, value", [("stop", "paragraph"), ("normalise", "lower"), ("max_new_tokens", 0),
                                          ("context", "Q: {question}")])
def test_a_bad_reading_is_one_line(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"answers.{field}"):
        AnswerReading(**{field: value})


def test_the_wild_reading_is_there_by_name(compose_cfg: Any) -> None:
    from hydra.utils import instantiate

    reading = instantiate(compose_cfg("answers=wild").answers)
    assert (reading.stop, reading.max_new_tokens, reading.normalise, reading.context) == ("wild", 50, "squad", "none")
    assert instantiate(compose_cfg("answers=wild", "answers.context=qa_inst").answers).prompt("Who?") == \
        "Please answer the question:\n\nQ: Who?\nA:"
    assert not instantiate(compose_cfg("answers=none").answers).enabled


# --- hand-made models: a bigram table as a real LLaMA --------------------------------------------------
def bigram_model(transitions: dict[str, str]) -> LoadedModel:
    """A one-layer LLaMA whose next token is a fixed function of the current one (``transitions`` over
    single characters of the tiny models' byte-level tokenizer; any other token is followed by the end
    token). The embedding is one-hot of the next token, the block adds nothing, the head reads it back."""
    tokenizer = tiny_model().tokenizer
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id

    def tid(ch: str) -> int:
        (i,) = tokenizer(ch, add_special_tokens=False).input_ids
        return i

    table = torch.full((vocab,), eos, dtype=torch.long)
    for a, b in transitions.items():
        table[tid(a)] = tid(b)
    hidden = vocab + vocab % 2  # RoPE needs an even head width
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(hidden)[table])
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(torch.eye(hidden)[:vocab])
    return LoadedModel(model, tokenizer, "bigram", "model.layers.{i}.mlp.down_proj", 1, "model.layers.{i}")


def request(prompt: str, target: str) -> EditRequest:
    return EditRequest(0, prompt, target, prompt, "Z?", "x")


def scores(transitions: dict[str, str], req: EditRequest, reading: AnswerReading | None = None) -> dict[str, float]:
    editor = Unedited(bigram_model(transitions))
    scorer = AnswerScorer(reading or AnswerReading())
    base = base_locality_predictions(editor, [req])
    base_answers = base_locality_answers(editor, [req], scorer)
    return evaluate_edits(editor, [req], base, progress=False, scorer=scorer, base_answers=base_answers)


def test_teacher_forcing_says_learned_where_the_models_own_answer_is_wrong() -> None:
    # after "Q?" the model says " abc": every token of the target " ab" is the argmax under teacher
    # forcing, but the model does not stop after it
    out = scores({"?": " ", " ": "a", "a": "b", "b": "c"}, request("Q?", "ab"))
    assert out["reliability"] == 1.0 and out["reliability_token"] == 1.0
    assert out["reliability_generated"] == 0.0 and out["reliability_generated_contains"] == 0.0
    assert out["locality_generated"] == 1.0  # the unedited model is its own reference


def test_the_models_own_answer_is_right_where_teacher_forcing_says_not_learned() -> None:
    # the model answers " ab." to "Q?": the target "ab!" fails on its last token under teacher forcing,
    # while the answer, cut at the sentence end and normalised, is the target
    out = scores({"?": " ", " ": "a", "a": "b", "b": "."}, request("Q?", "ab!"))
    assert out["reliability"] == 0.0
    assert out["reliability_generated"] == 1.0 and out["reliability_generated_contains"] == 1.0


def test_generation_stops_by_its_rule_never_at_the_targets_length() -> None:
    loaded = bigram_model({"?": " ", " ": "a", "a": "b", "b": "c", "c": ".", ".": " ", })  # " abc. abc. ..."
    reading = AnswerReading(stop="sentence", max_new_tokens=12)
    found = generate_continuations(loaded.model, loaded.tokenizer, ["Q?"], 12, stops=reading.stops)[0]
    assert (found.text, found.stop, found.tokens) == (" abc. ", "stop", 6)  # ended by ". ", not after " ab"
    assert reading.answer(found.text) == "abc"
    capped = generate_continuations(loaded.model, loaded.tokenizer, ["Q?"], 12)[0]  # no rule: the cap
    assert (capped.text, capped.stop, capped.tokens) == (" abc. abc. a", "budget", 12)
    ended = generate_continuations(loaded.model, loaded.tokenizer, ["Q?", "Qb"], 12,
                                   stops=AnswerReading(stop="eos").stops)
    assert (ended[1].text, ended[1].stop, ended[1].tokens) == ("c. abc. abc.", "budget", 12)
    assert [c.stop for c in generate_continuations(loaded.model, loaded.tokenizer, ["Zz"], 12)] == ["eos"]


def test_context_template_is_what_the_model_is_given() -> None:
    out = scores({":": " ", " ": "a", "a": "b", "b": "."}, request("Q", "ab"), AnswerReading(context="{prompt}:"))
    assert out["reliability_generated"] == 1.0  # "Q:" -> " ab."
    assert scores({":": " ", " ": "a", "a": "b", "b": "."}, request("Q", "ab"))["reliability_generated"] == 0.0


# --- routed editors and the unedited answers ------------------------------------------------------------
def test_an_out_of_scope_prompt_gets_the_unedited_answer_bit_for_bit(one_thread: None) -> None:
    from baselines.grace import GraceEditor
    from tests.conftest import zsre_requests

    requests = zsre_requests(6)
    loaded = tiny_model("tiny_llama")
    scorer = AnswerScorer(AnswerReading(stop="eos", max_new_tokens=8))
    others = [r.locality_prompt for r in requests] + ["The sky is", "nq question: who wrote the iliad"]
    before = scorer.answers(Unedited(loaded), others)
    editor = GraceEditor(loaded, layer=2, iterations=30, eps=0.5)
    editor.edit(requests[:3])
    assert not editor.in_scope(others).any()
    after = scorer.answers(editor, others)
    assert [a.continuation for a in after] == [a.continuation for a in before]
    learned = scorer.answers(editor, [requests[0].prompt])[0]
    assert learned.continuation != scorer.answers(Unedited(loaded), [requests[0].prompt])[0].continuation


def test_the_unedited_locality_answers_are_cached_by_model_reading_and_prompts(tmp_path: Path) -> None:
    from tests.conftest import zsre_requests

    requests = zsre_requests(3)
    editor = Unedited(tiny_model("tiny_gpt2"))
    scorer = AnswerScorer(AnswerReading(stop="eos", max_new_tokens=4))
    cache = AnswerCache(tmp_path, "tiny-key")
    first = base_locality_answers(editor, requests, scorer, cache)
    assert len(list(tmp_path.glob("*.json"))) == 1
    calls: list[int] = []
    original = scorer.answers
    scorer.answers = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    assert base_locality_answers(editor, requests, scorer, cache) == first and not calls  # read, not generated
    # another reading or another model is another file
    assert base_locality_answers(editor, requests, AnswerScorer(AnswerReading(stop="eos", max_new_tokens=3)),
                                 cache) is not None
    assert base_locality_answers(editor, requests, scorer, AnswerCache(tmp_path, "other-key")) == first
    assert len(list(tmp_path.glob("*.json"))) == 3
    # a file whose content was changed is not used
    path = cache.path(scorer.reading, [r.locality_prompt for r in requests])
    blob = json.loads(path.read_text())
    blob["continuations"][0][0] = "tampered"
    path.write_text(json.dumps(blob))
    assert base_locality_answers(editor, requests, scorer, cache) == first and calls


def test_a_locality_prompt_out_of_the_routers_scope_takes_the_unedited_answer_and_the_numbers_stay(
        one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRACE edits three requests; the locality prompt of one of them is another's edit prompt (in scope), the
    rest are not. Only the prompts in scope are generated; metrics and answers equal generating every prompt."""
    import dataclasses

    from baselines.grace import GraceEditor
    from tests.conftest import zsre_requests

    requests = zsre_requests(4)
    requests[1] = dataclasses.replace(requests[1], locality_prompt=requests[0].prompt)
    loaded = tiny_model("tiny_llama")
    base = base_locality_predictions(Unedited(loaded), requests)
    editor = GraceEditor(loaded, layer=2, iterations=30, eps=0.5)
    editor.edit(requests[:3])
    generated: list[int] = []

    def run(reuse: bool) -> tuple[dict[str, float], list[dict[str, Any]]]:
        scorer = AnswerScorer(AnswerReading(stop="eos", max_new_tokens=6, reuse_unedited=reuse))
        answers = base_locality_answers(Unedited(loaded), requests, scorer)
        original = scorer.answers
        monkeypatch.setattr(scorer, "answers", lambda ed, prompts, *a: generated.append(len(prompts))
                            or original(ed, prompts, *a))
        rows: list[dict[str, Any]] = []
        point = evaluate_edits(editor, requests, base, progress=False, scorer=scorer, base_answers=answers,
                               answers_out=rows)
        return point, rows

    reused, reused_rows = run(True)
    assert [r["routed"] for r in reused_rows if r["kind"] == "locality"] == [False, True, False, False]
    every, every_rows = run(False)
    assert generated == [4 + 4 + 1, 4 + 4 + 4]  # reliability, generalization, the locality prompts generated
    assert reused == every
    assert [{**r, "routed": None} if r["kind"] == "locality" else r for r in reused_rows] == every_rows
    assert not reused_rows[-3]["same"]  # the prompt in scope gets the edit's answer, not the unedited one


def test_the_unedited_teacher_forced_locality_is_cached_by_model_batch_size_and_probes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluation.run import metrics
    from tests.conftest import zsre_requests

    requests = zsre_requests(5)
    editor = Unedited(tiny_model("tiny_gpt2"))
    cache = metrics.locality_prediction_cache(tmp_path, "tiny-key")
    fresh = base_locality_predictions(editor, requests, 2)
    first = base_locality_predictions(editor, requests, 2, cache=cache)

    def rows(base: Any) -> list[tuple[list[int], list[int]]]:
        return [(r.predicted.tolist(), r.target.tolist()) for group in base for r in group]

    assert rows(first) == rows(fresh) and len(list(tmp_path.glob("*.json"))) == 1
    calls: list[int] = []
    original = metrics.predict
    monkeypatch.setattr(metrics, "predict", lambda *a, **k: calls.append(1) or original(*a, **k))
    read = base_locality_predictions(editor, requests, 2, cache=cache)
    assert rows(read) == rows(first) and not calls  # read, not predicted
    assert all(r.predicted.dtype == torch.long for group in read for r in group)
    assert evaluate_edits(editor, requests, read, 2, progress=False) == evaluate_edits(
        editor, requests, first, 2, progress=False)
    calls.clear()  # evaluate_edits predicts the edited rows
    # another batch size (other padding), another model or other probes: another file
    base_locality_predictions(editor, requests, 3, cache=cache)
    base_locality_predictions(editor, requests, 2, cache=metrics.locality_prediction_cache(tmp_path, "other"))
    base_locality_predictions(editor, requests[:4], 2, cache=cache)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 4
    # a file whose content was changed is not used
    path = next(p for p in tmp_path.glob("tiny-key-*.json") if len(json.loads(p.read_text())["rows"]) == 5
                and json.loads(p.read_text())["key"][1] == 2)
    blob = json.loads(path.read_text())
    blob["rows"][0][0] = [0]
    path.write_text(json.dumps(blob))
    assert rows(base_locality_predictions(editor, requests, 2, cache=cache)) == rows(first) and len(calls) == 4


# --- the forgetting record's edit-time points ------------------------------------------------------------
def test_edit_time_points_give_each_batch_its_score_just_after_editing() -> None:
    points = [
        {"edits": 2, "batch_size": 2, "first_batch": 0, "reliability": [1.0], "generalization": [0.5],
         "reliability_generated": [0.5], "generalization_generated": [0.0]},
        {"edits": 4, "batch_size": 2, "first_batch": 1, "reliability": [0.5], "generalization": [0.0],
         "reliability_generated": [0.0], "generalization_generated": [0.0]},
        {"edits": 5, "batch_size": 2, "reliability": [0.0, 0.5, 1.0], "generalization": [0.0, 0.0, 1.0],
         "reliability_generated": [0.0, 0.0, 1.0], "generalization_generated": [0.0, 0.0, 0.0]},
    ]
    # batches of 2, 2 and 1 edits, each read at its first point
    assert fg.at_edit_time(points) == pytest.approx({
        "reliability": (1.0 * 2 + 0.5 * 2 + 1.0) / 5, "generalization": (0.5 * 2 + 0 + 1.0) / 5,
        "reliability_generated": (0.5 * 2 + 0 + 1.0) / 5, "generalization_generated": 0.0})
    cells = fg.cells(points)
    assert [(c.batch, c.edits, c.age) for c in cells] == [(0, 2, 0), (1, 4, 0), (0, 5, 3), (1, 5, 1), (2, 5, 0)]
    assert cells[3].reliability_just_after == 0.5  # batch 1 just after editing: its edit-time point
    xs, _, matrix = fg.heatmap(points, "reliability")
    assert xs == [5] and matrix == [[0.0], [0.5], [1.0]]  # columns: the curve points only
    with pytest.raises(ValueError, match="2 edits of the point after 4"):
        fg.batch_point(4, 2, {"reliability": [1.0], "generalization": [1.0]}, first_batch=1)


# --- a stream with the new metrics: edit-time points and an exact resume ---------------------------------
def _stream(tmp_path: Path, resume_at: int | None) -> Any:
    from evaluation.run.checkpoint import CheckpointManager, checkpoint_name
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.loggers import NullLogger
    from evaluation.run.stream import run_stream

    cfg = compose_config(["model=tiny_llama", "editor=grace", "dataset.num_edits=5", "editor.iterations=10"])
    seed_everything(0)
    requests, loaded = build(cfg.dataset).load(), build(cfg.model)
    editor = build(cfg.editor, model=loaded)
    scorer = AnswerScorer(AnswerReading(max_new_tokens=6))
    base = base_locality_predictions(Unedited(loaded), requests)
    answers = base_locality_answers(Unedited(loaded), requests, scorer)
    manager = CheckpointManager(tmp_path, every=2, keep=5)
    resume = CheckpointManager.read(tmp_path / checkpoint_name(resume_at)) if resume_at else None
    return run_stream(editor, requests, base, NullLogger(), 0, progress=False, checkpoints=manager,
                      resume=resume, scorer=scorer, base_answers=answers, edit_time=True)


def test_edit_time_scores_and_a_resumed_stream_equal_the_uninterrupted_one(tmp_path: Path, one_thread: None,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    full = _stream(tmp_path, None)
    # GRACE edits one request a batch: an edit-time point after each of the first four, the final evaluation
    # after the fifth
    assert [(p["edits"], p.get("first_batch")) for p in full.forgetting] == [(1, 0), (2, 1), (3, 2), (4, 3), (5, None)]
    assert "locality" not in full.forgetting[0] and len(full.forgetting[0]["reliability_generated"]) == 1
    at = [row for row in full.answers if row["at"] == "edit_time"]
    assert [(r["edits"], r["kind"], r["uid"]) for r in at if r["kind"] == "reliability"] == \
        [(k + 1, "reliability", k) for k in range(4)]
    final = [row for row in full.answers if row["at"] == "final"]
    assert {r["kind"] for r in final} == {"reliability", "generalization", "locality"}
    assert set(full.metrics) >= {"reliability_generated", "generalization_generated_contains", "locality_generated"}
    with caplog.at_level("WARNING"):
        resumed = _stream(tmp_path, 2)
    assert resumed.resumed_from == 2
    assert "forgetting record" not in caplog.text  # edit-time points are forgetting points without a curve point
    assert (resumed.metrics, resumed.forgetting, resumed.answers) == (full.metrics, full.forgetting, full.answers)


# --- a run --------------------------------------------------------------------------------------------
def test_a_run_keeps_its_answers_and_answers_none_switches_them_off(tmp_path: Path, one_thread: None) -> None:
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment

    args = ["model=tiny_llama", "dataset.num_edits=4", "editor.iterations=3", "retention=none", "logger=none",
            "progress=false", "answers.max_new_tokens=4", f"answers.cache_dir={tmp_path / 'cache'}"]
    choices = {"model": "tiny_llama", "editor": "elder", "dataset": "zsre"}
    out = run_experiment(compose_config(args), tmp_path / "on", choices)
    rows = [json.loads(line) for line in (tmp_path / "on" / "answers.jsonl").read_text().splitlines()]
    assert {(r["at"], r["kind"]) for r in rows} == {("final", "reliability"), ("final", "generalization"),
                                                    ("final", "locality")}  # eval_every 0, one batch of 4
    assert [r["uid"] for r in rows if r["kind"] == "reliability"] == [0, 1, 2, 3]
    assert out["metrics"]["reliability_generated"] == sum(r["exact"] for r in rows if r["kind"] == "reliability") / 4
    assert set(out["metrics"]["at_edit_time"]) == {"reliability", "generalization", "reliability_generated",
                                                   "generalization_generated"}
    assert len(list((tmp_path / "cache").glob("*-locality-continuations-*.json"))) == 1
    off = run_experiment(compose_config([*args, "answers=none"]), tmp_path / "off", choices)
    assert "reliability_generated" not in off["metrics"] and not (tmp_path / "off" / "answers.jsonl").exists()
    assert off["metrics"]["reliability"] == out["metrics"]["reliability"]  # teacher forcing is untouched


def test_a_bad_reading_on_the_command_line_is_one_line_before_any_work(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    cmd = [sys.executable, str(REPO / "run.py"), "model=tiny_llama", "retention=none", "logger=none",
           "answers.stop=paragraph", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: answers.stop must be one of eos|line|sentence|wild, got 'paragraph'" in proc.stderr
