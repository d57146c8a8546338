"""WISE (Wang et al., NeurIPS 2024): a side memory beside one FFN matrix, knowledge shards, activation routing.

A copy of one FFN matrix (LLaMA: ``down_proj``; GPT-2: ``c_fc``, as the authors' hparams) is the *side memory*;
the model's own matrix (the *main memory*) is never written. Each edit batch trains the working side memory
with SGD on the edit's loss plus the routing margins, with its gradient masked by a random mask drawn once per
shard of ``save_freq`` edits (``mask_ratio`` of the entries: knowledge sharding). Every ``save_freq`` edits the
shard is put away and a fresh one starts from the main memory; every ``merge_freq`` edits the put-away shards
are merged (TIES by default, ``merge_alg``) relative to the main memory. A router compares side and main
activations: the activation score of an input is the mean over its tokens of
``||act(A(x) W_side) - act(A(x) W_main)||`` (``act`` = the model's FFN activation), and an input whose score
stays under the threshold ``act_ratio * min(in-scope score recorded at the end of each edit)`` uses the main
memory: the unedited output, bit for bit. Training pushes edit inputs' scores over ``beta``, an unrelated
input's under ``alpha`` and their gap over ``gamma`` (the margin losses).

``retrieve=true`` (WISE-Retrieve; the authors' llama-7b.yaml): every shard (and every merged group) stays a
memory of its own with its own threshold; an input takes the memory with the highest score above that
memory's threshold (the working shard first). ``retrieve=false`` (WISE-Merge): one merged side memory plus the
working shard, one threshold, the higher-scoring of the two above it.

Follows EasyEdit ``easyeditor/models/wise/WISE.py`` (WISE, WISEAdapter, euc, merge/gta.py), ``utils.py``
(tokenize, get_context_templates, EarlyStopMeter, EditingMeanAct) and ``hparams/WISE/{llama-7b,gpt2-xl}.yaml``
(zjunlp/EasyEdit @ 14cea82). Departures (docs/editor_wise.md has the list with reasons):

* the route is per sequence and read from its prompt: the score is averaged over each row's real tokens up to
  its key token (``key_position``: ``prompt_last`` by default; ``sequence_last`` = every token as fed, the
  authors' teacher-forced reading); a generation's decoding steps reuse the prompt's route (the authors
  re-route every forward, and their ``.item()`` needs batch size 1). Padding is never averaged (the authors'
  training rows average their pad tokens too); the margins and the recorded activation use the same span;
* WISE-Merge does not fold the working shard into the merged memory as a side effect of inference (the
  authors' ``WISE.__call__``): inference reads the memories that fold would give, without changing the state;
* the unrelated input of the margin loss (the authors' ``loc_prompt``, ZsRE train's NQ questions, not here)
  is the i-th text of ``loc_corpus`` for the i-th edit (default: CounterFact train facts, never an edit or a
  probe of the stream);
* memories of a Conv1D model (GPT-2) are applied as Conv1D (the authors' ``F.linear`` of a retrieved memory
  fails on GPT-2, EasyEdit issue #345);
* the shard masks come from the editor's seeded generator (the authors' global ``np.random``); the context
  prefixes are generated per seed word without padding; the edit loss is each row's mean target-token loss
  (the authors' denominator counts one prompt token and any pad tokens too); several requests per batch get
  one margin loss each, averaged; ``replay`` and the slerp/linear merges are not carried (off in every hparams).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.checks import check_choice, check_layer, check_positive
from evaluation.editing.editor import Editor, EditStats, FloorSpec
from evaluation.editing.encoding import IGNORE, EncodedBatch, encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel, model_device, replace_module
from evaluation.editing.prefix_cache import frozen_prefix, replaying
from evaluation.editing.query import MaskedSequenceQuery, prompt_span

#: merge_alg -> (sparsify, consensus, normalize): the GTA instances of the authors' WISE.py ``merge_dict``
MERGE_ALGS: dict[str, tuple[Optional[str], Optional[str], bool]] = {
    "ties": ("magnitude", "sum", True),
    "magnitude_norm": ("magnitude", None, True),
    "magnitude": ("magnitude", None, False),
    "sign": (None, "sum", True),
    "dare_ties": ("rescaled_random", "sum", False),
    "dare_linear": ("random", None, False),
}
#: the authors' get_context_templates seed words; each is continued greedily for each of template_lengths
SEED_WORDS = ("I", "You", "Because", "Yes", "Q: ")
MAIN = -1  # route: the main memory (the unedited layer)
NO_EDIT = 1e9  # the authors' EditingMeanAct(min_a=1e9): a shard without edits routes nothing to itself


# --- merging (the authors' merge/gta.py) -------------------------------------------------------------
def _sparsify(delta: torch.Tensor, method: Optional[str], density: float, generator: torch.Generator) -> torch.Tensor:
    if method is None or density >= 1:
        return delta
    if method == "magnitude":  # keep the largest |delta|
        k = int(density * delta.numel())
        if k <= 0:
            raise ConfigError(f"editor.densities={density} keeps no entry of a {delta.numel()}-entry matrix")
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[delta.abs().flatten().topk(k).indices] = 1
        return delta * mask.view_as(delta)
    keep = torch.bernoulli(torch.full(delta.shape, density), generator=generator).to(delta)
    return delta * keep / density if method == "rescaled_random" else delta * keep


def gta_merge(weights: Sequence[float], base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float,
              alg: str, generator: torch.Generator) -> torch.Tensor:
    """``base`` plus the merged task vectors ``tensors - base`` (sparsified, sign-elected, weighted)."""
    sparsify, consensus, normalize = MERGE_ALGS[alg]
    deltas = torch.stack([_sparsify(t - base, sparsify, density, generator) for t in tensors])
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, 1, 1)
    weighted = deltas * w
    if consensus is not None:  # TIES's "sum" election: keep the entries whose sign agrees with the total's
        majority = (weighted.sum(0) >= 0).to(deltas.dtype) * 2 - 1
        mask = (weighted.sign() == majority).to(deltas.dtype)
        mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(weighted[0]).clone()
        divisor[divisor.abs() < 1e-8] = 1
    return base + (mixed / divisor if normalize else mixed)


# --- routing ---------------------------------------------------------------------------------------
@dataclass
class MemoryRoute:
    """Which memory each sequence uses: an index into the editor's candidate memories, MAIN where none."""

    memory: torch.Tensor  # (B,) long
    active: torch.Tensor  # (B,) bool: False = the main memory, bit for bit


