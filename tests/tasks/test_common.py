"""lmforge.tasks.common: what task builders share: the run's tokenizer (trained once, then the
run folder's on resume), a fresh seeded model or one started from ``model.init_from`` (weights
copied, a new classification head fresh, fixed fields refused), LoRA on top, source specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.data.sources import SourceSpec
from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, build
from lmforge.store import WEIGHTS, save_model
from lmforge.tasks import config_from_dict
from lmforge.tasks.common import TaskContext, build_model, build_tokenizer, model_from_init, source_specs, with_lora
from lmforge.train.distributed import DistInfo


def quiet(*a, **k):
    pass


def _ctx(tiny_dict, **sections) -> TaskContext:
    cfg = config_from_dict(tiny_dict(**sections))
    return TaskContext(cfg=cfg, run_dir=Path(cfg.run.out_dir), dist=DistInfo(), progress=False, say=quiet)


def _saved(tmp_path, **fields) -> Path:
    torch.manual_seed(0)
    model = build(ModelConfig(**{**dict(arch="decoder", vocab_size=40, context_length=16, n_layer=1, n_head=2,
                                        n_embd=16, tie_embeddings=False), **fields}))
    return save_model(model, tmp_path / "base")


def test_source_specs_carry_every_field(tiny_dict):
    cfg = config_from_dict(tiny_dict())
    specs = source_specs(cfg.data.sources)
    assert [type(s) for s in specs] == [SourceSpec]
    assert (specs[0].path, specs[0].num_docs, specs[0].seed) == ("builtin:stories", 200, 0)
    assert vars(specs[0]) == vars(cfg.data.sources[0])
    assert source_specs(None) is None


def test_tokenizer_is_trained_once_and_the_run_folders_on_resume(tiny_dict):
    ctx = _ctx(tiny_dict)
    tok = build_tokenizer(ctx, lambda: ["abc", "abd"])
    assert (ctx.run_dir / "tokenizer.json").is_file()
    assert tok.decode(tok.encode("abdc")) == "abdc"
    again = build_tokenizer(ctx, lambda: ["something else entirely: xyz"])  # resume: the saved one
    assert again.vocab_size == tok.vocab_size and again.encode("abdc") == tok.encode("abdc")


def test_fresh_model_is_seeded_and_checks_the_vocabulary(tiny_dict):
    ctx = _ctx(tiny_dict)
    a, b = build_model(ctx, 30), build_model(ctx, 30)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    assert a.config.vocab_size == 30  # vocab_size: null takes the tokenizer's
    clf = build_model(ctx, 30, num_classes=3)
    assert clf.classifier is not None and clf.config.num_classes == 3
    small = _ctx(tiny_dict, model={"vocab_size": 20})
    with pytest.raises(ConfigError, match="model.vocab_size: 20 is smaller than the tokenizer's 30 tokens"):
        build_model(small, 30)


def test_with_lora_freezes_the_base_but_not_a_new_head():
    torch.manual_seed(0)
    model = build(ModelConfig(arch="decoder", vocab_size=40, context_length=16, n_layer=1, n_head=2, n_embd=16,
                              num_classes=2))
    assert with_lora(model, None) is model
    out = with_lora(model, {"rank": 2, "alpha": 4, "targets": ["q", "v"]})
    trainable = {n for n, p in out.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable) and any(n.startswith("classifier.") for n in trainable)
    assert not any(n.endswith("tok_emb.weight") for n in trainable)
    with pytest.raises(ConfigError, match="model.lora:"):
        with_lora(build(ModelConfig(arch="decoder", vocab_size=40, context_length=16, n_layer=1, n_head=2,
                                    n_embd=16)), {"rank": 2, "nonsense": 1})


def test_model_from_init_copies_weights_and_adds_a_fresh_head(tmp_path):
    folder = _saved(tmp_path)
    saved = load_file(folder / WEIGHTS)
    model = model_from_init(str(folder), {"dropout": 0.0, "n_layer": None}, {"num_classes": 3}, 40)
    assert model.training and model.config.num_classes == 3 and model.config.n_layer == 1  # null: kept
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())  # every saved weight copied
    assert {k for k in state if k not in saved} == {k for k in state if k.startswith("classifier.")}


def test_model_from_init_refuses_fixed_fields_and_a_bigger_vocabulary(tmp_path):
    folder = str(_saved(tmp_path))
    with pytest.raises(ConfigError, match="model.n_layer: cannot change when model.init_from is set"):
        model_from_init(folder, {"n_layer": 2}, {}, 40)
    with pytest.raises(ConfigError, match="has vocab_size 40 but the tokenizer has 50 tokens"):
        model_from_init(folder, {}, {}, 50)
