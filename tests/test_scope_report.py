"""Editor.in_scope reads each router's decision per prompt; the scope report reads it off a finished run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from evaluation.common.errors import HarnessError
from evaluation.reporting.scope_report import report
from evaluation.run.compose import compose_config
from tests.conftest import zsre_requests
from tests.test_cli import TINY, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_editor(editor: str, *overrides: str):
    cfg = compose_config(["model=tiny_llama", f"editor={editor}", *overrides])
    return instantiate(cfg.editor, _partial_=True)(model=instantiate(cfg.model))


@pytest.mark.parametrize("editor, overrides", [("grace", ["editor.iterations=5"]),
                                               ("melo", ["editor.iterations=5"]),
                                               ("elder", ["editor.iterations=5"])])
def test_nothing_is_in_scope_before_an_edit_and_the_edit_prompts_are_after(editor, overrides) -> None:
    ed = tiny_editor(editor, *overrides)
    requests = zsre_requests(4)
    prompts = [r.prompt for r in requests]
    before = ed.in_scope(prompts)
    assert before is not None and before.dtype == torch.bool and not before.any()
    done = requests[:ed.batch_size]  # one edit batch (GRACE: one edit, ELDER and MELO: four)
    ed.edit(done)
    after = ed.in_scope([r.prompt for r in done])
    assert after.all()  # each edit prompt's key/code is the stored one


def test_defer_is_out_of_scope_until_trained_and_weight_editors_have_no_scope() -> None:
    defer = tiny_editor("defer", "editor.iterations=5")
    assert not defer.in_scope([r.prompt for r in zsre_requests(3)]).any()
    assert tiny_editor("ft_l").in_scope(["a prompt"]) is None


def test_report_on_a_finished_tiny_grace_run(tmp_path: Path) -> None:
    proc = run_cli([*TINY, "editor=grace", "editor.iterations=5", "logger=none", "checkpoint.every=4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    compose_config([])
    out = report(tmp_path)
    assert out["edits"] == 8 and out["editor"] == "baselines.grace.GraceEditor"
    assert out["groups"]["edit prompts"] == {"n": 8, "in_scope": 1.0}
    assert 0.0 <= out["groups"]["locality prompts"]["in_scope"] <= 1.0 and (tmp_path / "scope.json").is_file()
    # a run not finished yet has no results.json: the report reads Hydra's saved config instead
    (tmp_path / "results.json").unlink()
    assert report(tmp_path)["groups"] == out["groups"]
    (tmp_path / ".hydra" / "config.yaml").unlink()
    with pytest.raises(HarnessError, match="pass the folder of a run"):
        report(tmp_path)


def test_report_refuses_a_weight_editor(tmp_path: Path) -> None:
    proc = run_cli([*TINY, "editor=ft_l", "dataset.num_edits=2", "logger=none", "checkpoint.every=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    compose_config([])
    with pytest.raises(HarnessError, match="has no router"):
        report(tmp_path)
