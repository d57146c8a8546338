"""The stream protocol (data/protocol.py): one_per_fact, grouped (GRACE/MELO) and revisit (rehearsal)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import evaluation.run.metrics
from data.loaders import (
    ZSRE_FIELDS,
    EditDataset,
    load_edit_requests,
    load_rome_counterfact,
)
from data.protocol import ShortStream, build_stream, describe_stream, split_phrasings
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.run.forgetting import batch_point
from evaluation.run.metrics import RowPredictions, evaluate_edits
from tests.conftest import DATA_DIR, ZSRE, tiny_model

ROME_CF = DATA_DIR / "counterfact" / "rome-counterfact-500.json"
LOCALITY = (("loc?", "x"),)


def fact(uid: int, m: int) -> EditRequest:
    """A synthetic fact with ``m`` paraphrases."""
    return EditRequest.make(uid, f"q{uid}", f"t{uid}", [f"q{uid}p{j}" for j in range(1, m + 1)], LOCALITY)


def held_out(stream: list[EditRequest]) -> dict[int, set[str]]:
    return {r.fact: set(r.paraphrases) for r in stream}


# --- the default -----------------------------------------------------------------------------------
def test_one_per_fact_is_the_loaders_records_unchanged() -> None:
    before = load_edit_requests(ZSRE, ZSRE_FIELDS, 30)  # today's loader, untouched by the protocol
    assert EditDataset("zsre", str(ZSRE), 30).load() == before
    assert EditDataset("zsre", str(ZSRE), 30, protocol="one_per_fact", revisit=1, seed=7).load() == before
    assert [r.uid for r in before] == [r.fact for r in before] == list(range(30))
    rome = load_rome_counterfact(ROME_CF, 5)
    assert EditDataset("counterfact_rome", str(ROME_CF), 5).load() == rome
    assert build_stream(rome, "one_per_fact", 1, 5, seed=3) == rome
    assert describe_stream(before) == {"protocol": "one_per_fact", "revisit": 1, "num_edits": 30, "num_facts": 30,
                                       "num_phrasings": 30, "facts": list(range(30))}


# --- grouped ---------------------------------------------------------------------------------------
def test_split_trains_the_prompt_and_the_first_half_of_the_paraphrases() -> None:
    assert split_phrasings(fact(0, 1)) == (("q0",), ("q0p1",))  # ZsRE here: grouping only shuffles
    assert split_phrasings(fact(0, 2)) == (("q0", "q0p1"), ("q0p2",))  # ROME's CounterFact
    assert split_phrasings(fact(0, 5)) == (("q0", "q0p1", "q0p2"), ("q0p3", "q0p4", "q0p5"))
    assert split_phrasings(fact(0, 5), "one_per_fact") == (("q0",), ("q0p1", "q0p2", "q0p3", "q0p4", "q0p5"))


def test_grouped_stream_never_trains_a_held_out_phrasing() -> None:
    records = load_rome_counterfact(ROME_CF, 20)
    stream = EditDataset("counterfact_rome", str(ROME_CF), 40, protocol="grouped").load()
    assert len(stream) == 40 and sorted(r.uid for r in stream) == list(range(40))
    assert Counter(r.fact for r in stream) == {f: 2 for f in range(20)}  # prompt + first paraphrase each
    held = held_out(stream)
    for r in stream:
        source = records[r.fact]
        assert r.paraphrases == (source.paraphrases[1],) == tuple(held[r.fact])  # the fact's held-out phrasing
        assert r.prompt in (source.prompt, source.paraphrases[0]) and r.prompt not in held[r.fact]
        assert (r.target, r.locality, r.subject) == (source.target, source.locality, source.subject)
    assert [r.fact for r in stream] != sorted(r.fact for r in stream)  # shuffled


def test_num_edits_counts_phrasings_and_the_last_fact_may_give_fewer() -> None:
    records = [fact(0, 4), fact(1, 1), fact(2, 3), fact(3, 2)]
    stream = build_stream(records, "grouped", 1, 5, seed=0)
    assert Counter(r.fact for r in stream) == {0: 3, 1: 1, 2: 1}  # 3 + 1 + the first of fact 2's two
    assert {r.prompt for r in stream if r.fact == 2} == {"q2"}
    assert held_out(stream) == {0: {"q0p3", "q0p4"}, 1: {"q1p1"}, 2: {"q2p2", "q2p3"}}
    trained = {(r.fact, r.prompt) for r in stream}
    assert not any(p in held_out(stream)[f] for f, p in trained)
    assert describe_stream(stream, "grouped", 1) | {"facts": None} == {
        "protocol": "grouped", "revisit": 1, "num_edits": 5, "num_facts": 3, "num_phrasings": 5, "facts": None}
    with pytest.raises(ShortStream, match="needs 9 trained phrasings, but its 4 facts give only 8"):
        build_stream(records, "grouped", 1, 9)


def test_the_shuffle_is_fixed_by_the_seed() -> None:
    records = [fact(i, 3) for i in range(10)]
    key = [(r.fact, r.prompt) for r in build_stream(records, "grouped", 2, 40, seed=0)]
    assert key == [(r.fact, r.prompt) for r in build_stream(records, "grouped", 2, 40, seed=0)]
    assert key != [(r.fact, r.prompt) for r in build_stream(records, "grouped", 2, 40, seed=1)]
    assert sorted(key) == sorted((r.fact, r.prompt) for r in build_stream(records, "grouped", 2, 40, seed=1))
    a = EditDataset("zsre", str(ZSRE), 12, protocol="grouped", seed=0).load()
    assert a == EditDataset("zsre", str(ZSRE), 12, protocol="grouped", seed=0).load()
    assert [r.fact for r in a] != [r.fact for r in EditDataset("zsre", str(ZSRE), 12, protocol="grouped", seed=1).load()]


def test_the_config_seed_is_the_runs_seed(compose_cfg: Any) -> None:
    from evaluation.run.experiment import build

    cfg = compose_cfg("dataset.protocol=grouped", "dataset.num_edits=12", "seed=5")
    assert cfg.dataset.seed == 5 and build(cfg.dataset).load() == EditDataset(
        "zsre", str(ZSRE), 12, protocol="grouped", seed=5).load()


# --- revisit ---------------------------------------------------------------------------------------
def test_revisit_puts_each_trained_phrasing_exactly_r_times() -> None:
    stream = EditDataset("zsre", str(ZSRE), 30, revisit=3).load()  # one_per_fact: 10 facts, three times each
    facts = load_edit_requests(ZSRE, ZSRE_FIELDS, 10)
    assert Counter((r.fact, r.prompt) for r in stream) == {(f.fact, f.prompt): 3 for f in facts}
    assert sorted(r.uid for r in stream) == list(range(30))
    assert all(r.paraphrases == facts[r.fact].paraphrases for r in stream)
    grouped = EditDataset("counterfact_rome", str(ROME_CF), 12, protocol="grouped", revisit=2).load()
    counts = Counter((r.fact, r.prompt) for r in grouped)
    assert set(counts.values()) == {2} and len(counts) == 6 and {f for f, _ in counts} == {0, 1, 2}
    assert describe_stream(grouped, "grouped", 2)["num_phrasings"] == 6


@pytest.mark.parametrize("overrides, message", [
    (["dataset.protocol=by_fact"], r"dataset.protocol must be one of \('one_per_fact', 'grouped'\), got 'by_fact'"),
    (["dataset.revisit=0"], r"dataset.revisit must be an integer >= 1"),
    (["dataset.revisit=3", "dataset.num_edits=10"], r"dataset.num_edits=10 must be a multiple of dataset.revisit=3"),
    (["dataset.revisit=2", "dataset.order=lemoe_cluster"], r"dataset.revisit=2 cannot be combined with dataset.order"),
])
def test_bad_values_are_one_config_error_line(compose_cfg: Any, overrides: list[str], message: str) -> None:
    from evaluation.run.experiment import build

    with pytest.raises(ConfigError, match=message) as err:
        build(compose_cfg(*overrides).dataset)
    assert "\n" not in str(err.value)


# --- metrics -------------------------------------------------------------------------------------
def test_reliability_counts_each_phrasing_once_and_generalization_each_fact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt containing 'good' is predicted right, others wrong; the rows predicted are recorded."""
    rows: list[str] = []

    def fake_predict(editor: Any, prompts: Any, targets: Any, batch_size: int = 32, desc: Any = None,
                     record: Any = None) -> list:
        rows.extend(prompts)
        return [RowPredictions(torch.tensor([1, 1] if "good" in p else [1, 0]), torch.tensor([1, 1])) for p in prompts]

    monkeypatch.setattr(evaluation.run.metrics, "predict", fake_predict)
    a = EditRequest.make(0, "good a", "T", ["good pa"], LOCALITY, fact=0)
    b = EditRequest.make(1, "bad b", "T", ["good pa"], LOCALITY, fact=0)
    c = EditRequest.make(2, "bad c", "U", ["bad pc"], [("good loc", "y")], fact=1)
    stream = [a, b, a, c, a]  # fact 0's "good a" revisited three times
    base = [(RowPredictions(torch.tensor([1, 0]), torch.tensor([1, 1])),)] * len(stream)
    per: dict[str, list[float]] = {}
    out = evaluate_edits(None, stream, base, progress=False, per_request_out=per)  # type: ignore[arg-type]
    assert out["reliability"] == pytest.approx(1 / 3)  # good a, bad b, bad c: not 3/5 over entries
    assert out["generalization"] == 0.5  # fact 0 held, fact 1 not: once each, not 4/5
    assert out["locality"] == 0.75  # per fact: (1 + 0.5) / 2, not 0.9 over entries
    assert rows.count("good a") == 1 and rows.count("good pa") == 1 and rows.count("loc?") == rows.count("good loc") == 1
    assert per == {"reliability": [1.0, 0.0, 1.0, 0.0, 1.0], "generalization": [1.0, 1.0, 1.0, 0.0, 1.0],
                   "locality": [1.0, 1.0, 1.0, 0.5, 1.0]}
    point = batch_point(5, 2, per)  # the forgetting view: per stream entry, a revisit in every batch holding it
    assert point["reliability"] == [0.5, 0.5, 1.0] and point["generalization"] == [1.0, 0.5, 1.0]


