"""GPT-2 through XL: each preset is the real model's shape (transformers' GPT2Config of that size,
parameters counted on the meta device), imports as the preset, and the odd head count of XL
(25 heads of 64) gives transformers' logits on a shrunk model of that head layout."""

from __future__ import annotations

import pytest
import torch

from lmforge.interop.hf import config_from_hf, load_hf
from lmforge.model import ModelConfig, build, count_parameters

tf = pytest.importorskip("transformers")

# published shapes: (layers, heads, width) and the parameter count of GPT2LMHeadModel (tied head)
SIZES = {"gpt2": (12, 12, 768, 124_439_808), "gpt2-medium": (24, 16, 1024, 354_823_168),
         "gpt2-large": (36, 20, 1280, 774_030_080), "gpt2-xl": (48, 25, 1600, 1_557_611_200)}


def _hf_config(n_layer: int, n_head: int, n_embd: int):
    return tf.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, n_positions=1024)


@pytest.mark.parametrize("name", list(SIZES))
def test_preset_is_the_real_shape_with_its_parameter_count(name):
    n_layer, n_head, n_embd, published = SIZES[name]
    with torch.device("meta"):
        ours = build(ModelConfig.from_preset(name))
        theirs = tf.GPT2LMHeadModel(_hf_config(n_layer, n_head, n_embd))
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters()) == published


@pytest.mark.parametrize("name", list(SIZES))
def test_real_config_imports_as_the_preset(name):
    n_layer, n_head, n_embd, _ = SIZES[name]
    got = config_from_hf(_hf_config(n_layer, n_head, n_embd).to_dict()).to_dict()
    want = ModelConfig.from_preset(name).to_dict()
    fields = ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "vocab_size", "context_length",
              "activation", "norm", "positional", "tie_embeddings", "bias")
    assert {k: got[k] for k in fields} == {k: want[k] for k in fields}


def test_xl_head_layout_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ref = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=25, n_embd=100, vocab_size=97, n_positions=32)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4
