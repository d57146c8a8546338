"""``torch.compile`` of the model's decoder blocks (``compile.enabled=true``; off by default).

Regional compilation: each decoder block is compiled in place (``nn.Module.compile``), so parameter
names, state dicts and checkpoints stay as they are, and the editors' adapters, hooks and replay
wrappers keep working. The blocks are compiled right after loading; whatever an editor later puts
inside a block (a module or a hook) is traced with it, because Dynamo's guards see the change and
recompile. An editor that adds a fresh hook per edit (ROME) recompiles per edit until Dynamo's
recompile limit sends it back to eager execution. Python control flow in the editors (routing,
deferral, codebook look-ups) becomes a graph break, not a different result. Meant for GPUs; on a CPU
the inductor backend needs a C++ compiler and each new graph costs seconds of compilation.
"""
from __future__ import annotations

import shutil

import torch

from evaluation.common.errors import ConfigError
from evaluation.editing.models import LoadedModel

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: graphs kept per block code object: a block is traced once per editor state (no adapter, adapter
#: with and without deferral, training and evaluation, each batch-shape class), more than Dynamo's 8
RECOMPILE_LIMIT = 64


def compile_blocks(loaded: LoadedModel, enabled: bool = False, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None) -> int:
    """Compile every decoder block of ``loaded`` in place; returns how many were compiled."""
    if not enabled:
        return 0
    if not loaded.block_template:
        raise ConfigError(f"compile.enabled=true needs the model config's block_template (model '{loaded.name}' has "
                          f"none); set it or compile.enabled=false")
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        raise ConfigError(f"compile.backend must be one of {', '.join(sorted(backends))}; got {backend!r}")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"compile.mode must be null or one of {', '.join(MODES)}; got {mode!r}")
    device = next(loaded.model.parameters()).device
    if backend == "inductor" and device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise ConfigError("compile.backend=inductor on a CPU needs a C++ compiler (g++), and none is on PATH: "
                          "install one (e.g. `apt install g++`), use compile.backend=aot_eager, or compile.enabled=false")
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    # editors add hooks to modules inside the blocks after they were first traced (ELDER's query
    # capture, ROME's per-edit key capture); by default Dynamo would not notice and replay a graph
    # without them
    config.skip_nnmodule_hook_guards = False
    for i in range(loaded.num_layers):
        loaded.model.get_submodule(loaded.block_template.format(i=i)).compile(backend=backend, mode=mode,
                                                                               dynamic=dynamic)
    return loaded.num_layers
