"""lmforge.store is the one answer to "what is in this folder": the verbs' loader (load_model,
from_pretrained) and the trainer's checkpoint loading build the same module from the same folder."""

from __future__ import annotations

import torch

from lmforge.model import build
from lmforge.model.lora import LoraConfig, LoraLinear, apply_lora
from lmforge.store import from_pretrained, load_model, resolve_model_path
from lmforge.tokenizer import CharTokenizer
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint


def _lora_checkpoint(tmp_path):
    tok = CharTokenizer.train(["hello world, a tiny corpus"])
    torch.manual_seed(0)
    model = build({"vocab_size": tok.vocab_size, "context_length": 16, "n_layer": 2, "n_head": 2, "n_embd": 16,
                   "positional": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False})
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=("q", "v", "mlp_in")))
    with torch.no_grad():  # adapters away from zero, so that a missed rebuild changes the logits
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.1)
    run = tmp_path / "run"
    path = save_checkpoint(run / "checkpoints", "step_00000003", model, config={"run": {"name": "t"}},
                           trainer_state={"step": 3}, tokenizer=tok, step=3)
    return model, tok, run, path


def test_the_verbs_and_the_trainer_build_the_same_module_from_one_checkpoint(tmp_path):
    model, tok, run, path = _lora_checkpoint(tmp_path)
    by_verbs = load_model(path)
    by_trainer = load_checkpoint(path).build_model().eval()
    by_name = from_pretrained(run)  # the run folder: its newest complete checkpoint
    assert resolve_model_path(run)[0] == path
    for other in (by_trainer, by_name):
        assert [(n, type(m)) for n, m in by_verbs.named_modules()] == [(n, type(m)) for n, m in other.named_modules()]
        assert by_verbs.state_dict().keys() == other.state_dict().keys()
        assert all(torch.equal(by_verbs.state_dict()[k], other.state_dict()[k]) for k in by_verbs.state_dict())
    assert sum(isinstance(m, LoraLinear) for m in by_verbs.modules()) == 2 * 2  # per block: qkv (q, v slices), mlp_in
    x = torch.tensor([tok.encode("hello world")])
    model.eval()
    with torch.no_grad():
        want = model(x)
        for loaded in (by_verbs, by_trainer, by_name):
            assert torch.equal(loaded(x), want)
