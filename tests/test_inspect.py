"""lmforge.inspect: explicit attention == SDPA, attention-map properties, logit lens, weight
statistics against closed forms, per-token loss, the run report, and bad input."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from lmforge.errors import DataError, InputError
from lmforge.inspect import common
from lmforge.inspect.attention_maps import (attention, attention_html, plot_attention_grid, plot_attention_layer,
                                            record_attention)
from lmforge.inspect.lens import logit_lens, plot_lens, plot_top_tokens
from lmforge.inspect.report import log_sample, read_samples, report_after_run, write_report
from lmforge.inspect.tokens import chat_ids, prompt_response_ids, to_terminal, token_html, token_losses
from lmforge.inspect.weights import (compare_weights, effective_rank, layer_group, matrix_stats, plot_weight_change,
                                     plot_weight_histograms, plot_weight_stats, spectral_norm, weight_stats)
from lmforge.model import build, causal_lm_loss
from lmforge.model.layers import Attention
from lmforge.tokenizer import DEFAULT_SPECIAL_TOKENS, BPETokenizer, CharTokenizer

TEXT = "the cat sat on the mat. the cat sat on the hat."


def _model(**fields):
    torch.manual_seed(0)
    cfg = {"vocab_size": 48, "context_length": 64, "n_layer": 2, "n_head": 4, "n_embd": 32, **fields}
    model = build(cfg).eval()
    with torch.no_grad():  # untrained weights are nearly uniform: make the attention peaky
        for m in model.modules():
            if isinstance(m, Attention):
                m.qkv.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train([TEXT + " ROMEO:,\n"], specials=DEFAULT_SPECIAL_TOKENS)


def _attn_outputs(model, *args, **kwargs):
    """Each attention layer's output for one forward pass."""
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _a, o: outs.append(o)) for m in model.modules()
             if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            final = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def _sdpa_vs_explicit(model, *args, **kwargs):
    sdpa, final_sdpa = _attn_outputs(model, *args, **kwargs)
    with record_attention(model) as layers:
        explicit, final_explicit = _attn_outputs(model, *args, **kwargs)
    assert len(sdpa) == len(explicit) == model.config.n_layer
    for a, b in zip(sdpa, explicit):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(final_explicit, final_sdpa, atol=1e-5, rtol=0)
    assert not any(m.record_weights for m in layers)  # switched back off
    return [m.last_weights for m in layers]


# ---------------------------------------------------------------------------- explicit attention
@pytest.mark.parametrize("fields", [
    {},  # GPT-2 style: learned positions, MHA
    {"positional": "rope", "n_kv_head": 2, "norm": "rmsnorm", "activation": "swiglu", "bias": False},  # Llama GQA
    {"positional": "rope", "n_kv_head": 1},  # MQA
], ids=["mha-learned", "gqa-rope", "mqa-rope"])
def test_explicit_attention_equals_sdpa_decoder(fields):
    model = _model(**fields)
    ids = torch.randint(0, 48, (2, 20))
    weights = _sdpa_vs_explicit(model, ids)
    for w in weights:
        assert w.shape == (2, 4, 20, 20)  # GQA heads expanded to every query head
        assert torch.all(w.triu(1) == 0)  # causal: nothing above the diagonal
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 20))


def test_explicit_attention_equals_sdpa_with_left_padding():
    model = _model(positional="rope", n_kv_head=2)
    ids = torch.randint(0, 48, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    weights = _sdpa_vs_explicit(model, ids, attention_mask=mask)
    assert torch.all(weights[0][0, :, 5:, :5] == 0)  # real tokens never look at the padding


def test_explicit_attention_equals_sdpa_with_kv_cache():
    from lmforge.model import KVCache

    model = _model(positional="rope", n_kv_head=2)
    ids = torch.randint(0, 48, (1, 10))
    results = []
    for record in (False, True):
        cache = KVCache.for_model(model, 1)
        with torch.no_grad():
            if record:
                with record_attention(model) as layers:
                    model(ids[:, :9], cache=cache)
                    step = model(ids[:, 9:], cache=cache)
                assert layers[0].last_weights.shape == (1, 4, 1, 10)  # one query sees all 10 keys
            else:
                model(ids[:, :9], cache=cache)
                step = model(ids[:, 9:], cache=cache)
        results.append(step)
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


def test_explicit_attention_equals_sdpa_encoder_padding():
    model = _model(arch="encoder", norm_position="post", embedding_norm=True, type_vocab_size=2)
    ids = torch.randint(0, 48, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 4:] = 0
    unpadded = model(ids, attention_mask=mask)  # the default encoder path skips padding
    model.transformer.unpad = False  # layer by layer, both paths on the padded layout
    weights = _sdpa_vs_explicit(model, ids, attention_mask=mask)
    with record_attention(model):  # the explicit path agrees with the unpadded one where tokens are real
        explicit = model(ids, attention_mask=mask)
    torch.testing.assert_close(explicit[mask.bool()], unpadded[mask.bool()], atol=1e-5, rtol=0)
    for w in weights:
        assert torch.all(w[1, :, :, 10:] == 0) and torch.all(w[2, :, :, 4:] == 0)  # padding columns
        upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
        assert torch.all(w[1, :, :10, :10][:, upper] > 0)  # bidirectional: keys to the right get weight
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 16))


