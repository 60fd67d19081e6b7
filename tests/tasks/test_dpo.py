"""``task: dpo`` on the one trainer: step 0 with policy == reference (ln 2, margins 0) for every
kind of reference, preference metrics and the eval report, exact resume (N + N == 2N), gradient
accumulation, the shipped teaching recipes' golden curve, and bad input with one clear line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lmforge.tasks import config_from_dict
from lmforge.errors import ConfigError, DataError
from lmforge.tasks import get_task
from lmforge.tasks.common import TaskContext
from lmforge.train.distributed import DistInfo
from lmforge.tasks.run import run
from tests.conftest import deep_merge, loss_metrics_grads, run_in_two_parts, shrunk_arithmetic_sft, shrunk_recipe

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dpo_scratch_tiny.json"


def quiet(*a, **k):
    pass


def _run(d):
    return run(config_from_dict(d), progress=False, print_fn=quiet)


@pytest.fixture(scope="module")
def sft_run(run_dict, tmp_path_factory):
    """A tiny causal LM pretrained on built-in arithmetic text: the reference for DPO."""
    out = tmp_path_factory.mktemp("dpo") / "sft"
    d = run_dict(out, data={"sources": [{"path": "builtin:arithmetic", "num_docs": 400, "seed": 0}]},
                 model={"context_length": 40},
                 train={"max_steps": 4, "checkpoint_every": 4})
    return _run(d)["run_dir"]


@pytest.fixture
def dpo_dict(sft_run, tiny_dict):
    def make(name="dpo", **sections):
        base = tiny_dict(name, task="dpo", model={"init_from": sft_run},
                         data={"sources": [{"path": "builtin:arithmetic", "num_docs": 48, "seed": 1}],
                               "val_fraction": 0.25},
                         objective={"beta": 0.1},
                         train={"max_steps": 4, "batch_size": 4, "lr": 3e-3, "eval_every": 2, "eval_batch_size": 8})
        base["model"] = {"init_from": sft_run}  # no fresh-model fields next to init_from
        return deep_merge(base, sections)
    return make


def _parts(d, tmp_path):
    cfg = config_from_dict(d)
    ctx = TaskContext(cfg=cfg, run_dir=Path(cfg.run.out_dir), dist=DistInfo(), progress=False, say=quiet)
    return get_task("dpo").build(ctx)


# ------------------------------------------------------------------------------ step 0
@pytest.mark.parametrize("reference", ["copy", "precompute"])
def test_step0_policy_equals_reference_gives_ln2_and_zero_margins(dpo_dict, tmp_path, reference):
    parts = _parts(dpo_dict(objective={"reference": reference}), tmp_path)
    parts.objective.setup(parts.model, torch.device("cpu"))
    batch = parts.train_data.batch(0, 0)
    loss, m = parts.objective.loss(parts.model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0, abs=1e-6) and m["rewards/accuracy"] == 0
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0
    assert parts.objective.targets_in(batch) == 4  # pairs, not rows
    assert batch["input_ids"].shape[0] == 8  # chosen and rejected stacked: one forward pass


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_shared_prompt_rows_give_the_flat_rows_loss_and_gradients(dpo_dict, tmp_path, loss_type):
    parts = _parts(dpo_dict(objective={"loss_type": loss_type}), tmp_path)
    obj, model = parts.objective, parts.model
    obj.setup(model, torch.device("cpu"))
    with torch.no_grad():  # move the policy away from the reference so the rewards are not all 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = parts.train_data.batch(0, 0)
    assert batch["shared_ids"].shape[0] == 4  # one row per pair: prompt, chosen, rejected
    flat = {k: v for k, v in batch.items() if not k.startswith("shared_")}
    (l1, m1, g1), (l2, m2, g2) = loss_metrics_grads(obj, model, [batch, flat])
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    for k in ("rewards/margins", "logps/chosen", "logps/rejected"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-4), k
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_lora_model_is_its_own_reference_with_adapters_off(dpo_dict, tmp_path):
    """A LoRA model's reference is its base (adapters switched off): no deep copy is made."""
    from lmforge.model.lora import LoraLinear, adapters_disabled

    parts = _parts(dpo_dict(model={"init_from": dpo_dict()["model"]["init_from"],
                                   "lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"]}}), tmp_path)
    model = parts.model
    parts.objective.setup(model, torch.device("cpu"))
    assert parts.objective.kind == "adapters" and parts.objective.reference is model
    batch = parts.train_data.batch(0, 0)
    loss, m = parts.objective.loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and m["rewards/margins"] == 0
    with torch.no_grad():  # move the adapters: the policy changes, the reference stays the base
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                for p in layer.lora.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    ref = parts.objective.reference_logps(batch)
    with adapters_disabled(model):
        base = parts.objective._pair_logps(model.eval(), batch)
    model.train()
    torch.testing.assert_close(ref.chosen, base.chosen)
    assert not torch.allclose(parts.objective._pair_logps(model, batch).chosen, base.chosen)
    assert model.training  # the reference pass restored the training mode


