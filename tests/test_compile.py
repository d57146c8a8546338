"""``compile.enabled=true``: compiled decoder blocks give the eager run's edits, and bad settings are named.

The default tests trace with Dynamo's ``eager`` backend: Dynamo is where editors' hooks, adapters,
routing side effects and replay wrappers could be mis-traced (a hook added after the first trace was
one such case), and running its graphs eagerly is exact. The slow tests add AOTAutograd
(``aot_eager``) and inductor's generated kernels.
"""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from evaluation.common.errors import ConfigError
from evaluation.editing.compilation import compile_blocks
from evaluation.editing.unedited import Unedited
from evaluation.run.compose import compose_config
from evaluation.run.loggers import NullLogger
from evaluation.run.metrics import locality_inputs, predict
from evaluation.run.stream import run_stream
from tests.conftest import tiny_model, zsre_requests

FEW_STEPS = {"elder": ["editor.iterations=5"], "grace": ["editor.iterations=5"], "melo": ["editor.iterations=5"],
             "defer": ["editor.iterations=5"], "ft_l": ["editor.steps=5"]}


def _stream(editor_name: str, compile_conf: dict | None) -> tuple[dict, list[torch.Tensor]]:
    cfg = compose_config(["model=tiny_llama", f"editor={editor_name}", *FEW_STEPS[editor_name]])
    loaded = instantiate(cfg.model)
    if compile_conf is not None:
        assert compile_blocks(loaded, enabled=True, **compile_conf) == loaded.num_layers
    requests = zsre_requests(4)
    base = predict(Unedited(loaded), *locality_inputs(requests))
    editor = instantiate(cfg.editor, _partial_=True)(model=loaded)
    result = run_stream(editor, requests, base, NullLogger(), progress=False, handle_signals=False)
    prompts = [r.prompt for r in requests] + ["Completely unrelated text about the weather"]
    targets = [r.target for r in requests] + [" sunny"]
    with torch.no_grad():
        rows = predict(editor, prompts, targets)
    return result.metrics, [r.predicted for r in rows]


EDITORS = ["elder", "grace", "melo", "defer", "ft_l"]


@pytest.mark.parametrize("backend, editor_name", [
    *(("eager", e) for e in EDITORS),
    *(pytest.param("aot_eager", e, marks=pytest.mark.slow) for e in EDITORS),
])
def test_traced_blocks_give_the_eager_edits(backend: str, editor_name: str, one_thread: None) -> None:
    torch._dynamo.reset()
    eager_metrics, eager_pred = _stream(editor_name, None)
    traced_metrics, traced_pred = _stream(editor_name, {"backend": backend})
    for key in ("reliability", "reliability_token", "generalization", "locality"):
        assert traced_metrics[key] == pytest.approx(eager_metrics[key], abs=1e-6), key
    assert all(torch.equal(a, b) for a, b in zip(eager_pred, traced_pred))


def test_state_dict_keys_are_unchanged_by_compilation() -> None:
    loaded = tiny_model()
    keys = list(loaded.model.state_dict())
    compile_blocks(loaded, enabled=True, backend="aot_eager")
    assert list(loaded.model.state_dict()) == keys  # checkpoints of compiled runs load into eager ones


@pytest.mark.parametrize("settings, needle", [
    ({"backend": "turbo"}, "compile.backend must be one of"),
    ({"mode": "fastest"}, "compile.mode must be null or one of"),
])
def test_bad_compile_settings_are_named(settings: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        compile_blocks(tiny_model(), enabled=True, **settings)


def test_disabled_compiles_nothing() -> None:
    loaded = tiny_model()
    assert compile_blocks(loaded, enabled=False, backend="turbo") == 0


@pytest.mark.slow
def test_inductor_blocks_give_the_eager_edits_within_tolerance(one_thread: None) -> None:
    torch._dynamo.reset()
    eager_metrics, eager_pred = _stream("elder", None)
    compiled_metrics, compiled_pred = _stream("elder", {"backend": "inductor", "dynamic": True})
    for key in ("reliability", "generalization", "locality"):
        assert compiled_metrics[key] == pytest.approx(eager_metrics[key], abs=1e-6), key
    assert all(torch.equal(a, b) for a, b in zip(eager_pred, compiled_pred))
