"""The knowledge-superposition analysis: overlap, interference and kurtosis on constructed keys, and one tiny run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from evaluation.reporting import superposition as sp


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _stream(keys: torch.Tensor, values: torch.Tensor, c: torch.Tensor, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form lifelong editing, one key at a time: W <- W + r (C^-1 k)^T / (k^T C^-1 k), r = v - W k."""
    w, c_inv, residuals = w0.clone(), torch.linalg.inv(c), []
    for k, v in zip(keys, values):
        r = v - w @ k
        u = c_inv @ k
        w = w + torch.outer(r, u) / (u @ k)
        residuals.append(r)
    return w, torch.stack(residuals)


def test_keys_orthogonal_in_whitening_space_have_no_overlap_and_no_interference() -> None:
    d, n = 12, 8
    c = _spd(d, 0)
    a = torch.linalg.cholesky(c)  # C = A A^T; k_i = s_i A e_i gives k_i^T C^-1 k_j = s_i s_j delta_ij
    keys = (a[:, :n] * torch.linspace(0.5, 3.0, n, dtype=torch.float64)).T
    c_inv = torch.linalg.inv(c)
    for measure in sp.MEASURES:
        assert sp.off_diagonal(sp.overlap_matrix(keys, c_inv, measure)).abs().max() < 1e-9
    assert sp.overlap_matrix(keys, c_inv, "p").diagonal().sub(1).abs().max() < 1e-12
    # not orthogonal without the whitening: the raw overlap is what C^-1 removes
    assert sp.off_diagonal(sp.overlap_matrix(keys, None, "cos")).abs().max() > 0.1
    residuals = torch.randn(n, 5, dtype=torch.float64)
    assert sp.interference(keys, residuals, c_inv).abs().max() < 1e-9
    assert sp.interference_energy(sp.overlap_matrix(keys, c_inv, "p")).abs().max() < 1e-15
    # and the edited memory keeps every edit exactly (lossless lifelong editing)
    values, w0 = torch.randn(n, 5, dtype=torch.float64), torch.randn(5, d, dtype=torch.float64)
    w, _ = _stream(keys, values, c, w0)
    assert torch.allclose(keys @ w.T, values, atol=1e-9)


