"""UltraEdit on the tiny random models: the update is the authors' closed form, batches are learned through a run,
only the edited matrices change, nothing grows with the stream, exact resume, state, configs, bad settings."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from baselines.ultraedit import UltraEditEditor
from data.requests import EditRequest
from evaluation.common.errors import ConfigError
from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.models import LoadedModel, get_module
from tests.conftest import (
    compose_config,
    save_merged_tokenizer,
    tiny_model,
    tiny_with_tokenizer,
    zsre_requests,
)

DOWN = {"gpt2": "transformer.h.{i}.mlp.c_proj", "llama": "model.layers.{i}.mlp.down_proj"}
GATE_UP = ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"]
LR = {"gpt2": 0.01, "llama": 0.1}  # conf/editor_model/ultraedit_tiny_*.yaml
MODELS = ("smollm2", "gpt2xl", "llama2", "tiny_gpt2", "tiny_llama", "gpt2xl_random", "llama2_random")
# one-token targets (the merged tokenizer): a one-shot update of a random 8-layer model moves one token reliably
RECORDS = [("The capital of Zorbland is", "Q"), ("The mayor of Quux is", "Z"), ("The river of Blorvia is", "V"),
           ("Who wrote the Flumph?", "K"), ("The color of Grelt is", "J"), ("Where is Snarf from?", "X")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def merged_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_merged_tokenizer(tmp_path_factory.mktemp("tokenizer"), tuple(t for _, t in RECORDS))


def records() -> list[EditRequest]:
    return [EditRequest(i, p, t, p, "", "") for i, (p, t) in enumerate(RECORDS)]


def editor(arch: str, model: LoadedModel | None = None, **fields) -> UltraEditEditor:
    fields = {"modules": [DOWN[arch]], "layers": [[5, 6, 7]], "lr": LR[arch], **fields}
    return UltraEditEditor(model or tiny_model(f"tiny_{arch}"), **fields)


def loss_of(ed: UltraEditEditor, requests: list[EditRequest]) -> float:
    with torch.no_grad():
        return float(target_logits(ed.model, encode_pairs(ed.tokenizer, [r.prompt for r in requests],
                                                          [r.target for r in requests])).loss())


# --- the update ------------------------------------------------------------------------------------------
def authors_turns(model: LoadedModel, names: list[str], turns: list[list[EditRequest]], lr: float, chunk: int) -> None:
    """The authors' editor/ultraedit.py, nets.py and util.py (TracerDict, cross_entropy), written out again here:
    chunks of the turn sorted by input length, their "prompt + answer[:-1]" rows with labels shifted by one, keys and
    output gradients from a forward hook and a full backward hook on weights that require grad, one RunningMeanStd
    per weight shape, then solve(K^T K + I, K^T V) added to each weight."""
    tok, net = model.tokenizer, model.model
    modules = [get_module(net, n) for n in names]
    shape = [tuple(m.weight.shape[::-1]) if isinstance(m, nn.Linear) else tuple(m.weight.shape) for m in modules]
    stats = {s: [0.0, torch.zeros(s[0] + s[1]), torch.zeros(s[0] + s[1]), torch.zeros(s[0] + s[1])] for s in shape}
    for m in modules:
        m.weight.requires_grad_(True)
    for turn in turns:
        rows = []
        for r in turn:
            p = tok(r.prompt, return_tensors="pt").input_ids[0]
            a = tok(" " + r.target, return_tensors="pt", add_special_tokens=False).input_ids[0]
            rows.append((torch.cat([p, a[:-1]]), torch.cat([torch.full((len(p) - 1,), -100), a])))
        rows.sort(key=lambda row: len(row[0]), reverse=True)
        cache: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in modules]
        for s in range(0, len(rows), chunk):
            part = rows[s:s + chunk]
            ids = nn.utils.rnn.pad_sequence([x for x, _ in part], batch_first=True)
            labels = nn.utils.rnn.pad_sequence([y for _, y in part], batch_first=True, padding_value=-100)
            mask = torch.ones_like(ids)
            for b, (x, _) in enumerate(part):
                mask[b, len(x):] = 0
            sel = torch.where(labels != -100)
            seen: dict[int, torch.Tensor] = {}
            handles = []
            for i, m in enumerate(modules):
                handles.append(m.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, inp[0][sel])))
                handles.append(m.register_full_backward_hook(
                    lambda mod, gin, gout, i=i: seen.__setitem__(-1 - i, gout[0][sel])))
            logits = net(input_ids=ids, attention_mask=mask).logits
            F.cross_entropy(logits[sel], labels[sel]).backward()
            for h in handles:
                h.remove()
            for i, s_ in enumerate(shape):
                k, g = seen[i].detach().float(), seen[-1 - i].detach().float()
                cache[i].append((k, g))
                x = torch.cat((k, g), -1)
                n0, mean, var, _ = stats[s_]
                n = n0 + x.shape[0]
                delta = x.mean(0) - mean
                mean = mean + x.shape[0] * delta / n
                var = var + x.shape[0] * x.var(0) + n0 * x.shape[0] * delta.pow(2) / n
                stats[s_] = [n, mean, var, (var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()]
        shifts = []
        for i, s_ in enumerate(shape):
            keys = torch.cat([k for k, _ in cache[i]])
            grads = torch.cat([g for _, g in cache[i]])
            _, mean, _, std = stats[s_]
            z = (torch.cat((keys, grads), -1) - mean) / (std + torch.finfo(torch.float32).eps)
            k_hat, g_hat = z.split([s_[0], s_[1]], -1)
            v = -lr * (k_hat * k_hat).sum(-1).unsqueeze(-1) * g_hat
            shifts.append(torch.linalg.solve(keys.T @ keys + torch.eye(s_[0]), keys.T @ v))
        with torch.no_grad():
            for m, shift in zip(modules, shifts):
                m.weight += shift.T if isinstance(m, nn.Linear) else shift
    for m in modules:
        m.weight.requires_grad_(False)
        m.weight.grad = None


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("arch, templates, layers", [("gpt2", [DOWN["gpt2"]], [[2, 5]]),
                                                      ("llama", GATE_UP, [[2, 3], [5]])])
def test_two_turns_give_the_authors_update(arch, templates, layers):
    """Chunks of 2 over turns of 3 zsRE edits (so the sort, the chunking and the statistics carried from the first
    turn into the second all matter): the weights end as the authors' code leaves them, up to float rounding."""
    r = zsre_requests(8)
    turns = [[r[3], r[1], r[0]], [r[5], r[4], r[7]]]  # shortest first: sorting changes which rows share a chunk
    ours = editor(arch, modules=templates, layers=layers, chunk_size=2, batch_size=3)
    for turn in turns:
        ours.edit(turn)
    theirs = tiny_model(f"tiny_{arch}")
    authors_turns(theirs, ours.module_names, turns, ours.config.lr, chunk=2)
    assert len(ours.module_names) == sum(len(g) for g in layers)
    for name, w in zip(ours.module_names, ours.weights):
        reference = get_module(theirs.model, name).weight
        base = get_module(tiny_model(f"tiny_{arch}").model, name).weight
        theirs_shift, our_shift = (reference - base).detach(), (w - base).detach()
        assert theirs_shift.abs().max() > 1e-3  # the update is not vacuous
        # float32 solves of K^T K + I (rank well below d_in: condition number ~ ||k||^2) round differently
        assert (our_shift - theirs_shift).norm() < 1e-3 * theirs_shift.norm()
    assert len(ours.normalizers) == 1  # one weight shape (LLaMA: gate and up share it): one statistics, as the authors'


