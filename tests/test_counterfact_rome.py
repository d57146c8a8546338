"""ROME's CounterFact format (dataset=counterfact_rome) and metrics over several paraphrases and
locality probes per request: per-request means, then the mean over requests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

import evaluation.run.metrics
from data.loaders import DataError, EditDataset
from data.requests import EditRequest
from evaluation.editing.unedited import Unedited
from evaluation.run.metrics import (
    RowPredictions,
    base_locality_predictions,
    evaluate_edits,
    locality_inputs,
    predict,
)
from tests.conftest import DATA_DIR, tiny_model, zsre_requests

ROME_500 = DATA_DIR / "counterfact" / "rome-counterfact-500.json"


def rome_record(i: int) -> dict[str, Any]:
    """A made-up record in ROME's counterfact.json format."""
    return {
        "case_id": 100 + i, "pararel_idx": i,
        "requested_rewrite": {"prompt": "The pet of {} is a", "relation_id": "P0", "subject": f"Zorb{i}",
                              "target_new": {"str": f"dragon{i}", "id": "Q1"},
                              "target_true": {"str": f"cat{i}", "id": "Q2"}},
        "paraphrase_prompts": [f"Noise. Zorb{i} keeps a pet, a", f"Zorb{i} owns a pet, which is a"],
        "neighborhood_prompts": [f"The pet of Neighbour{i}_{k} is a" for k in range(10)],
        "attribute_prompts": [f"Attr{k} has a pet" for k in range(10)],
        "generation_prompts": [f"Zorb{i} walked the" for _ in range(10)],
    }


