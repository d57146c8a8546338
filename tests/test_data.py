"""Edit-set loaders: the protocol's fields, order and errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.loaders import DataError, EditDataset
from tests.conftest import DATA_DIR, ZSRE

COUNTERFACT = DATA_DIR / "counterfact" / "counterfact-edit.json"


def test_zsre_edits_alt_and_holds_out_the_rephrase() -> None:
    raw = json.loads(ZSRE.read_text())
    requests = EditDataset("zsre", str(ZSRE), 1000).load()
    assert len(requests) == 1000 and [r.uid for r in requests] == list(range(1000))
    first = requests[0]
    assert (first.prompt, first.target, first.paraphrase) == (raw[0]["src"], raw[0]["alt"], raw[0]["rephrase"])
    assert (first.locality_prompt, first.locality_answer) == (raw[0]["loc"], raw[0]["loc_ans"])
    assert first.subject == raw[0]["subject"]


def test_counterfact_edits_target_new() -> None:
    raw = json.loads(COUNTERFACT.read_text())
    requests = EditDataset("counterfact", str(COUNTERFACT), 5).load()
    assert requests[0].prompt == raw[0]["prompt"] and requests[0].target == raw[0]["target_new"]
    assert requests[0].paraphrase == raw[0]["rephrase_prompt"]
    assert requests[0].locality_answer == raw[0]["locality_ground_truth"]


def test_records_without_paraphrase_are_skipped(tmp_path: Path) -> None:
    records = [{"src": f"q{i}?", "alt": "a", "rephrase": "" if i == 1 else f"p{i}?", "loc": "l", "loc_ans": "x",
                "subject": "s", "answers": ["t"]} for i in range(4)]
    path = tmp_path / "z.json"
    path.write_text(json.dumps(records))
    assert [r.prompt for r in EditDataset("zsre", str(path), 3).load()] == ["q0?", "q2?", "q3?"]


def test_malformed_record_is_named(tmp_path: Path) -> None:
    records = [{"src": "q?", "alt": "a", "rephrase": "p?", "loc": "l", "loc_ans": "x"},
               {"src": "q2?", "alt": None, "rephrase": "p2?", "loc": "l", "loc_ans": "x"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"bad\.json: record 1 is malformed: field 'alt'"):
        EditDataset("zsre", str(path), 2).load()


def test_a_missing_field_is_named_as_missing(tmp_path: Path) -> None:
    records = [{"prompt": "q?", "target_new": "a", "rephrase_prompt": "p?", "locality_prompt": "l",
                "locality_ground_truth": "x"}, {"prompt": "q2?", "rephrase_prompt": "p2?", "locality_prompt": "l",
                                                "locality_ground_truth": "x"}]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"cf\.json: record 1 is malformed: field 'target_new' is missing \(or null\)$"):
        EditDataset("counterfact", str(path), 2).load()


def test_repeated_records_are_warned_about_and_still_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = {"src": "q?", "alt": "a", "rephrase": "p?", "loc": "l", "loc_ans": "x"}
    path = tmp_path / "z.json"
    path.write_text(json.dumps([record, {**record, "src": "other?"}, record]))
    with caplog.at_level("WARNING", logger="data.loaders"):
        requests = EditDataset("zsre", str(path), 3).load()
    assert len(requests) == 3  # still three facts, as the file says
    assert "1 of the 3 edits repeat an earlier edit's prompt and target (2 repeats 0)" in caplog.text


def test_broken_json_is_located(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"src": "q?",\n "alt": ]')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 2"):
        EditDataset("zsre", str(path), 1).load()


def test_missing_file_and_too_few_records(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        EditDataset("zsre", str(tmp_path / "none.json"), 1).load()
    with pytest.raises(DataError, match="lower dataset.num_edits"):
        EditDataset("zsre", str(ZSRE), 5000).load()


def _zsre_fixture(tmp_path: Path) -> Path:
    records = [{"src": f"q{i}?", "alt": f"alt{i}", "answers": [f"true{i}", "other"], "rephrase": f"p{i}?",
                "loc": "l", "loc_ans": "x", "subject": "s"} for i in range(2)]
    path = tmp_path / "z.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("target, field", [(None, "alt"), ("alt", "alt"), ("answers", "true"), ("rome", "true")])
def test_zsre_target_reading(tmp_path: Path, target: str | None, field: str) -> None:
    requests = EditDataset("zsre", str(_zsre_fixture(tmp_path)), 2, target=target).load()
    assert [r.target for r in requests] == [f"{field}0", f"{field}1"]
    assert [r.ground_truth for r in requests] == ["true0", "true1"]


def test_counterfact_target_reading(tmp_path: Path) -> None:
    record = {"prompt": "p", "target_new": "new", "ground_truth": "old", "rephrase_prompt": "r",
              "locality_prompt": "l", "locality_ground_truth": "x", "subject": "s"}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    for target in (None, "target_new", "rome"):
        assert EditDataset("counterfact", str(path), 1, target=target).load()[0].target == "new"
    with pytest.raises(DataError, match=r"dataset\.target='alt' is not a target of the counterfact format: "
                                        r"allowed are target_new, rome"):
        EditDataset("counterfact", str(path), 1, target="alt")


def test_bad_target_is_one_clear_line(tmp_path: Path, compose_cfg) -> None:
    with pytest.raises(DataError) as err:
        EditDataset("zsre", str(_zsre_fixture(tmp_path)), 2, target="pred")
    assert str(err.value) == ("dataset.target='pred' is not a target of the zsre format: allowed are alt, "
                              "answers, rome (or null for the default, alt)")
    from evaluation.run.experiment import build
    assert build(compose_cfg("dataset=zsre").dataset).target_field == "alt"
    assert build(compose_cfg("dataset=zsre", "dataset.target=rome").dataset).target_field == "answers"
    with pytest.raises(DataError, match="dataset.target='nope'"):  # the run's build: the error stays itself
        build(compose_cfg("dataset=zsre", "dataset.target=nope").dataset)


def test_no_file_of_the_shared_data_is_tracked_in_the_repo() -> None:
    """The data are read in place from ../shared/data (configs point there); no copy may be committed."""
    import hashlib
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    if not DATA_DIR.is_dir():
        pytest.skip(f"no shared data at {DATA_DIR}")
    by_size: dict[int, list[Path]] = {}
    for path in DATA_DIR.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            by_size.setdefault(path.stat().st_size, []).append(path)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    copies = []
    for name in filter(None, tracked.decode().split("\0")):
        path = repo / name
        if path.is_file() and (same := by_size.get(path.stat().st_size)):
            mine = digest(path)  # once per tracked file, not once per same-size candidate
            copies += [f"{name} = {d}" for d in same if digest(d) == mine]
    assert copies == [], f"shared data files committed: {copies}"
