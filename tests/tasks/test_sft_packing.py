"""SFT packing (objective.packing): several examples in one row, attention kept inside each
(block-diagonal causal mask, positions restarting per example), equal to unpacked losses and
gradients; the training run with packing resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_in_two_parts
from lmforge.tasks import config_from_dict
from lmforge.data.sft_format import IGNORE, SFTExample
from lmforge.errors import InputError
from lmforge.model import ModelConfig, build
from lmforge.objectives import CausalLM
from lmforge.tasks.sft import collate_packed, collate_sft, pack_rows
from lmforge.tasks.run import run

STYLES = {
    "llama": dict(positional="rope", norm="rmsnorm", activation="swiglu", bias=False, n_kv_head=1),
    "gpt2": dict(positional="learned", norm="layernorm", activation="gelu", bias=True),
}


def _model(style: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(ModelConfig(vocab_size=50, context_length=64, n_layer=2, n_head=2, n_embd=32, **STYLES[style]))


def _examples(lengths=(7, 3, 12, 5, 9, 2), seed=1) -> list[SFTExample]:
    """Uneven examples, each with a masked prompt (about a third) and a trained response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        k = max(1, n // 3)
        out.append(SFTExample(ids, [IGNORE] * k + ids[k:]))
    return out


def test_first_fit_keeps_order_and_capacity():
    assert pack_rows([5, 4, 3, 2, 6], capacity=8) == [[0, 2], [1, 3], [4]]
    assert pack_rows([8, 8], capacity=8) == [[0], [1]]


def test_packed_batch_layout_and_no_target_crosses_an_example():
    a = SFTExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])
    b = SFTExample([5, 6, 7], [IGNORE, 6, 7])
    batch = collate_packed([a, b], pad_id=0, capacity=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6]]
    # a's last input (3) predicts 4; b's first input (5) predicts 6: nothing predicts across
    assert batch["targets"].tolist() == [[IGNORE, 3, 4, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2]]
    # the same targets as unpacked: the trainer's target-count weighting is unchanged
    obj = CausalLM()
    assert obj.targets_in(batch) == obj.targets_in(collate_sft([a, b], pad_id=0)) == 4


@pytest.mark.parametrize("style", list(STYLES))
def test_packed_loss_and_gradients_equal_unpacked(style):
    examples = _examples()
    obj = CausalLM()
    losses, grads = [], []
    for batch in (collate_sft(examples, pad_id=0), collate_packed(examples, pad_id=0, capacity=16)):
        model = _model(style)
        loss, _ = obj.loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    packed = collate_packed(examples, pad_id=0, capacity=16)
    assert packed["input_ids"].shape[0] < len(examples)  # fewer rows than examples
    assert abs(losses[0] - losses[1]) <= 1e-5
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("style", list(STYLES))
def test_mask_blocks_attention_across_examples(style):
    model = _model(style).eval()
    first, second = _examples((6, 8), seed=2)
    other = SFTExample(torch.randint(1, 50, (6,)).tolist(), first.labels)  # example 1 with new tokens
    outs = []
    for ex1 in (first, other):
        b = collate_packed([ex1, second], pad_id=0, capacity=20)
        assert b["input_ids"].shape[0] == 1  # both in one row
        with torch.no_grad():
            outs.append(model(b["input_ids"], position_ids=b["position_ids"], segment_ids=b["segment_ids"]))
    assert not torch.allclose(outs[0][0, :5], outs[1][0, :5])  # example 1 itself changed
    torch.testing.assert_close(outs[0][0, 5:], outs[1][0, 5:], atol=1e-6, rtol=0)  # example 2 did not
    # and example 2 in the row is exactly example 2 alone
    alone = collate_sft([second], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(outs[0][0, 5:], model(alone["input_ids"])[0], atol=1e-5, rtol=1e-5)


def test_segment_ids_need_no_cache():
    from lmforge.model.layers import KVCache

    model = _model("llama")
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(InputError, match="segment_ids"):
        model(torch.ones(1, 3, dtype=torch.long), segment_ids=torch.ones(1, 3, dtype=torch.long), cache=cache)


# ------------------------------------------------------------------------------ a packed run
@pytest.fixture
def packed_dict(tiny_dict, tmp_path):
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "x" * (i % 7), "output": f"{2 * i + 1}"}
            for i in range(40)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(recs))

    def make(name, **train):
        return tiny_dict(name, task="sft", tokenizer={"kind": "byte"}, model={"context_length": 160},
                         objective={"max_length": 160, "sample_prompts": 0, "packing": True},
                         data={"sources": [{"path": str(path)}], "val_fraction": 0.2},
                         train={"max_steps": 4, "batch_size": 4, "eval_every": 100, **train})

    return make


def test_packed_sft_run_trains_logs_efficiency_and_resumes_exactly(packed_dict):
    lines = []
    straight = run(config_from_dict(packed_dict("straight")), progress=False,
                   print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("packing: 160-token rows" in x and "of row capacity filled" in x for x in lines)
    losses = [h["loss"] for h in straight["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    first, second = run_in_two_parts(lambda: config_from_dict(packed_dict("resumed")), 2)
    got = [h["loss"] for h in first["history"] + second["history"]]
    assert got == pytest.approx(losses, abs=1e-6)
