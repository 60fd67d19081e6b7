"""Models by name (``hf:ORG/NAME[@REVISION]``, lmforge.hub) against a Hugging Face cache built on
tmp_path in the hub's own layout (models--ORG--NAME/refs + snapshots): never the network."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import hub
from lmforge.cli import main
from lmforge.tasks import config_from_dict
from lmforge.errors import CheckpointError, ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"
REPO = "test-org/tiny-llama"
VOCAB = 64


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("transformers")


def _tiny_llama(tf, seed: int):
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return tf.LlamaForCausalLM(cfg).eval()


def _tokenizer_json(folder: Path) -> None:
    """A small byte-level BPE tokenizer.json (the Hugging Face tokenizers library's own format)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40])
    tok.train_from_iterator(["once upon a time there was a cat"] * 20, trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_cache(tf, tmp_path_factory) -> Path:
    """A hub cache holding test-org/tiny-llama at main (COMMIT) and at tag v1 (COMMIT_V1, other weights)."""
    root = tmp_path_factory.mktemp("hf_hub_cache")
    repo = root / ("models--" + REPO.replace("/", "--"))
    for commit, seed in ((COMMIT, 0), (COMMIT_V1, 1)):
        snap = repo / "snapshots" / commit
        _tiny_llama(tf, seed).save_pretrained(snap)
        _tokenizer_json(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT_V1)
    broken = root / "models--test-org--no-weights" / "snapshots" / COMMIT
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    (broken.parent.parent / "refs").mkdir()
    (broken.parent.parent / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture()
def offline(hf_cache, monkeypatch):
    """HF_HUB_OFFLINE=1 on the test cache, and any socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("lmforge.hub opened a network connection while offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return hf_cache


# ------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("spec, want", [
    ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", ("HuggingFaceTB/SmolLM2-135M-Instruct", None)),
    ("hf:org/name@main", ("org/name", "main")),
    ("hf:org/name.v2@" + COMMIT, ("org/name.v2", COMMIT)),
    ("hf:gpt2", ("gpt2", None)),  # a legacy top-level name
])
def test_parse_hf_spec(spec, want):
    assert hub.parse_hf_spec(spec) == want


@pytest.mark.parametrize("spec", ["hf:", "hf:org/", "hf:/name", "hf:a/b/c", "hf:org/name@", "hf:org name/x",
                                  "hf:../x"])
def test_malformed_spec_is_one_line(spec):
    with pytest.raises(CheckpointError, match=r"expected hf:ORG/NAME") as e:
        hub.parse_hf_spec(spec)
    assert "\n" not in str(e.value)


def test_allow_patterns_keep_only_what_lmforge_loads():
    """The patterns, applied by huggingface_hub's own filter to a real repository's file list
    (SmolLM2-135M-Instruct's, plus a sharded index and a sentence-transformers pooling file)."""
    from huggingface_hub.utils import filter_repo_objects

    files = [".gitattributes", "README.md", "config.json", "generation_config.json", "merges.txt",
             "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "onnx/model.onnx", "onnx/model_q4.onnx", "pytorch_model.bin", "runs/events.out.tfevents",
             "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "chat_template.jinja", "1_Pooling/config.json", "tf_model.h5", "flax_model.msgpack"]
    kept = set(filter_repo_objects(files, allow_patterns=hub.ALLOW_PATTERNS))
    assert kept == {"config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                    "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "1_Pooling/config.json"}


# ------------------------------------------------------------------------------ resolution
def test_resolves_to_the_cached_snapshot(offline):
    snap = offline / f"models--test-org--tiny-llama/snapshots/{COMMIT}"
    assert hub.resolve_hf_model(f"hf:{REPO}") == snap
    assert hub.resolve_hf_model(f"hf:{REPO}@main") == snap
    assert hub.resolve_hf_model(f"hf:{REPO}@{COMMIT}") == snap
    assert hub.resolve_hf_model(f"hf:{REPO}@v1") == snap.parent / COMMIT_V1


def test_from_pretrained_by_name_matches_transformers(tf, offline):
    """lmforge.from_pretrained("hf:...") loads the snapshot: same logits as transformers on the
    same folder, for main and for the v1 tag (other weights), and the tokenizer comes with it."""
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    for rev, commit in (("", COMMIT), ("@v1", COMMIT_V1)):
        ours, tok = lmforge.from_pretrained(f"hf:{REPO}{rev}", with_tokenizer=True)
        ref = tf.LlamaForCausalLM.from_pretrained(offline / f"models--test-org--tiny-llama/snapshots/{commit}")
        with torch.no_grad():
            assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4
        assert tok is not None and tok.decode(tok.encode("once upon a time")) == "once upon a time"


def test_offline_missing_model_fails_at_once_in_one_line(offline, capsys):
    t0 = time.perf_counter()
    assert main(["download", "hf:test-org/not-cached"]) == 2
    assert time.perf_counter() - t0 < 5.0  # no retries
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "hf:test-org/not-cached" in err and "HF_HUB_OFFLINE" in err
    assert main(["generate", "--model", f"hf:{REPO}@no-such-tag", "--max-new-tokens", "1"]) == 2
    assert f"hf:{REPO}@no-such-tag: not in the Hugging Face cache" in capsys.readouterr().err


def test_download_prints_the_cached_folder(offline, capsys):
    assert main(["download", f"hf:{REPO}", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(offline / f"models--test-org--tiny-llama/snapshots/{COMMIT}")


def test_info_by_name_counts_the_parameters(tf, offline, capsys):
    assert main(["info", f"hf:{REPO}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ref = tf.LlamaForCausalLM.from_pretrained(offline / f"models--test-org--tiny-llama/snapshots/{COMMIT}")
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())


def test_snapshot_without_weights_is_one_line(offline):
    with pytest.raises(CheckpointError, match=r"hf:test-org/no-weights: .* no \.safetensors weights"):
        hub.resolve_hf_model("hf:test-org/no-weights")


def test_generate_cli_by_name(offline, capsys):
    assert main(["generate", "--model", f"hf:{REPO}", "--prompt", "once", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("once")


# --------------------------------------------------------------------------- init_from
def test_init_from_by_name_trains(offline, run_dict, tmp_path):
    """model.init_from: hf:... validates without the network, starts from the snapshot's weights
    and tokenizer, and trains a step."""
    from lmforge.tasks.run import run

    d = run_dict(tmp_path / "run", model={"init_from": f"hf:{REPO}"}, tokenizer={"kind": "bpe"},
                 train={"max_steps": 1})
    for key in ("arch", "n_layer", "n_head", "n_embd", "context_length", "vocab_size", "dropout"):
        d["model"].pop(key, None)
    cfg = config_from_dict(d)
    summary = run(cfg, progress=False)
    assert summary["steps"] == 1
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_init_from_malformed_name_is_a_config_error(run_dict, tmp_path):
    d = run_dict(tmp_path / "run", model={"init_from": "hf:org/name@"})
    with pytest.raises(ConfigError, match=r"model.init_from: hf:org/name@: expected hf:ORG/NAME"):
        config_from_dict(d)
