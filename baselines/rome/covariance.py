"""The second-moment statistics C = E[k k^T] of a rewritten matrix's input, from a text corpus.

ROME (layer_stats.py) collects the uncentred second moment of the rewritten module's input over
every non-padding token of 100,000 Wikipedia texts (each cut to the model's context length); ROME uses
C^-1 k as the update direction, MEMIT regularises its batched update by C, AlphaEdit projects onto C's
null space. No Wikipedia copy ships with the harness, so the corpus (``mom2_corpus``) is one of:

- ``model`` (the default): ``mom2_generated_texts`` texts the unedited model writes itself, sampled from
  its own distribution (plain sampling, seeded), each ``mom2_generated_length`` tokens, started from its
  BOS token. It needs no download and describes the inputs the model actually sees in its own text, as
  ROME's context prefixes are the model's own text;
- a local file (``.txt``: one text per non-empty line; ``.jsonl``: one JSON object per line with a text
  field), of which the first ``mom2_n_samples`` texts are used (ROME samples them at random).
Never point it at the retention suite's items: statistics of what retention scores would protect exactly
what it measures.

Results are cached on disk. The file name holds everything the statistics depend on: model name, module,
corpus (content hash, or the generation settings), sample count, cut length, dtype, and a fingerprint of
the module's input on a fixed probe sentence (so a different checkpoint or random seed under the same name
misses the cache instead of reusing wrong statistics). The generated texts are cached too (as token ids).
Computing them holds a lock per model and corpus (``filelock``; released by the kernel if the process dies), so
two runs started together (a sweep's two jobs) compute them once: the second waits, then reads the first's files.
Every editor computes the statistics on the unedited model (at its first edit, or when it is built).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from filelock import FileLock, Timeout
from torch import nn
from tqdm.auto import tqdm

from baselines.rome.compute_key import (
    capture,
    capture_all,
    hidden_states,
    pad,
    run_until,
)
from data.text_corpus import read_texts
from evaluation.common.atomic import file_stem, write_atomic
from evaluation.common.errors import ConfigError
from evaluation.common.integrity import file_sha256

log = logging.getLogger(__name__)

MODEL_CORPUS = "model"  # mom2_corpus: texts the model samples itself
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
    texts = read_texts(path, "editor.mom2_corpus", n_samples, text_field, field_setting="editor.mom2_text_field")
    if len(texts) < n_samples:
        log.warning("mom2 corpus %s has %d texts, fewer than mom2_n_samples=%d; using all of them",
                    path, len(texts), n_samples)
    return texts


@torch.no_grad()
def fingerprint(model: nn.Module, tokenizer: Any, module: nn.Module | None = None) -> str:
    """A short hash of the module's input (None: the model's last hidden state) on a fixed sentence: it
    identifies the weights below it."""
    device = next(model.parameters()).device
    ids, mask = pad([tokenizer(PROBE).input_ids], 0, device)
    if module is None:
        seen = {"in": hidden_states(model, ids, mask)}
    else:
        with capture(module, stop=True) as seen:
            run_until(model, ids, mask)
    rounded = torch.round(seen["in"].double().cpu() * 1e3).to(torch.int64)
    return hashlib.sha256(rounded.numpy().tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class Corpus:
    """Where the statistics' texts come from (module docstring): ``source`` is ``model`` or a file path."""

    source: str
    n_samples: int = 100000  # texts read from a file
    text_field: str = "text"
    generated_texts: int = 1000  # texts the model writes (source "model")
    generated_length: int = 128
    seed: int = 0

    @property
    def generated(self) -> bool:
        return self.source == MODEL_CORPUS

    def label(self) -> str:
        """The corpus's part of a cache file's name."""
        if self.generated:
            return f"model-sampled-{self.generated_texts}x{self.generated_length}-s{self.seed}"
        path = Path(self.source).expanduser()
        return f"{path.stem}-{file_sha256(path)[:12]}-n{self.n_samples}"

    def check(self) -> None:
        if self.generated:
            if self.generated_texts < 1 or self.generated_length < 1:
                raise ConfigError(f"editor.mom2_generated_texts and editor.mom2_generated_length must be at least 1, "
                                  f"got {self.generated_texts} and {self.generated_length}")
            return
        path = Path(self.source).expanduser()
        if not path.is_file():
            raise ConfigError(f"editor.mom2_corpus={self.source} is neither '{MODEL_CORPUS}' (texts the model writes) "
                              f"nor a file (a .txt file with one text per line, or a .jsonl file with a "
                              f"'{self.text_field}' field)")


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer: Any, corpus: Corpus, batch_size: int = 50) -> list[list[int]]:
    """``corpus.generated_texts`` token-id rows the model samples from its BOS token (its own RNG, seeded).

    A row ends at the first EOS; the start token is kept only where the tokenizer itself puts one first."""
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    keeps_start = tokenizer("a").input_ids[:1] == [start]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[list[int]] = []
    bar = tqdm(total=corpus.generated_texts, desc="sampling texts", unit="text", leave=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), bar:
        torch.manual_seed(corpus.seed)
        while len(rows) < corpus.generated_texts:
            n = min(batch_size, corpus.generated_texts - len(rows))
            ids = torch.full((n, 1), start, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=corpus.generated_length,
                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            for row in out.tolist():
                body = row[1:]
                if tokenizer.eos_token_id in body:
                    body = body[:body.index(tokenizer.eos_token_id)]
                rows.append(([start] if keeps_start else []) + body)
            bar.update(n)
    return [r for r in rows if r]


def corpus_ids(model: nn.Module, tokenizer: Any, corpus: Corpus, *, model_name: str,
               cache_dir: str | Path) -> list[list[int]]:
    """The corpus as token ids: read from the file, or the model's own texts (cached in ``cache_dir``)."""
    if not corpus.generated:
        return [tokenizer(t).input_ids for t in read_corpus(corpus.source, corpus.n_samples, corpus.text_field)]
    path = Path(cache_dir).expanduser() / f"{file_stem(model_name)}__{corpus.label()}__{fingerprint(model, tokenizer)}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)["ids"]
    log.info("sampling %d texts of %d tokens from %s for the second-moment statistics", corpus.generated_texts,
             corpus.generated_length, model_name)
    ids = sample_texts(model, tokenizer, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save({"ids": ids}, f), binary=True)
    return ids


@torch.no_grad()
def collect(model: nn.Module, modules: Sequence[nn.Module], rows: list[list[int]], max_length: int,
            dtype: torch.dtype, batch_size: int, pad_id: int) -> tuple[list[torch.Tensor], int]:
    """sum(k k^T) / count of each module's input over every token of ``rows`` (each cut to ``max_length``),
    all modules from the same forwards."""
    device = next(model.parameters()).device
    encoded = sorted((r[:max_length] for r in rows), key=len)  # batches of similar length pad little
    totals: list[torch.Tensor | None] = [None] * len(modules)
    count = 0
    for start in tqdm(range(0, len(encoded), batch_size), desc="second moment", unit="batch", leave=False):
        ids, mask = pad(encoded[start:start + batch_size], pad_id, device)
        with capture_all(modules, stop=True) as seen:
            run_until(model, ids, mask)
        for i, record in enumerate(seen):
            feats = record["in"][mask.bool()].to(dtype)  # (tokens, d_in)
            part = feats.T @ feats
            totals[i] = part if totals[i] is None else totals[i] + part
        count += int(mask.sum())
    return [(t / count).cpu() for t in totals if t is not None], count


@contextlib.contextmanager
def _computing(cache_dir: Path, model_name: str, corpus_label: str) -> Iterator[None]:
    """Held while one run computes a model's statistics (and sampled texts) from the corpus ``corpus_label``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_dir / f".{file_stem(model_name)}__{corpus_label}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another run is computing %s's second-moment statistics (%s); waiting to read them",
                 model_name, corpus_label)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def second_moments(model: nn.Module, tokenizer: Any, modules: Sequence[nn.Module], *, model_name: str,
                   module_names: Sequence[str], corpus: Corpus, max_length: int, dtype: str, batch_size: int,
                   cache_dir: str | Path) -> list[SecondMoment]:
    """Each module's statistics, loaded from ``cache_dir`` or computed (those missing, in one set of forwards)."""
    corpus.check()
    try:
        torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    except KeyError:
        raise ConfigError(f"editor.mom2_dtype must be float32 or float64, got {dtype!r}") from None
    label = corpus.label()  # a file corpus's label hashes the file: once
    root = Path(cache_dir).expanduser()
    paths = [root / ("__".join([
        file_stem(model_name), name, label, f"t{max_length}", dtype, fingerprint(model, tokenizer, module),
    ]) + ".pt") for module, name in zip(modules, module_names)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    if missing:
        with _computing(root, model_name, label):
            # another run may have written them while this one waited
            missing = [i for i, path in enumerate(paths) if not path.is_file()]
            if missing:
                rows = corpus_ids(model, tokenizer, corpus, model_name=model_name, cache_dir=cache_dir)
                log.info("computing the second moment of %s over %d texts (%s)",
                         ", ".join(module_names[i] for i in missing), len(rows), label)
                pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                moments, count = collect(model, [modules[i] for i in missing], rows, max_length, torch_dtype,
                                         batch_size, pad_id)
                for i, mom2 in zip(missing, moments):
                    payload = {"mom2": mom2, "count": count, "texts": len(rows)}
                    write_atomic(paths[i], lambda f, payload=payload: torch.save(payload, f), binary=True)
    out = []
    for i, path in enumerate(paths):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        out.append(SecondMoment(saved["mom2"], int(saved["count"]), int(saved["texts"]), path,
                                from_cache=i not in missing))
    return out


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
