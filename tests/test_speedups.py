"""Speed-ups keep results identical: logits only at target positions, frozen-prefix replay."""
from __future__ import annotations

import pytest
import torch

from evaluation.editing.encoding import encode_pairs
from evaluation.editing.forward import target_logits
from evaluation.editing.prefix_cache import FrozenPrefix
from tests.conftest import tiny_model, zsre_requests


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_target_logits_equal_the_full_forward_at_those_positions(arch: str) -> None:
    loaded = tiny_model(arch)
    requests = zsre_requests(3)
    batch = encode_pairs(loaded.tokenizer, [r.prompt for r in requests], [r.target for r in requests])
    with torch.no_grad():
        full = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits
        tl = target_logits(loaded.model, batch)
    rows, cols = (batch.labels[:, 1:] != -100).nonzero(as_tuple=True)
    torch.testing.assert_close(tl.logits, full[rows, cols], rtol=1e-5, atol=1e-5)
    assert torch.equal(tl.targets, batch.labels[rows, cols + 1])


def test_prefix_replay_is_bit_identical_and_skips_the_frozen_blocks() -> None:
    loaded = tiny_model("tiny_llama")
    requests = zsre_requests(2)
    batch = encode_pairs(loaded.tokenizer, [r.prompt for r in requests], [r.target for r in requests])
    with torch.no_grad():
        plain = target_logits(loaded.model, batch).logits
    prefix = FrozenPrefix(loaded.model, loaded.block_template, 4)
    calls = []
    hook = prefix.wrappers[0].block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), prefix.cache():
        first = target_logits(loaded.model, batch).logits
        second = target_logits(loaded.model, batch).logits
    hook.remove()
    assert torch.equal(plain, first) and torch.equal(first, second)
    assert len(calls) == 1  # block 0 ran once for two forwards
    other = encode_pairs(loaded.tokenizer, ["a"], ["b"])
    with torch.no_grad(), prefix.cache():
        target_logits(loaded.model, batch)
        with pytest.raises(RuntimeError, match="another shape"):
            target_logits(loaded.model, other)


def test_floor_runs_one_row_per_rome_prefix_and_merge_keeps_other_editors(tmp_path) -> None:
    import json

    from benchmarks.bench_editing import measure_floor, previous_rows

    torch.set_num_threads(1)
    floor = measure_floor(["model=tiny_llama", "editor=rome", "dataset.num_edits=2",
                           "editor.context_template_length_params=[[5,5]]"], batches=1)
    assert floor["floor_rows_per_edit"] == 6 and floor["floor_passes"] == 20 and floor["floor_seconds_per_edit"] > 0
    saved = {"editors": {e: {"variants": {"after": {"editor": e, "variant": "after"}}} for e in ("elder", "grace")}}
    (tmp_path / "bench.json").write_text(json.dumps(saved))
    assert previous_rows(tmp_path, ["elder"]) == [{"editor": "grace", "variant": "after"}]
    assert previous_rows(tmp_path / "none", ["elder"]) == []


def test_work_count_sees_the_backward_and_skips_views() -> None:
    from benchmarks.bench_editing import count_work

    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    flops, _ = count_work(lambda: (x @ w).sum().backward())
    assert flops == 3 * 2 * 4 * 8 * 16  # the forward matmul and the two of its backward
    assert count_work(lambda: x.t().unsqueeze(0))[1] == 0  # views launch nothing
    assert count_work(lambda: x + 1)[1] == 1
