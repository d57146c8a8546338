"""The ELDER editor: mixture-of-LoRA layers, guided loss, allocation codes, deferral."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import torch
from torch import nn

from data.requests import EditRequest
from elder.adapter import LORA_INITS, MixtureOfLoRA
from elder.allocation import PresetAllocator
from elder.codes_dump import dump_codes
from elder.losses import guided_loss, load_balancing_loss
from elder.routing import Routers, Routes, min_hamming
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec, optimise
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel, layer_dims, replace_module
from evaluation.editing.prefix_cache import frozen_prefix, replaying
from evaluation.editing.query import SequenceQuery

AUX_LOSSES = ("guided", "none", "load_balance")
# when a batch's codes are stored: from the routers after the batch's last optimizer step, or from
# the forward of its last iteration (before that step), as the authors' code does
CODE_SNAPSHOTS = ("after_training", "last_iteration")
# the learning rate within a batch: constant, or StepLR(lr_step, lr_gamma) over the batch's iterations
# restarted every batch (MELO's driver, which the ELDER authors' README says to run)
LR_SCHEDULES = ("constant", "step")


@dataclass
class ElderConfig:
    """ELDER's hyper-parameters: the paper's values (spec section 5) and, where the paper is silent, the
    readings of the authors' layer code (JiaangL/ELDER peft_egg/src/peft/tuners/elder.py) or MELO's
    driver; experiment=elder_authors sets all of them the authors' way (README, "Does ELDER reproduce?")."""

    layers: List[int]  # the L layers whose FFN input projection gets N LoRAs (conf/editor/elder.yaml)
    query_layer: int  # the layer whose FFN input at the query token the routers read; below every ELDER layer
    rank: int = 8
    num_loras: int = 4  # N
    top_k: int = 2  # k
    alpha: float = 8.0  # not stated in the paper; the authors' layer code defaults to 8 (scaling 1 at r=8)
    epsilon: int = 12  # deferral: a code at Hamming distance >= epsilon from every stored code is a task input
    guide_lambda: float = 1e-2
    aux_loss: str = "guided"  # guided | none | load_balance (the paper's Table 4 ablations)
    lr: float = 1e-4
    iterations: int = 50
    batch_size: int = 4
    deferral: bool = True
    reset_optimizer: bool = False  # true: a new Adam for every edit batch (MELO's driver)
    lr_schedule: str = "constant"  # step: StepLR(lr_step, lr_gamma) over each batch's iterations (MELO's driver)
    lr_step: int = 20
    lr_gamma: float = 0.5
    prefix_cache: bool = True  # replay the frozen blocks below the query layer during a batch (bit-identical, faster)
    code_snapshot: str = "last_iteration"  # codes from the last iteration's forward (authors' code) | after_training
    lora_init: str = "authors"  # A Kaiming-uniform on the authors' (d_in, r) tensor: fan-in r | peft: fan-in d_in
    # the router reads the last prompt token | sequence_last: the last token as fed (authors' key_id=-1):
    # under teacher forcing, the last target token
    key_position: str = "prompt_last"
    seed: int = 0  # routers, LoRAs and preset allocations


