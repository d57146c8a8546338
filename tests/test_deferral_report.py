"""The deferral report reads a finished run and measures how its codes separate inputs."""
from __future__ import annotations

from pathlib import Path

from elder.deferral_report import report
from evaluation.run.compose import compose_config
from tests.test_cli import TINY, run_cli


def test_report_on_a_finished_tiny_run(tmp_path: Path) -> None:
    proc = run_cli([*TINY, "logger=none", "checkpoint.every=4", "editor.iterations=20"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    compose_config([])
    out = report(tmp_path)
    assert out["edits_stored"] == 8 and out["bits"] == 24
    edits = out["groups"]["edit prompts"]
    assert edits["n"] == 8 and sum(edits["histogram"].values()) == 8
    # every edit prompt's code is stored: in scope at any epsilon > its distance, never at epsilon 0
    assert edits["in_scope_at"][0] == 0.0 and edits["in_scope_at"][24] == 1.0
    assert (tmp_path / "deferral.json").is_file()