# ---------------------------------------------------------------------------- attention API
def test_attention_maps_select_layers_and_heads(tok, tmp_path):
    model = _model(n_layer=3)
    maps = attention(model, tok, TEXT, layers=[0, -1], heads=[1, 3])
    T = len(tok.encode(TEXT))
    assert maps.weights.shape == (2, 2, T, T) and maps.layers == [0, 2] and maps.heads == [1, 3]
    assert maps.tokens[3] == "·" and "".join(maps.texts) == TEXT
    full = attention(model, tok, TEXT)
    torch.testing.assert_close(maps.weights[1, 0], full.weights[2, 1])
    win = maps.window(10, 16)
    assert win.weights.shape == (2, 2, 16, 16) and win.offset == 10 and win.total == T
    torch.testing.assert_close(win.weights, maps.weights[:, :, 10:26, 10:26])
    assert not model.training

    grid = plot_attention_grid(win, tmp_path / "grid.png")
    layer = plot_attention_layer(win, 2, tmp_path / "layer2.png")
    page = attention_html(win, tmp_path / "a.html")
    for p in (grid, layer):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert "http" not in text and "<script src" not in text
    data = json.loads(re.search(r"const DATA = (\{.*?\});\n", text).group(1))
    assert data["layers"] == [0, 2] and len(data["w"][0][0]) == 16
    assert all(sum(row) <= 1000 + 16 for row in data["w"][0][0])  # per mille; the window cuts keys before 10
    data = json.loads(re.search(r"const DATA = (\{.*?\});\n", attention_html(maps, tmp_path / "b.html").read_text()).group(1))
    assert all(abs(sum(row) - 1000) <= T for row in data["w"][1][1])  # whole rows sum to 1


def test_attention_bad_input(tok):
    model = _model(context_length=16)
    with pytest.raises(InputError, match="longer than the model's context_length 16"):
        attention(model, tok, TEXT)
    with pytest.raises(InputError, match="layer 5 is out of range: the model has 2 layers"):
        attention(model, tok, "the cat", layers=[5])
    with pytest.raises(InputError, match="head 4 is out of range: the model has 4 heads"):
        attention(model, tok, "the cat", heads=[4])
    with pytest.raises(InputError, match="empty text"):
        attention(model, tok, "")
    bigram = build({"arch": "bigram", "vocab_size": 48})
    with pytest.raises(InputError, match="no attention layers"):
        attention(bigram, tok, "the cat")
    with pytest.raises(InputError, match="no attention layers"):
        logit_lens(bigram, tok, "the cat")


def test_parse_indices():
    assert common.parse_indices("0,2,5-7") == [0, 2, 5, 6, 7]
    assert common.parse_indices("-1") == [-1]
    assert common.parse_indices(None) is None
    with pytest.raises(InputError, match="expected indices"):
        common.parse_indices("a,b")


