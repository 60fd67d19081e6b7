"""lmforge.train.freeze: train.trainable picks what trains (all, the head only, the last N blocks
with the final norm and the head); counts returned; bad specs named."""

from __future__ import annotations

import pytest

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, build
from lmforge.train.freeze import apply_trainable


def _model(num_classes: int = 0, arch: str = "decoder", **kw):
    fields = dict(arch=arch, vocab_size=37, context_length=16, n_layer=3, n_head=2, n_embd=16,
                  num_classes=num_classes, tie_embeddings=False)
    if arch == "bigram":
        fields.update(n_layer=1, n_head=1, n_embd=37, positional="none")
    return build(ModelConfig(**{**fields, **kw}))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _count(model, names) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def test_head_trains_the_classifier_when_there_is_one():
    model = _model(num_classes=3)
    trainable, total = apply_trainable(model, "head")
    assert _trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert (trainable, total) == (_count(model, _trainable(model)), sum(p.numel() for p in model.parameters()))
    # and else the LM head
    lm = _model()
    apply_trainable(lm, "head")
    assert _trainable(lm) == {"lm_head.weight"}


def test_last_blocks_adds_the_final_norm_and_head_and_all_undoes_it():
    model = _model(num_classes=2)
    apply_trainable(model, "last_blocks:2")
    names = _trainable(model)
    assert {n.split(".")[2] for n in names if n.startswith("transformer.blocks.")} == {"1", "2"}
    assert any(n.startswith("transformer.norm.") for n in names)
    assert any(n.startswith("classifier.") for n in names)
    assert not any(n.startswith(("transformer.blocks.0.", "transformer.tok_emb")) for n in names)
    trainable, total = apply_trainable(model, "all")
    assert trainable == total and _trainable(model) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("spec,match", [
    ("last_blocks:4", "last_blocks:4 but the model has 3 blocks"),
    ("middle", "got 'middle', expected all, head or last_blocks:N"),
])
def test_bad_specs_are_named(spec, match):
    with pytest.raises(ConfigError, match=f"train.trainable: {match}"):
        apply_trainable(_model(), spec)


def test_a_model_without_blocks_or_heads_is_refused():
    bigram = _model(arch="bigram")
    with pytest.raises(ConfigError, match="needs a transformer model"):
        apply_trainable(bigram, "last_blocks:1")
    with pytest.raises(ConfigError, match="head leaves nothing to train"):
        apply_trainable(bigram, "head")