class ElderEditor(Editor):
    """Mixture-of-LoRA lifelong editor. Its state: the LoRAs and routers (registered), and as extra
    state the stored codes, the preset allocations and the optimizer."""

    Config = ElderConfig

    def __init__(self, model: LoadedModel, config: ElderConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        layers = list(c.layers)
        L, N = len(layers), c.num_loras
        self._validate(model, layers, c.query_layer, N, c.top_k, c.epsilon, c.aux_loss)
        for key, value, allowed in (("code_snapshot", c.code_snapshot, CODE_SNAPSHOTS),
                                    ("lr_schedule", c.lr_schedule, LR_SCHEDULES), ("lora_init", c.lora_init, LORA_INITS)):
            if value not in allowed:
                raise ConfigError(f"editor.{key} must be one of {allowed}, got {value!r}")
        check_positive("lr", c.lr)
        if c.lr_step < 1 or not 0 < c.lr_gamma <= 1:
            raise ConfigError(f"editor.lr_step must be >= 1 and editor.lr_gamma in (0, 1], "
                              f"got {c.lr_step} and {c.lr_gamma}")
        self.checked_key_position(c.key_position)
        self.layers = layers
        self._editing = False  # routers route every input while a batch trains (no deferral)

        device = next(model.model.parameters()).device
        query_module = model.ffn_module(c.query_layer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            routers = Routers(L, layer_dims(query_module)[0], N, c.top_k).to(device)
            self.adapters: list[MixtureOfLoRA] = []  # in the model, not registered here: they hold base layers
            for index, layer in enumerate(layers):
                adapter = MixtureOfLoRA(model.ffn_module(layer), index, N, c.rank, c.alpha, self._current_routes,
                                        c.lora_init)
                replace_module(model.model, model.ffn_name(layer), adapter)
                self.adapters.append(adapter)
        self.experts = nn.ModuleList(a.experts for a in self.adapters)
        self.routers = routers
        self.query = SequenceQuery(query_module, on_query=self._route)
        # blocks below the query layer are frozen and see the same batch in every iteration
        self.prefix = frozen_prefix(model, c.prefix_cache, c.query_layer)
        self.allocator = PresetAllocator(L, N, c.top_k, c.seed)
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
        if not self._editing and self.config.deferral:
            dist = min_hamming(routes.codes(self.config.num_loras), self.stored_codes)
            routes.active = dist < self.config.epsilon  # nearest code at least epsilon away: a task input
        return routes

    def query_site(self) -> str | None:
        return self.ffn_input_site(self.config.query_layer)  # below every ELDER layer (_validate)

    def codes_for(self, prompts: Sequence[str]) -> torch.Tensor:
        """Allocation codes (B, L*N) of prompts, as stored and compared at inference."""
        return self.routes_for(prompts).codes(self.config.num_loras).cpu()

    # --- editing ---------------------------------------------------------------------------
    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.parameters()), lr=self.config.lr)

    def _batch_schedule(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        c = self.config
        if c.lr_schedule == "constant":
            return None
        for group in self.optimizer.param_groups:  # StepLR starts from each group's initial_lr
            group["initial_lr"] = c.lr
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=c.lr_step, gamma=c.lr_gamma)

    def _aux(self, routes: Routes, preset: torch.Tensor) -> torch.Tensor:
        if self.config.aux_loss == "guided":
            return guided_loss(routes, preset)
        if self.config.aux_loss == "load_balance":
            return load_balancing_loss(routes)
        return routes.log_scores.new_zeros(())

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        device = next(self.model.parameters()).device
        batch = encode_pairs(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests]).to(device)
        # (B, L, k), by fact: every phrasing (and revisit) of one fact shares its allocation (ELDER's
        # "identically labeled edits"); by default each request is its own fact (fact = uid)
        preset = self.allocator.batch([r.fact for r in requests])
        if c.reset_optimizer:
            self.optimizer = self._new_optimizer()
        schedule = self._batch_schedule()
        parts = {"lm": torch.zeros(()), "aux": torch.zeros(()), "codes": torch.zeros(0, dtype=torch.bool)}

        def loss() -> torch.Tensor:  # the LM loss plus the guided loss; keeps this iteration's codes
            with self.batch_scope(batch):
                parts["lm"] = target_logits(self.model, batch).loss()
                routes = self.query.derived
                parts["aux"] = self._aux(routes, preset)  # type: ignore[arg-type]
                parts["codes"] = routes.codes(c.num_loras).cpu()  # type: ignore[union-attr]
            return parts["lm"] + c.guide_lambda * parts["aux"]

        with replaying(self.prefix):
            self._editing = True
            try:
                optimise(self.optimizer, c.iterations, loss, scheduler=schedule)
            finally:
                self._editing = False
                for group in self.optimizer.param_groups:  # the schedule is per batch: leave lr as configured
                    group["lr"] = c.lr
            codes = parts["codes"]
            if c.code_snapshot == "after_training":
                with torch.no_grad(), self.batch_scope(batch):
                    target_logits(self.model, batch)
                    codes = self.query.derived.codes(c.num_loras).cpu()  # type: ignore[union-attr]
        self.stored_codes = torch.cat([self.stored_codes, codes])
        return EditStats(loss=float(parts["lm"].detach()), iterations=c.iterations,
                         extra={"aux_loss": float(parts["aux"].detach())})

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=min(self.layers), passes=self.config.iterations)

    def stored_params(self) -> int:
        return self.stored_codes.numel()  # one bit each; counted as numbers, as GRACE's keys are

    def get_extra_state(self) -> dict[str, Any]:
        return {"stored_codes": self.stored_codes, "allocator": self.allocator.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stored_codes = state["stored_codes"].clone()
        self.allocator.load_state_dict(state["allocator"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])

    def write_artifacts(self, run_dir: Path, requests: Sequence[EditRequest], retention_data_dir: str) -> None:
        """Figure 4's input: allocation codes of paraphrase groups and NQ inputs (elder.codes_dump)."""
        dump_codes(self, requests, retention_data_dir, run_dir / "codes.npz")
