"""A long evaluation kept in parts (evaluation.common.evaluation_parts): a stop loses only the batches since the
last write, the resumed evaluation computes only the missing batches, and the numbers are those of one
uninterrupted evaluation, bit for bit."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from baselines.grace import GraceEditor
from evaluation.common.evaluation_parts import EvaluationParts
from evaluation.editing.answers import AnswerReading
from evaluation.editing.unedited import Unedited
from evaluation.run import metrics
from evaluation.run.answer_metrics import AnswerScorer, base_locality_answers
from evaluation.run.checkpoint import PARTS_DIR, CheckpointManager, StreamCheckpoint
from evaluation.run.metrics import base_locality_predictions, evaluate_edits
from tests.conftest import REPO, tiny_model, zsre_requests
from tests.test_resume import ARGS, ENV, comparable, results, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    """Stands for a signal or a crash in the middle of an evaluation."""


def _evaluation(tmp_path: Path) -> tuple[Any, ...]:
    requests = zsre_requests(6)
    loaded = tiny_model("tiny_llama")
    scorer = AnswerScorer(AnswerReading(stop="eos", max_new_tokens=6), batch_size=2)
    base = base_locality_predictions(Unedited(loaded), requests, 2)
    answers = base_locality_answers(Unedited(loaded), requests, scorer)
    editor = GraceEditor(loaded, layer=2, iterations=10, eps=0.5)
    editor.edit(requests[:3])
    return editor, requests, base, scorer, answers


def _evaluate(setup: tuple[Any, ...], parts: EvaluationParts | None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    editor, requests, base, scorer, answers = setup
    rows: list[dict[str, Any]] = []
    point = evaluate_edits(editor, requests, base, 2, progress=False, scorer=scorer, base_answers=answers,
                           answers_out=rows, parts=parts)
    return point, rows


def test_a_stopped_evaluation_goes_on_from_its_saved_batches_to_the_same_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _evaluation(tmp_path)
    whole, whole_rows = _evaluate(setup, None)
    batches: list[int] = []  # the teacher-forced batches computed
    original = metrics.target_logits

    def counted(model: Any, batch: Any) -> Any:
        batches.append(1)
        if len(batches) == stop_at[0]:
            raise Stop
        return original(model, batch)

    monkeypatch.setattr(metrics, "target_logits", counted)
    parts = EvaluationParts(tmp_path, 6, "state", every_s=0)  # every batch written as it ends
    stop_at = [5]  # 3 reliability batches of 2 rows, then the generalization batches: stopped in the 2nd
    with pytest.raises(Stop):
        _evaluate(setup, parts)
    assert sorted(p.name.split("-")[0] for p in parts.folder.glob("*.json")) == ["generalization"] + ["reliability"] * 3
    stop_at = [0]
    batches.clear()
    resumed, resumed_rows = _evaluate(setup, EvaluationParts(tmp_path, 6, "state", every_s=0))
    assert (resumed, resumed_rows) == (whole, whole_rows)  # ==: every number and every answer
    total = len(batches) + 4  # 4 batches were read back, not computed
    batches.clear()
    again = _evaluate(setup, EvaluationParts(tmp_path, 6, "state", every_s=0))
    assert again == (whole, whole_rows) and not batches  # all saved now: nothing is computed
    # another editor state, or other batches (another eval batch size), read nothing saved for this one
    _evaluate(setup, EvaluationParts(tmp_path, 6, "other state", every_s=0))
    assert len(batches) == total
    batches.clear()
    editor, requests, base, scorer, answers = setup
    evaluate_edits(editor, requests, base, 3, progress=False, parts=EvaluationParts(tmp_path, 6, "state", every_s=0))
    assert len(batches) == 2 + 2 + 2  # reliability, generalization and locality, 6 rows each in batches of 3


def test_batches_are_written_as_often_as_asked_and_when_the_evaluation_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _evaluation(tmp_path)
    original = metrics.target_logits
    seen: list[int] = []

    def stop_in_the_fourth(model: Any, batch: Any) -> Any:
        seen.append(1)
        if len(seen) == 4:
            raise Stop
        return original(model, batch)

    monkeypatch.setattr(metrics, "target_logits", stop_in_the_fourth)
    parts = EvaluationParts(tmp_path, 6, "state", every_s=3600)  # not written while the evaluation goes on ...
    with pytest.raises(Stop):
        _evaluate(setup, parts)
    [written] = parts.folder.glob("*.json")  # ... but when it stops: the three batches done, in one file
    assert written.name.startswith("reliability-") and len(json.loads(written.read_text())["batches"]) == 3
    # a file whose content was changed is not read: its batches are computed again
    blob = json.loads(written.read_text())
    blob["batches"]["0"][0][0] = [0]
    written.write_text(json.dumps(blob))
    seen.clear()
    monkeypatch.setattr(metrics, "target_logits", original)
    assert _evaluate(setup, EvaluationParts(tmp_path, 6, "state", every_s=3600)) == _evaluate(setup, None)


def test_a_saved_checkpoint_drops_the_parts_of_the_points_it_holds(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, every=4)
    for upto in (4, 8, 12):
        EvaluationParts(manager.parts_dir, upto, "s", 0).folder.mkdir(parents=True)
    manager.save(StreamCheckpoint(position=8, editor_state={}, curves=[{"edits": 4}], curve_due=True))
    assert sorted(p.name for p in manager.parts_dir.iterdir()) == ["0000008-s", "0000012-s"]  # the point owed at 8
    manager.save(StreamCheckpoint(position=8, editor_state={}, curves=[{"edits": 4}, {"edits": 8}]))
    assert [p.name for p in manager.parts_dir.iterdir()] == ["0000012-s"]
    manager.clear()  # a fresh start
    assert not manager.parts_dir.exists()


SLOW_FINAL_POINT = (  # run.py whose final evaluation takes 3 s per teacher-forced batch (a wrapper, not a hook)
    "import runpy, sys, time\n"
    "import evaluation.run.metrics as m\n"
    "tl = m.target_logits\n"
    "import evaluation.run.stream as s\n"
    "ev = s.evaluate_edits\n"
    "def slow(*a, **k):\n"
    "    if len(a[1]) < 16: return ev(*a, **k)\n"
    "    m.target_logits = lambda *b: (time.sleep(3), tl(*b))[1]\n"
    "    try: return ev(*a, **k)\n"
    "    finally: m.target_logits = tl\n"
    "s.evaluate_edits = slow\n"
    "sys.argv = ['run.py'] + sys.argv[1:]\n"
    "runpy.run_path('run.py', run_name='__main__')\n"
)


def test_a_run_stopped_in_its_final_evaluation_resumes_it_from_the_batches_done(tmp_path: Path) -> None:
    """SIGTERM in the final evaluation: the batches done are on disk, the resumed run reads them back and ends
    with exactly the uninterrupted run's numbers and answers."""
    args = ["logger=none", "eval_batch_size=4", "checkpoint.evaluation_every_s=0.001"]
    reference = tmp_path / "reference"
    assert run_cli(args, reference).returncode == 0
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FINAL_POINT, *ARGS, *args, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = run_dir / "checkpoints" / PARTS_DIR
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and len(list(parts.glob("0000016-*/*.json"))) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "during the final evaluation of 16 edits" in err, err[-2000:]
    saved = list(parts.glob("0000016-*/reliability-*.json"))  # the final point's (the curve points' went with them)
    assert len(saved) >= 2
    resumed = run_cli([*args, "resume=true"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"reliability: {len(saved)} batches evaluated before are read back" in (run_dir / "run.log").read_text()
    assert comparable(results(run_dir)) == comparable(results(reference))
    assert (run_dir / "answers.jsonl").read_text() == (reference / "answers.jsonl").read_text()
    assert not parts.exists() or not any(parts.iterdir())  # the end checkpoint holds the point: its parts are gone