# ---------------------------------------------------------------------------- logit lens
@pytest.mark.parametrize("fields", [{}, {"positional": "rope", "norm": "rmsnorm", "n_kv_head": 2}])
def test_lens_last_layer_equals_model_logits(tok, fields, tmp_path):
    model = _model(**fields)
    lens = logit_lens(model, tok, TEXT, k=5)
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        logits = model(ids)[0, :-1]  # (T-1, vocab)
    torch.testing.assert_close(lens.logits_last, logits, atol=1e-5, rtol=0)
    probs = logits.softmax(-1)
    target = probs.gather(1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(lens.target_prob[-1], target, atol=1e-6, rtol=0)
    assert lens.rows == ["embed", "layer 0", "layer 1"] and lens.target_prob.shape == (3, ids.shape[1] - 1)
    assert torch.all(lens.target_rank[-1] == (probs > target[:, None]).sum(-1))
    top = probs.argmax(-1)
    assert [r[0] for r in lens.top_tokens[-1]] == common.token_labels(tok, top.tolist())
    json.dumps(lens.to_json())
    if fields:
        return  # the plots are drawn once
    for p in (plot_lens(lens, tmp_path / "l.png"), plot_lens(lens, tmp_path / "r.png", metric="rank"),
              plot_top_tokens(lens, tmp_path / "t.png")):
        assert p.stat().st_size > 1000


def test_lens_of_an_encoder_reads_through_the_mlm_head(tok):
    model = _model(arch="encoder", mlm_head=True)
    lens = logit_lens(model, tok, "the cat")
    with torch.no_grad():
        logits = model.mlm_logits(torch.tensor([tok.encode("the cat")]))[0]
    torch.testing.assert_close(lens.logits_last, logits, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="no masked-LM head"):
        logit_lens(_model(arch="encoder"), tok, "the cat")


# ---------------------------------------------------------------------------- weights
def test_spectral_norm_and_effective_rank_closed_forms():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    s = matrix_stats(d)
    assert s["spectral_norm"] == pytest.approx(3.0) and s["frobenius_norm"] == pytest.approx(math.sqrt(14))
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert s["effective_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert matrix_stats(torch.eye(7))["effective_rank"] == pytest.approx(7.0)
    u, v = torch.randn(9, 1), torch.randn(1, 5)
    rank1 = matrix_stats(u @ v)
    assert rank1["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert rank1["spectral_norm"] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)
    w = torch.randn(20, 12)
    assert spectral_norm(w) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-5)
    assert matrix_stats(w)["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-5)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_weight_stats_and_change(tmp_path):
    model = _model()
    records = weight_stats(model)
    names = [r["name"] for r in records]
    assert "transformer.blocks.1.attn.qkv.weight" in names and "transformer.tok_emb.weight" in names
    assert "lm_head.weight" not in names  # tied to tok_emb: counted once
    assert layer_group("transformer.blocks.1.mlp.fc.weight") == "layer 1"
    assert layer_group("transformer.pos_emb.weight") == "embeddings"
    other = _model()
    with torch.no_grad():
        other.transformer.blocks[1].mlp.fc.weight.mul_(1.1)
    change = {r["name"]: r["rel_change"] for r in compare_weights(model, other)}
    assert change["transformer.blocks.1.mlp.fc.weight"] == pytest.approx(0.1, rel=1e-4)
    assert change["transformer.blocks.0.mlp.fc.weight"] == 0.0
    with pytest.raises(InputError, match="same"):
        compare_weights(model, _model(n_layer=3))
    for p in (plot_weight_histograms(model, tmp_path / "h.png"), plot_weight_stats(records, tmp_path / "s.png"),
              plot_weight_change(compare_weights(model, other), tmp_path / "c.png")):
        assert p.stat().st_size > 1000


# ---------------------------------------------------------------------------- per-token loss
def test_token_losses_match_the_model_loss(tok, tmp_path):
    model = _model()
    tl = token_losses(model, tok, TEXT)
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        ref = causal_lm_loss(model(ids)[:, :-1], ids[:, 1:])
    assert tl.losses[0] is None and len(tl.losses) == ids.shape[1]
    assert tl.mean_loss == pytest.approx(float(ref), rel=1e-5)
    plain = to_terminal(tl, color=False)
    assert plain.startswith("th[") and f"mean loss {tl.mean_loss:.4f}" in plain
    assert "\x1b[48;2;" in to_terminal(tl)
    page = token_html(tl, tmp_path / "t.html").read_text()
    assert page.count("<span") >= len(tl.texts) and "http" not in page


def test_loss_mask_of_prompt_and_chat(tok, tmp_path):
    model = _model()
    ids, trains = prompt_response_ids(tok, "the cat ", "sat on the mat")
    assert trains == [False] * 8 + [True] * 14
    tl = token_losses(model, tok, ids=ids, trains=trains)
    assert tl.mean_loss == pytest.approx(sum(tl.losses[8:]) / 14, rel=1e-6)
    bpe = BPETokenizer.train([TEXT] * 20, vocab_size=300)  # parses the chat tags as special tokens
    msgs = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    ids, trains = chat_ids(bpe, msgs)
    assert bpe.decode(ids, skip_special_tokens=False) == bpe.apply_chat_template(msgs)
    trained = bpe.decode([i for i, t in zip(ids, trains) if t], skip_special_tokens=False)
    assert trained == "sat<|end|>"
    tl = token_losses(_model(vocab_size=300), bpe, ids=ids, trains=trains)
    assert "does not train" in token_html(tl, tmp_path / "m.html").read_text()
    with pytest.raises(InputError, match="causal LM"):
        token_losses(_model(arch="encoder"), tok, "the cat")
    with pytest.raises(InputError, match="unknown role"):
        chat_ids(tok, [{"role": "robot", "content": "x"}])


# ---------------------------------------------------------------------------- report
def _tiny_run(run, tok, model=None, samples=True):
    from lmforge.store import save_model

    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 6):
        lines.append({"step": step, "split": "train", "time": step, "loss": 4 - 0.3 * step, "lr": 1e-3,
                      "tokens_per_s": 900.0 + step, "grad_norm": 1.0 / step})
    for step in (3, 5):
        lines.append({"step": step, "split": "val", "time": step, "loss": 4 - 0.25 * step,
                      "ppl": math.exp(4 - 0.25 * step), "token_accuracy": 0.1 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = {"run": {"name": "tiny-report"}, "sample": {"prompt": "the cat"}, "model": {"n_layer": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run_info.json").write_text(json.dumps({"git_commit": "abc123", "torch": torch.__version__}))
    if samples:
        log_sample(run, 5, "the cat sat <on> the mat")
    if model is not None:
        save_model(model, run / "checkpoints" / "best", tokenizer=tok, config=cfg)
    return run


def test_report_of_a_tiny_run(tok, tmp_path):
    run = _tiny_run(tmp_path / "run", tok, _model())
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for name in ("loss", "lr", "tokens_per_s", "grad_norm", "ppl", "token_accuracy"):
        assert name in page, name
    assert "tiny-report" in page and "abc123" in page and "the cat sat &lt;on&gt; the mat" in page
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"(https?:|ftp:)?//[a-z]", text) and "url(" not in text  # no external URLs
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 4  # metrics, weight stats, histograms, attention
    assert "checkpoints/best" in page
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"step": 6, "te')  # a line cut short by a crash is skipped
    assert [s["step"] for s in read_samples(run)] == [5]


def test_report_without_checkpoint_or_samples(tok, tmp_path):
    run = _tiny_run(tmp_path / "run", tok, samples=False)
    page = write_report(run, tmp_path / "out" / "r.html").read_text()
    assert "no samples logged" in page and "no checkpoint plots" in page
    assert page.count("data:image/png;base64,") == 1


def test_report_bad_input(tok, tmp_path):
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no metrics logged"):
        write_report(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        write_report(tmp_path / "nope")
    said = []
    assert report_after_run(tmp_path, say=said.append) is None and "could not write the run report" in said[0]
    assert report_after_run(tmp_path, enabled=False, say=said.append) is None and len(said) == 1


def test_head_patterns_of_known_maps():
    from lmforge.inspect.attention_maps import AttentionMaps, head_patterns

    T = 6
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1  # every token looks one back
    ids = [1, 2, 3, 1, 2, 3]  # a repeat: query 3 (id 1) follows-copy key 1 (id 2), etc.
    induct = torch.zeros(T, T)
    induct[:3, 0] = 1
    induct[3, 1], induct[4, 2], induct[5, 0] = 1, 1, 1  # 3 and 4 look at what followed their copy, 5 does not
    maps = AttentionMaps(tokens=list("abcabc"), texts=list("abcabc"), ids=ids,
                         weights=torch.stack([prev, induct])[None], layers=[0], heads=[0, 1])
    p, i = head_patterns(maps)
    assert p["previous"] == pytest.approx(1.0) and p["self"] == pytest.approx(1 / T) and p["distance"] == pytest.approx(5 / 6)
    assert i["induction"] == pytest.approx(2 / 3)  # queries 3, 4, 5 have earlier copies; 3 and 4 look right
    assert i["first"] == pytest.approx(4 / 6)
