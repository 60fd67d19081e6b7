"""`lmforge export` beyond plain decoders, checked by transformers and peft themselves:
LoRA merged into the weights, the adapter alone as PEFT, and classifiers as
*ForSequenceClassification with the same class logits (or refused with one line)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import InteropError
from lmforge.interop.hf_export import export_model
from lmforge.model import ModelConfig, build
from lmforge.model.lora import LoraConfig, apply_lora

tf = pytest.importorskip("transformers")

GPT2 = dict(arch="decoder", vocab_size=60, context_length=32, n_layer=2, n_head=4, n_embd=32,
            activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(arch="decoder", vocab_size=60, context_length=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             mlp_hidden=64, activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope", bias=False,
             tie_embeddings=False)
PAD = 0


def _perturbed(fields, seed=3):
    torch.manual_seed(seed)
    model = build(ModelConfig(**fields)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from 1/0, so a wrong mapping shows
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _padded_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 6), (2, 3)):  # right padding
        ids[row, n:], mask[row, n:] = PAD, 0
    return ids, mask


@pytest.mark.parametrize("fields", [GPT2, {**GPT2, "tie_embeddings": False}], ids=["tied", "untied"])
def test_gpt2_classifier_exports_with_the_same_class_logits(tmp_path, fields):
    model = _perturbed({**fields, "num_classes": 3, "pooling": "last", "labels": ["neg", "neu", "pos"]})
    assert model.classifier.out.bias.abs().min() > 0  # a bias to fold into ln_f
    said = export_model(model, tmp_path / "out")
    assert "GPT2ForSequenceClassification" in said
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg["pad_token_id"] = PAD
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg))
    ref, info = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(ref).__name__ == "GPT2ForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert ref.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    ids, mask = _padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, head="cls")  # (B, K)
        theirs = ref.eval()(ids, attention_mask=mask).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_llama_classifier_exports_with_a_zero_bias_and_refuses_a_bias(tmp_path):
    model = _perturbed({**LLAMA, "num_classes": 2, "pooling": "last"})
    with pytest.raises(InteropError, match="RMSNorm has no bias"):
        export_model(model, tmp_path / "refused")
    with torch.no_grad():
        model.classifier.out.bias.zero_()
    export_model(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg["pad_token_id"] = PAD
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg))
    ref = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == "LlamaForSequenceClassification"
    ids, mask = _padded_batch()
    with torch.no_grad():
        diff = model(ids, attention_mask=mask, head="cls") - ref(ids, attention_mask=mask).logits
    assert diff.abs().max().item() < 1e-4


@pytest.mark.parametrize("fields,pooling,named", [
    (GPT2, "mean", "model.pooling is 'mean'"),
    ({**GPT2, "arch": "encoder", "causal": False}, "cls", "dense\\+tanh pooler"),
])
def test_classifier_without_an_exact_twin_is_refused_naming_the_pooling(tmp_path, fields, pooling, named):
    model = build(ModelConfig(**{**fields, "num_classes": 2, "pooling": pooling}))
    with pytest.raises(InteropError, match=named):
        export_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _lora_llama():
    model = _perturbed(LLAMA)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=("all",)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_lora_model_needs_merge_and_merged_export_gives_the_same_logits(tmp_path):
    model = _lora_llama()
    ids, _ = _padded_batch()
    with torch.no_grad():
        expected = model(ids)  # with the adapters
    with pytest.raises(InteropError, match="--merge"):
        export_model(model, tmp_path / "refused")
    said = export_model(model, tmp_path / "out", merge=True)
    assert "LoRA merged" in said
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (ref(ids).logits - expected).abs().max().item() < 1e-4


def test_peft_format_writes_the_adapter_alone_and_peft_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    from lmforge.interop.hf import export_hf
    from lmforge.model.lora import adapters_disabled

    model = _lora_llama()
    ids, _ = _padded_batch()
    with torch.no_grad():
        expected = model(ids)
    base = _perturbed(LLAMA)  # the same base weights, no adapters
    export_hf(base, tmp_path / "base")
    with pytest.raises(InteropError, match="no LoRA adapters"):
        export_model(base, tmp_path / "x", fmt="peft")
    said = export_model(model, tmp_path / "adapter", fmt="peft", base=str(tmp_path / "base"))
    assert "PeftModel.from_pretrained" in said
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (hf(ids).logits - expected).abs().max().item() < 1e-4
    with adapters_disabled(model), torch.no_grad():
        assert (model(ids) - base(ids)).abs().max().item() == 0