class ActivationQuery(MaskedSequenceQuery):
    """The per-sequence query of WISE: each row's activation scores against every candidate side memory,
    averaged over its real tokens up to its query position (the kept attention mask says which are real), on
    the first forward of a scope only, so generation's decoding steps keep the prompt's route."""

    def __init__(self, stack: nn.Module, layer: nn.Module,
                 score: Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor],
                 on_query: Callable[[torch.Tensor], object]) -> None:
        super().__init__(stack, layer, on_query=on_query)
        self._score = score

    def read(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._score(x, self.padding(x), positions)


class SideMemoryLayer(nn.Module):
    """The edited matrix's place in the model: ``apply(x, base_layer(x))`` (the editor picks main or side)."""

    def __init__(self, base_layer: nn.Module, apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.base_layer, self.apply = base_layer, apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.base_layer(x))


# --- the editor ----------------------------------------------------------------------------------
@dataclass
class WISEConfig:
    """WISE's hyper-parameters. Defaults: EasyEdit hparams/WISE/llama-7b.yaml (LLaMA-2-7B) and the constants of
    easyeditor/models/wise/WISE.py; GPT2-XL's in conf/editor_model/wise_gpt2xl.yaml."""

    layer: int  # the FFN matrix that gets a side memory (llama-7b.yaml: layers[27].mlp.down_proj; relative depth)
    mask_ratio: float = 0.2  # share of the side memory's entries one shard trains
    lr: float = 1.0  # edit_lr (SGD)
    iterations: int = 70  # n_iter (gpt2-xl.yaml: 40)
    weight_decay: float = 1e-5  # WISE.py's SGD(weight_decay=1e-5): decays every entry, masked or not
    norm_constraint: Optional[float] = 1.0  # clamp the side memory to main +- this after every step; None: off
    alpha: float = 5.0  # act_margin[0]: an unrelated input's score is pushed under alpha
    beta: float = 20.0  # act_margin[1]: an edit input's score is pushed over beta
    gamma: float = 10.0  # act_margin[2]: and over the unrelated input's score by gamma
    act_ratio: float = 0.88  # threshold = act_ratio * min recorded in-scope score (gpt2-xl.yaml: 0.8)
    save_freq: int = 500  # edit batches per shard (one gradient mask each)
    merge_freq: int = 1000  # edit batches between merges (a multiple of save_freq, as the authors assert)
    merge_alg: str = "ties"  # ties | magnitude_norm | magnitude | sign | dare_ties | dare_linear
    densities: float = 0.53  # share of each task vector a magnitude/random sparsification keeps
    weights: float = 1.0  # total weight of the merged shards
    retrieve: bool = True  # WISE-Retrieve (llama-7b.yaml); false: WISE-Merge
    early_stop: bool = True  # the authors' EarlyStopMeter: stop once the loss is <= 0.02 and moved <= 1e-4
    # an input with more scored tokens than this is scored by its highest token (the authors' euc(infer=True)
    # for sequences over 100 tokens); None: always the mean
    long_input_tokens: Optional[int] = 100
    # new-token counts of the context prefixes the edit is also trained under (get_context_templates'
    # length_params [[5, 5], [10, 5]]: each seed word continued greedily once per length); []: the bare prompt only
    template_lengths: List[int] = field(default_factory=lambda: [5, 10])
    # unrelated texts for the margin loss, the i-th for the i-th edit: a CounterFact/ZsRE-format .json
    # ("prompt ground_truth" / "loc loc_ans"), a .txt (one per line) or a .jsonl ({"text": ...})
    loc_corpus: str = MISSING
    batch_size: int = 1  # WISE edits one request at a time
    prefix_cache: bool = True  # replay the frozen blocks below the layer during an edit (exact, faster)
    # the scored tokens end at the last prompt token | sequence_last: the last token as fed (teacher forcing:
    # the last target token, the authors' reading)
    key_position: str = "prompt_last"
    seed: int = 0  # shard masks (and dare merges)


def read_loc_corpus(path: str) -> list[str]:
    """The unrelated texts of ``loc_corpus`` (see WISEConfig)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"editor.loc_corpus={path} does not exist (a .json of CounterFact/ZsRE records, a .txt "
                          f"with one text per line, or a .jsonl with a 'text' field)")
    suffix = p.suffix.lower()
    if suffix == ".json":
        texts = []
        for r in json.loads(p.read_text(encoding="utf-8")):
            if "loc" in r and "loc_ans" in r:  # the authors' ZsRE train records
                texts.append(f"{str(r['loc']).strip()} {str(r['loc_ans']).strip()}")
            elif "prompt" in r and "ground_truth" in r:  # CounterFact (EasyEdit's flat format)
                truth = r["ground_truth"][0] if isinstance(r["ground_truth"], list) else r["ground_truth"]
                texts.append(f"{str(r['prompt']).strip()} {str(truth).strip()}")
            else:
                raise ConfigError(f"editor.loc_corpus={path}: a record has neither loc/loc_ans nor prompt/ground_truth")
    elif suffix in (".txt", ".jsonl"):
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [str(json.loads(line)["text"]).strip() for line in lines] if suffix == ".jsonl" else lines
    else:
        raise ConfigError(f"editor.loc_corpus must be a .json, .txt or .jsonl file, got {path}")
    texts = [t for t in texts if t]
    if not texts:
        raise ConfigError(f"editor.loc_corpus={path} holds no text")
    return texts


class WISEEditor(Editor):
    """WISE behind the shared Editor interface. State: the working side memory and its shard mask (registered);
    the put-away / merged memories, their thresholds, the counters, the generator and the context prefixes
    (extra state)."""

    Config = WISEConfig

    def __init__(self, model: LoadedModel, config: WISEConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        c = self.config
        self._validate(model)
        base = model.ffn_module(c.layer)
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ConfigError(f"editor.layer={c.layer}: {model.ffn_name(c.layer)} is a {type(base).__name__}; WISE "
                              f"needs a Linear or Conv1D matrix (the model's ffn_template)")
        self._conv = isinstance(base, Conv1D)
        self._bias = None if base.bias is None else base.bias.detach().float()
        self.main = base.weight.detach().float()  # the main memory (the model's, never written; not state)
        act_name = getattr(model.model.config, "hidden_act", None) or getattr(model.model.config,
                                                                             "activation_function", None)
        if act_name not in ACT2FN:
            raise ConfigError(f"model '{model.name}': its FFN activation {act_name!r} is not one transformers knows")
        self._act = ACT2FN[act_name]
        self.loc_texts = read_loc_corpus(c.loc_corpus)

        self.working = nn.Parameter(self.main.clone(), requires_grad=False)  # the authors' new_weight
        self.register_buffer("weight_mask", torch.zeros(self.main.shape, dtype=torch.bool, device=self.main.device))
        self.memories: list[torch.Tensor] = []  # retrieve: every memory; merge: shards awaiting the merge
        self.memory_min_act: list[float] = []  # retrieve: each memory's min recorded in-scope score
        self.merged: torch.Tensor | None = None if c.retrieve else self.main.clone()  # merge: the merged memory
        self.min_act = NO_EDIT  # the working shard's (retrieve) or every edit's (merge) min in-scope score
        self.batches_done = 0  # the authors' editing_total_cnt (edit() calls)
        self.requests_done = 0  # which loc_corpus text the next request takes
        self.merge_count = 0
        self.prefixes: list[str] | None = None  # "" + the generated context prefixes (made at the first edit)
        self.generator = torch.Generator().manual_seed(c.seed)

        adapter = SideMemoryLayer(base, self._apply)
        replace_module(model.model, model.ffn_name(c.layer), adapter)
        self.adapters = [adapter]  # in the model, not registered here: it holds the base layer
        self.query = ActivationQuery(model.model.base_model, adapter, self._score, self._route)
        self.prefix = frozen_prefix(model, c.prefix_cache, c.layer)
        self._train: dict[str, Any] | None = None  # edit(): the training forward's per-token distances
        self._view: tuple[int, list[torch.Tensor], list[float]] | None = None  # cached candidates (merge mode)

    def _validate(self, model: LoadedModel) -> None:
        c = self.config
        check_layer(model, "layer", c.layer)
        check_choice("merge_alg", c.merge_alg, tuple(MERGE_ALGS))
        self.checked_key_position(c.key_position)
        for key in ("lr", "iterations", "act_ratio", "save_freq", "merge_freq", "weights", "batch_size"):
            check_positive(key, getattr(c, key))
        for key in ("mask_ratio", "densities"):
            if not 0 < getattr(c, key) <= 1:
                raise ConfigError(f"editor.{key} must be in (0, 1], got {getattr(c, key)}")
        if c.merge_freq % c.save_freq:
            raise ConfigError(f"editor.merge_freq={c.merge_freq} must be a multiple of editor.save_freq={c.save_freq}")
        if c.weight_decay < 0:
            raise ConfigError(f"editor.weight_decay must be >= 0, got {c.weight_decay}")
        for key in ("norm_constraint", "long_input_tokens"):
            if getattr(c, key) is not None:
                check_positive(key, getattr(c, key))
        if any(int(n) <= 0 for n in c.template_lengths):
            raise ConfigError(f"editor.template_lengths must be positive token counts, got {list(c.template_lengths)}")

    # --- the matrices --------------------------------------------------------------------------
    def _side(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's output with ``weight`` in place of its own (float32)."""
        x = x.float()
        if self._conv:  # Conv1D stores (in, out)
            y = x @ weight
            return y + self._bias if self._bias is not None else y
        return F.linear(x, weight, self._bias)

    def _distance(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token activation distance ||act(x W_side) - act(x W_main)|| (the authors' euc)."""
        return (self._act(self._side(x, weight)) - self._act(y.float())).norm(dim=-1)

    def candidates(self) -> tuple[list[torch.Tensor], list[float]]:
        """The side memories a route may pick, and their thresholds (act_ratio * min recorded score)."""
        r = self.config.act_ratio
        if self.config.retrieve:
            return [self.working.detach(), *self.memories], [r * self.min_act] + [r * a for a in self.memory_min_act]
        if self._view is None or self._view[0] != self.batches_done:
            merged, working = self._merge_view()
            self._view = (self.batches_done, [merged, working], [r * self.min_act])
        return self._view[1], self._view[2]

    def _merge_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """WISE-Merge's (merged, working) memories as the authors' inference sees them: past one shard, their
        ``WISE.__call__`` first folds the working shard and any waiting ones into the merged memory. Read here
        without changing the state (a copy of the generator for the random merges)."""
        assert self.merged is not None
        working = self.working.detach()
        if self.batches_done < self.config.save_freq:
            return self.merged, working
        pending = list(self.memories) + ([working] if not torch.equal(working, self.main) else [])
        if not pending:
            return self.merged, working
        generator = torch.Generator().set_state(self.generator.get_state())
        return self._merge_into_side(pending, generator), self.main

    def _merge_into_side(self, shards: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The authors' WISEAdapter.merge_weight (retrieve=False): the first merge weighs the shards alone; later
        ones give the shards 0.4 and the merged memory 0.6."""
        c = self.config
        assert self.merged is not None
        if torch.equal(self.merged, self.main):
            return gta_merge([c.weights / len(shards)] * len(shards), self.main, shards, c.densities, c.merge_alg,
                             generator)
        return gta_merge([0.4 / len(shards)] * len(shards) + [0.6], self.main, [*shards, self.merged], c.densities,
                         c.merge_alg, generator)

    # --- routing -------------------------------------------------------------------------------
    @staticmethod
    def _mean(dist: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        span = span.to(dist.device)
        return torch.where(span, dist, 0).sum(-1) / span.sum(-1).clamp(min=1)

    @torch.no_grad()
    def _score(self, x: torch.Tensor, mask: Optional[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """(B, M) each row's activation score against each candidate memory."""
        y = self.adapters[0].base_layer(x)
        span = prompt_span(positions, x.shape[1], mask).to(x.device)
        long_rows = (span.sum(-1) > self.config.long_input_tokens if self.config.long_input_tokens is not None
                     else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        scores = []
        for weight in self.candidates()[0]:
            dist = self._distance(x, y, weight)
            top = dist.masked_fill(~span, -math.inf).amax(-1)
            scores.append(torch.where(long_rows, top, self._mean(dist, span)))
        return torch.stack(scores, -1)

    def _route(self, scores: torch.Tensor) -> MemoryRoute:
        """The authors' choice (WISEAdapter.forward) from (B, M) scores."""
        _, thresholds = self.candidates()
        B = scores.shape[0]
        if self.config.retrieve:  # working shard if over its threshold; a memory that beats the best and its own
            memory = torch.where(scores[:, 0] >= thresholds[0], 0, MAIN)
            best = scores[:, 0].clone()
            for i in range(1, scores.shape[1]):
                take = (scores[:, i] > best) & (scores[:, i] > thresholds[i])
                memory = torch.where(take, i, memory)
                best = torch.where(take, scores[:, i], best)
        else:  # merged (0) or working (1): the higher, unless both are under the threshold
            under = (scores[:, 0] < thresholds[0]) & (scores[:, 1] < thresholds[0])
            memory = torch.where(under, MAIN, torch.where(scores[:, 0] > scores[:, 1], 0, 1))
        memory = memory.to(device=scores.device, dtype=torch.long).view(B)
        return MemoryRoute(memory, memory != MAIN)

    def _current(self) -> MemoryRoute | None:
        derived = self.query.derived
        return derived if isinstance(derived, MemoryRoute) else None

    def _apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output: the working side memory for every row while an edit trains (the authors'
        ``editing`` branch); else each routed row's memory, and the main memory's own output elsewhere."""
        if self._train is not None:
            side = self._side(x, self.working)
            with torch.no_grad():
                main_act = self._act(y.float())
            self._train["dist"] = (self._act(side) - main_act).norm(dim=-1)
            return side.to(y.dtype)
        route = self._current()
        if route is None or not bool(route.active.any()):
            return y
        active, memory = route.active.to(y.device), route.memory.to(y.device)
        weights = self.candidates()[0]
        out = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        for m in memory[active].unique().tolist():
            rows = active & (memory == m)
            out[rows] = self._side(x[rows], weights[m])
        return torch.where(active[:, None, None], out.to(y.dtype), y)

    def scope(self, query_positions: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        return self.query.scope(query_positions)

    def query_site(self) -> str | None:
        return None  # the scores depend on the side memories, which every edit changes

    # --- editing -------------------------------------------------------------------------------
    def context_prefixes(self) -> list[str]:
        """"" and the context prefixes (the authors' get_context_templates: each seed word continued greedily by
        the unedited model), generated once at the first edit and kept in the state."""
        if self.prefixes is None:
            tok, device = self.tokenizer, model_device(self.model)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            made = []
            for length in self.config.template_lengths:
                for word in SEED_WORDS:
                    ids = torch.tensor([tok(word).input_ids], device=device)
                    with torch.no_grad():  # outside any scope: the unedited model
                        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                  max_new_tokens=int(length), do_sample=False, pad_token_id=pad)
                    made.append(tok.decode(out[0], skip_special_tokens=True).strip())
            self.prefixes = [""] + made
        return self.prefixes

    def _training_batch(self, requests: Sequence[EditRequest]) -> tuple[EncodedBatch, torch.Tensor, int]:
        """Every request under every prefix (its target as labels), then one unrelated text per request (no
        labels). Returns the batch, the (R, T) scored span of each row and the number of prefixes."""
        prefixes = self.context_prefixes()
        prompts = [f"{p} {r.prompt}" if p else r.prompt for r in requests for p in prefixes]
        edits = encode_pairs(self.tokenizer, prompts, [r.target for r in requests for _ in prefixes])
        n = len(self.loc_texts)
        locs = [self.tokenizer(self.loc_texts[(self.requests_done + i) % n]).input_ids for i in range(len(requests))]
        width = max(edits.input_ids.shape[1], *(len(ids) for ids in locs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(t, (0, width - t.shape[1]), value=value)

        loc_ids = torch.full((len(locs), width), pad, dtype=torch.long)
        loc_mask = torch.zeros((len(locs), width), dtype=torch.long)
        for i, ids in enumerate(locs):
            loc_ids[i, :len(ids)], loc_mask[i, :len(ids)] = torch.tensor(ids), 1
        batch = EncodedBatch(
            torch.cat([widen(edits.input_ids, pad), loc_ids]),
            torch.cat([widen(edits.attention_mask, 0), loc_mask]),
            torch.cat([widen(edits.labels, IGNORE), torch.full((len(locs), width), IGNORE, dtype=torch.long)]),
            torch.cat([edits.query_positions, torch.tensor([len(ids) - 1 for ids in locs])]),
        )
        ends = torch.cat([edits.key_positions(self.key_position), batch.query_positions[len(prompts):]])
        span = prompt_span(ends, width, batch.attention_mask)
        device = model_device(self.model)
        return batch.to(device), span.to(device), len(prefixes)

    def _losses(self, batch: EncodedBatch, span: torch.Tensor, n_req: int, n_pre: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(edit loss, margin loss, per-row scores) of one training forward."""
        c = self.config
        assert self._train is not None
        logits = target_logits(self.model, batch)
        ce = F.cross_entropy(logits.logits.float(), logits.targets, reduction="none")
        rows = n_req * n_pre
        sums = torch.zeros(rows, device=ce.device).index_add(0, logits.rows, ce)
        counts = torch.bincount(logits.rows, minlength=rows).clamp(min=1)
        ft = (sums / counts).mean()  # each row's mean target-token loss, averaged over the rows
        scores = self._mean(self._train["dist"], span)  # (R,)
        margin = []
        for i in range(n_req):  # the authors' _cal_activation_loss for each request and its unrelated text
            inside, out = scores[i * n_pre:(i + 1) * n_pre], scores[rows + i:rows + i + 1]
            margin.append(_mean_positive(out.view(-1, 1) - inside + c.gamma) + _mean_positive(out - c.alpha)
                          + _mean_positive(c.beta - inside))
        return ft, torch.stack(margin).mean(), scores.detach()

    def edit(self, requests: Sequence[EditRequest]) -> EditStats:
        c = self.config
        if self.batches_done % c.save_freq == 0:  # a new shard: a new gradient mask
            self.weight_mask = (torch.rand(self.main.shape, generator=self.generator) < c.mask_ratio
                                ).to(self.weight_mask.device)
        batch, span, n_pre = self._training_batch(requests)
        n_req, rows = len(requests), len(requests) * n_pre
        optimizer = torch.optim.SGD([self.working], lr=c.lr, weight_decay=c.weight_decay)
        mask = self.weight_mask.to(self.working.dtype)
        pre, val = 0.0, 1e9  # the authors' EarlyStopMeter
        recorded: torch.Tensor | None = None
        steps, loss_value, ft_value, margin_value = 0, float("nan"), float("nan"), float("nan")
        self.working.requires_grad_(True)
        self._train = {}
        try:
            with replaying(self.prefix):
                for i in range(c.iterations):
                    ft, margin, scores = self._losses(batch, span, n_req, n_pre)
                    loss = ft + margin
                    loss_value, ft_value, margin_value = float(loss.detach()), float(ft.detach()), float(margin.detach())
                    if c.early_stop and abs(val - pre) <= 1e-4 and val <= 0.02:
                        recorded = scores
                        break
                    if i == c.iterations - 1:
                        recorded = scores  # the authors record before the last step
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    assert self.working.grad is not None
                    self.working.grad.mul_(mask)  # knowledge sharding: only this shard's entries learn
                    optimizer.step()
                    steps += 1
                    if c.norm_constraint is not None:
                        with torch.no_grad():
                            self.working.copy_(torch.clamp(self.working, self.main - c.norm_constraint,
                                                           self.main + c.norm_constraint))
                    pre, val = val, loss_value
        finally:
            self._train = None
            self.working.requires_grad_(False)
            self.working.grad = None
        assert recorded is not None
        in_scope = [float(recorded[i * n_pre:(i + 1) * n_pre].mean()) for i in range(n_req)]
        self.min_act = min([self.min_act, *in_scope])  # EditingMeanAct.min_act
        self.batches_done += 1
        self.requests_done += n_req
        if self.batches_done % c.save_freq == 0:
            self._save_shard()
        if self.batches_done % c.merge_freq == 0:
            self._merge_shards()
        self._view = None
        return EditStats(loss=loss_value, iterations=steps, extra={
            "edit_loss": ft_value, "margin_loss": margin_value, "in_scope_score": min(in_scope),
            "loc_score": float(recorded[rows:].max()), "threshold": c.act_ratio * self.min_act,
            "memories": float(len(self.memories)), "merges": float(self.merge_count)})

    def _save_shard(self) -> None:
        """The authors' save_weight: put the working shard away; a new one starts from the main memory."""
        self.memories.append(self.working.detach().clone())
        with torch.no_grad():
            self.working.copy_(self.main)
        if self.config.retrieve:
            self.memory_min_act.append(self.min_act)
            self.min_act = NO_EDIT

    def _merge_shards(self) -> None:
        """The authors' merge_weight: retrieve merges the last merge_freq/save_freq shards into one memory (its
        threshold the lowest of theirs); merge folds every waiting shard into the merged memory."""
        c = self.config
        if c.retrieve:
            n = c.merge_freq // c.save_freq
            merged = gta_merge([c.weights / n] * n, self.main, self.memories[-n:], c.densities, c.merge_alg,
                               self.generator)
            self.memories, low = self.memories[:-n] + [merged], min(self.memory_min_act[-n:])
            self.memory_min_act = self.memory_min_act[:-n] + [low]
        else:
            self.merged = self._merge_into_side(self.memories, self.generator)
            self.memories = []
        with torch.no_grad():
            self.working.copy_(self.main)
        self.merge_count += 1

    # --- accounting and state ------------------------------------------------------------------
    def floor_spec(self) -> FloorSpec:
        return FloorSpec(first_layer=self.config.layer, passes=self.config.iterations,
                         prompt_prefixes=tuple(self.context_prefixes()))

    def trainable_params(self) -> int:
        return self.working.numel()  # the side memory SGD trains

    def stored_params(self) -> int:
        kept = sum(m.numel() for m in self.memories)
        return kept + (self.merged.numel() if self.merged is not None else 0) + self.weight_mask.numel()

    def get_extra_state(self) -> dict[str, Any]:
        return {"memories": [m.clone() for m in self.memories], "memory_min_act": list(self.memory_min_act),
                "merged": None if self.merged is None else self.merged.clone(), "min_act": self.min_act,
                "batches_done": self.batches_done, "requests_done": self.requests_done,
                "merge_count": self.merge_count, "prefixes": None if self.prefixes is None else list(self.prefixes),
                "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.main.device
        self.memories = [m.to(device).clone() for m in state["memories"]]
        self.memory_min_act = list(state["memory_min_act"])
        self.merged = None if state["merged"] is None else state["merged"].to(device).clone()
        self.min_act = float(state["min_act"])
        self.batches_done, self.requests_done = int(state["batches_done"]), int(state["requests_done"])
        self.merge_count = int(state["merge_count"])
        self.prefixes = None if state["prefixes"] is None else list(state["prefixes"])
        self.generator.set_state(state["generator"])
        self._view = None


def _mean_positive(v: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries (0 when there are none), as the authors' margin terms."""
    pos = v > 0
    return torch.where(pos, v, 0).sum() / pos.sum() if bool(pos.any()) else v.new_zeros(())
