"""Knowledge superposition (Hu et al. 2024, arXiv 2408.07413): overlap of edit keys in whitening space, per layer."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from data.text_corpus import read_texts
from evaluation.common.atomic import write_atomic, write_json_atomic, write_text_atomic
from evaluation.common.errors import HarnessError

#: the authors' notebooks draw the P matrix (Compute_PMatrix.py), the paper's p(k_i, k_j) of the interference term
MEASURES = ("p", "cos")
WHITENINGS = ("corpus", "none")
GAUSS_3SIGMA = math.erfc(3 / math.sqrt(2))  # P(|x - mu| > 3 sigma) of a Gaussian, 0.0027


class _Stop(Exception):
    """Ends a forward once the deepest wanted layer has been seen."""


def gram(keys: torch.Tensor, c_inv: torch.Tensor | None = None) -> torch.Tensor:
    """G[i, j] = k_i^T C^-1 k_j (C = I when ``c_inv`` is None), in float64."""
    k = keys.double()
    return k @ (k if c_inv is None else k @ c_inv.double().T).T


def overlap_matrix(keys: torch.Tensor, c_inv: torch.Tensor | None = None, measure: str = "p") -> torch.Tensor:
    """``p``: P[i, j] = k_i^T C^-1 k_j / k_i^T C^-1 k_i (authors' p(k_i, k_j), asymmetric, diagonal 1);
    ``cos``: the cosine of C^-1/2 k_i and C^-1/2 k_j (Compute_Whitening_Cos.py; with C = I Compute_Activation_Cos.py)."""
    g = gram(keys, c_inv)
    d = g.diagonal()
    if measure == "p":
        return g / d[:, None]
    if measure == "cos":
        return g / torch.sqrt(d[:, None] * d[None, :])
    raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """Every entry but the diagonal (the notebooks' ``p[~np.eye(n, dtype=bool)]``)."""
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]


def kurtosis(x: torch.Tensor, fisher: bool = True) -> float:
    """m4 / m2^2 with population moments (scipy.stats.kurtosis defaults, as the notebooks): excess when ``fisher``."""
    x = x.double().flatten()
    c = x - x.mean()
    m2 = (c ** 2).mean()
    k = float((c ** 4).mean() / m2 ** 2) if m2 > 0 else float("nan")
    return k - 3.0 if fisher else k


def overlap_stats(values: torch.Tensor) -> dict[str, float]:
    """Mean, variance, excess kurtosis and tails of the pairwise overlaps (off-diagonal entries)."""
    x = values.double().flatten()
    mean, std = float(x.mean()), float(x.std(unbiased=False))
    a = x.abs().sort().values
    q = lambda f: float(a[round(f * (len(a) - 1))])  # noqa: E731 (nearest-rank quantile of |x|)
    tail = float(((x - mean).abs() > 3 * std).double().mean()) if std > 0 else 0.0
    return {"n": int(x.numel()), "mean": mean, "var": std ** 2, "std": std, "kurtosis": kurtosis(x),
            "mean_abs": float(a.mean()), "mean_sq": float((x ** 2).mean()), "abs_q99": q(0.99), "abs_q999": q(0.999),
            "abs_max": q(1.0), "tail_3sigma": tail, "tail_ratio": tail / GAUSS_3SIGMA}


def interference(keys: torch.Tensor, residuals: torch.Tensor, c_inv: torch.Tensor | None = None) -> torch.Tensor:
    """Row j: W_n k_j - v_j after n closed-form edits W_i = W_{i-1} + r_i (C^-1 k_i)^T / (k_i^T C^-1 k_i), edited
    in order, r_i = v_i - W_{i-1} k_i: the paper's interference term sum_{i > j} r_i p(k_i, k_j)."""
    p = overlap_matrix(keys, c_inv, "p")
    return torch.tril(p, -1).T @ residuals.double()


def interference_energy(p: torch.Tensor) -> torch.Tensor:
    """sum_{i > j} p(k_i, k_j)^2 per edit j: E|interference_j|^2 / |r|^2 for uncorrelated residuals of one norm."""
    return (torch.tril(p, -1) ** 2).sum(0)


def histogram(x: torch.Tensor, stats: dict[str, float], bins: int = 120) -> dict[str, Any]:
    """Counts over [-R, R], R = max |x| capped at 8 x the 99.9% quantile of |x| (``outside``: beyond R)."""
    r = min(stats["abs_max"], 8 * stats["abs_q999"]) or 1.0
    counts = torch.histc(x.double().clamp(-r, r), bins=bins, min=-r, max=r)
    return {"range": r, "counts": [int(c) for c in counts], "outside": int((x.abs() > r).sum())}


@torch.no_grad()
def _forward(loaded: Any, rows: Sequence[list[int]], layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Inputs (B, T, d) of every layer's FFN output projection on right-padded ``rows``, and the mask."""
    model = loaded.model
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    seen: dict[int, torch.Tensor] = {}

    def hook(layer: int) -> Any:
        def record(_: nn.Module, args: tuple, __: Any) -> None:
            seen[layer] = args[0].detach().float()
            if layer == max(layers):
                raise _Stop  # nothing deeper is needed
        return record

    handles = [loaded.ffn_module(i).register_forward_hook(hook(i)) for i in layers]
    try:
        with contextlib.suppress(_Stop):
            model.base_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen, mask.bool()


def key_index(tokenizer: Any, prompt: str, subject: str, fact_token: str = "subject_last") -> tuple[list[int], int]:
    """Token ids of the bare prompt (the authors' context template '{}') and the key's position: the subject's last
    token (len of the tokenised text up to the subject's end, minus one; repr_tools.get_words_idxs_in_templates),
    or the last token for ``fact_token='last'`` or when the subject is not in the prompt."""
    ids = tokenizer(prompt).input_ids
    start = prompt.find(subject) if subject and fact_token == "subject_last" else -1
    if start < 0:
        return ids, len(ids) - 1
    return ids, min(len(tokenizer(prompt[:start + len(subject)]).input_ids) - 1, len(ids) - 1)


def collect_keys(loaded: Any, requests: Sequence[Any], layers: Sequence[int], fact_token: str = "subject_last",
                 batch_size: int = 32) -> dict[int, torch.Tensor]:
    """(N, d) keys per layer: the FFN output projection's input at each request's key position."""
    located = [key_index(loaded.tokenizer, r.prompt, getattr(r, "subject", ""), fact_token) for r in requests]
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for s in range(0, len(located), batch_size):
        chunk = located[s:s + batch_size]
        acts, _ = _forward(loaded, [ids for ids, _ in chunk], layers)
        idx = torch.tensor([i for _, i in chunk])
        for i in layers:
            parts[i].append(acts[i][torch.arange(len(chunk)), idx].cpu())
    return {i: torch.cat(v) for i, v in parts.items()}


def second_moments(loaded: Any, texts: Sequence[str], layers: Sequence[int], max_length: int,
                   batch_size: int = 8) -> tuple[dict[int, torch.Tensor], int]:
    """C = sum(k k^T) / count over every token of ``texts`` (layer_stats.py's uncentred ``mom2``), per layer."""
    encoded = sorted((loaded.tokenizer(t).input_ids[:max_length] for t in texts), key=len)
    total: dict[int, torch.Tensor] = {}
    count = 0
    for s in range(0, len(encoded), batch_size):
        acts, mask = _forward(loaded, encoded[s:s + batch_size], layers)
        for i in layers:
            feats = acts[i][mask].cpu()
            total[i] = total.get(i, 0) + (feats.T @ feats).double()
        count += int(mask.sum())
    return {i: c / count for i, c in total.items()}, count


def invert(c: torch.Tensor) -> torch.Tensor:
    """C^-1 as the authors (torch.inverse, compute.py get_inv_cov): by Cholesky; pinv if C is singular."""
    chol, info = torch.linalg.cholesky_ex(c.double())
    return torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.pinv(c.double(), hermitian=True)


def layer_report(keys: torch.Tensor, c_inv: torch.Tensor | None, other: torch.Tensor) -> dict[str, Any]:
    """Statistics (all pairs; pairs ``other[i, j]``: different subjects), histograms and stream interference.

    Interference, in units of |r| for uncorrelated residuals of one norm: ``first_edit_rms`` = sqrt((N-1) E[p^2]),
    a fact edited first and followed by the N-1 others (averaged over which goes first); ``mean_rms``: the RMS
    over the stream in dataset order (edit j followed by N-1-j edits)."""
    out: dict[str, Any] = {}
    for measure in MEASURES:
        m = overlap_matrix(keys, c_inv, measure)
        vals = off_diagonal(m)
        stats = overlap_stats(vals)
        out[measure] = {"stats": stats, "stats_distinct_subjects": overlap_stats(m[other]),
                        "histogram": histogram(vals, stats)}
        if measure == "p":
            out[measure]["interference"] = {"n_edits": int(m.shape[0]), "mean_rms": float(interference_energy(m).mean().sqrt()),
                                            "first_edit_rms": math.sqrt((m.shape[0] - 1) * stats["mean_sq"])}
    return out


def _params(model: nn.Module) -> tuple[int, int]:
    """Total parameters (tied ones once) and those outside the token embedding and output head."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        emb[id(head.weight)] = head.weight.numel()
    return total, total - sum(emb.values())


def analyse(overrides: Sequence[str], n: int, layers: str = "all", fact_token: str = "subject_last",
            whitening: str = "corpus", corpus: str | None = None, corpus_field: str = "passage",
            corpus_texts: int = 400, corpus_max_length: int = 256, command: str = "") -> dict[str, Any]:
    """Load the composed model and dataset, collect keys and second moments, and report every layer."""
    from hydra.utils import instantiate

    from evaluation.run.compose import compose_config

    overrides = [*overrides, f"dataset.num_edits={n}"]
    cfg = compose_config(overrides)
    rome_cfg = cfg if "layer" in cfg.get("editor", {}) else compose_config([*overrides, "editor=rome"])
    rome_layer = int(rome_cfg.editor.layer)
    (loaded := instantiate(cfg.model)).model.eval()
    chosen = list(range(loaded.num_layers)) if layers == "all" else [rome_layer] if layers == "rome" else \
        [int(x) for x in layers.split(",")]
    requests = instantiate(cfg.dataset).load()[:n]
    subjects = [getattr(r, "subject", "") or r.prompt for r in requests]
    other = torch.tensor([[a != b for b in subjects] for a in subjects])
    t0 = time.time()
    keys = collect_keys(loaded, requests, chosen, fact_token)
    t_keys = time.time() - t0
    source: dict[str, Any] = {"whitening": whitening}
    c_inv: dict[int, torch.Tensor | None] = dict.fromkeys(chosen)
    if whitening == "corpus":
        path = Path(corpus or f"{cfg.paths.data_dir}/retention/test-ClosedDomainQA.jsonl").expanduser()
        texts = read_texts(path, "--corpus", corpus_texts, corpus_field, field_setting="--corpus-field")
        mom2, count = second_moments(loaded, texts, chosen, corpus_max_length)
        if count < (d := max(m.shape[0] for m in mom2.values())):
            raise SystemExit(f"error: {count} corpus tokens for {d}-dimensional keys: C is singular; give more text")
        c_inv = {i: invert(m) for i, m in mom2.items()}
        source.update(corpus=str(path), field=corpus_field, texts=len(texts), tokens=count,
                      max_length=corpus_max_length)
    total, non_emb = _params(loaded.model)
    report = [{"layer": i, "module": loaded.ffn_name(i), "d_key": int(keys[i].shape[1]),
               "key_norm_mean": float(keys[i].norm(dim=1).mean()), "none": layer_report(keys[i], None, other),
               **({} if c_inv[i] is None else {"corpus": layer_report(keys[i], c_inv[i], other)})} for i in chosen]
    return {"model": str(cfg.model.name), "num_layers": int(loaded.num_layers), "params": total,
            "params_non_embedding": non_emb, "dataset": str(cfg.dataset.name), "n": len(requests),
            "fact_token": fact_token, "context_templates": ["{}"], "whitening": source, "rome_layer": rome_layer,
            "kurtosis": "excess (Fisher, population moments: scipy.stats.kurtosis defaults); Gaussian 0, Laplace 3",
            "seconds": {"keys": round(t_keys, 1), "total": round(time.time() - t0, 1)},
            "command": command, "layers": report}


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    return __import__("matplotlib.pyplot").pyplot


def _save(fig: Any, path: Path) -> str:
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130, bbox_inches="tight"), binary=True)
    _plt().close(fig)
    return path.name


def _whiten(r: dict[str, Any]) -> str:
    return "corpus" if "corpus" in r["layers"][0] else "none"


def plot_histograms(r: dict[str, Any], out: Path, measure: str = "p") -> str:
    """One panel per layer: the overlap distribution (log counts) and a Gaussian of the same mean and variance."""
    plt, w = _plt(), _whiten(r)
    cols, rows = min(6, len(r["layers"])), math.ceil(len(r["layers"]) / min(6, len(r["layers"])))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False)
    [ax.axis("off") for ax in axes.flat[len(r["layers"]):]]
    for ax, layer in zip(axes.flat, r["layers"]):
        h, s = layer[w][measure]["histogram"], layer[w][measure]["stats"]
        counts, rng = torch.tensor(h["counts"], dtype=torch.float64), h["range"]
        edges = torch.linspace(-rng, rng, len(counts) + 1)
        ax.stairs(counts.numpy(), edges.numpy(), fill=True, alpha=0.6)
        mid, width = (edges[1:] + edges[:-1]) / 2, float(edges[1] - edges[0])
        if s["std"] > 0:
            gauss = s["n"] * width * torch.exp(-0.5 * ((mid - s["mean"]) / s["std"]) ** 2) / (s["std"] * math.sqrt(2 * math.pi))
            ax.plot(mid.numpy(), gauss.numpy(), "r-", lw=0.8)
        ax.set_yscale("log"), ax.set_ylim(0.5, max(2.0, float(counts.max()) * 2))
        rome = " (ROME)" if layer["layer"] == r["rome_layer"] else ""
        ax.set_title(f"layer {layer['layer']}{rome}: kurt {s['kurtosis']:.1f}", fontsize=8), ax.tick_params(labelsize=6)
    fig.suptitle(f"{r['model']}: {measure} overlap of {r['n']} {r['dataset']} keys, whitening={w} "
                 f"(red: Gaussian, same mean/var)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / f"{r['model']}_histograms.png")


_PANELS = (("mean", "mean"), ("std", "std"), ("kurtosis", "excess kurtosis"), ("tail_ratio", "P(>3σ) / Gaussian's"))


def plot_layers(r: dict[str, Any], out: Path) -> str:
    """Statistic vs layer, every measure and whitening; the dashed line is ROME's layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4 * len(_PANELS), 3.2))
    xs = [layer["layer"] for layer in r["layers"]]
    lines = [(w, m, "stats", "C0" if w == "corpus" else "C3", "-" if m == "p" else "--", f"{m}, whitening={w}")
             for w in WHITENINGS if w in r["layers"][0] for m in MEASURES]
    lines.append((_whiten(r), "p", "stats_distinct_subjects", "C2", ":", f"p, whitening={_whiten(r)}, different subjects"))
    for w, measure, which, color, ls, name in lines:
        for ax, (key, label) in zip(axes, _PANELS):
            ys = [layer[w][measure][which][key] for layer in r["layers"]]
            ax.plot(xs, ys, marker=".", ms=4, color=color, ls=ls, label=name)
            ax.set_title(label, fontsize=10), ax.set_xlabel("layer")
    for ax in axes:
        ax.axvline(r["rome_layer"], color="grey", ls="--", lw=0.8), ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=1), axes[2].set_ylim(bottom=-2)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{r['model']} ({r['params'] / 1e6:.0f}M): overlap of {r['n']} {r['dataset']} keys by layer "
                 f"(dashed: ROME's layer {r['rome_layer']})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / f"{r['model']}_layers.png")


def plot_sizes(reports: Sequence[dict[str, Any]], out: Path, measure: str = "p") -> str:
    """Statistic vs model size: the median over layers (bar: interquartile range) and ROME's layer."""
    plt = _plt()
    reports = sorted(reports, key=lambda r: r["params"])
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4 * len(_PANELS), 3.2))
    for ax, (key, label) in zip(axes, _PANELS):
        for j, r in enumerate(reports):
            w = _whiten(r)
            v = torch.tensor([layer[w][measure]["stats"][key] for layer in r["layers"]], dtype=torch.float64)
            q1, med, q3 = (float(v.quantile(q)) for q in (0.25, 0.5, 0.75))
            ax.errorbar([r["params"] / 1e6], [med], yerr=[[med - q1], [q3 - med]], fmt="o", color=f"C{j}",
                        capsize=3, label=f"{r['model']}: median over layers")
            at = [layer for layer in r["layers"] if layer["layer"] == r["rome_layer"]]
            if at:
                ax.plot([r["params"] / 1e6], [at[0][w][measure]["stats"][key]], "x", color=f"C{j}", ms=8,
                        label=f"{r['model']}: ROME's layer {r['rome_layer']}")
        sizes = [r["params"] / 1e6 for r in reports]
        ax.set_xscale("log"), ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6), ax.minorticks_off()
        ax.set_xticks(sizes, [f"{x:.0f}M" for x in sizes]), ax.set_xlabel("parameters"), ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("symlog", linthresh=1), axes[2].set_ylim(-2, 2 * max(axes[2].get_ylim()[1], 1))
    axes[0].legend(fontsize=7)
    fig.suptitle(f"overlap ({measure}) vs model size", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "superposition_sizes.png")


