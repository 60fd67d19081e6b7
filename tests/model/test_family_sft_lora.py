"""One shrunk SFT + LoRA run per family through the task machinery (``task: sft``): the family's
fields travel through the run config and the checkpoint, and every role's adapter trains."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import from_pretrained
from lmforge.tasks import config_from_dict
from lmforge.model import ModelConfig
from lmforge.tasks.run import run

# each family preset shrunk to 2 layers of width 32 (its named fields kept: qkv_bias, qk_norm, ...)
SHRINK = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, mlp_hidden=64, context_length=160, vocab_size=None)
FAMILIES = {
    "llama-3.2-1b": {},
    "qwen2.5-0.5b": {},
    "qwen3-0.6b": {"head_size": 24},  # not n_embd / n_head
    "gemma-3-270m": {"head_size": 16, "sliding_window": 8, "global_every": 2},
}


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_sft_lora_step_on_each_family(tiny_dict, tmp_path, preset):
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(24)]
    (tmp_path / "data.json").write_text(json.dumps(recs))
    d = tiny_dict("sft", task="sft", tokenizer={"kind": "byte"},
                  objective={"max_length": 160, "sample_prompts": 0},
                  data={"sources": [{"path": str(tmp_path / "data.json")}], "val_fraction": 0.2},
                  train={"max_steps": 2, "batch_size": 4, "eval_every": 2})
    d["model"] = {"preset": preset, "dropout": 0.0, **SHRINK, **FAMILIES[preset],
                  "lora": {"rank": 2, "alpha": 4, "targets": ["all"]}}
    s = run(config_from_dict(d), progress=False, print_fn=lambda *a, **k: None)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])
    model = from_pretrained(s["last_checkpoint"])
    c = model.config
    for field, value in FAMILIES[preset].items():
        assert getattr(c, field) == value
    full = ModelConfig.from_preset(preset)
    assert (c.qk_norm, c.qkv_bias, c.sandwich_norm, c.activation) == \
        (full.qk_norm, full.qkv_bias, full.sandwich_norm, full.activation)
    lora = {k: v for k, v in model.state_dict().items() if ".lora." in k}
    # every role of every layer got an adapter, and training moved B off zero
    assert sum(k.endswith(".B") for k in lora) == 2 * 7
    assert all(v.abs().max() > 0 for k, v in lora.items() if k.endswith(".B"))
