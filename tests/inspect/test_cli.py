"""``lmforge inspect ...`` and ``lmforge report``: files written, one-line errors on bad input,
and (when Chromium is installed) the pages rendered headless as a user would see them."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny char-level decoder saved as a model folder, a second one (its 'fine-tuned' copy),
    a run folder holding it as checkpoints/best, and a bigram model folder."""
    from lmforge.model import build
    from lmforge.store import save_model
    from lmforge.tokenizer import CharTokenizer

    root = tmp_path_factory.mktemp("inspect_cli")
    tok = CharTokenizer.train(["to be, or not to be: that is the question.\n"])
    torch.manual_seed(0)
    model = build({"vocab_size": tok.vocab_size, "context_length": 48, "n_layer": 2, "n_head": 2, "n_embd": 16})
    save_model(model, root / "model", tokenizer=tok)
    with torch.no_grad():
        model.transformer.blocks[1].mlp.fc.weight.mul_(1.5)
    save_model(model, root / "tuned", tokenizer=tok)
    run = root / "run"
    save_model(model, run / "checkpoints" / "best", tokenizer=tok, config={"run": {"name": "cli-run"}})
    recs = [{"step": s, "split": "train", "time": s, "loss": 3.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    recs.append({"step": 3, "split": "val", "time": 3, "loss": 1.2, "ppl": math.exp(1.2)})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "cli-run"}, "sample": {"prompt": "to be"}}))
    save_model(build({"arch": "bigram", "vocab_size": tok.vocab_size}), root / "bigram", tokenizer=tok)
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "error" in lines[0], err
    for n in needles:
        assert n in lines[0], lines[0]


def test_inspect_attention_writes_grid_layers_and_html(folders, tmp_path, capsys):
    rc, out, err = _run(capsys, "inspect", "attention", "--model", folders / "run", "--text", "to be, or not to be",
                        "--out", tmp_path, "--heads", "1")
    assert rc == 0
    assert "is a run folder; using its best checkpoint" in err
    for name in ("attention.png", "attention_layer0.png", "attention_layer1.png", "attention.html"):
        assert (tmp_path / name).stat().st_size > 500, name


def test_inspect_attention_windows_long_texts(folders, tmp_path, capsys):
    text = "to be, or not to be: that is the question. to be"  # 48 tokens
    rc, out, _ = _run(capsys, "inspect", "attention", "--model", folders / "model", "--file",
                      _write(tmp_path / "t.txt", text), "--out", tmp_path, "--window", "20", "--start", "4")
    assert rc == 0 and "the text has 48 tokens: the plots show tokens 4..23" in out


def test_inspect_weights_and_against(folders, tmp_path, capsys):
    rc, out, _ = _run(capsys, "inspect", "weights", "--model", folders / "model", "--against", folders / "tuned",
                      "--out", tmp_path)
    assert rc == 0 and "transformer.blocks.1.mlp.fc.weight" in out
    assert "moved most: transformer.blocks.1.mlp.fc.weight 0.5" in out
    records = json.loads((tmp_path / "weights.json").read_text())
    assert {"spectral_norm", "frobenius_norm", "effective_rank"} <= set(records[0])
    for name in ("weights_stats.png", "weights_hist.png", "weights_change.png", "weights_change.json"):
        assert (tmp_path / name).stat().st_size > 100, name


def test_inspect_lens(folders, tmp_path, capsys):
    rc, out, _ = _run(capsys, "inspect", "lens", "--model", folders / "model", "--text", "to be, or not",
                      "--out", tmp_path, "--metric", "rank")
    assert rc == 0 and "position 11 ('o' -> target 't')" in out and "layer 1" in out
    lens = json.loads((tmp_path / "lens.json").read_text())
    assert len(lens["rows"]) == 3 and len(lens["target_prob"][0]) == 12
    assert (tmp_path / "lens.png").is_file() and (tmp_path / "lens_top5.png").is_file()


def test_inspect_tokens_with_prompt_mask(folders, tmp_path, capsys):
    rc, out, _ = _run(capsys, "inspect", "tokens", "--model", folders / "model", "--prompt", "to be, ",
                      "--text", "or not", "--out", tmp_path, "--no-color")
    assert rc == 0 and "o[~" in out and "n[" in out and "over the 6 tokens that train" in out
    data = json.loads((tmp_path / "tokens.json").read_text())
    assert data["trains"] == [False] * 7 + [True] * 6 and data["losses"][0] is None
    assert "does not train" in (tmp_path / "tokens.html").read_text()


