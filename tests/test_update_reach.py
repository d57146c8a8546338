"""benchmarks.update_reach: r(k) is exactly what ROME's rank-one update writes at input k."""
from __future__ import annotations

import json

import pytest
import torch

from baselines.rome.editor import apply_rank_one, left_vector
from benchmarks.update_reach import main, reach, subject_collisions


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("adjusted", [False, True])
def test_reach_is_the_share_of_the_written_value(transposed: bool, adjusted: bool) -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 7, 5
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    inv = torch.linalg.inv(a @ a.T + torch.eye(d_in, dtype=torch.float64)) if adjusted else None
    key, k0, v = (torch.randn(n, generator=g, dtype=torch.float64) for n in (d_in, d_in, d_out))
    u = left_vector(key, inv)
    right = (v - w @ k0) / torch.dot(k0, u)  # as rank_one_update computes it
    edited = (w.T.clone() if transposed else w.clone())
    apply_rank_one(edited, u, right, transposed)
    edited = edited.T if transposed else edited
    others = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    written = (edited - w) @ others.T  # (d_out, 4): the change of the output at each input
    assert torch.allclose(written, torch.outer(v - w @ k0, reach(u, k0, others)), atol=1e-10)
    assert torch.allclose(edited @ k0, v, atol=1e-10)  # r(k0) = 1: the prompt's key gets the whole value
    assert reach(u, k0, k0.unsqueeze(0)).item() == pytest.approx(1.0)


def test_cli_measures_each_corpus_on_a_tiny_model(tmp_path) -> None:
    out = tmp_path / "reach"
    main(["--corpora", "none,model", "--out", str(out), "model=tiny_llama", "dataset=zsre", "dataset.num_edits=3",
          "threads=1", f"paths.cache_dir={tmp_path}/cache", "editor.mom2_generated_texts=48",
          "editor.mom2_generated_length=24"])
    saved = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(saved) == {"none", "model"}
    assert "condition" not in saved["none"] and saved["model"]["condition"] >= 1.0
    for row in saved.values():
        assert 0 < row["locality_mean_abs_r"] < row["paraphrase_median_r"] < 1.5  # finite, measured
    # the adjustment changes where the update goes
    assert saved["none"]["other_subjects_mean_abs_r"] != saved["model"]["other_subjects_mean_abs_r"]
    assert "| model |" in out.with_suffix(".md").read_text()


def test_cli_names_a_missing_corpus_in_one_line(tmp_path) -> None:
    with pytest.raises(SystemExit, match="neither none, model nor a text file"):
        main(["--corpora", "none,/no/such.txt", "--out", str(tmp_path / "r"), "model=tiny_llama"])


def test_subject_collisions_split_edits_by_a_later_same_subject_edit() -> None:
    # four one-edit batches about A, B, A, C; each scored at its edit time and at the end
    at_edit = [{"edits": i + 1, "batch_size": 1, "first_batch": i, "reliability": [1.0], "generalization": [0.0]}
               for i in range(4)]
    end = {"edits": 4, "batch_size": 1, "reliability": [0.0, 1.0, 1.0, 0.0], "generalization": [0.0] * 4}
    groups = subject_collisions(["A", "B", "A", "C"], [*at_edit, end])
    assert groups["a later edit shares the subject"] == {"edits": 1, "just_after": 1.0, "end": 0.0}
    assert groups["no later edit does"] == {"edits": 3, "just_after": 1.0, "end": pytest.approx(2 / 3)}
