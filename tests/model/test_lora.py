"""LoRA: zero-init, targets by role on fused projections, frozen base, switching adapters off,
merging, adapter-only files bound to their base, and PEFT export checked by peft itself."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError, InteropError
from lmforge.model import build
from lmforge.model.lora import (
    LoraConfig,
    LoraLinear,
    adapters_disabled,
    apply_lora,
    base_checksum,
    export_peft,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)


def _model(preset="llama-baby", **kw):
    torch.manual_seed(0)
    return build({"preset": preset, "n_layer": 2, "n_embd": 32, "n_head": 4, "context_length": 32,
                  "vocab_size": 50, **kw}).eval()


def _randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("preset", ["llama-baby", "baby", "bert-mini"])
def test_fresh_adapter_changes_nothing_and_base_is_frozen(preset):
    model = _model(preset)
    with torch.no_grad():
        before = model(IDS)
    apply_lora(model, LoraConfig(rank=4, targets=("all",)))
    with torch.no_grad():
        assert torch.equal(model(IDS), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    # base state-dict keys are unchanged: only adapter keys were added
    assert {k for k in model.state_dict() if ".lora." not in k} == set(_model(preset).state_dict())


def test_roles_on_fused_projections():
    model = _model(n_kv_head=2)  # q: 32 rows, k and v: 16 rows each (GQA)
    apply_lora(model, LoraConfig(rank=2, targets=("q", "v", "mlp_in")))
    qkv = model.transformer.blocks[0].attn.qkv
    assert isinstance(qkv, LoraLinear) and qkv.slices == {"q": (0, 32), "v": (48, 64)}
    fc = model.transformer.blocks[0].mlp.fc
    h = model.config.mlp_hidden
    assert fc.slices == {"gate": (0, h), "up": (h, 2 * h)}
    assert not isinstance(model.transformer.blocks[0].attn.proj, LoraLinear)
    # an adapter on q changes only q's rows of the fused output
    _randomise_adapters(model)
    x = torch.randn(1, 3, 32)
    delta = qkv(x) - torch.nn.functional.linear(x, qkv.weight)
    assert delta[..., :32].abs().max() > 0 and delta[..., 32:48].abs().max() == 0
    assert delta[..., 48:].abs().max() > 0


def test_adapters_disabled_gives_the_base_and_gradients_reach_adapters_only():
    model = _model()
    with torch.no_grad():
        base = model(IDS)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("attn", "mlp"), dropout=0.1))
    _randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        with adapters_disabled(model):
            assert torch.equal(model(IDS), base)
        assert torch.equal(model(IDS), adapted)
    assert (adapted - base).abs().max() > 1e-3
    model.train()
    model(IDS).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora." in n), n


def test_merge_gives_the_same_logits_and_a_plain_model():
    model = _model()
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=("all",)))
    _randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(_model().state_dict())
    with torch.no_grad():
        assert (merged(IDS) - adapted).abs().max().item() <= 1e-5


def test_merge_in_float64_is_exact_to_float64_rounding():
    """In float64 the merge is the same function to ~1e-13 (fp32's 1e-5 is its rounding, not the
    merge's); merging a float64 model does not write into the weights it read."""
    model = _model().double()
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=("all",)))
    _randomise_adapters(model)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    base = layer.weight.detach().clone()
    merged_w = layer.merged_weight()
    assert torch.equal(layer.weight, base) and merged_w.dtype == torch.float64
    with torch.no_grad():
        adapted = model(IDS)
        assert adapted.dtype == torch.float64
        assert (merge_lora(model)(IDS) - adapted).abs().max().item() <= 1e-12


def test_adapter_files_are_small_and_bound_to_their_base(tmp_path):
    model = _model()
    apply_lora(model, LoraConfig(rank=2, targets=("q", "v")))
    _randomise_adapters(model)
    with torch.no_grad():
        want = model(IDS)
    save_adapter(model, tmp_path / "ad", base_path="base-model")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["base"]["path"] == "base-model" and meta["lora"]["targets"] == ["q", "v"]
    n_adapter = sum(v.numel() for v in lora_state_dict(model).values())
    assert (tmp_path / "ad" / "adapter.safetensors").stat().st_size < 4 * n_adapter + 4096

    fresh = load_adapter(_model(), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(IDS), want)
    other = _model()
    with torch.no_grad():
        other.transformer.norm.weight.add_(1e-3)
    with pytest.raises(CheckpointError, match="base-model"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(_model(), tmp_path / "nothing")


def test_checksum_ignores_adapters():
    model = _model()
    before = base_checksum(model)
    apply_lora(model, LoraConfig())
    _randomise_adapters(model)
    assert base_checksum(model) == before


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="lora.targets"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="match no layer"):
        apply_lora(build("bigram"), LoraConfig())
    model = apply_lora(_model(), LoraConfig())
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_lora(model, LoraConfig())


def test_peft_export_loads_in_peft_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.interop.hf import export_hf

    model = _model(n_kv_head=2)
    export_hf(model, tmp_path / "base")
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("all",)))
    _randomise_adapters(model)
    export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(IDS), hf(IDS).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    gpt2 = apply_lora(_model("baby"), LoraConfig())
    with pytest.raises(InteropError, match="Llama-style"):
        export_peft(gpt2, tmp_path / "x")
