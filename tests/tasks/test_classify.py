"""lmforge.tasks.classify: the classification format (labels, bad records, collate) and the classify
task end to end (golden curve, reports, checkpoint with its head, eval/classify verbs, exact resume,
init_from, freezing), and bad input that must fail with one clear line."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from lmforge import from_pretrained
from lmforge.errors import ConfigError, DataError
from lmforge.tasks import config_from_dict
from lmforge.tasks.classify import collate_classification, encode_classification
from lmforge.tasks.run import run
from lmforge.tokenizer import CharTokenizer
from lmforge.train.logging import read_metrics
from tests.conftest import run_in_two_parts
from tests.test_cli import lmforge


def cli(capsys, *args):
    """Run a verb in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from lmforge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_cli_error(result, *needles):
    code, out, err = result
    assert code == 2 and "Traceback" not in err, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], err
    for n in needles:
        assert n in lines[0], lines[0]

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "classify_tiny.json"
POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]


def _sentiment_tsv(path: Path, n: int = 120, seed: int = 0, header: bool = True) -> Path:
    """Short texts whose label is the mood word they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        word = rng.choice(POS if label == "pos" else NEG)
        rows.append(f"the {rng.choice(['film', 'song', 'day'])} was {word}\t{label}")
    path.write_text(("text\tlabel\n" if header else "") + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def clf_dict(tiny_dict, tmp_path):
    data = _sentiment_tsv(tmp_path / "mood.tsv")

    def make(name="clf", **sections):
        base = tiny_dict(name, task="classify",
                         model={"context_length": 32},
                         objective={"max_length": 24},
                         data={"sources": [{"path": str(data)}], "val_fraction": 0.2, "test_fraction": 0.2},
                         train={"max_steps": 12, "batch_size": 8, "lr": 3e-3, "eval_every": 6,
                                "best_metric": "val_accuracy", "best_mode": "max", "eval_batch_size": 16})
        from tests.conftest import deep_merge

        return deep_merge(base, sections)

    return make


def quiet(*a, **k):
    pass


def _run(d):
    return run(config_from_dict(d), progress=False, print_fn=quiet)


# ------------------------------------------------------------------------------ classification
def test_classification_end_to_end(clf_dict, tmp_path):
    s = _run(clf_dict())
    run_dir = Path(s["run_dir"])
    losses = [h["loss"] for h in s["history"]]
    # golden curve: regenerate with LMFORGE_UPDATE_GOLDEN=1 (and commit the file) after a deliberate change
    import os

    if os.environ.get("LMFORGE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"description": "tests/tasks/test_classify.py::test_classification_end_to_end",
                                      "torch": torch.__version__, "losses": losses}, indent=1) + "\n")
    assert GOLDEN.is_file(), "no golden curve: run with LMFORGE_UPDATE_GOLDEN=1 once and commit it"
    assert losses == pytest.approx(json.loads(GOLDEN.read_text())["losses"], abs=2e-4)
    rep = s["reports"]
    assert set(rep) == {"val", "test"} and rep["test"]["examples"] == 24
    assert rep["test"]["labels"] == ["neg", "pos"] and len(rep["test"]["confusion_matrix"]) == 2
    for f in ("eval_report.json", "confusion_matrix_val.png", "confusion_matrix_test.png", "training_curves.png",
              "config.yaml", "run_info.json"):
        assert (run_dir / f).is_file(), f
    val_rows = [r for r in read_metrics(run_dir) if r["split"] == "val"]
    assert {"loss", "accuracy", "macro_f1"} <= set(val_rows[-1])

    # the best checkpoint reloads with its head through from_pretrained
    model, tok = from_pretrained(run_dir / "checkpoints" / "best", with_tokenizer=True)
    assert model.config.num_classes == 2 and model.config.labels == ["neg", "pos"]
    ids = torch.tensor([tok.encode("the day was good")])
    assert model(ids, torch.ones_like(ids), head="cls").shape == (1, 2)


def test_classifier_learns_the_task(clf_dict):
    s = _run(clf_dict(train={"max_steps": 60, "eval_every": 30, "lr": 5e-3}))
    assert s["reports"]["test"]["accuracy"] >= 0.9


def test_exact_resume_for_classification(clf_dict):
    n = 4
    sections = dict(model={"dropout": 0.1}, train={"max_steps": 2 * n, "eval_every": 100})
    straight = _run(clf_dict("straight", **sections))
    first, second = run_in_two_parts(lambda: config_from_dict(clf_dict("resumed", **sections)), n)
    got = [h["loss"] for h in first["history"]] + [h["loss"] for h in second["history"]]
    assert got == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    a = from_pretrained(straight["last_checkpoint"]).state_dict()
    b = from_pretrained(second["last_checkpoint"]).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the resumed run's metrics hold each step once (rows past the checkpoint are dropped)
    steps = [r["step"] for r in read_metrics(Path(second["run_dir"])) if r["split"] == "train"]
    assert steps == sorted(set(steps))


def test_init_from_a_pretrained_decoder_adds_a_head_and_freezes(tiny_dict, clf_dict):
    pre = _run(tiny_dict("pre", train={"max_steps": 3, "checkpoint_every": 3}))
    s = _run(clf_dict(model={"init_from": pre["run_dir"]}, tokenizer={"kind": "char"},
                      train={"trainable": "last_blocks:1", "max_steps": 3, "eval_every": 3}))
    base = from_pretrained(pre["last_checkpoint"]).state_dict()
    tuned = from_pretrained(s["last_checkpoint"]).state_dict()
    torch.testing.assert_close(tuned["transformer.tok_emb.weight"], base["transformer.tok_emb.weight"])  # frozen
    block = [k for k in base if k.startswith("transformer.blocks.0.") and k.endswith("weight")]
    assert any(not torch.equal(tuned[k], base[k]) for k in block)  # the last (only) block trained
    assert "classifier.out.weight" in tuned and "classifier.out.weight" not in base


def test_head_trainable_only_moves_the_classifier(clf_dict):
    from lmforge.train.freeze import apply_trainable

    s = _run(clf_dict(train={"trainable": "head", "max_steps": 3, "eval_every": 3}))
    model = from_pretrained(s["last_checkpoint"])
    trainable, total = apply_trainable(model, "head")
    assert trainable == sum(p.numel() for p in model.classifier.parameters()) < total


# ------------------------------------------------------------------------------ CLI
def test_eval_and_classify_verbs(clf_dict, tmp_path, capsys):
    s = _run(clf_dict(train={"max_steps": 40, "eval_every": 20, "lr": 5e-3}))
    data = _sentiment_tsv(tmp_path / "held.tsv", n=20, seed=9)
    r = lmforge("eval", "--model", s["run_dir"], "--data", data, cwd=tmp_path)  # one real process, end to end
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["examples"] == 20 and 0 <= out["accuracy"] <= 1 and len(out["confusion_matrix"]) == 2
    code, stdout, err = cli(capsys, "classify", "--model", s["run_dir"], "--text", "the song was great")
    assert code == 0, err
    row = json.loads(stdout)
    assert row["label"] in ("neg", "pos") and sum(row["probs"].values()) == pytest.approx(1, abs=1e-4)
    texts = tmp_path / "texts.txt"
    texts.write_text("the day was bad\nthe film was nice\n")
    code, stdout, _ = cli(capsys, "classify", "--model", s["run_dir"], "--input", texts)
    assert code == 0 and len(stdout.splitlines()) == 2

    # bad input: an unseen label, a missing label field, a zero batch count, no text given
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nthe day was good\tmeh\n")
    best = Path(s["run_dir"]) / "checkpoints" / "best"  # a checkpoint: no run-folder note on stderr
    assert_cli_error(cli(capsys, "eval", "--model", best, "--data", bad), "never seen")
    assert_cli_error(cli(capsys, "eval", "--model", best, "--data", data, "--label-field", "mood"),
                     "no label field 'mood'")
    assert_cli_error(cli(capsys, "eval", "--model", best, "--data", data, "--max-batches", "0"),
                     "--max-batches")
    assert_cli_error(cli(capsys, "classify", "--model", best), "--text")


# ------------------------------------------------------------------------------ bad input
def test_single_class_training_data_is_an_error(clf_dict, tmp_path):
    one = tmp_path / "one.tsv"
    one.write_text("text\tlabel\n" + "".join(f"x{i}\tpos\n" for i in range(20)))
    d = clf_dict(data={"sources": [{"path": str(one)}]})
    with pytest.raises(DataError, match="only one label"):
        _run(d)


def test_missing_label_field_and_non_string_text(clf_dict, tmp_path):
    with pytest.raises(DataError, match="no label field 'mood'"):
        _run(clf_dict(objective={"label_field": "mood"}))
    p = tmp_path / "nums.jsonl"
    p.write_text("".join(json.dumps({"text": i, "label": i % 2}) + "\n" for i in range(20)))
    with pytest.raises(DataError, match="text field 'text' is int"):
        _run(clf_dict(data={"sources": [{"path": str(p)}]}))


def test_header_only_file_is_an_error(clf_dict, tmp_path):
    p = tmp_path / "empty.tsv"
    p.write_text("text\tlabel\n")
    with pytest.raises(DataError, match="no records found"):
        _run(clf_dict(data={"sources": [{"path": str(p)}]}))


def test_cls_pooling_on_a_decoder_is_an_error(clf_dict):
    with pytest.raises(ConfigError, match="pooling: 'cls' on a causal decoder"):
        config_from_dict(clf_dict(objective={"pooling": "cls"}))


def test_init_from_with_another_vocabulary_is_an_error(tiny_dict, clf_dict, tmp_path):
    pre = _run(tiny_dict("pre2", train={"max_steps": 1}))
    from lmforge.tokenizer import ByteTokenizer

    big = tmp_path / "byte.json"
    ByteTokenizer().save(big)
    with pytest.raises(ConfigError, match="vocab_size"):
        _run(clf_dict(model={"init_from": pre["run_dir"]}, tokenizer={"kind": "file", "path": str(big)}))


def test_init_from_cannot_change_the_architecture(tiny_dict, clf_dict):
    pre = _run(tiny_dict("pre3", train={"max_steps": 1}))
    with pytest.raises(ConfigError, match="model.n_layer: cannot change when model.init_from is set"):
        _run(clf_dict(model={"init_from": pre["run_dir"], "n_layer": 3}))


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
        {"text": 'a "quoted" one', "label": "pos"}]


def test_label_mapping_round_trip_and_unseen_label():
    tok = CharTokenizer.train(["good bad film quoted one a\""])
    names = ["neg", "pos"]
    ex = encode_classification([dict(r, _where=f"r{i}") for i, r in enumerate(ROWS)], tok, "text", "label",
                               names, max_length=5)
    assert [names[i] for i in ex.labels] == [r["label"] for r in ROWS]
    assert ex.truncated == 3  # all three texts are longer than 5 characters
    assert all(len(s) <= 5 for s in ex.ids)
    with pytest.raises(DataError, match="never seen in training"):
        encode_classification([{"text": "x", "label": "meh", "_where": "f:3"}], tok, "text", "label", names, 8)


@pytest.mark.parametrize("bad", [{"text": 3, "label": "pos"}, {"label": "pos"}, {"text": "x"},
                                 {"text": "x", "label": None}])
def test_bad_records_name_the_problem(bad):
    tok = CharTokenizer.train(["x"])
    with pytest.raises(DataError, match="text field|label field"):
        encode_classification([dict(bad, _where="f.jsonl:7")], tok, "text", "label", ["neg", "pos"], 8)


def test_integer_and_string_labels_are_the_same_label():
    tok = CharTokenizer.train(["ab"])
    ex = encode_classification([{"text": "a", "label": 1}, {"text": "b", "label": "0"}], tok, "text", "label",
                               ["0", "1"], 4)
    assert ex.labels == [1, 0]


def test_collate_pads_to_the_micro_batch_and_masks():
    b = collate_classification([[5, 6, 7], [8]], [1, 0], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
