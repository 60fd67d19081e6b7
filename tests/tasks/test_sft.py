"""``task: sft`` on the one pipeline: response-only targets, sample answers at each evaluation,
LoRA from the model section (adapters saved with the checkpoint and rebuilt on load), resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_in_two_parts
from lmforge import from_pretrained
from lmforge.tasks import config_from_dict
from lmforge.data.sft_format import IGNORE, SFTExample
from lmforge.tasks.sft import collate_sft
from lmforge.tasks.run import run


def _records(path: Path, n: int = 40) -> Path:
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(n)]
    recs.append({"instruction": "Say nothing.", "input": "", "output": ""})  # nothing to train: dropped, counted
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture
def sft_dict(tiny_dict, tmp_path):
    data = _records(tmp_path / "alpaca.json")

    def make(name="sft", **sections):
        from tests.conftest import deep_merge

        base = tiny_dict(name, task="sft", tokenizer={"kind": "byte"},
                         model={"context_length": 160},
                         objective={"max_length": 160, "sample_prompts": 1, "sample_tokens": 4},
                         data={"sources": [{"path": str(data)}], "val_fraction": 0.2},
                         train={"max_steps": 4, "batch_size": 4, "eval_every": 2})
        return deep_merge(base, sections)

    return make


def _run(d):
    return run(config_from_dict(d), progress=False, print_fn=lambda *a, **k: None)


def test_collate_shifts_labels_and_masks_prompt_and_padding():
    a = SFTExample([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])  # a two-token prompt, a two-token response
    b = SFTExample([5, 6, 7], [IGNORE, 6, 7])
    batch = collate_sft([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 0]]
    assert batch["targets"].tolist() == [[IGNORE, 3, 4], [6, 7, IGNORE]]


def test_sft_run_with_lora_writes_samples_and_reloads(sft_dict):
    s = _run(sft_dict(model={"lora": {"rank": 2, "alpha": 4, "targets": ["q", "v"]}}))
    run_dir = Path(s["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "sft_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and "### Response:" in rows[0]["prompt"]
    model = from_pretrained(run_dir / "checkpoints" / "best")
    assert getattr(model, "lora_config", None) is not None and model.lora_config.rank == 2
    base_keys = [k for k in model.state_dict() if ".lora." not in k]
    trained = from_pretrained(s["last_checkpoint"]).state_dict()
    assert all(k in trained for k in base_keys)


def test_lora_trains_only_the_adapters(sft_dict):
    s = _run(sft_dict(model={"lora": {"rank": 2, "alpha": 4}}, train={"max_steps": 2, "eval_every": 2}))
    first = from_pretrained(Path(s["run_dir"]) / "checkpoints" / "best").state_dict()
    s2 = _run(sft_dict("again", model={"lora": {"rank": 2, "alpha": 4}}, train={"max_steps": 4, "eval_every": 4}))
    later = from_pretrained(s2["last_checkpoint"]).state_dict()
    for k, v in first.items():  # same seed, same initial base: only adapter tensors may differ
        if ".lora." not in k:
            torch.testing.assert_close(later[k], v)


def test_exact_resume_for_sft(sft_dict):
    n = 2
    straight = _run(sft_dict("straight", train={"max_steps": 2 * n, "eval_every": 100}))
    first, second = run_in_two_parts(
        lambda: config_from_dict(sft_dict("resumed", train={"max_steps": 2 * n, "eval_every": 100})), n)
    got = [h["loss"] for h in first["history"] + second["history"]]
    assert got == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)


def test_ordered_split_is_the_books_layout(sft_dict, tmp_path):
    from lmforge.data.splits import ordered_split
    from lmforge.tasks.sft import split_for_run

    recs = [{"i": i} for i in range(1100)]
    train, val, test = ordered_split(recs, 0.05, 0.10)  # the book: first 85% train, next 10% test, last 5% val
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train == recs[:935] and test == recs[935:1045] and val == recs[1045:]
    cfg = config_from_dict(sft_dict(data={"split": "ordered", "val_fraction": 0.1, "test_fraction": 0.1}))
    train, val, test = split_for_run(cfg)
    in_file = json.loads(Path(cfg.data.sources[0].path).read_text())
    assert train + test + val == in_file  # file order, nothing shuffled
    assert (len(train), len(test), len(val)) == (33, 4, 4)


def test_ordered_split_is_for_record_tasks_only(tiny_dict):
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="data.split: ordered splits the records of tasks sft, dpo"):
        config_from_dict(tiny_dict(data={"split": "ordered"}))
    with pytest.raises(ConfigError, match="data.split"):
        config_from_dict(tiny_dict(task="sft", data={"split": "sorted"}))


def test_sft_test_fraction_is_held_out_and_evaluated_at_the_end(sft_dict):
    s = _run(sft_dict(data={"split": "ordered", "val_fraction": 0.1, "test_fraction": 0.1},
                      train={"max_steps": 2, "eval_every": 2}))
    assert s["test_loss"] > 0 and s["test_ppl"] > 1
    saved = json.loads((Path(s["run_dir"]) / "results.json").read_text())
    assert saved["test_loss"] == pytest.approx(s["test_loss"]) and saved["step"] == 2
    rows = [json.loads(x) for x in (Path(s["run_dir"]) / "test_responses.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "reference", "response"} for r in rows)
    assert all(r["prompt"].rstrip().endswith("### Response:") for r in rows)  # the alpaca template's prompt


def test_smollm2_lora_recipe_has_the_books_935_55_110_split(monkeypatch):
    from lmforge.tasks import load_config
    from lmforge.tasks.sft import split_for_run

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    cfg = load_config(root / "configs" / "sft-smollm2-lora.yaml")
    from lmforge.data import catalog

    if catalog.locate(catalog.get(cfg.data.sources[0].path))[0] is None:
        pytest.skip("catalog:book-instructions is neither mirrored (LMFORGE_DATA_MIRROR) nor cached")
    train, val, test = split_for_run(cfg)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train[0]["instruction"].startswith("Evaluate the following phrase")  # the file's first record


def test_fresh_tokenizers_learn_from_the_rendered_prompt_not_json():
    from lmforge.tasks.sft import SFTOptions, tokenizer_text

    rec = {"instruction": "Name a colour.", "input": "", "output": "Blue.\nOr red."}
    text = tokenizer_text(rec, SFTOptions(template="book"))
    assert text.endswith("### Response:\nBlue.\nOr red.") and "\\n" not in text  # real newlines, no escapes
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert json.loads(tokenizer_text(chat, SFTOptions(format="messages"))) == chat


def test_oasst_validation_prompts_are_the_first_path_before_its_last_reply():
    from lmforge.tasks.sft import SFTOptions, prompt_text
    from lmforge.tokenizer import ByteTokenizer

    tree = {"prompt": {"role": "prompter", "text": "Q1", "replies": [
        {"role": "assistant", "text": "A1", "rank": 0, "replies": [
            {"role": "prompter", "text": "Q2", "replies": [{"role": "assistant", "text": "A2", "rank": 0}]}]}]}}
    text = prompt_text(tree, SFTOptions(format="oasst", template="chat"), ByteTokenizer())
    assert text is not None  # the sample answers of an OASST run (it used to write none)
    assert text.index("Q1") < text.index("A1") < text.index("Q2") and "A2" not in text