def test_unedited_locality_is_predicted_once_per_fact(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_predict(editor: Any, prompts: Any, targets: Any, batch_size: int = 32, desc: Any = None,
                     record: Any = None) -> list:
        calls.append(len(prompts))
        return [RowPredictions(torch.tensor([i]), torch.tensor([i])) for i in range(len(prompts))]

    monkeypatch.setattr(evaluation.run.metrics, "predict", fake_predict)
    stream = build_stream([fact(0, 2), fact(1, 2)], "grouped", 2, 8, seed=0)
    base = evaluation.run.metrics.base_locality_predictions(None, stream)  # type: ignore[arg-type]
    assert calls == [2] and len(base) == 8
    assert all(base[i] is base[j] for i in range(8) for j in range(8) if stream[i].fact == stream[j].fact)


# --- ELDER's preset allocation ---------------------------------------------------------------------
def test_phrasings_of_a_fact_share_their_elder_allocation(one_thread: None) -> None:
    from elder.allocation import PresetAllocator
    from elder.editor import ElderEditor

    editor = ElderEditor(tiny_model(), layers=[2, 3, 4, 5, 6, 7], query_layer=1, iterations=1, seed=0)
    presets: list[torch.Tensor] = []
    batch = editor.allocator.batch
    editor.allocator.batch = lambda facts: presets.append(batch(facts)) or presets[-1]  # type: ignore[method-assign]
    stream = EditDataset("counterfact_rome", str(ROME_CF), 16, protocol="grouped", revisit=2, seed=0).load()
    for start in range(0, 16, 4):
        editor.edit(stream[start:start + 4])
    per_entry = torch.cat(presets)  # (16, L, k), stream order
    for i, r in enumerate(stream):
        for j, s in enumerate(stream):
            assert torch.equal(per_entry[i], per_entry[j]) == (r.fact == s.fact)
    seen = list(dict.fromkeys(r.fact for r in stream))  # facts in first-use order
    assert sorted(editor.allocator.by_fact) == sorted(seen) == [0, 1, 2, 3]
    usual = PresetAllocator(6, editor.config.num_loras, editor.config.top_k, seed=0).batch(seen)  # one draw per label
    assert torch.equal(torch.stack([editor.allocator.by_fact[f] for f in seen]), usual)


# --- through a run -------------------------------------------------------------------------------
GROUPED = ["model=tiny_llama", "dataset=counterfact_rome", "dataset.protocol=grouped", "dataset.revisit=2",
           "dataset.num_edits=8", "retention=none", "progress=false", "eval_every=4", "logger=none"]


@pytest.mark.parametrize("overrides, expected", [
    (GROUPED, {"protocol": "grouped", "revisit": 2, "num_edits": 8, "num_facts": 2, "num_phrasings": 4}),
    (["model=tiny_llama", "dataset.num_edits=4", "retention=none", "progress=false", "logger=none"],
     {"protocol": "one_per_fact", "revisit": 1, "num_edits": 4, "num_facts": 4, "num_phrasings": 4}),
])
def test_results_json_records_the_protocol_and_its_counts(tmp_path: Path, overrides: list[str],
                                                          expected: dict[str, Any], one_thread: None) -> None:
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment
    from evaluation.run.results import read_results

    cfg = compose_config([*overrides, "editor.iterations=2", "checkpoint.every=0"])
    run_experiment(cfg, tmp_path, {"editor": "elder", "model": "tiny_llama", "dataset": "x"})
    res = read_results(tmp_path / "results.json")
    recorded = res["dataset_protocol"]
    assert {k: v for k, v in recorded.items() if k != "facts"} == expected
    assert res["metrics"]["num_edits"] == expected["num_edits"] == len(recorded["facts"]) == len(res["dataset_order"])
    assert len(set(recorded["facts"])) == expected["num_facts"]
    assert [len(p["reliability"]) for p in res["forgetting"]][-1] == -(-expected["num_edits"] // 4)


def test_a_grouped_revisited_stream_resumes_exactly(tmp_path: Path, one_thread: None) -> None:
    """In-process, as tests/test_resume.py does for the baselines: resumed after 4 of 8 edits, ELDER ends exactly
    as the uninterrupted stream, its preset allocations (keyed by fact) included."""
    from evaluation.editing.unedited import Unedited
    from evaluation.run.checkpoint import CheckpointManager, checkpoint_name, to_cpu
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import build, seed_everything
    from evaluation.run.loggers import NullLogger
    from evaluation.run.metrics import base_locality_predictions
    from evaluation.run.stream import run_stream
    from tests.test_resume import _state_equal

    cfg = compose_config([*GROUPED, "editor.iterations=3"])

    def fresh() -> tuple[Any, list, list]:
        seed_everything(0)
        requests, loaded = build(cfg.dataset).load(), build(cfg.model)
        return build(cfg.editor, model=loaded), requests, base_locality_predictions(Unedited(loaded), requests)

    full_editor, requests, base = fresh()
    assert {r.fact for r in requests[:4]} & {r.fact for r in requests[4:]}  # a fact edited on both sides of the cut
    full = run_stream(full_editor, requests, base, NullLogger(), 4, progress=False,
                      checkpoints=CheckpointManager(tmp_path, every=4, keep=3))
    resumed_editor, requests, base = fresh()
    resumed = run_stream(resumed_editor, requests, base, NullLogger(), 4, progress=False,
                         resume=CheckpointManager.read(tmp_path / checkpoint_name(4)))
    assert resumed.resumed_from == 4
    assert (resumed.metrics, resumed.curves, resumed.forgetting) == (full.metrics, full.curves, full.forgetting)
    assert _state_equal(to_cpu(resumed_editor.state_dict()), to_cpu(full_editor.state_dict()))
    assert json.dumps(sorted(full_editor.allocator.by_fact)) == json.dumps(sorted({r.fact for r in requests}))


def test_a_grouped_stream_resumed_with_more_edits_names_num_edits(tmp_path: Path, one_thread: None) -> None:
    """A grouped or revisited stream is drawn from all its edits, so a longer one is another stream: the refusal
    names dataset.num_edits (not the dataset's name or path, which did not change)."""
    from evaluation.common.errors import ConfigError
    from evaluation.run.compose import compose_config
    from evaluation.run.experiment import run_experiment

    overrides = [*GROUPED, "editor.iterations=2", "checkpoint.every=4"]
    run_experiment(compose_config(overrides), tmp_path, {})
    with pytest.raises(ConfigError, match=r"differs from the checkpoint .* in dataset\.num_edits \(checkpoint 8, now 12\)"):
        run_experiment(compose_config([*overrides, "dataset.num_edits=12", "resume=true"]), tmp_path, {})
