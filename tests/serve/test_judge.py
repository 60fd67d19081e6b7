"""lmforge judge: score parsing, the summary, the answers file's checks, and the whole verb against
an lmforge server on loopback whose model is a scripted judge (its weights make it reply
'Score: 85' whatever it is asked)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from tests.serve.serve_helpers import running_server  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.errors import InputError  # noqa: E402
from lmforge.model import ModelConfig, build  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.batcher import Batcher  # noqa: E402
from lmforge.serve.judge import Judgement, judge_messages, parse_score, read_answers, summarize  # noqa: E402
from lmforge.tokenizer import ByteTokenizer  # noqa: E402

REPLY = "Score: 85"


# ------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("reply,score", [
    ("Correct and clear.\nScore: 90", 90), ("score=7", 7), ("Score: **100**", 100), ("Score: 75/100", 75),
    ("Score: 20. On reflection, Score: 40", 40), ("I would give it 80.", None), ("Score: 140", None), ("", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_summarize_mean_bands_and_lowest():
    scores = [90, 15, None, 55, 15, 100, 42]
    js = [Judgement(i, f"q{i}", f"a{i}", s, "why") for i, s in enumerate(scores)]
    s = summarize(js, lowest=3)
    assert s["answers"] == 7 and s["scored"] == 6 and s["unscored"] == 1
    assert s["mean"] == pytest.approx((90 + 15 + 55 + 15 + 100 + 42) / 6)
    assert s["distribution"] == {"0-19": 2, "20-39": 0, "40-59": 2, "60-79": 0, "80-100": 2}
    assert [(j["index"], j["score"]) for j in s["lowest"]] == [(1, 15), (4, 15), (6, 42)]
    assert [j["index"] for j in s["unscored_answers"]] == [2]


def test_read_answers_checks_each_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "p", "response": "r", "reference": null}\n\n{"prompt": "p2", "response": "r2"}\n')
    assert [r["prompt"] for r in read_answers(f)] == ["p", "p2"]
    for text, words in [('{"prompt": "p"}\n', "line 1"), ('{"prompt": "p", "response": "r"}\n{oops\n', "line 2"),
                        ("", "no answers"), ('{"prompt": "p", "response": "r", "reference": 3}\n', "reference")]:
        f.write_text(text)
        with pytest.raises(InputError, match=words):
            read_answers(f)


def test_judge_messages_show_the_reference_only_when_given():
    with_ref = judge_messages({"prompt": "2+2?", "response": "4", "reference": "4"})[1]["content"]
    without = judge_messages({"prompt": "2+2?", "response": "4", "reference": None})[1]["content"]
    assert "Reference answer:\n4" in with_ref and "Reference" not in without
    assert without.startswith("Question:\n2+2?") and "Candidate answer:\n4" in without


# ------------------------------------------------------------------------------ end to end
def scripted_judge(reply: str, context_length: int = 4096):
    """A 1-layer decoder over bytes whose next token depends only on the current one (attention
    and MLP weights zero; embeddings and head one-hot): after the chat template's final newline
    it says ``reply``, then its end-of-sequence token. ``reply``'s characters must all differ."""
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = build(ModelConfig(vocab_size=tok.vocab_size, context_length=context_length, n_layer=1, n_head=2,
                              n_embd=32, activation="swiglu", norm="rmsnorm", positional="rope", bias=False,
                              tie_embeddings=False)).eval()
    chain = [ord("\n")] + [ord(c) for c in reply] + [tok.eos_id]
    assert len(set(chain)) == len(chain) and len(chain) <= 32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.zero_()
        for k, (now, nxt) in enumerate(zip(chain, chain[1:])):
            model.transformer.tok_emb.weight[now, k] = 1.0
            model.lm_head.weight[nxt, k] = 10.0
    return model, tok


def test_judge_verb_against_an_lmforge_server(tmp_path, capsys):
    model, tok = scripted_judge(REPLY)
    answers = tmp_path / "test_responses.jsonl"
    rows = [{"prompt": "What is 2+2?", "reference": "4", "response": "4"},
            {"prompt": "Name a colour.", "reference": None, "response": "Blue."},
            {"prompt": "Tell me a long story.", "reference": None, "response": "word " * 1000},  # too long to judge
            {"prompt": "Capital of France?", "reference": "Paris", "response": "Paris"}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "judged.jsonl"
    with running_server(create_app(Batcher(model, tok, max_batch=2), "judge-model")) as url:
        code = main(["judge", "--answers", str(answers), "--endpoint", url, "--out", str(out), "--json",
                     "--lowest", "2", "--max-tokens", "20", "--concurrency", "3"])
        printed = capsys.readouterr().out
        assert code == 0, printed
        s = json.loads(printed)
        assert s["model"] == "judge-model" and s["endpoint"] == url + "/v1"
        assert s["scored"] == 3 and s["unscored"] == 1 and s["mean"] == 85
        assert s["distribution"]["80-100"] == 3
        assert [j["index"] for j in s["lowest"]] == [0, 1] and s["lowest"][0]["reply"] == REPLY
        assert s["unscored_answers"][0]["index"] == 2 and "context" in s["unscored_answers"][0]["reply"]
        judged = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [j["score"] for j in judged] == [85, 85, None, 85]
        # the plain report, and a wrong model name as a one-line error
        assert main(["judge", "--answers", str(answers), "--endpoint", url + "/v1", "--max-tokens", "20"]) == 0
        report = capsys.readouterr().out
        assert "mean score 85.0 (3 scored, 1 unscored)" in report and "80-100: 3" in report
        assert main(["judge", "--answers", str(answers), "--endpoint", url, "--model", "other"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "404" in err[0] and "judge-model" in err[0]