def test_inspect_tokens_with_chat_messages(folders, tmp_path, capsys):
    msgs = [{"role": "user", "content": "be"}, {"role": "assistant", "content": "or"}]  # 43 characters
    rc, out, _ = _run(capsys, "inspect", "tokens", "--model", folders / "model", "--no-color", "--out", tmp_path,
                      "--messages", _write(tmp_path / "chat.json", json.dumps({"messages": msgs})))
    assert rc == 0
    data = json.loads((tmp_path / "tokens.json").read_text())
    trained = "".join(t for t, flag in zip(data["tokens"], data["trains"]) if flag)
    assert trained.startswith("or") and sum(data["trains"]) == len("or<|end|>")  # the reply + its end tag (chars)
    assert "~" in out and "over the 9 tokens that train" in out
    rc, _, err = _run(capsys, "inspect", "tokens", "--model", folders / "model", "--out", tmp_path,
                      "--messages", _write(tmp_path / "bad.json", "[{"))
    _one_line_error(rc, err, "not valid JSON")


def test_report_verb(folders, tmp_path, capsys):
    rc, out, _ = _run(capsys, "report", folders / "run", "--out", tmp_path / "r.html")
    assert rc == 0 and (tmp_path / "r.html").stat().st_size > 10_000


@pytest.mark.parametrize("argv, needles", [
    (["inspect", "attention", "--text", "to be " * 20], ["longer than the model's context_length 48"]),
    (["inspect", "attention", "--text", "to be", "--layers", "7"], ["layer 7 is out of range", "2 layers"]),
    (["inspect", "attention", "--text", "to be", "--heads", "0,9"], ["head 9 is out of range"]),
    (["inspect", "lens"], ["no text"]),
    (["inspect", "attention", "--text", "to be", "--start", "30"], ["window start 30 is out of range"]),
], ids=["too-long", "bad-layer", "bad-head", "no-text", "bad-start"])
def test_inspect_bad_input_is_one_line(folders, tmp_path, capsys, argv, needles):
    rc, _, err = _run(capsys, *argv, "--model", folders / "model", "--out", tmp_path)
    _one_line_error(rc, err, *needles)


def test_bigram_and_missing_metrics_are_one_line(folders, tmp_path, capsys):
    rc, _, err = _run(capsys, "inspect", "attention", "--model", folders / "bigram", "--text", "to be", "--out", tmp_path)
    _one_line_error(rc, err, "no attention layers")
    rc, _, err = _run(capsys, "report", tmp_path)
    _one_line_error(rc, err, "no metrics.jsonl")
    rc, _, err = _run(capsys, "inspect", "weights", "--model", tmp_path / "nope", "--out", tmp_path)
    _one_line_error(rc, err, "no such file or folder")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------- Chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1400, timeout: float = 120) -> Path:
    """Render ``page`` in headless Chromium (network off) and save a PNG screenshot."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={png.parent / '.chromium'}",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # any network fetch would fail
           f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()]
    env = {**os.environ, "HOME": str(png.parent)}
    subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, check=False)
    return png


def _distinct_colours(png: Path) -> int:
    from matplotlib.image import imread

    img = imread(str(png))[..., :3]
    return len(torch.unique((torch.as_tensor(img).reshape(-1, 3) * 255).round().int(), dim=0))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_pages_render_in_headless_chromium(folders, tmp_path, capsys):
    assert _run(capsys, "report", folders / "run", "--out", tmp_path / "report.html")[0] == 0
    assert _run(capsys, "inspect", "attention", "--model", folders / "model", "--text", "to be, or not to be",
                "--out", tmp_path)[0] == 0
    for page in ("report.html", "attention.html"):
        png = screenshot(tmp_path / page, tmp_path / f"{page}.png")
        assert png.is_file() and png.stat().st_size > 5000, page
        assert _distinct_colours(png) > 50, page  # text, plots and colours, not a blank page


if __name__ == "__main__":  # screenshot pages by hand: python tests/inspect/test_cli.py PAGE.html OUT.png
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
