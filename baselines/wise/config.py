"""WISE's hyper-parameters (the authors' file and line for each: docs/editor_wise.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING


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