def test_duplicated_and_scaled_keys_give_the_closed_form_values() -> None:
    k = torch.randn(6, dtype=torch.float64)
    keys = torch.stack([k, k, 2 * k])
    c = _spd(6, 1)
    c_inv = torch.linalg.inv(c)
    p = sp.overlap_matrix(keys, c_inv, "p")
    assert p[0, 1] == pytest.approx(1.0) and p[1, 0] == pytest.approx(1.0)
    assert p[2, 0] == pytest.approx(0.5) and p[0, 2] == pytest.approx(2.0)  # p(k_i, k_j) = k_i^T C^-1 k_j / k_i^T C^-1 k_i
    assert torch.allclose(sp.overlap_matrix(keys, c_inv, "cos"), torch.ones(3, 3, dtype=torch.float64))
    # two edits of one key: the second overwrites the first, W_2 k = v_2, so the interference on edit 1 is v_2 - v_1
    values, w0 = torch.randn(2, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    w, residuals = _stream(keys[:2], values, c, w0)
    term = sp.interference(keys[:2], residuals, c_inv)
    assert torch.allclose(term[0], values[1] - values[0]) and term[1].abs().max() == 0
    assert torch.allclose(w @ k - values[0], term[0])
    # N copies of one key: edit j is hit by every later edit with p = 1
    energy = sp.interference_energy(sp.overlap_matrix(k.repeat(5, 1), None, "p"))
    assert energy.tolist() == pytest.approx([4, 3, 2, 1, 0])


def test_interference_equals_the_simulated_lifelong_closed_form() -> None:
    g = torch.Generator().manual_seed(3)
    n, d_in, d_out = 10, 16, 7
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    values = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    c = _spd(d_in, 4)
    w, residuals = _stream(keys, values, c, w0)
    # W_n k_j = v_j + sum_{i > j} r_i p(k_i, k_j)
    assert torch.allclose(keys @ w.T - values, sp.interference(keys, residuals, torch.linalg.inv(c)), atol=1e-9)
    # and with C = I (ROME without the second-moment adjustment)
    w, residuals = _stream(keys, values, torch.eye(d_in, dtype=torch.float64), w0)
    assert torch.allclose(keys @ w.T - values, sp.interference(keys, residuals), atol=1e-9)


def test_kurtosis_follows_scipy_defaults() -> None:
    two_point = torch.tensor([-1.0, 1.0] * 50)
    assert sp.kurtosis(two_point) == pytest.approx(-2.0) and sp.kurtosis(two_point, fisher=False) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(400_000, generator=g, dtype=torch.float64)
    laplace = torch.distributions.Laplace(0.0, 1.0).icdf(torch.rand(400_000, generator=g, dtype=torch.float64) * (1 - 2e-12) + 1e-12)
    uniform = torch.rand(400_000, generator=g, dtype=torch.float64)
    assert abs(sp.kurtosis(gauss)) < 0.05
    assert sp.kurtosis(laplace) == pytest.approx(3.0, abs=0.25)
    assert sp.kurtosis(uniform) == pytest.approx(-1.2, abs=0.02)
    scipy_stats = pytest.importorskip("scipy.stats")
    x = laplace[:5000]
    assert sp.kurtosis(x) == pytest.approx(float(scipy_stats.kurtosis(x.numpy())), rel=1e-9)
    s = sp.overlap_stats(gauss)
    assert s["mean"] == pytest.approx(0, abs=0.01) and s["var"] == pytest.approx(1, abs=0.01)
    assert s["tail_ratio"] == pytest.approx(1.0, abs=0.1) and s["abs_max"] >= s["abs_q999"] >= s["abs_q99"]
    assert sp.overlap_stats(laplace)["tail_ratio"] > 2  # heavy-tailed: more mass beyond 3 sigma than a Gaussian


def test_tiny_llama_end_to_end(tmp_path) -> None:
    words = "the of and a to in is was for on with as by at from river city king war music film".split()
    g = torch.Generator().manual_seed(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[int(i)] for i in torch.randint(len(words), (30,), generator=g))
                                for _ in range(40)))
    out = tmp_path / "out"
    sp.main(["model=tiny_llama", "n=12", "dataset=zsre", "--corpus", str(corpus), "--out", str(out)])
    r = json.loads((out / "tiny_llama.json").read_text())
    assert r["n"] == 12 and r["num_layers"] == 8 and len(r["layers"]) == 8 and r["rome_layer"] == 1
    assert r["whitening"]["tokens"] > r["layers"][0]["d_key"]  # enough tokens for an invertible C
    for layer in r["layers"]:
        assert layer["d_key"] == 128  # tiny_llama's intermediate size: the input of down_proj
        for w in ("corpus", "none"):
            for measure in sp.MEASURES:
                s = layer[w][measure]["stats"]
                assert s["n"] == 12 * 11
                assert all(math.isfinite(v) for v in s.values()), (layer["layer"], w, measure, s)
                assert s["var"] > 0
                if measure == "cos":
                    assert s["abs_max"] <= 1 + 1e-9
                h = layer[w][measure]["histogram"]
                assert sum(h["counts"]) == s["n"]
            inter = layer[w]["p"]["interference"]
            assert inter["n_edits"] == 12 and math.isfinite(inter["first_edit_rms"]) and inter["mean_rms"] > 0
    for name in ("tiny_llama_histograms.png", "tiny_llama_layers.png", "superposition_sizes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "superposition.md").read_text()
    assert md.count("| tiny_llama |") == 8 and "1 (ROME)" in md and "model=tiny_llama n=12" in md
    # the redraw mode reads the saved JSONs only
    (out / "superposition_sizes.png").unlink()
    sp.main(["--redraw", "--out", str(out)])
    assert (out / "superposition_sizes.png").is_file()