def markdown(reports: Sequence[dict[str, Any]], measure: str = "p") -> str:
    """Per model and layer: the measure's statistics, and the commands that produced them."""
    head = ("| model | params | layer | whitening | mean | variance | excess kurtosis | same, different-subject pairs "
            "| P(>3σ)/Gaussian | 99.9% abs | first of N edits: interference RMS / |r| | same, C = I |")
    lines = [f"# Knowledge superposition ({measure})", "", head, "|---|---:|---:|---|" + "---:|" * 8]
    for r in sorted(reports, key=lambda r: r["params"]):
        w = _whiten(r)
        for layer in r["layers"]:
            s, rome = layer[w][measure]["stats"], " (ROME)" if layer["layer"] == r["rome_layer"] else ""
            inter, raw = layer[w]["p"]["interference"], layer["none"]["p"]["interference"]
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {layer['layer']}{rome} | {w} | {s['mean']:.4f} "
                         f"| {s['var']:.4f} | {s['kurtosis']:.1f} | {layer[w][measure]['stats_distinct_subjects']['kurtosis']:.1f} "
                         f"| {s['tail_ratio']:.1f} | {s['abs_q999']:.3f} | {inter['first_edit_rms']:.2f} (N={inter['n_edits']}) "
                         f"| {raw['first_edit_rms']:.2f} |")
    lines += ["", "Commands:", ""] + [f"    {c}" for c in dict.fromkeys(r.get("command") for r in reports) if c]
    return "\n".join(lines) + "\n"


