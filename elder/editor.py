"""The ELDER editor: mixture-of-LoRA layers, guided loss, allocation codes, deferral."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from data.requests import EditRequest
from elder.adapter import LORA_INITS, MixtureOfLoRA
from elder.allocation import PresetAllocator
from elder.losses import guided_loss, load_balancing_loss
from elder.routing import Routers, Routes, min_hamming
from evaluation.editor import EditStats, Editor, FloorSpec, optimise
from evaluation.errors import ConfigError
from evaluation.encoding import encode_pairs
from evaluation.forward import target_logits
from evaluation.models import LoadedModel, layer_dims, replace_module
from evaluation.prefix_cache import frozen_prefix, replaying
from evaluation.query import SequenceQuery

AUX_LOSSES = ("guided", "none", "load_balance")
# when a batch's codes are stored: from the routers after the batch's last optimizer step, or from
# the forward of its last iteration (before that step), as the authors' code does
CODE_SNAPSHOTS = ("after_training", "last_iteration")
# the learning rate within a batch: constant, or StepLR(lr_step, lr_gamma) over the batch's iterations
# restarted every batch (MELO's driver, which the ELDER authors' README says to run)
LR_SCHEDULES = ("constant", "step")


class ElderEditor(Editor):
    """Mixture-of-LoRA lifelong editor (all paper hyper-parameters are constructor arguments)."""

    def __init__(
        self,
        model: LoadedModel,
        layers: Sequence[int],
        query_layer: int,
        rank: int = 8,
        num_loras: int = 4,
        top_k: int = 2,
        alpha: float = 8.0,
        epsilon: int = 12,
        guide_lambda: float = 1e-2,
        aux_loss: str = "guided",
        lr: float = 1e-4,
        iterations: int = 50,
        batch_size: int = 4,
        deferral: bool = True,
        reset_optimizer: bool = False,
        lr_schedule: str = "constant",
        lr_step: int = 20,
        lr_gamma: float = 0.5,
        prefix_cache: bool = True,
        code_snapshot: str = "last_iteration",
        lora_init: str = "authors",
        key_position: str = "prompt_last",
        seed: int = 0,
    ) -> None:
        layers = list(layers)
        L, N = len(layers), num_loras
        self._validate(model, layers, query_layer, num_loras, top_k, epsilon, aux_loss)
        for key, value, allowed in (("code_snapshot", code_snapshot, CODE_SNAPSHOTS),
                                    ("lr_schedule", lr_schedule, LR_SCHEDULES), ("lora_init", lora_init, LORA_INITS)):
            if value not in allowed:
                raise ConfigError(f"editor.{key} must be one of {allowed}, got {value!r}")
        if lr_step < 1 or not 0 < lr_gamma <= 1:
            raise ConfigError(f"editor.lr_step must be >= 1 and editor.lr_gamma in (0, 1], "
                              f"got {lr_step} and {lr_gamma}")
        self.code_snapshot, self.key_position = code_snapshot, self.checked_key_position(key_position)
        self.lr_schedule, self.lr_step, self.lr_gamma = lr_schedule, lr_step, lr_gamma
        self.loaded, self.model, self.tokenizer = model, model.model, model.tokenizer
        self.layers, self.query_layer = layers, query_layer
        self.num_loras, self.top_k, self.epsilon = N, top_k, epsilon
        self.guide_lambda, self.aux_loss = guide_lambda, aux_loss
        self.lr, self.iterations, self.batch_size = lr, iterations, batch_size
        self.deferral, self.reset_optimizer = deferral, reset_optimizer
        self.training = False

        device = next(self.model.parameters()).device
        query_module = model.ffn_module(query_layer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.routers = Routers(L, layer_dims(query_module)[0], N, top_k).to(device)
            self.adapters: list[MixtureOfLoRA] = []
            for index, layer in enumerate(layers):
                adapter = MixtureOfLoRA(model.ffn_module(layer), index, N, rank, alpha, self._current_routes,
                                        lora_init)
                replace_module(self.model, model.ffn_name(layer), adapter)
                self.adapters.append(adapter)
        self.query = SequenceQuery(query_module, on_query=self._route)
        # blocks below the query layer are frozen and see the same batch in every iteration
        self.prefix = frozen_prefix(model, prefix_cache, query_layer)
        self.allocator = PresetAllocator(L, N, top_k, seed)
        self.stored_codes = torch.zeros(0, L * N, dtype=torch.bool)
        self.optimizer = self._new_optimizer()

    @staticmethod
    def _validate(model: LoadedModel, layers: list[int], query_layer: int, num_loras: int, top_k: int,
                  epsilon: int, aux_loss: str) -> None:
        n = model.num_layers
        bad = [i for i in [*layers, query_layer] if not 0 <= i < n]
        if bad:
            raise ConfigError(f"layer index {bad[0]} is out of range for model '{model.name}' with {n} layers "
                             f"(valid: 0..{n - 1}); fix editor.layers / editor.query_layer")
        if not layers or len(set(layers)) != len(layers):
            raise ConfigError(f"editor.layers must be distinct layer indices, got {layers}")
        if query_layer >= min(layers):
            raise ConfigError(f"editor.query_layer={query_layer} must lie below the first ELDER layer "
                             f"({min(layers)}): the query must not depend on the LoRAs")
        if not 1 <= top_k <= num_loras:
            raise ConfigError(f"editor.top_k={top_k} must be between 1 and editor.num_loras={num_loras} (k <= N)")
        bits = len(layers) * num_loras
        if not 0 <= epsilon <= bits:
            raise ConfigError(f"editor.epsilon={epsilon} must lie in 0..L*N = 0..{bits} (codes have {bits} bits)")
        if aux_loss not in AUX_LOSSES:
            raise ConfigError(f"editor.aux_loss must be one of {AUX_LOSSES}, got {aux_loss!r}")

    # --- routing -------------------------------------------------------------------------
    def _current_routes(self) -> Routes | None:
        return self.query.derived  # type: ignore[return-value]

    def _route(self, q: torch.Tensor) -> Routes:
        routes = self.routers(q)
        if not self.training and self.deferral:
            dist = min_hamming(routes.codes(self.num_loras), self.stored_codes)
            routes.active = dist < self.epsilon  # nearest code at least epsilon away: a task input
        return routes

    def scope(self, query_positions: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        return self.query.scope(query_positions)

    def codes_for(self, prompts: Sequence[str]) -> torch.Tensor:
        """Allocation codes (B, L*N) of prompts, as stored and compared at inference."""
        return self.routes_for(prompts).codes(self.num_loras).cpu()

    # --- editing ---------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        for adapter in self.adapters:
            yield adapter.lora_A
            yield adapter.lora_B
        yield from self.routers.parameters()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.parameters()), lr=self.lr)

    def _batch_schedule(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        if self.lr_schedule == "constant":
            return None
        for group in self.optimizer.param_groups:  # StepLR starts from each group's initial_lr
            group["initial_lr"] = self.lr
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=self.lr_step, gamma=self.lr_gamma)

    def _aux(self, routes: Routes, preset: torch.Tensor) -> torch.Tensor:
        if self.aux_loss == "guided":
            return guided_loss(routes, preset)
        if self.aux_loss == "load_balance":
            return load_balancing_loss(routes)
        return routes.log_scores.new_zeros(())

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        device = next(self.model.parameters()).device
        batch = encode_pairs(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests]).to(device)
        preset = self.allocator.batch([r.uid for r in requests])  # (B, L, k)
        if self.reset_optimizer:
            self.optimizer = self._new_optimizer()
        schedule = self._batch_schedule()
        parts = {"lm": torch.zeros(()), "aux": torch.zeros(()), "codes": torch.zeros(0, dtype=torch.bool)}

        def loss() -> torch.Tensor:  # the LM loss plus the guided loss; keeps this iteration's codes
            with self.batch_scope(batch):
                parts["lm"] = target_logits(self.model, batch).loss()
                routes = self.query.derived
                parts["aux"] = self._aux(routes, preset)  # type: ignore[arg-type]
                parts["codes"] = routes.codes(self.num_loras).cpu()  # type: ignore[union-attr]
            return parts["lm"] + self.guide_lambda * parts["aux"]

        with replaying(self.prefix):
            self.training = True
            try:
                optimise(self.optimizer, self.iterations, loss, scheduler=schedule)
            finally:
                self.training = False
                for group in self.optimizer.param_groups:  # the schedule is per batch: leave lr as configured
                    group["lr"] = self.lr
            codes = parts["codes"]
            if self.code_snapshot == "after_training":
                with torch.no_grad(), self.batch_scope(batch):
                    target_logits(self.model, batch)
                    codes = self.query.derived.codes(self.num_loras).cpu()  # type: ignore[union-attr]
        self.stored_codes = torch.cat([self.stored_codes, codes])
        return EditStats(loss=float(parts["lm"].detach()), iterations=self.iterations,
                         extra={"aux_loss": float(parts["aux"].detach())})

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=min(self.layers), passes=self.iterations)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def stored_params(self) -> int:
        return self.stored_codes.numel()  # one bit each; counted as numbers, as GRACE's keys are

    def state_dict(self) -> dict[str, Any]:
        return {
            "adapters": [{"A": a.lora_A.detach().clone(), "B": a.lora_B.detach().clone()} for a in self.adapters],
            "routers": {k: v.clone() for k, v in self.routers.state_dict().items()},
            "stored_codes": self.stored_codes.clone(),
            "allocator": self.allocator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for adapter, saved in zip(self.adapters, state["adapters"], strict=True):
                adapter.lora_A.copy_(saved["A"])
                adapter.lora_B.copy_(saved["B"])
        self.routers.load_state_dict(state["routers"])
        self.stored_codes = state["stored_codes"].clone()
        self.allocator.load_state_dict(state["allocator"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
