"""UltraEdit (Gu, Huang, Gu, Zhang, TMLR 2026, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing
in Language Models"; the authors' code github.com/XiaojieGu/UltraEdit, editor/ultraedit.py, nets.py, util.py).

No optimiser and no hypernetwork: each call of :meth:`UltraEditEditor.edit` (one "turn" of ``batch_size`` edits)
1. splits the turn into chunks of ``chunk_size`` requests (after sorting them by token length, longest first, as
   the authors' collate_fn does) and runs one forward + backward of the chunk's target loss (mean cross entropy over
   its target tokens) on the weights before the turn; at every edited linear layer it keeps the layer's input
   (the key k) and the gradient of the loss w.r.t. the layer's output (g) at the positions that predict a target
   token (``token: ans``; the authors' util.TracerDict);
2. adds each chunk's rows [k, g] to a running mean / variance kept across turns ("lifelong normalization":
   nets.RunningMeanStd, one per weight shape, so layers of one shape share it);
3. per layer: the z-scored k_hat, g_hat give pseudo value shifts v = -lr * ||k_hat||^2 * g_hat, and the weight
   shift solves the ridge regression  dW = (K^T K + ridge * I)^-1 K^T V  on the raw keys K (float32), added to the
   weight in place (all layers at once, after all their shifts are computed).
The edits live in the weights (registered, as MEMIT's) and the running statistics (buffers); nothing grows with
the number of edits and each turn costs the same.

Hyper-parameters: lr 1e-6 (config/editor/ultraedit.yaml:2), 100 edits per turn in chunks of 10 (run.sh and
config/dataset/zsre.yaml: dataset.n_edits=100, dataset.batch_size=10), ridge 1 (the identity in
editor/ultraedit.py:92), ``token: ans`` (config/editor/ultraedit.yaml:4). Layers: conf/editor/ultraedit.yaml.

Departures from the authors' code (docs/editor_ultraedit.md):
- keys and gradients stay in memory for the turn instead of going through per-chunk files in ``cache_dir``; the
  normaliser is applied to all rows at once, not in zero-padded blocks of ``editor.batch_size`` (row-wise: same
  numbers);
- the gradient w.r.t. a layer's output is read with ``torch.autograd.grad`` on the hooked outputs, not through
  full backward hooks on weights that require grad (the same values, no weight gradients kept);
- a chunk with one row adds nothing to the running variance (the authors' ``x.var(0)`` is NaN for one row);
- the harness feeds the whole "{prompt} {target}" row; the authors drop the last target token from the input.
  Causal attention makes the keys and gradients at the read positions the same (with ``token: mask`` the last
  real token is left out, as it is absent from the authors' input);
- the model runs in its configured dtype (the authors cast to bfloat16); keys, gradients and the solve are float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import (
    check_choice,
    check_positive,
    resolve_rewrite_module,
)
from evaluation.editing.editor import Editor, EditStats, FloorSpec
from evaluation.editing.encoding import IGNORE, EncodedBatch, encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel, layer_dims

TOKENS = ("ans", "mask")


@dataclass
class UltraEditConfig:
    """UltraEdit's hyper-parameters (module docstring; the authors' file and line for each)."""

    # module name templates ({i}: the layer) and, one list per template, the layers to edit (authors' edit_modules)
    modules: List[str] = MISSING
    layers: List[List[int]] = MISSING
    lr: float = 1e-6  # the pseudo value's step size (config/editor/ultraedit.yaml:2)
    ridge: float = 1.0  # lambda of (K^T K + lambda I): the identity in editor/ultraedit.py:92
    batch_size: int = 100  # edits per turn (run.sh dataset.n_edits=100; EasyEdit hparams batch_size: 100)
    # requests per forward+backward, whose loss is one mean over its target tokens (run.sh dataset.batch_size=10)
    chunk_size: int = 10
    # where keys and gradients are read: ans = the positions that predict a target token (the authors'
    # config/editor/ultraedit.yaml:4); mask = every real input token (EasyEdit's hparams/UltraEdit files)
    token: str = "ans"


class LifelongNormalizer(nn.Module):
    """Running mean and spread of rows [k, g] over every turn so far (the authors' nets.RunningMeanStd)."""

    def __init__(self, size: int, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(1, device=device))
        self.register_buffer("mean", torch.zeros(size, device=device))
        self.register_buffer("var", torch.zeros(size, device=device))  # a running sum of squares, as theirs
        self.register_buffer("std", torch.zeros(size, device=device))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean += m * delta / n
        # m times the unbiased variance, as the authors' (one row: none, where theirs is NaN)
        spread = m * x.var(0) if m > 1 else torch.zeros_like(delta)
        self.var += spread + self.n * m * delta.pow(2) / n
        self.std.copy_((self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt())
        self.n.copy_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


def ridge_shift(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """(d_in, d_out) shift S minimising ||K S - V||^2 + ridge ||S||^2 for keys K (n, d_in), values V (n, d_out)."""
    gram = keys.T @ keys
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, keys.T @ values)


class UltraEditEditor(Editor):
    """UltraEdit over the ``modules`` x ``layers`` linear layers, ``batch_size`` requests per turn (module docstring).

    Its state: the edited matrices, registered as the model's own parameters (``weights``), the running statistics
    (``normalizers``, one per weight shape) and the modules' names and edit count (extra state)."""

    Config = UltraEditConfig
    config: UltraEditConfig

    def __init__(self, model: LoadedModel, config: UltraEditConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        check_positive("lr", c.lr)
        if not (math.isfinite(c.ridge) and c.ridge > 0):
            raise ConfigError(f"editor.ridge must be a positive number (K^T K + ridge I must be invertible), "
                              f"got {c.ridge}")
        for key in ("batch_size", "chunk_size"):
            if getattr(c, key) < 1:
                raise ConfigError(f"editor.{key} must be at least 1, got {getattr(c, key)}")
        check_choice("token", c.token, TOKENS)
        templates, groups = list(c.modules), [list(g) for g in c.layers]
        if not templates or len(templates) != len(groups):
            raise ConfigError(f"editor.layers must hold one list of layers per entry of editor.modules "
                              f"({len(templates)} modules, {len(groups)} lists of layers)")
        names, held = [], []
        for template, group in zip(templates, groups):
            if not group:
                raise ConfigError(f"editor.layers: no layers for module {template!r}")
            for layer in group:
                name, module = resolve_rewrite_module(model, int(layer), template)
                names.append(name)
                held.append(module)
        if len(set(names)) != len(names):
            raise ConfigError(f"editor.modules x editor.layers names a module twice: {names}")
        self.module_names = names
        self._held = held  # the model's own modules: held, not registered
        self.transposed = [not isinstance(m, nn.Linear) for m in held]  # GPT-2's Conv1D stores (in, out)
        self.weights = nn.ParameterList([m.weight for m in held])
        self.dims = [layer_dims(m) for m in held]  # (d_in, d_out)
        self.first_layer = min(int(layer) for group in groups for layer in group)
        device = held[0].weight.device
        # one normaliser per (d_in, d_out), shared by the layers of that shape (the authors' shape_counter)
        self.shape_keys = [f"{d_in}x{d_out}" for d_in, d_out in self.dims]
        self.normalizers = nn.ModuleDict({key: LifelongNormalizer(d_in + d_out, device)
                                          for key, (d_in, d_out) in zip(self.shape_keys, self.dims)})
        self.num_edits = 0

    # --- editing ---------------------------------------------------------------------------
    def _chunks(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        """The turn sorted by token length, longest first (stable; the authors' collate_fn), in chunks."""
        tok = self.tokenizer
        length = [len(tok(r.prompt).input_ids) + len(tok(" " + r.target, add_special_tokens=False).input_ids)
                  for r in requests]
        ordered = [requests[i] for i in sorted(range(len(requests)), key=lambda i: -length[i])]
        size = self.config.chunk_size
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]

    def _read_mask(self, batch: EncodedBatch) -> torch.Tensor:
        """(B, T) bool: the positions whose keys and gradients are read."""
        mask = torch.zeros_like(batch.labels, dtype=torch.bool)
        if self.config.token == "ans":  # the positions whose next token is a target token
            mask[:, :-1] = batch.labels[:, 1:] != IGNORE
        else:  # every real token the authors feed: all but each row's last
            mask = batch.attention_mask.bool().clone()
            mask[torch.arange(mask.shape[0], device=mask.device), batch.last_positions] = False
        return mask

    def _trace(self, batch: EncodedBatch) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        """One forward + backward of ``batch``'s loss: the loss, and per edited layer its keys (n, d_in) and the
        loss's gradient w.r.t. its output (n, d_out) at the read positions, in float32."""
        inputs: list[torch.Tensor | None] = [None] * len(self._held)
        outputs: list[torch.Tensor | None] = [None] * len(self._held)

        def hook_for(index: int) -> Any:
            def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
                inputs[index] = args[0].detach()
                if not output.requires_grad:  # the lowest edited layer: the graph starts here
                    output = output.detach().requires_grad_(True)
                outputs[index] = output
                return output
            return hook

        handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(self._held)]
        try:
            with torch.enable_grad():
                loss = target_logits(self.model, batch).loss()
                grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        mask = self._read_mask(batch)
        keys = [x[mask].float() for x in inputs]  # type: ignore[index]
        values = [torch.zeros(len(k), d_out, device=k.device) if g is None else g[mask].float()
                  for k, g, (_, d_out) in zip(keys, grads, self.dims)]
        return float(loss.detach()), keys, values

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        device = self.weights[0].device
        per_layer_keys: list[list[torch.Tensor]] = [[] for _ in self._held]
        per_layer_grads: list[list[torch.Tensor]] = [[] for _ in self._held]
        losses = []
        for chunk in self._chunks(requests):  # all on the weights before this turn
            batch = encode_pairs(self.tokenizer, [r.prompt for r in chunk], [r.target for r in chunk]).to(device)
            loss, keys, grads = self._trace(batch)
            losses.append(loss)
            for i, (k, g) in enumerate(zip(keys, grads)):  # chunk by chunk, layer by layer: the authors' order
                self.normalizers[self.shape_keys[i]].update(torch.cat((k, g), -1))
                per_layer_keys[i].append(k)
                per_layer_grads[i].append(g)
        shifts = []
        with torch.no_grad():
            for i, (d_in, d_out) in enumerate(self.dims):
                keys, grads = torch.cat(per_layer_keys[i]), torch.cat(per_layer_grads[i])
                k_hat, g_hat = self.normalizers[self.shape_keys[i]](torch.cat((keys, grads), -1)).split([d_in, d_out], -1)
                values = -c.lr * k_hat.pow(2).sum(-1, keepdim=True) * g_hat  # pseudo value shifts (n, d_out)
                shifts.append(ridge_shift(keys, values, c.ridge))  # (d_in, d_out)
            for weight, shift, transposed in zip(self.weights, shifts, self.transposed):
                weight.add_((shift if transposed else shift.T).to(weight.dtype))
        self.num_edits += len(requests)
        norms = [float(s.norm()) for s in shifts]
        return EditStats(loss=sum(losses) / len(losses), iterations=len(losses),
                         extra={"shift_norm": sum(norms) / len(norms), "rows": float(sum(len(k) for k in
                                                                                          per_layer_keys[0]))})

    # --- accounting and state ------------------------------------------------------------------
    def stored_params(self) -> int:
        """The running statistics (count, mean, sum of squares, spread per weight shape)."""
        return sum(b.numel() for b in self.normalizers.buffers())

    def floor_spec(self) -> FloorSpec:
        # one forward+backward per turn from the lowest edited layer up
        return FloorSpec(first_layer=self.first_layer, passes=1)

    def get_extra_state(self) -> dict[str, Any]:
        return {"modules": list(self.module_names), "num_edits": self.num_edits}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["modules"]) != self.module_names:
            raise ConfigError(f"saved UltraEdit state edits {state['modules']} but this editor edits "
                              f"{self.module_names}")
        self.num_edits = int(state["num_edits"])