def test_reference_free_losses_hold_no_reference(dpo_dict, tmp_path):
    parts = _parts(dpo_dict(objective={"loss_type": "simpo", "beta": 2.0}), tmp_path)
    parts.objective.setup(parts.model, torch.device("cpu"))
    assert parts.objective.kind == "none" and parts.objective.reference is None
    loss, _ = parts.objective.loss(parts.model, parts.train_data.batch(0, 0))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------ training
def test_dpo_end_to_end_metrics_and_report(dpo_dict):
    s = _run(dpo_dict(train={"max_steps": 8, "eval_every": 4, "lr": 3e-2}))
    run_dir = Path(s["run_dir"])
    first = s["history"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1 sees policy == reference
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
              "logps/rejected"):
        assert k in first and f"val_{k}" in s["evals"][-1]
    assert s["evals"][-1]["val_rewards/margins"] > 0 and s["evals"][-1]["val_loss"] < math.log(2)
    report = json.loads((run_dir / "eval_report.json").read_text())
    assert report["val"]["pairs"] == 12


def test_exact_resume_n_plus_n_equals_2n(dpo_dict):
    n = 3
    sections = dict(train={"max_steps": 2 * n, "eval_every": 100})
    straight = _run(dpo_dict("straight", **sections))
    first, second = run_in_two_parts(lambda: config_from_dict(dpo_dict("resumed", **sections)), n)
    got = [h["loss"] for h in first["history"] + second["history"]]
    assert got == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)


def test_grad_accum_and_precomputed_reference_match_one_big_batch_with_a_copy(dpo_dict):
    """2 x 2 pairs with accumulation and cached reference log-probs == 4 pairs with a frozen copy."""
    a = _run(dpo_dict("big", train={"max_steps": 3, "batch_size": 4, "grad_accum": 1, "eval_every": 100}))
    b = _run(dpo_dict("accum", objective={"reference": "precompute"},
                      train={"max_steps": 3, "batch_size": 2, "grad_accum": 2, "eval_every": 100}))
    assert (Path(b["run_dir"]) / "reference_logps.pt").is_file()
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=1e-5)
    assert a["evals"][-1]["val_loss"] == pytest.approx(b["evals"][-1]["val_loss"], abs=1e-5)


# ------------------------------------------------------------------------------ the teaching recipe
def test_dpo_scratch_recipes_golden_curve(tmp_path, token_cache):
    """configs/arithmetic-sft.yaml then configs/dpo-scratch.yaml, shrunk to a few steps. Regenerate
    after a deliberate change with LMFORGE_UPDATE_GOLDEN=1 (and commit the file)."""
    sft = shrunk_arithmetic_sft(tmp_path / "sft", token_cache)
    raw = shrunk_recipe("dpo-scratch", tmp_path / "dpo", max_steps=6, eval_every=3, batch_size=4)
    raw["model"]["init_from"] = str(tmp_path / "sft")
    raw["data"]["sources"][0]["num_docs"] = 40
    sft = config_from_dict(sft)
    run(sft, progress=False, print_fn=quiet)
    s = run(config_from_dict(raw), progress=False, print_fn=quiet)
    record = {"losses": [h["loss"] for h in s["history"]],
              "val_margins": [e["val_rewards/margins"] for e in s["evals"]], "torch": torch.__version__}
    if os.environ.get("LMFORGE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"description": "tests/tasks/test_dpo.py::test_dpo_scratch_recipes_golden_curve",
                                      **record}, indent=1) + "\n")
    assert GOLDEN.is_file(), "no golden curve: run with LMFORGE_UPDATE_GOLDEN=1 once and commit it"
    golden = json.loads(GOLDEN.read_text())
    assert record["losses"] == pytest.approx(golden["losses"], abs=2e-4)
    assert record["val_margins"] == pytest.approx(golden["val_margins"], abs=2e-4)


