"""A new user's first hour, round two (issue 24): the CLI surprises, run in-process through
``lmforge.cli.main`` -- several --text, --input -, both spellings of the token budget, --top-k
in chat, chat refused on a model that cannot chat, LoRA export, fp16 on a CPU refused early."""

from __future__ import annotations

import io
import json

import pytest
import torch

from lmforge.cli import build_parser, main
from lmforge.model import build
from lmforge.store import save_model
from lmforge.tokenizer import CharTokenizer

TEXT = "the film was good. the film was bad. a fine, warm story. a dull, cold mess.\n"


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    tok = CharTokenizer.train([TEXT])
    model = build({"preset": "baby", "vocab_size": tok.vocab_size, "n_layer": 1, "n_embd": 16, "n_head": 2,
                   "context_length": 64, "num_classes": 2, "pooling": "last",
                   "labels": ["negative", "positive"]}).eval()
    folder = save_model(model, tmp_path_factory.mktemp("clf") / "model", tokenizer=tok)
    return folder, model, tok


def _expected_probs(model, tok, text: str) -> list[float]:
    ids = torch.tensor([tok.encode(text)])  # (1, T): one text, no padding
    with torch.no_grad():
        return model(ids, head="cls").softmax(-1)[0].tolist()


def test_classify_every_text_flag_and_stdin(classifier, capsys, monkeypatch):
    folder, model, tok = classifier
    texts = ["a fine, warm story", "a dull, cold mess"]
    assert main(["classify", "--model", str(folder), "--text", texts[0], "--text", texts[1]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    for r, text in zip(rows, texts):
        want = _expected_probs(model, tok, text)
        assert r["probs"] == pytest.approx(dict(zip(["negative", "positive"], want)), abs=1e-5)
        assert r["label"] == ["negative", "positive"][max(range(2), key=want.__getitem__)]  # names, not 0/1
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n\n"))
    assert main(["classify", "--model", str(folder), "--input", "-"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    _one_line_error(capsys, main(["classify", "--model", str(folder), "--input", "-"]), "stdin", "no text lines")


def test_token_budget_has_both_spellings_and_chat_takes_top_k():
    parser = build_parser()
    for verb in ("generate", "chat"):
        dest = "max_new_tokens" if verb == "generate" else "max_tokens"
        for flag in ("--max-new-tokens", "--max-tokens"):
            assert getattr(parser.parse_args([verb, "--model", "m", flag, "7"]), dest) == 7
    assert parser.parse_args(["chat", "--model", "m", "--top-k", "5"]).top_k == 5


def test_chat_on_a_model_without_a_chat_template_is_one_line(classifier, capsys):
    folder, _, _ = classifier  # a char tokenizer: no template, no chat tokens
    code = main(["chat", "--model", str(folder)])
    _one_line_error(capsys, code, "no chat template", "lmforge generate")
    code = main(["generate", "--model", str(folder), "--chat", "--prompt", "hi"])
    _one_line_error(capsys, code, "no chat template")


def test_piped_chat_echoes_the_users_turns():
    from lmforge.chat_session import ChatSession, run_chat
    from lmforge.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = build({"preset": "llama-baby", "vocab_size": tok.vocab_size, "n_layer": 1, "n_embd": 32,
                   "context_length": 256}).eval()
    out = io.StringIO()
    session = ChatSession(model, tok, temperature=0.9, top_k=3, max_tokens=4, seed=0)
    assert run_chat(session, io.StringIO("hello there\n/max_tokens 3\n/top_k 0\n/top_k 2\nsecond turn\n"), out) == 0
    text = out.getvalue()
    assert "> hello there\n" in text and "> /max_tokens 3\n" in text and "> second turn\n" in text
    assert "/top_k: got '0', expected an integer >= 1" in text and "[top_k = 2]" in text and session.top_k == 2
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hello there", "second turn"]


def test_lora_model_exports_merged_or_as_peft_from_the_cli(tmp_path, capsys):
    tf = pytest.importorskip("transformers")
    from lmforge.model.lora import LoraConfig, apply_lora

    torch.manual_seed(0)
    model = build({"preset": "llama-baby", "vocab_size": 40, "n_layer": 1, "n_embd": 32, "n_head": 4,
                   "context_length": 32}).eval()
    apply_lora(model, LoraConfig(rank=2, targets=("q", "v")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.3)
    folder = save_model(model, tmp_path / "lora")
    _one_line_error(capsys, main(["export", "--model", str(folder), "--out", str(tmp_path / "a")]), "--merge")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert "LoRA merged" in capsys.readouterr().out
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max().item() < 1e-4
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_fp16_on_a_cpu_is_refused_when_the_config_is_read(tmp_path):
    from lmforge.errors import ConfigError
    from lmforge.tasks import config_from_dict

    base = {"task": "pretrain", "run": {"out_dir": str(tmp_path / "r"), "device": "cpu"},
            "data": {"sources": [{"path": str(tmp_path / "never-read.txt")}]}, "train": {"precision": "fp16"}}
    with pytest.raises(ConfigError, match="train.precision: fp16 .* needs a CUDA device"):
        config_from_dict(base, pending_paths=(str(tmp_path / "never-read.txt"),))
    config_from_dict({**base, "train": {"precision": "fp32"}}, pending_paths=(str(tmp_path / "never-read.txt"),))
