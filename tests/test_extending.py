"""What the "Extending" section of docs/development.md promises: a new editor is one module and one YAML, a new model
is one YAML, and the packages import one another in one direction only."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from hydra.utils import instantiate

from evaluation.run.compose import compose_config
from evaluation.run.experiment import build, run_experiment
from tests.conftest import REPO

TOY_MODULE = '''
"""A toy editor: a rank-4 update added to one FFN layer's output, trained on each batch."""
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from evaluation.editing.editor import Editor, EditStats, optimise
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.models import layer_dims, replace_module


@dataclass
class ToyConfig:
    layer: int
    rank: int = 4
    lr: float = 1e-2
    iterations: int = 40
    batch_size: int = 1


class LowRank(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(d_in, rank) / d_in ** 0.5)
        self.B = nn.Parameter(torch.zeros(rank, d_out))


class UpdatedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, update: LowRank) -> None:
        super().__init__()
        self.base_layer, self.update = base_layer, update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + x @ self.update.A @ self.update.B


class ToyEditor(Editor):
    Config = ToyConfig

    def __init__(self, model: Any, config: ToyConfig | None = None, **fields: Any) -> None:
        super().__init__(model, config, **fields)
        base = model.ffn_module(self.config.layer)
        self.update = LowRank(*layer_dims(base), self.config.rank)  # registered: the editor's whole state
        # the wrapper holds the base layer, so it goes into the model, not onto the editor
        replace_module(model.model, model.ffn_name(self.config.layer), UpdatedLayer(base, self.update))

    def edit(self, requests: Sequence[Any]) -> EditStats:
        batch = encode_pairs(self.tokenizer, [r.prompt for r in requests], [r.target for r in requests])
        losses = optimise(torch.optim.Adam(self.parameters(), lr=self.config.lr), self.config.iterations,
                          lambda: self.batch_loss(batch))
        return EditStats(loss=losses[-1], iterations=len(losses))
'''

TOY_YAML = """
defaults:
  - /toy_schema
_target_: toy_editor.ToyEditor
layer: ${at_depth:3,4}
"""

NEW_MODEL_YAML = """
defaults:
  - /random_schema
name: tiny_llama_24
architecture: llama
config: {num_hidden_layers: 24, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2,
         num_key_value_heads: 2, max_position_embeddings: 512}
ffn_template: model.layers.{i}.mlp.down_proj
block_template: model.layers.{i}
num_layers: 24
"""


def _toy_editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "toy_editor.py").write_text(textwrap.dedent(TOY_MODULE))
    (tmp_path / "conf" / "editor").mkdir(parents=True)
    (tmp_path / "conf" / "editor" / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "conf"


def test_a_new_editor_is_a_module_and_a_yaml_and_runs_through_the_stream(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    conf = _toy_editor(tmp_path, monkeypatch)
    overrides = ["editor=toy", "model=tiny_llama", "dataset.num_edits=1", "retention=none", "logger=none",
                 "progress=false", "checkpoint.every=0"]
    cfg = compose_config(overrides, config_dirs=[conf])
    assert cfg.editor.layer == 6 and cfg.editor.iterations == 40  # relative depth 3/4 of 8; the dataclass default
    result = run_experiment(cfg, tmp_path / "run", {"editor": "toy", "model": "tiny_llama", "dataset": "zsre"})
    assert result["metrics"]["reliability"] == 1.0  # the one edit is learned
    d_ffn, d = cfg.model.config.intermediate_size, cfg.model.config.hidden_size
    assert result["metrics"]["trainable_params"] == 4 * (d_ffn + d)  # A and B, and nothing of the model


def test_a_toy_editors_state_is_what_it_registers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = _toy_editor(tmp_path, monkeypatch)
    cfg = compose_config(["editor=toy", "model=tiny_llama"], config_dirs=[conf])
    editor = build(cfg.editor, model=instantiate(cfg.model))
    assert list(editor.state_dict()) == ["update.A", "update.B"]  # the base model stays out
    with pytest.raises(Exception, match="lrr"):  # a misspelt setting fails when the config is composed
        compose_config(["editor=toy", "model=tiny_llama", "editor.lrr=1"], config_dirs=[conf])


@pytest.mark.parametrize("editor", ["elder", "grace", "melo", "defer", "ft_l", "rome"])
def test_a_new_model_is_one_yaml(tmp_path: Path, editor: str) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny_llama_24.yaml").write_text(NEW_MODEL_YAML)
    cfg = compose_config([f"editor={editor}", "model=tiny_llama_24"], config_dirs=[tmp_path])
    layers = {"elder": ("query_layer", 15, "layers", list(range(16, 22))), "melo": ("query_layer", 18, "layers", [19, 20]),
              "grace": ("layer", 20), "defer": ("layer", 20), "ft_l": ("layer", 4), "rome": ("layer", 4)}[editor]
    for key, value in zip(layers[::2], layers[1::2]):
        assert cfg.editor[key] == value, key  # the authors' relative depth on 24 layers
    built = build(cfg.editor, model=instantiate(cfg.model))  # every layer exists and passes the editor's checks
    assert not any(name.startswith("model.") for name in built.state_dict())


def test_random_shape_models_take_their_real_models_layers() -> None:
    for editor, key in (("elder", "layers"), ("grace", "layer"), ("melo", "layers"), ("rome", "layer")):
        real, shaped = (compose_config([f"editor={editor}", f"model={m}"]).editor for m in ("gpt2xl", "gpt2xl_random"))
        assert real[key] == shaped[key], editor


# --- the package map -------------------------------------------------------------------------------
PACKAGES = ("evaluation.common", "evaluation.editing", "evaluation.retention", "evaluation.run",
            "evaluation.reporting", "data", "elder", "baselines", "benchmarks")


def _package(module: str) -> str | None:
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), None)


def _imports() -> dict[str, set[str]]:
    """package -> the packages its modules import (every import statement, also inside functions)."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for path in REPO.glob("**/*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "tests", "outputs") or len(rel.parts) == 1:
            continue
        source = _package(".".join(rel.with_suffix("").parts))
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                target = _package(name)
                if target and target != source:
                    graph[source].add(target)
    return graph


def test_packages_import_in_one_direction() -> None:
    graph = _imports()
    for package in ("evaluation.common", "evaluation.editing", "evaluation.retention", "evaluation.run",
                    "evaluation.reporting", "data"):
        assert not graph[package] & {"elder", "baselines", "benchmarks"}, (package, graph[package])
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:  # depth-first: a package met again on its own path is a cycle
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node not in done:
            for nxt in sorted(graph[node]):
                visit(nxt, (*path, node))
            done.add(node)

    for package in PACKAGES:
        visit(package, ())


def test_no_module_over_400_lines() -> None:
    long = [f"{p.relative_to(REPO)} ({n})" for p in REPO.glob("*/**/*.py") if p.relative_to(REPO).parts[0]
            in ("evaluation", "elder", "baselines", "data") for n in [len(p.read_text().splitlines())] if n > 400]
    assert not long, long
