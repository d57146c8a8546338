"""Shared fixtures: composed configs and tiny random models of the paper's two architectures."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from data.loaders import EditDataset
from data.requests import EditRequest
from evaluation.editing.models import LoadedModel
from evaluation.run.compose import compose_config

REPO = Path(__file__).resolve().parent.parent
# the data are read where they live (../shared/data beside the repo, as conf/paths/default.yaml), never copied
DATA_DIR = Path(os.environ.get("ELDER_DATA_DIR", REPO.parent / "shared" / "data"))
RETENTION_DATA = Path(os.environ.get("RETENTION_DATA_DIR", DATA_DIR / "retention"))
ZSRE = DATA_DIR / "zsre" / "zsre_mend_eval_portability_gpt4.json"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker takes one core: one torch thread each (and in the runs it starts),
    since two workers with a thread per core would only contend."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: extra threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    return lambda *overrides: compose_config(overrides)


def tiny_model(name: str = "tiny_llama", seed: int = 0) -> LoadedModel:
    cfg = compose_config([f"model={name}", f"seed={seed}"])
    return instantiate(cfg.model)


def zsre_requests(n: int) -> list[EditRequest]:
    return EditDataset("zsre", str(ZSRE), n).load()


def save_merged_tokenizer(path: Path, targets: Sequence[str]) -> str:
    """The tiny models' byte-level tokenizer plus one merge per target (" Q", " Z", ...), saved to ``path``:
    ROME-style editors write one vector at the subject's last token, which a random model's attention does
    not carry far, so their learned edits end on the subject and have one-token targets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in [f"Ġ{t}" for t in targets] + ["<|endoftext|>"]:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", t) for t in targets]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return str(path)


def tiny_with_tokenizer(arch: str, tokenizer_path: str | None = None, seed: int = 0) -> LoadedModel:
    """``tiny_model(f"tiny_{arch}")``, with the tokenizer saved at ``tokenizer_path`` when one is given."""
    if tokenizer_path is None:
        return tiny_model(f"tiny_{arch}", seed)
    cfg = compose_config([f"model=tiny_{arch}", f"seed={seed}", f"model.tokenizer_path={tokenizer_path}"])
    return instantiate(cfg.model)