def test_ordered_split_is_the_books_layout_for_preference_pairs(dpo_dict, tmp_path):
    from lmforge.tasks.dpo import split_for_run

    rows = [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(20)]
    rows[3]["rejected"] = rows[3]["chosen"]  # skipped: the boundaries stay those of the file (as in the book's data)
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = dpo_dict(data={"sources": [{"path": str(p)}], "split": "ordered", "val_fraction": 0.1, "test_fraction": 0.1},
                 objective={"skip_identical": True})
    parts = split_for_run(config_from_dict(d))
    prompts = {s: [pair.prompt for _, pair in parts[s]] for s in ("train", "val", "test")}
    # the book: the first 85% train (here 80%), the next 10% test, the last 5% (here 10%) validate
    assert prompts == {"train": [f"q{i}" for i in range(16) if i != 3], "test": ["q16", "q17"], "val": ["q18", "q19"]}
    assert parts["skipped"] == {"identical": 1}


# ------------------------------------------------------------------------------ bad input
def test_record_missing_rejected_names_file_and_index(dpo_dict, tmp_path):
    p = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2", "chosen": "a"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows * 1))
    with pytest.raises(DataError, match=r"prefs.jsonl: record 1: no 'rejected' field"):
        _run(dpo_dict(data={"sources": [{"path": str(p)}]}))


def test_identical_pair_is_an_error_unless_skipped_and_field_names(dpo_dict, tmp_path):
    p = tmp_path / "same.jsonl"
    rows = [{"question": f"What is {i}?", "good": f" {i}", "bad": f" {i + 1}"} for i in range(12)]
    rows[3]["bad"] = rows[3]["good"]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}
    with pytest.raises(DataError, match="record 3: chosen and rejected are identical"):
        _run(dpo_dict(data={"sources": [{"path": str(p)}]}, objective=names))
    s = _run(dpo_dict("skip", data={"sources": [{"path": str(p)}], "val_fraction": 0.2},
                      objective={**names, "skip_identical": True}, train={"max_steps": 1}))
    assert s["steps"] == 1


@pytest.mark.parametrize("objective,needle", [
    ({"beta": 0}, "objective.beta: got 0"),
    ({"beta": -1.0}, "objective.beta"),
    ({"loss_type": "kto"}, "objective.loss_type: got 'kto'"),
    ({"reference": "none"}, "objective.reference: the sigmoid loss needs a reference"),
    ({"label_smoothing": 0.5, "loss_type": "robust"}, "objective.label_smoothing"),
])
def test_bad_options_are_config_errors(dpo_dict, objective, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(dpo_dict(objective=objective))


def test_prompt_longer_than_the_context_is_one_clear_line(dpo_dict, tmp_path):
    p = tmp_path / "long.jsonl"
    rows = [{"prompt": "1" * (60 if i == 5 else 5), "chosen": " a", "rejected": " b"} for i in range(12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"long.jsonl: record 5: the prompt has 60 tokens.*context_length 40"):
        _run(dpo_dict(data={"sources": [{"path": str(p)}]}))


def test_smollm2_dpo_recipe_has_the_books_split_by_position(monkeypatch):
    from lmforge.tasks import load_config
    from lmforge.tasks.dpo import split_for_run

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    cfg = load_config(root / "configs" / "dpo-smollm2-lora.yaml")
    from lmforge.data import catalog

    if catalog.locate(catalog.get(cfg.data.sources[0].path))[0] is None:
        pytest.skip("catalog:book-preferences is neither mirrored (LMFORGE_DATA_MIRROR) nor cached")
    parts = split_for_run(cfg)
    # 935 / 110 / 55 by record position; the 6 train records with chosen == rejected are skipped
    assert (len(parts["train"]), len(parts["test"]), len(parts["val"])) == (929, 110, 55)
    assert [p.index for _, p in parts["test"]] == list(range(935, 1045))
    assert [p.index for _, p in parts["val"]] == list(range(1045, 1100))
    assert parts["skipped"] == {"identical": 6}


def test_fixed_batches_by_length_cover_every_pair_once_longest_first():
    from lmforge.tasks.dpo import fixed_batches

    class Enc:  # what fixed_batches reads of EncodedPairs: (prompt, chosen, rejected) ids per pair
        ids = [([1] * n, [2, 2], [3]) for n in (3, 9, 1, 7, 5, 2, 8)]

        def __len__(self):
            return len(self.ids)

    enc = Enc()
    in_order = [b["pair_index"].tolist() for b in fixed_batches(enc, 3, 0, 64, "val")()]
    assert in_order == [[0, 1, 2], [3, 4, 5], [6]]
    batches = list(fixed_batches(enc, 3, 0, 64, "val", by_length=True)())
    got = [b["pair_index"].tolist() for b in batches]
    assert sorted(sum(got, [])) == list(range(7))
    assert got[0] == [1, 6, 3]  # the longest prompts first
    widths = [b["chosen_ids"].shape[1] if "chosen_ids" in b else b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)  # each batch padded only to its own longest pair
