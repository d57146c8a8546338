"""The retention suite end to end with fake generators: gold answers, empty answers, caching, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.editing.generation import Continuation
from evaluation.retention.conll03 import TYPES, authors_entities, iob_chunks
from evaluation.retention.suite import (
    TASK_NAMES,
    Gu2024Suite,
    NoRetention,
    RetentionReport,
)
from tests.conftest import RETENTION_DATA

DATA = RETENTION_DATA
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"retention data not at {DATA} (set RETENTION_DATA_DIR)")

LIMIT = 5
MAX_NEW = {"gsm8k": 5, "rte": 1, "nq": 20, "boolq": 1, "mutual": 1, "samsum": 25, "conll03": 10, "sst2": 1}


def _gold_outputs(suite: Gu2024Suite) -> dict[str, str]:
    """prompt -> the output a perfect model would give, built from the loaded examples."""
    gold: dict[str, str] = {}
    for name in suite.task_names:
        task, ex = suite.tasks[name], suite.examples(name)
        prompts = task.prompts(ex)
        if name == "gsm8k":
            answers = [" " + e.answer for e in ex]
        elif name == "rte":
            answers = [" True" if e.label == "entailment" else " False" for e in ex]
        elif name == "nq":
            answers = [" " + e.answers[0] for e in ex]
        elif name == "boolq":
            answers = [" yes" if e.answer else " no" for e in ex]
        elif name == "mutual":
            answers = [" " + e.answer for e in ex]
        elif name == "samsum":
            answers = [" " + e.summary for e in ex]
        elif name == "conll03":
            answers = [", ".join(iob_chunks(e.words, e.labels, tag)) for e in ex for tag, _ in TYPES]
        else:
            answers = [" positive" if e.label == 1 else " negative" for e in ex]
        assert len(answers) == len(prompts)
        gold.update(zip(prompts, answers))
    return gold


class Recorder:
    def __init__(self, answer):
        self.answer = answer
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, prompts, max_new_tokens, desc=""):
        self.calls.append((desc, max_new_tokens, len(prompts)))
        return [made_up(self.answer(p), max_new_tokens) for p in prompts]


def made_up(text: str, max_new_tokens: int) -> Continuation:
    """A hand-made continuation: an empty one ended at once, any other ran the token budget."""
    return Continuation(text, 0, "eos") if not text else Continuation(text, max_new_tokens, "budget")


def test_gold_generator_scores_one_and_calls_once_per_task():
    suite = Gu2024Suite(str(DATA), limit=LIMIT)
    gold = _gold_outputs(suite)
    gen = Recorder(lambda p: gold[p])
    report = suite.evaluate(gen)
    assert [c[0] for c in gen.calls] == list(TASK_NAMES)
    for desc, max_new, n in gen.calls:
        assert max_new == MAX_NEW[desc]
        assert n == (4 * LIMIT if desc == "conll03" else LIMIT)
    assert set(report.scores) == set(TASK_NAMES) | {"average"}
    for name in TASK_NAMES:
        assert report.scores[name] == pytest.approx(1.0), name
        assert report.details[name]["n_items"] == LIMIT
        assert report.seconds[name] >= 0
    assert report.scores["average"] == pytest.approx(1.0)
    assert report.details["conll03"]["entity_f1"] == pytest.approx(1.0)
    assert report.details["rte"]["accuracy_valid"] == 1.0
    json.dumps(report.to_dict())  # serialisable


def test_empty_generator_scores_zero_except_conll_empty_rule():
    suite = Gu2024Suite(str(DATA), limit=LIMIT)
    report = suite.evaluate(Recorder(lambda p: ""))
    for name in TASK_NAMES:
        if name != "conll03":
            assert report.scores[name] == 0.0, name
    # CoNLL03: the authors count an empty output as a hit when the sentence has no entity of the type
    rates = []
    for tag, _ in TYPES:
        n_without = n_ents = empty_ents = 0
        for e in suite.examples("conll03"):
            ents = authors_entities(e.words, e.labels, tag)
            n_without += not ents
            n_ents += len(ents)
            empty_ents += ents.count("")
        rates.append((n_without + empty_ents) / (n_without + n_ents))
    assert report.scores["conll03"] == pytest.approx(sum(rates) / 4)
    assert report.details["conll03"]["entity_f1"] == 0.0 and report.details["conll03"]["recall_macro"] == 0.0
    assert report.scores["average"] == pytest.approx(sum(report.scores[n] for n in TASK_NAMES) / 8)


def test_cache_stores_each_task_and_keys_on_settings(tmp_path):
    gen = Recorder(lambda p: " True")
    suite = Gu2024Suite(str(DATA), tasks=["rte", "sst2"], limit=3, cache_dir=str(tmp_path))
    first = suite.evaluate(gen, cache_key="gpt2-xl")
    assert len(gen.calls) == 2 and not first.cached and first.reused == []
    again = Gu2024Suite(str(DATA), tasks=["rte", "sst2"], limit=3, cache_dir=str(tmp_path))
    second = again.evaluate(gen, cache_key="gpt2-xl")
    assert len(gen.calls) == 2 and second.cached and second.reused == ["rte", "sst2"]  # generate not called
    assert second.scores == first.scores and second.details == first.details and second.seconds == first.seconds
    assert set(second.scores) == {"rte", "sst2", "average"}
    # another model or another limit is generated afresh
    again.evaluate(gen, cache_key="llama-2-7b")
    assert len(gen.calls) == 4
    Gu2024Suite(str(DATA), tasks=["rte", "sst2"], limit=4, cache_dir=str(tmp_path)).evaluate(gen, cache_key="gpt2-xl")
    assert len(gen.calls) == 6
    # the cache is per task: a subset reads back, a superset generates only what is new
    subset = Gu2024Suite(str(DATA), tasks=["sst2"], limit=3, cache_dir=str(tmp_path)).evaluate(gen, cache_key="gpt2-xl")
    assert len(gen.calls) == 6 and subset.cached and subset.scores["sst2"] == first.scores["sst2"]
    more = Gu2024Suite(str(DATA), tasks=["rte", "sst2", "boolq"], limit=3, cache_dir=str(tmp_path))
    report = more.evaluate(gen, cache_key="gpt2-xl")
    assert [c[0] for c in gen.calls[6:]] == ["boolq"] and report.reused == ["rte", "sst2"] and not report.cached
    assert report.scores["average"] == pytest.approx(sum(report.scores[t] for t in ("rte", "sst2", "boolq")) / 3)
    # no cache_key: always generated
    again.evaluate(gen)
    assert len(gen.calls) == 9
    assert len(list(tmp_path.glob("*.json"))) == 7  # gpt2-xl@3: rte sst2 boolq; llama@3: 2; gpt2-xl@4: 2


def test_an_interrupted_suite_keeps_finished_tasks_and_ends_as_an_uninterrupted_one(tmp_path):
    tasks = ["sst2", "rte", "boolq"]
    answer = Recorder(lambda p: " positive" if len(p) % 2 else " yes")
    uninterrupted = Gu2024Suite(str(DATA), tasks=tasks, limit=4).evaluate(answer)

    class Stop(Exception):
        pass

    def dies_in_rte(prompts, max_new_tokens, desc=""):
        if desc == "rte":
            raise Stop
        return answer(prompts, max_new_tokens, desc)

    store = tmp_path / "run" / "retention"  # a per-call folder (as a run's edited-model store), not the suite's
    suite = Gu2024Suite(str(DATA), tasks=tasks, limit=4, cache_dir=str(tmp_path / "shared"))
    with pytest.raises(Stop):
        suite.evaluate(dies_in_rte, cache_key="edited_abc", cache_dir=str(store))
    assert [p.name.split("-")[1] for p in store.glob("*.json")] == ["sst2"] and not (tmp_path / "shared").exists()
    calls = len(answer.calls)
    resumed = suite.evaluate(answer, cache_key="edited_abc", cache_dir=str(store))
    assert [c[0] for c in answer.calls[calls:]] == ["rte", "boolq"] and resumed.reused == ["sst2"]
    assert resumed.scores == uninterrupted.scores and resumed.details == uninterrupted.details


def test_report_round_trip():
    r = RetentionReport(scores={"rte": 0.5, "average": 0.5}, details={"rte": {"n_items": 2.0}}, seconds={"rte": 1.0})
    assert RetentionReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_unknown_task_names_it_and_lists_valid():
    with pytest.raises(ValueError, match=r"'sst5'.*gsm8k, rte, nq, boolq, mutual, samsum, conll03, sst2"):
        Gu2024Suite(str(DATA), tasks=["rte", "sst5"])


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*retention\.data_dir="):
        Gu2024Suite(str(missing))


def test_wrong_number_of_outputs_is_an_error():
    suite = Gu2024Suite(str(DATA), tasks=["sst2"], limit=2)
    with pytest.raises(ValueError, match="sst2: got 1 outputs for 2 prompts"):
        suite.evaluate(lambda prompts, max_new_tokens, desc="": [made_up("", max_new_tokens)])


def test_no_retention():
    off = NoRetention()
    assert off.enabled is False and Gu2024Suite.enabled is True
    assert off.evaluate(Recorder(lambda p: "")) is None


def test_hydra_config_instantiates(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "conf" / "retention"
    cfg = OmegaConf.create({"paths": {"data_dir": str(DATA.parent), "cache_dir": str(tmp_path)},
                            "retention": OmegaConf.load(root / "gu2024.yaml")})
    suite = instantiate(cfg.retention)
    assert isinstance(suite, Gu2024Suite) and suite.task_names == list(TASK_NAMES)
    assert suite.limit is None and suite.cache_dir == str(tmp_path / "retention")
    cfg.retention = OmegaConf.load(root / "none.yaml")
    assert isinstance(instantiate(cfg.retention), NoRetention)


@pytest.mark.parametrize("damage", [
    lambda b: b.pop("score"),
    lambda b: b.update(score="0.5"),
    lambda b: b.update(details=None),
    lambda b: b.update(details={"accuracy_valid": "high"}),
    lambda b: b.pop("seconds"),
])
def test_a_damaged_stored_task_is_generated_again_and_rewritten(tmp_path, damage, caplog):
    gen = Recorder(lambda p: " True")
    suite = Gu2024Suite(str(DATA), tasks=["rte", "sst2"], limit=3, cache_dir=str(tmp_path))
    first = suite.evaluate(gen, cache_key="m")
    path = Path(suite.cache_path(str(tmp_path), "m", "rte"))
    blob = json.loads(path.read_text())
    damage(blob)
    path.write_text(json.dumps(blob))
    again = suite.evaluate(gen, cache_key="m")
    assert [c[0] for c in gen.calls[2:]] == ["rte"] and again.reused == ["sst2"]
    assert again.scores == first.scores and path.name in caplog.text
    assert json.loads(path.read_text())["score"] == first.scores["rte"]  # rewritten whole


def test_retention_ratio_is_null_where_the_unedited_score_is_zero() -> None:
    base = RetentionReport(scores={"rte": 0.0, "sst2": 0.5, "average": 0.25})
    after = RetentionReport(scores={"rte": 0.2, "sst2": 0.25, "average": 0.225})
    ratio = after.ratio_to(base)
    assert ratio["rte"] is None
    assert ratio["sst2"] == pytest.approx(0.5) and ratio["average"] == pytest.approx(0.9)
    # strict JSON (no NaN literal) so results.json reads in any JSON parser
    json.dumps(ratio, allow_nan=False)