def write(tmp_path: Path, records: list[Any], name: str = "rome.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_rome_format_maps_rewrite_paraphrases_and_neighbours(tmp_path: Path) -> None:
    path = write(tmp_path, [rome_record(i) for i in range(3)])
    requests = EditDataset("counterfact_rome", str(path), 2).load()
    assert [r.uid for r in requests] == [0, 1]
    r = requests[1]
    assert (r.prompt, r.target, r.subject, r.ground_truth) == ("The pet of Zorb1 is a", "dragon1", "Zorb1", "cat1")
    assert r.paraphrases == ("Noise. Zorb1 keeps a pet, a", "Zorb1 owns a pet, which is a")
    assert r.paraphrase == r.paraphrases[0]
    assert r.locality == tuple((f"The pet of Neighbour1_{k} is a", "cat1") for k in range(10))
    assert (r.locality_prompt, r.locality_answer) == r.locality[0]
    prompts, answers = locality_inputs(requests)
    assert len(prompts) == 20 and prompts[10] == "The pet of Neighbour1_0 is a" and set(answers) == {"cat0", "cat1"}
    for target in ("rome", "target_new", None):
        assert EditDataset("counterfact_rome", str(path), 1, target=target).load()[0].target == "dragon0"


@pytest.mark.parametrize("field, value, message", [
    ("requested_rewrite.target_new", None, r"field 'requested_rewrite\.target_new\.str' is missing"),
    ("requested_rewrite.prompt", "The pet of Zorb is a", r"field 'requested_rewrite\.prompt' must contain '\{\}'"),
    ("requested_rewrite.subject", "  ", r"field 'requested_rewrite\.subject' must be a non-empty string"),
    ("paraphrase_prompts", ["ok", 3], r"field 'paraphrase_prompts\[1\]' must be a non-empty string"),
    ("neighborhood_prompts", "one prompt", r"field 'neighborhood_prompts' must be a list of strings"),
    ("neighborhood_prompts", [], r"field 'neighborhood_prompts' is empty"),
])
def test_malformed_rome_record_is_named(tmp_path: Path, field: str, value: Any, message: str) -> None:
    bad = rome_record(1)
    node = bad
    *parents, last = field.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    path = write(tmp_path, [rome_record(0), bad], "bad.json")
    with pytest.raises(DataError, match=r"bad\.json: record 1 is malformed: " + message):
        EditDataset("counterfact_rome", str(path), 2).load()


def test_rome_missing_file_bad_target_and_too_few(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        EditDataset("counterfact_rome", str(tmp_path / "none.json"), 1).load()
    with pytest.raises(DataError, match=r"dataset\.target='answers' is not a target of the counterfact_rome "
                                        r"format: allowed are target_new, rome"):
        EditDataset("counterfact_rome", str(tmp_path / "none.json"), 1, target="answers")
    no_paraphrase = rome_record(1) | {"paraphrase_prompts": []}
    path = write(tmp_path, [rome_record(0), no_paraphrase, rome_record(2)])
    assert [r.subject for r in EditDataset("counterfact_rome", str(path), 2).load()] == ["Zorb0", "Zorb2"]
    with pytest.raises(DataError, match="lower dataset.num_edits"):
        EditDataset("counterfact_rome", str(path), 3).load()


def test_the_shared_rome_subset_loads_whole() -> None:
    requests = EditDataset("counterfact_rome", str(ROME_500), 500).load()
    assert len(requests) == 500
    assert all(len(r.paraphrases) == 2 and len(r.locality) == 10 for r in requests)
    assert not any("{}" in r.prompt for r in requests)
    assert all(r.subject in r.prompt and r.locality_answer == r.ground_truth for r in requests)


def test_config_choice(compose_cfg) -> None:
    cfg = compose_cfg("dataset=counterfact_rome")
    assert cfg.dataset.path.endswith("counterfact/rome-counterfact-500.json") and cfg.dataset.num_edits == 500
    assert cfg.dataset.sha256 == "99a455fe1b99dc332ec1fa921e69fd9297606e9c51d4f108522782f6ad125803"
    from data.download import FILES
    assert FILES["counterfact/rome-counterfact-500.json"] == (cfg.dataset.url, cfg.dataset.sha256)
    dataset = instantiate(compose_cfg("dataset=counterfact_rome", "dataset.num_edits=3", "dataset.target=rome").dataset)
    assert len(dataset.load()) == 3


def _request(uid: int, paraphrases: tuple[str, ...], locality: tuple[tuple[str, str], ...]) -> EditRequest:
    return EditRequest.make(uid, f"prompt{uid}", "T", paraphrases, locality)


def test_aggregation_is_per_request_then_over_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact control over the rows: a prompt containing 'good' is predicted right, others wrong."""

    def fake_predict(editor, prompts, targets, batch_size=32, desc=None, record=None):
        return [RowPredictions(torch.tensor([1, 1] if "good" in p else [1, 0]), torch.tensor([1, 1]))
                for p in prompts]

    monkeypatch.setattr(evaluation.run.metrics, "predict", fake_predict)
    requests = [_request(0, ("good a", "bad b"), (("good l0", "x"), ("bad l1", "y"), ("bad l2", "z"))),
                _request(1, ("good c",), (("good l3", "w"),))]
    base = [RowPredictions(torch.tensor([1, 1]), torch.tensor([1, 1]))] * 4  # flat: one per probe
    per: dict[str, list[float]] = {}
    out = evaluate_edits(None, requests, base, progress=False, per_request_out=per)  # type: ignore[arg-type]
    assert per["generalization"] == [0.5, 1.0] and out["generalization"] == 0.75  # not 2/3 (flat over rows)
    assert out["generalization_token"] == pytest.approx((0.75 + 1.0) / 2)
    assert per["locality"] == [pytest.approx(2 / 3), 1.0] and out["locality"] == pytest.approx((2 / 3 + 1) / 2)
    assert per["reliability"] == [0.0, 0.0] and out["reliability"] == 0.0
    grouped = [tuple(base[:3]), (base[3],)]  # the per-request form, as base_locality_predictions gives
    assert evaluate_edits(None, requests, grouped, progress=False) == out  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_locality"):
        evaluate_edits(None, requests, base[:2], progress=False)  # type: ignore[arg-type]


def test_two_paraphrases_on_a_tiny_model(one_thread: None) -> None:
    """Real predictions: a request's generalization is the mean over its two paraphrases, and
    per_request_out holds the scores whose means are returned."""
    editor, other = Unedited(tiny_model()), Unedited(tiny_model(seed=1))
    single = zsre_requests(3)
    two = EditRequest.make(3, single[0].prompt, single[0].target, (single[0].paraphrase, single[1].prompt),
                           single[0].locality + single[1].locality)
    requests = [*single, two]
    base = base_locality_predictions(other, requests)  # another model: agreement below 1
    per: dict[str, list[float]] = {}
    out = evaluate_edits(editor, requests, base, progress=False, per_request_out=per)
    rows = predict(editor, list(two.paraphrases), [two.target] * 2)
    assert per["generalization"][3] == (rows[0].exact + rows[1].exact) / 2
    for key in ("reliability", "generalization", "locality"):
        assert len(per[key]) == 4 and out[key] == pytest.approx(sum(per[key]) / 4)
    loc_rows = predict(editor, *locality_inputs([two]))
    agree = [float((b.predicted == e.predicted).float().mean()) for b, e in zip(base[3], loc_rows)]
    assert per["locality"][3] == pytest.approx(sum(agree) / 2) and 0 < out["locality"] < 1


def test_one_paraphrase_requests_score_as_before(one_thread: None) -> None:
    """ZsRE/EasyEdit CounterFact (one paraphrase, one probe): the formulas of the single-row metrics, bit for bit."""
    editor, other = Unedited(tiny_model("tiny_gpt2")), Unedited(tiny_model("tiny_gpt2", seed=1))
    requests = zsre_requests(5)
    flat_base = predict(other, [r.locality_prompt for r in requests], [r.locality_answer for r in requests])
    out = evaluate_edits(editor, requests, flat_base, batch_size=2, progress=False)
    rel = predict(editor, [r.prompt for r in requests], [r.target for r in requests], 2)
    gen = predict(editor, [r.paraphrase for r in requests], [r.target for r in requests], 2)
    loc = predict(editor, [r.locality_prompt for r in requests], [r.locality_answer for r in requests], 2)
    assert out == {
        "reliability": sum(p.exact for p in rel) / 5,
        "generalization": sum(p.exact for p in gen) / 5,
        "reliability_token": sum(p.token_accuracy for p in rel) / 5,
        "generalization_token": sum(p.token_accuracy for p in gen) / 5,
        "locality": sum(float((b.predicted == e.predicted).float().mean()) for b, e in zip(flat_base, loc)) / 5,
    }
    assert evaluate_edits(editor, requests, base_locality_predictions(other, requests, 2), 2, progress=False) == out
