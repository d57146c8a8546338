"""benchmarks.update_reach: r(k) is exactly what ROME's rank-one update writes at input k, under either key."""
from __future__ import annotations

import json

import pytest
import torch

from baselines.rome.editor import apply_rank_one, left_vector, solved_key
from benchmarks.update_reach import main, measure, reach, subject_collisions


@pytest.mark.parametrize("update_key", ["prompt", "average"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("adjusted", [False, True])
def test_reach_is_the_share_of_the_written_value(transposed: bool, adjusted: bool, update_key: str) -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 7, 5
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    inv = torch.linalg.inv(a @ a.T + torch.eye(d_in, dtype=torch.float64)) if adjusted else None
    key, k0, v = (torch.randn(n, generator=g, dtype=torch.float64) for n in (d_in, d_in, d_out))
    u = left_vector(key, inv)
    solved_at = solved_key(update_key, k0, key)
    right = (v - w @ k0) / torch.dot(solved_at, u)  # as rank_one_update computes it
    edited = (w.T.clone() if transposed else w.clone())
    apply_rank_one(edited, u, right, transposed)
    edited = edited.T if transposed else edited
    others = torch.randn(4, d_in, generator=g, dtype=torch.float64)
    written = (edited - w) @ others.T  # (d_out, 4): the change of the output at each input
    assert torch.allclose(written, torch.outer(v - w @ k0, reach(u, solved_at, others)), atol=1e-10)
    # the key it is solved at gets the whole value: k0 under the original, k* under r-ROME
    assert torch.allclose(edited @ solved_at - w @ solved_at, v - w @ k0, atol=1e-10)
    assert reach(u, solved_at, solved_at.unsqueeze(0)).item() == pytest.approx(1.0)
    assert (reach(u, solved_at, k0.unsqueeze(0)).item() == pytest.approx(1.0)) == (update_key == "prompt")


def test_cli_measures_each_corpus_and_key_on_a_tiny_model(tmp_path) -> None:
    out = tmp_path / "reach"
    main(["--corpora", "none,model", "--update-keys", "prompt,average", "--out", str(out), "model=tiny_llama",
          "dataset=zsre", "dataset.num_edits=3", "threads=1", f"paths.cache_dir={tmp_path}/cache",
          "editor.mom2_generated_texts=48", "editor.mom2_generated_length=24"])
    saved = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(saved) == {"none @ prompt", "model @ prompt", "none @ average", "model @ average"}
    assert "condition" not in saved["none @ prompt"] and saved["model @ prompt"]["condition"] >= 1.0
    for name, row in saved.items():
        assert 0 < row["locality_mean_abs_r"] < row["paraphrase_median_r"] < 1.5  # finite, measured
        # the original writes the whole value at the prompt's key k0; r-ROME at k*, so k0 gets another share
        assert (row["prompt_median_r"] == pytest.approx(1.0)) == name.endswith("@ prompt")
    # the adjustment changes where the update goes
    assert saved["none @ prompt"]["other_subjects_mean_abs_r"] != saved["model @ prompt"]["other_subjects_mean_abs_r"]
    table = out.with_suffix(".md").read_text()
    assert "| model | k0 |" in table and "| none | k* |" in table


def test_cli_takes_the_key_from_the_config_and_names_a_bad_one_in_one_line(tmp_path) -> None:
    out = tmp_path / "reach"
    main(["--corpora", "none", "--out", str(out), "model=tiny_llama", "dataset=zsre", "dataset.num_edits=2",
          "threads=1", "editor.update_key=average"])
    assert set(json.loads(out.with_suffix(".json").read_text())["rows"]) == {"none @ average"}
    with pytest.raises(SystemExit, match="update key 'middle' is not one of prompt, average"):
        main(["--corpora", "none", "--update-keys", "middle", "--out", str(out), "model=tiny_llama"])


def test_a_site_no_request_has_is_left_out_not_nan() -> None:
    g = torch.Generator().manual_seed(0)
    keys = [{"subject": subject, "opens_with_subject": subject == "Paris", "key": torch.randn(6, generator=g), "k0": torch.randn(6, generator=g),
             "paraphrase": torch.randn(1, 6, generator=g), "after_subject": torch.randn(2, 6, generator=g),
             "locality": torch.randn(3, 6, generator=g)} for subject in ("Paris", "Rome")]
    row = measure(keys, None)
    assert "same_subject_mean_abs_r" not in row  # two subjects, none repeated
    assert row["prompt_opening_median_r"] == row["prompt_later_median_r"] == pytest.approx(1.0)
    averaged = measure(keys, None, "average")
    assert averaged["prompt_opening_median_r"] != averaged["prompt_later_median_r"]  # one request each
    assert row["other_subjects_mean_abs_r"] > 0 and row["prompt_min_r"] == pytest.approx(1.0)
    assert measure([{**keys[1], "subject": "Paris"}, keys[0]], None)["same_subject_mean_abs_r"] > 0


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
