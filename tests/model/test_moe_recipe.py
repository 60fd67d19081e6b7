"""The MoE recipe end to end, a few steps on a small text: its training log carries the router
losses and each layer's expert usage, the run report draws the expert-usage plot, and the
recipe's active parameters equal its dense twin's plus the routers."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.inspect.report import write_report
from lmforge.model import build, count_active_parameters, count_parameters
from lmforge.tasks import load_config
from lmforge.tasks.run import run

REPO = Path(__file__).resolve().parents[2]
MOE, DENSE = REPO / "configs" / "moe-shakespeare.yaml", REPO / "configs" / "moe-shakespeare-dense.yaml"


def test_recipe_twins_have_equal_active_parameters():
    moe = build(load_config(MOE).model_config(vocab_size=65))
    dense = build(load_config(DENSE).model_config(vocab_size=65))
    c = moe.config
    assert count_active_parameters(moe) == count_parameters(dense) + c.n_layer * c.n_experts * c.n_embd
    assert count_parameters(moe) > 1.5 * count_parameters(dense)


def test_recipe_logs_expert_usage_and_the_report_plots_it(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40)
    cfg = load_config(MOE, [f"run.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                            f"data.sources=[{{path: {text}}}]", "train.max_steps=6", "train.eval_every=3",
                            "train.eval_batches=2", "sample.max_new_tokens=4", "sample.prompt=To",
                            "model.n_layer=2", "model.n_embd=32", "model.moe_hidden=16", "train.batch_size=4",
                            "train.log_every=1", "logging.report=false"])
    run(cfg, progress=False, print_fn=lambda *a, **k: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    last = train[-1]
    for layer in range(2):
        shares = [last[f"expert_usage/L{layer}/E{e}"] for e in range(4)]
        assert abs(sum(shares) - 1) < 1e-6
    # the step's loss is cross-entropy + 0.01 * load balancing + 0.001 * z-loss
    assert abs(last["loss"] - (last["ce_loss"] + 0.01 * last["moe_aux_loss"] + 0.001 * last["moe_z_loss"])) < 1e-4
    val = [r for r in records if r.get("split") == "val"]
    assert val and not any(k.startswith("expert_usage") for r in val for k in r)  # evaluation: CE only
    page = write_report(tmp_path / "run", with_model=False).read_text()
    assert "<h2>Expert usage</h2>" in page
    assert page.count("data:image/png;base64,") == 2  # the metric panels and the expert-usage plot
    assert "expert_usage/L0/E0" not in page.split("<h2>Evaluation</h2>")[0]  # not one panel per expert
