"""`lmforge eval` on a classifier trained from a headerless TSV: the eval file's own layout is
read (JSONL by its extension; a TSV's header row is skipped, never taken as a label), and
integer labels map to the recipe's label names. Accuracy is checked against the model's own
argmax computed here, text by text."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import DataError
from lmforge.model import build
from lmforge.tasks import EvalRequest, evaluate
from lmforge.tokenizer import CharTokenizer

ROWS = [("a fine, warm story", 1), ("a dull, cold mess", 0), ("the film was good", 1), ("the film was bad", 0),
        ("warm and fine", 1), ("cold and dull", 0)]
# trained from a headerless TSV, its columns named in the recipe
RUN_CONFIG = {"task": "classify", "objective": {"text_field": "sentence", "label_field": "label",
                                                "labels": ["negative", "positive"], "max_length": 32},
              "data": {"sources": [{"path": "train.tsv", "columns": ["sentence", "label"], "quoting": False}]}}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    tok = CharTokenizer.train([" ".join(t for t, _ in ROWS)])
    model = build({"preset": "baby", "vocab_size": tok.vocab_size, "n_layer": 1, "n_embd": 16, "n_head": 2,
                   "context_length": 64, "num_classes": 2, "pooling": "last",
                   "labels": ["negative", "positive"]}).eval()
    return model, tok


def _accuracy(model, tok) -> float:
    right = 0
    with torch.no_grad():
        for text, label in ROWS:
            right += int(model(torch.tensor([tok.encode(text)]), head="cls").argmax(-1).item() == label)
    return right / len(ROWS)


def test_jsonl_is_read_as_json_whatever_the_training_file_was(classifier, tmp_path):
    model, tok = classifier
    path = tmp_path / "my.jsonl"
    path.write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in ROWS))
    metrics = evaluate(model, tok, RUN_CONFIG, EvalRequest(data=str(path)))
    assert metrics["examples"] == len(ROWS)
    assert metrics["labels"] == ["negative", "positive"]  # 0/1 in the file, names in the report
    assert metrics["accuracy"] == pytest.approx(_accuracy(model, tok))


def test_tsv_with_a_header_does_not_read_the_header_as_a_record(classifier, tmp_path):
    model, tok = classifier
    body = "".join(f"{t}\t{y}\n" for t, y in ROWS)
    for name, text in (("headed.tsv", "sentence\tlabel\n" + body), ("plain.tsv", body)):
        (tmp_path / name).write_text(text)
        metrics = evaluate(model, tok, RUN_CONFIG, EvalRequest(data=str(tmp_path / name)))
        assert metrics["examples"] == len(ROWS), name
        assert metrics["accuracy"] == pytest.approx(_accuracy(model, tok)), name


def test_a_label_outside_the_names_is_still_refused(classifier, tmp_path):
    model, tok = classifier
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"sentence": "x", "label": 2}) + "\n")
    with pytest.raises(DataError, match="label '2' was never seen"):
        evaluate(model, tok, RUN_CONFIG, EvalRequest(data=str(path)))