def test_the_shift_reproduces_the_pseudo_values_at_the_keys():
    """dW = (K^T K + I)^-1 K^T V: K dW = (K K^T + I)^-1 K K^T V, close to V when the keys are long."""
    from baselines.ultraedit import ridge_shift
    g = torch.Generator().manual_seed(0)
    keys, values = 10 * torch.randn(5, 32, generator=g), torch.randn(5, 16, generator=g)
    shift = ridge_shift(keys, values, 1.0)
    torch.testing.assert_close(keys @ shift, values, rtol=0, atol=1e-2)
    assert (keys @ ridge_shift(keys, values, 1e4) - values).norm() > 0.5 * values.norm()  # lambda shrinks it


def test_read_positions():
    """ans: the positions that predict a target token; mask: every real token the authors feed (not the last)."""
    ed = editor("llama")
    batch = encode_pairs(ed.tokenizer, ["ab", "abcd"], ["xy", "z"])  # byte tokens: rows of 5 and 6 tokens
    ans = ed._read_mask(batch)
    assert ans.tolist() == [[False, True, True, True, False, False], [False, False, False, True, True, False]]
    ed.config.token = "mask"
    assert ed._read_mask(batch).tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False]]


# --- learning and the stream -----------------------------------------------------------------------------
def _dataset(tmp_path: Path) -> Path:
    rows = [{"subject": p.split()[-2], "src": p, "rephrase": p, "alt": t, "answers": ["x"],
             "loc": "nq question: who is it", "loc_ans": "me"} for p, t in RECORDS]
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_a_run_learns_its_batches(model, merged_tokenizer, tmp_path):
    from evaluation.run.experiment import run_experiment

    args = [f"model={model}", f"model.tokenizer_path={merged_tokenizer}", "editor=ultraedit",
            f"dataset.path={_dataset(tmp_path)}", "dataset.sha256=null", "dataset.url=null", "dataset.num_edits=6",
            "retention=none", "logger=none", "progress=false", "answers=none", "editor.batch_size=3",
            "checkpoint.every=0"]
    out = run_experiment(compose_config(args), tmp_path / "run", {"model": model, "editor": "ultraedit",
                                                                   "dataset": "zsre"})
    assert out["metrics"]["at_edit_time"]["reliability"] == 1.0  # each turn learned when it is written
    assert out["metrics"]["reliability"] >= 5 / 6  # and held through the next one
    assert out["metrics"]["trainable_params"] == 3 * 64 * 4 * (64 if model == "tiny_gpt2" else 32)