def draw(reports: Sequence[dict[str, Any]], out: Path, measure: str = "p") -> list[str]:
    """Every figure and the Markdown table of ``reports`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for r in reports for n in (plot_histograms(r, out, measure), plot_layers(r, out))]
    names.append(plot_sizes(reports, out, measure))
    write_text_atomic(out / "superposition.md", markdown(reports, measure))
    return [*names, "superposition.md"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*", help="model=a[,b] n=N layers=all|rome|i,j plus Hydra overrides")
    parser.add_argument("--out", default="results/superposition")
    parser.add_argument("--fact-token", default="subject_last", choices=["subject_last", "last"])
    parser.add_argument("--whitening", default="corpus", choices=WHITENINGS)
    parser.add_argument("--corpus", default=None, help="default: BoolQ's Wikipedia passages (retention data)")
    parser.add_argument("--corpus-field", default="passage")
    parser.add_argument("--corpus-texts", type=int, default=400)
    parser.add_argument("--corpus-max-length", type=int, default=256)
    parser.add_argument("--measure", default="p", choices=MEASURES, help="what the figures and table show")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--redraw", action="store_true", help="only redraw from the JSONs in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    own = dict(o.split("=", 1) for o in args.overrides if o.split("=", 1)[0] in ("model", "n", "layers"))
    rest = [o for o in args.overrides if o.split("=", 1)[0] not in ("model", "n", "layers")]
    if not args.redraw:
        out.mkdir(parents=True, exist_ok=True)
        command = "python -m evaluation.reporting.superposition " + " ".join(sys.argv[1:] if argv is None else argv)
        for model in own.get("model", "smollm2").split(","):
            try:
                r = analyse([f"model={model}", *rest], int(own.get("n", 1000)), own.get("layers", "all"),
                            args.fact_token, args.whitening, args.corpus, args.corpus_field, args.corpus_texts,
                            args.corpus_max_length, command)
            except HarnessError as err:
                raise SystemExit(f"error: {err}") from None
            write_json_atomic(out / f"{r['model']}.json", r)
            print(f"{r['model']}: {len(r['layers'])} layers in {r['seconds']['total']} s -> {out / (r['model'] + '.json')}")
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    print("wrote", ", ".join(draw([r for r in reports if "layers" in r], out, args.measure)))


if __name__ == "__main__":
    main()
