"""ROME's second-moment statistics C = E[k k^T] of the rewritten matrix's input, from a local corpus.

ROME (layer_stats.py) collects the uncentred second moment of the rewritten module's input over
every non-padding token of 100,000 Wikipedia texts (each cut to the model's context length) and
uses C^-1 k as the update direction. Here the texts come from a local file (``.txt``: one text per
non-empty line; ``.jsonl``: one JSON object per line with a text field); the first
``n_samples`` texts are used (ROME samples them at random from Wikipedia).

The result is cached on disk. The file name holds everything the statistics depend on: model name,
module, corpus content hash, sample count, cut length, dtype, and a fingerprint of the module's input
on a fixed probe sentence (so a different checkpoint or random seed under the same name misses the
cache instead of reusing wrong statistics). ROME edits only the rewritten matrix, whose own input
does not depend on it, so the statistics stay valid for the whole stream.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baselines.rome.compute_key import capture, pad, run_until
from evaluation.common.errors import ConfigError

log = logging.getLogger(__name__)

PROBE = "The quick brown fox jumps over the lazy dog near the bank of the river."


@dataclass
class SecondMoment:
    mom2: torch.Tensor  # (d_in, d_in) sum(k k^T) / count
    count: int  # tokens seen
    texts: int
    path: Path  # the cache file
    from_cache: bool


def read_corpus(path: str | Path, n_samples: int, text_field: str = "text") -> list[str]:
    """The first ``n_samples`` non-empty texts of a .txt (one per line) or .jsonl file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"editor.mom2_corpus={path} does not exist (a .txt file with one text per line, "
                         f"or a .jsonl file with a '{text_field}' field)")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"editor.mom2_corpus must be a .txt or .jsonl file, got {path}")
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if suffix == ".jsonl":
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{path}:{number} is not a JSON object with a '{text_field}' field "
                                     f"(editor.mom2_text_field)") from None
                line = str(text).strip()
                if not line:
                    continue
            texts.append(line)
            if len(texts) == n_samples:
                break
    if not texts:
        raise ConfigError(f"editor.mom2_corpus={path} holds no text")
    if len(texts) < n_samples:
        log.warning("mom2 corpus %s has %d texts, fewer than mom2_n_samples=%d; using all of them",
                    path, len(texts), n_samples)
    return texts


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


@torch.no_grad()
def fingerprint(model: nn.Module, tokenizer: Any, module: nn.Module) -> str:
    """A short hash of the module's input on a fixed sentence (identifies the weights below it)."""
    device = next(model.parameters()).device
    ids, mask = pad([tokenizer(PROBE).input_ids], 0, device)
    with capture(module, stop=True) as seen:
        run_until(model, ids, mask)
    rounded = torch.round(seen["in"].double().cpu() * 1e3).to(torch.int64)
    return hashlib.sha256(rounded.numpy().tobytes()).hexdigest()[:12]


@torch.no_grad()
def collect(model: nn.Module, tokenizer: Any, module: nn.Module, texts: list[str], max_length: int,
            dtype: torch.dtype, batch_size: int) -> tuple[torch.Tensor, int]:
    """sum(k k^T) / count over every token of ``texts`` (each cut to ``max_length`` tokens)."""
    device = next(model.parameters()).device
    encoded = [tokenizer(t).input_ids[:max_length] for t in texts]
    encoded.sort(key=len)  # batches of similar length pad little
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total: torch.Tensor | None = None
    count = 0
    for start in range(0, len(encoded), batch_size):
        ids, mask = pad(encoded[start:start + batch_size], pad_id, device)
        with capture(module, stop=True) as seen:
            run_until(model, ids, mask)
        feats = seen["in"][mask.bool()].to(dtype)  # (tokens, d_in)
        part = feats.T @ feats
        total = part if total is None else total + part
        count += feats.shape[0]
    assert total is not None
    return (total / count).cpu(), count


def second_moment(model: nn.Module, tokenizer: Any, module: nn.Module, *, model_name: str, module_name: str,
                  corpus: str | Path, n_samples: int, max_length: int, dtype: str, text_field: str,
                  batch_size: int, cache_dir: str | Path) -> SecondMoment:
    """Load the statistics from ``cache_dir``, or compute and save them."""
    corpus = Path(corpus).expanduser()
    if not corpus.is_file():
        raise ConfigError(f"editor.mom2_corpus={corpus} does not exist")
    try:
        torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    except KeyError:
        raise ConfigError(f"editor.mom2_dtype must be float32 or float64, got {dtype!r}") from None
    name = "__".join([
        model_name.replace("/", "_"), module_name, f"{corpus.stem}-{_file_hash(corpus)}", f"n{n_samples}",
        f"t{max_length}", dtype, fingerprint(model, tokenizer, module),
    ]) + ".pt"
    path = Path(cache_dir).expanduser() / name
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        log.info("ROME second moment of %s loaded from %s", module_name, path)
        return SecondMoment(saved["mom2"], int(saved["count"]), int(saved["texts"]), path, from_cache=True)
    texts = read_corpus(corpus, n_samples, text_field)
    log.info("ROME: computing the second moment of %s over %d texts of %s", module_name, len(texts), corpus)
    mom2, count = collect(model, tokenizer, module, texts, max_length, torch_dtype, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    torch.save({"mom2": mom2, "count": count, "texts": len(texts)}, tmp)
    tmp.rename(path)
    return SecondMoment(mom2, count, len(texts), path, from_cache=False)


def inverse(stats: SecondMoment) -> torch.Tensor:
    """C^-1 in float32 (ROME: torch.inverse(...).float()); an error if C cannot be inverted."""
    d = stats.mom2.shape[0]
    if stats.count < d:
        raise ConfigError(f"the second moment of a {d}-dimensional key from {stats.count} tokens is singular; "
                         f"give more text (editor.mom2_corpus / editor.mom2_n_samples / editor.mom2_max_length)")
    try:
        inv = torch.linalg.inv(stats.mom2.double())
    except torch.linalg.LinAlgError:
        raise ConfigError(f"the second moment in {stats.path} is singular; give more or more varied text "
                         f"(editor.mom2_corpus / editor.mom2_n_samples)") from None
    return inv.float()