def test_gate_and_up_projections_learn_and_only_they_change(merged_tokenizer):
    """llama2's choice (gate_proj and up_proj of two layer ranges) on tiny_llama: the turn's loss falls by more than
    half, the four matrices and nothing else change, and no gradient is left behind."""
    model = tiny_with_tokenizer("llama", merged_tokenizer)
    ed = editor("llama", model, modules=GATE_UP, layers=[[3, 4], [5, 6]], lr=0.01)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    first = loss_of(ed, records()[:3])
    stats = ed.edit(records()[:3])
    assert stats.loss == pytest.approx(first, rel=1e-5) and stats.iterations == 1
    assert loss_of(ed, records()[:3]) < 0.5 * first
    changed = {k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{t.format(i=i)}.weight" for t, group in zip(GATE_UP, [[3, 4], [5, 6]]) for i in group}
    assert not any(p.requires_grad or p.grad is not None for p in model.model.parameters())


def test_nothing_grows_with_the_stream():
    """The state after one turn and after four has the same tensors of the same sizes (the statistics are a fixed
    size per weight shape; the keys of a turn are dropped after it)."""
    ed = editor("gpt2", batch_size=2)
    requests = zsre_requests(8)
    ed.edit(requests[:2])
    sizes = {k: v.shape for k, v in ed.state_dict().items() if isinstance(v, torch.Tensor)}
    stored = ed.stored_params()
    n = float(ed.normalizers["256x64"].n)
    for i in range(1, 4):
        ed.edit(requests[2 * i:2 * i + 2])
    assert {k: v.shape for k, v in ed.state_dict().items() if isinstance(v, torch.Tensor)} == sizes
    assert ed.stored_params() == stored == 3 * (256 + 64) + 1  # n; mean, var, std of [k, g]
    assert float(ed.normalizers["256x64"].n) > 3 * n and ed.num_edits == 8  # the statistics carry every turn


def test_a_resumed_stream_ends_exactly_as_the_uninterrupted_one(tmp_path):
    from evaluation.run.checkpoint import to_cpu
    from tests.test_resume import resume_pair

    _, resumed_editor = resume_pair(["editor=ultraedit", "dataset.num_edits=8", "editor.batch_size=2",
                                     "editor.chunk_size=1"], tmp_path)
    assert to_cpu(resumed_editor.state_dict())["normalizers.128x64.n"].item() > 0 and resumed_editor.num_edits == 8


def test_state_round_trip_continues_exactly(tmp_path):
    requests = zsre_requests(6)
    straight = editor("gpt2", batch_size=2)
    for t in range(3):
        straight.edit(requests[2 * t:2 * t + 2])
    first = editor("gpt2", batch_size=2)
    first.edit(requests[:2])
    first.save(tmp_path / "ultraedit.pt")
    resumed = editor("gpt2", batch_size=2)  # a fresh model and editor, as a resumed stream builds them
    resumed.load(tmp_path / "ultraedit.pt")
    for t in range(1, 3):
        resumed.edit(requests[2 * t:2 * t + 2])
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert resumed.num_edits == 6 and not any(k.startswith("model.") for k in a)
    with pytest.raises(ConfigError, match="saved UltraEdit state edits"):
        editor("gpt2", layers=[[4, 6, 7]]).load(tmp_path / "ultraedit.pt")


# --- configs and settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_every_model_has_modules_and_the_authors_settings(model):
    c = compose_config(["editor=ultraedit", f"model={model}", "logger=none"]).editor
    n = compose_config([f"model={model}"]).model.num_layers
    groups = [list(g) for g in c.layers]
    assert len(groups) == len(c.modules) and all(g == sorted(set(g)) and 0 <= g[0] and g[-1] < n for g in groups)
    assert (c.batch_size, c.chunk_size, c.ridge, c.token) == (100, 10, 1.0, "ans")
    # the authors' 1e-6 everywhere but the small models, where it moves nothing (conf/editor_model/ultraedit_*.yaml)
    assert c.lr == {"tiny_gpt2": 0.01, "tiny_llama": 0.1, "smollm2": 1e-4}.get(model, 1e-6)
    if model.startswith("llama2"):
        assert list(c.modules) == GATE_UP and groups == [list(range(11, 16)), list(range(18, 25))]
    elif model == "smollm2":
        assert list(c.modules) == GATE_UP and groups == [list(range(10, 15)), list(range(17, 24))]  # of 30
    else:
        assert list(c.modules) == [DOWN["gpt2" if "gpt2" in model else "llama"]]
        assert len(groups[0]) == (3 if model.startswith("tiny") else 9)  # GPT-J's 18..26 of 28


def test_composed_config_instantiates():
    from hydra.utils import instantiate
    cfg = compose_config(["editor=ultraedit", "model=tiny_gpt2", "logger=none"])
    ed = instantiate(cfg.editor, model=tiny_model("tiny_gpt2"))
    assert isinstance(ed, UltraEditEditor) and ed.batch_size == 100 and ed.query is None
    assert ed.module_names == [f"transformer.h.{i}.mlp.c_proj" for i in (5, 6, 7)]
    assert ed.transposed == [True] * 3 and all(isinstance(m, Conv1D) for m in ed._held)
    assert ed.floor_spec().first_layer == 5 and ed.floor_spec().passes == 1


def test_bad_settings_are_config_errors():
    model = tiny_model("tiny_llama")
    bad = [({"lr": 0.0}, r"editor\.lr must be positive"),
           ({"ridge": math.nan}, r"editor\.ridge must be a positive number"),
           ({"chunk_size": 0}, r"editor\.chunk_size must be at least 1"),
           ({"batch_size": 0}, r"editor\.batch_size must be at least 1"),
           ({"token": "all"}, r"editor\.token must be one of \('ans', 'mask'\)"),
           ({"layers": [[5], [6]]}, r"one list of layers per entry of editor\.modules \(1 modules, 2 lists"),
           ({"layers": [[]]}, r"editor\.layers: no layers for module"),
           ({"layers": [[5, 8]]}, r"editor\.layer=8 is out of range .*0\.\.7"),
           ({"layers": [[5, 5]]}, r"names a module twice"),
           ({"modules": ["model.layers.{i}.mlp.nope"]}, r"module 'model\.layers\.5\.mlp\.nope' not found")]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            editor("llama", model, **fields)
