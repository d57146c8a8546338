"""AlphaEdit (Fang, Jiang, Wang, Ma, Shi, Wang, He, Chua 2025, "AlphaEdit: Null-Space Constrained Knowledge
Editing for Language Models", ICLR; github.com/jianghoucheng/AlphaEdit): MEMIT's update projected onto the null
space of the keys of the knowledge to preserve, so that what the model knew maps to the same outputs.

Everything but the update is MEMIT's (baselines/memit.py: targets at the last edited layer's block output, keys
averaged over MEMIT's prefix groups, the residual spread over the layers, sequential batches of 100). Per layer l
(AlphaEdit_main.apply_AlphaEdit_to_model and experiments/evaluate.py of the authors' code):
- P_l, built once on the unedited model: the projector onto the eigenvectors of C_l (the second moment of the
  matrix's input, covariance.py: the preserved keys K0 K0^T / count) whose eigenvalues are below
  ``nullspace_threshold`` (the authors: an absolute 2e-2, on the singular values of C_l from svd);
- Kp_l: the sum of K K^T of every earlier batch's keys, each recomputed on the weights after its batch
  (the authors' ``cache_c``); it is the editor's state, saved in checkpoints;
- update (float32, as the authors):  dW_l^T = (P_l (K_l K_l^T + Kp_l) + L2 I)^-1 P_l K_l R^T,
  which lies in P_l's range, so dW_l k = 0 for every k the projector removes.

Two reported failures of other implementations are avoided by construction (docs/locate_then_edit.md):
EasyEdit #613 (``cache_c`` a module-level global that accumulated across runs meant to be independent): Kp_l
belongs to one editor instance, starts at zero with it, and is restored only from that run's checkpoint;
EasyEdit #518 (0.24 / 0.20 against the authors' 94.56 / 90.96 after 2,000 ZsRE edits, with one edit per call):
batches are ``batch_size`` edits (100, the authors' README) and P is computed from this model's own statistics
and checked against it (the cache's fingerprint), never loaded from a file made for another model or layers.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from baselines.memit import BatchedConfig, MEMITEditor
from baselines.rome.covariance import SecondMoment
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class AlphaEditConfig(BatchedConfig):
    """AlphaEdit's hyper-parameters: MEMIT's (the authors' hparams/AlphaEdit/gpt2-xl.json: layers 13-17, clamp
    0.75, 20 value steps, lr 0.5, weight decay 0.5, KL 0.0625) and the projection's."""

    nullspace_threshold: float = 2e-2  # eigenvalues of C_l below it span the null space (absolute, as the authors)
    L2: float = 10.0  # the ridge term of the solve


def null_space_projector(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = U_0 U_0^T over C's eigenvectors with eigenvalue below ``threshold`` (get_project: svd of C, whose
    singular values are its eigenvalues as C is symmetric positive semi-definite), and their number."""
    u, s, _ = torch.linalg.svd(mom2.float(), full_matrices=False)
    small = u[:, s < threshold]
    return small @ small.T, int(small.shape[1])


def alphaedit_update(projector: torch.Tensor, keys: torch.Tensor, preserved: torch.Tensor, resid: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """dW (d_out, d_in) = [(P (K K^T + Kp) + L2 I)^-1 P K R^T]^T for keys K (d_in, n) and residuals R (d_out, n)."""
    keys, resid = keys.float(), resid.float()
    eye = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
    lhs = projector @ (keys @ keys.T + preserved) + l2 * eye
    return torch.linalg.solve(lhs, projector @ keys @ resid.T).T


class AlphaEditEditor(MEMITEditor):
    """MEMIT with the null-space projected update (module docstring). Its state: MEMIT's, and Kp of every layer
    (``preserved``, a buffer of shape (layers, d_in, d_in))."""

    Config = AlphaEditConfig
    config: AlphaEditConfig

    def __init__(self, model: LoadedModel, config: Any = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        d_in = self.stats[0].mom2.shape[0]
        self.register_buffer("preserved", torch.zeros(len(self.layers), d_in, d_in,
                                                      device=self.weights[0].device))

    def setup_statistics(self, stats: Sequence[SecondMoment]) -> None:
        c = self.config
        if not (math.isfinite(c.nullspace_threshold) and math.isfinite(c.L2)) or c.nullspace_threshold <= 0 or c.L2 < 0:
            raise ConfigError(f"editor.nullspace_threshold must be positive and editor.L2 at least 0, got "
                              f"{c.nullspace_threshold} and {c.L2}")
        device = self.weights[0].device
        self.projectors, self.null_dims = [], []
        for name, s in zip(self.module_names, stats):
            projector, dims = null_space_projector(s.mom2, c.nullspace_threshold)
            self.projectors.append(projector.to(device))
            self.null_dims.append(dims)
            log.info("AlphaEdit: %s keeps %d of %d directions (eigenvalues of C below %g)", name, dims,
                     projector.shape[0], c.nullspace_threshold)
            if dims == 0:
                log.warning("AlphaEdit: the null space of %s is empty at nullspace_threshold=%g (its smallest "
                            "eigenvalue is above it): no update can be written there", name, c.nullspace_threshold)

    def layer_update(self, index: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return alphaedit_update(self.projectors[index], keys, self.preserved[index], resid, self.config.L2)

    def after_batch(self, requests: Sequence[EditRequest], prefixes: list[str]) -> None:
        # the batch's keys on the weights it left, added to what later batches must preserve
        keys, _, _ = self.keys_and_targets(self._held, requests, prefixes)
        with torch.no_grad():
            for i, k in enumerate(keys):
                self.preserved[i] += (k @ k.T).to(self.preserved.dtype)
