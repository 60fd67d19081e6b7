"""lmforge.store: where a model is (run folders, checkpoints, best, latest) and what is in it
(save/load round trip, from_pretrained, every broken folder named)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import lmforge
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import ModelConfig, build
from lmforge.model.lora import LoraConfig, LoraLinear, apply_lora
from lmforge.store import CONFIG, WEIGHTS, from_pretrained, load_model, resolve_model_path, save_model
from lmforge.tokenizer import CharTokenizer
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint

V, CTX = 37, 16  # tiny vocabulary and context shared by the test models
# Tiny versions of each family: same fields as the presets, a few thousand parameters.
GPT2 = dict(arch="decoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16,
            activation="gelu_tanh", norm="layernorm", positional="learned", bias=True, tie_embeddings=True)
LLAMA = dict(arch="decoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
             activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positional="rope", bias=False,
             tie_embeddings=False)
MQA = dict(LLAMA, n_kv_head=1)
MHA_ROPE = dict(LLAMA, n_kv_head=4)
BERT = dict(arch="encoder", vocab_size=V, context_length=CTX, n_layer=2, n_head=2, n_embd=16, activation="gelu",
            norm="layernorm", norm_eps=1e-12, norm_position="post", embedding_norm=True, positional="learned",
            type_vocab_size=2, mlm_head=True, pooling="cls")
BIGRAM = dict(arch="bigram", vocab_size=V, context_length=CTX, n_layer=1, n_head=1, n_embd=V, positional="none")

DECODERS = {"gpt2": GPT2, "llama-gqa": LLAMA, "llama-mqa": MQA, "llama-mha": MHA_ROPE}


@functools.cache
def tiny(name: str, seed: int = 0, **overrides):
    """A tiny model (eval mode), cached so hypothesis examples share it. Do not mutate."""
    table = {**DECODERS, "bert": BERT, "bigram": BIGRAM}
    torch.manual_seed(seed)
    return build(ModelConfig(**{**table[name], **overrides})).eval()


def tokens(seed: int, *shape: int, vocab: int = V) -> torch.Tensor:
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ IO
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert", "bigram"])
def test_save_load_round_trip(tmp_path, name):
    model = tiny(name, seed=5)
    folder = save_model(model, tmp_path / "m")
    assert (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()
    loaded = load_model(folder)
    assert not loaded.training
    assert loaded.config == model.config
    x = tokens(0, 2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if model.config.tie_embeddings and name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.tok_emb.weight


def test_save_overwrites_atomically(tmp_path):
    save_model(tiny("gpt2", seed=1), tmp_path / "m")
    save_model(tiny("gpt2", seed=2), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left
    x = tokens(0, 1, 5)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(x), tiny("gpt2", seed=2)(x))


def test_from_pretrained(tmp_path):
    model = tiny("llama-gqa", seed=3)
    save_model(model, tmp_path / "m", config={"train": {"lr": 0.001}})
    loaded = lmforge.from_pretrained(tmp_path / "m")
    assert not loaded.training
    x = tokens(0, 1, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    loaded, tok = lmforge.from_pretrained(str(tmp_path / "m"), with_tokenizer=True)
    assert tok is None


@pytest.fixture
def saved(tmp_path) -> Path:
    """A model folder without its checksums.json (as older folders are), so the tests below that
    edit a file reach the check behind the checksums; test_edited_config_is_caught_by_checksums
    keeps it."""
    folder = save_model(tiny("gpt2"), tmp_path / "m")
    (folder / "checksums.json").unlink()
    return folder


def test_edited_config_is_caught_by_checksums(tmp_path):
    folder = save_model(tiny("gpt2"), tmp_path / "m")
    cfg = yaml.safe_load((folder / CONFIG).read_text())
    cfg["model"]["n_layer"] = 3
    (folder / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"config.yaml is corrupt: checksum mismatch"):
        load_model(folder)


def test_missing_folder(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="nope"):
        lmforge.from_pretrained(path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_missing_weights(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(CheckpointError) as e:
        lmforge.from_pretrained(saved)
    assert str(saved / WEIGHTS) in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(saved, damage):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", ["train:\n  lr: 0.1\n", "- a\n- b\n", "", "model: 3\n", "model: [unclosed\n"])
def test_config_without_model_section(saved, content):
    (saved / CONFIG).write_text(content)
    with pytest.raises(CheckpointError) as e:
        lmforge.from_pretrained(saved)
    assert str(saved / CONFIG) in str(e.value)


def test_missing_config(saved):
    (saved / CONFIG).unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    assert str(saved / CONFIG) in str(e.value)


@pytest.mark.parametrize("change", [{"n_embd": 32}, {"n_layer": 3}, {"n_layer": 1}, {"tie_embeddings": False},
                                    {"vocab_size": V + 1}])
def test_weights_not_matching_config(saved, change):
    cfg = yaml.safe_load((saved / CONFIG).read_text())
    cfg["model"].update(change)
    (saved / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(saved)
    assert str(saved / WEIGHTS) in str(e.value)


def test_invalid_model_section_is_config_error(saved):
    cfg = yaml.safe_load((saved / CONFIG).read_text())
    cfg["model"]["activation"] = "tanh"
    (saved / CONFIG).write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="model.activation"):
        load_model(saved)


TINY = {"vocab_size": 20, "context_length": 8, "n_layer": 1, "n_head": 1, "n_embd": 8}


def _run(tmp_path: Path, steps=(2, 4), best: int | None = 2) -> Path:
    """A run folder as training leaves it: config.yaml, metrics, checkpoints/step_*, best."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: t}\n")
    (run / "metrics.jsonl").write_text("")
    model = build(TINY)
    cfg = {"model": dict(TINY)}
    for s in steps:
        save_checkpoint(run / "checkpoints", f"step_{s:08d}", model, config=cfg, trainer_state={}, step=s)
    if best is not None:
        save_checkpoint(run / "checkpoints", "best", model, config=cfg, trainer_state={}, step=best,
                        metrics={"val_loss": 1.0})
    return run


def test_model_folders_and_other_paths_pass_through(tmp_path):
    run = _run(tmp_path)
    ckpt = run / "checkpoints" / "step_00000004"
    assert resolve_model_path(ckpt) == (ckpt, None)
    assert resolve_model_path(tmp_path / "nothing") == (tmp_path / "nothing", None)
    (tmp_path / "plain").mkdir()
    assert resolve_model_path(tmp_path / "plain") == (tmp_path / "plain", None)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_path(str(hf)) == (hf, None)


def test_a_run_folder_resolves_to_its_best_checkpoint(tmp_path):
    run = _run(tmp_path)
    path, note = resolve_model_path(run)
    assert path == run / "checkpoints" / "best"
    assert note == f"{run} is a run folder; using its best checkpoint {path} (step 2)"
    path, note = resolve_model_path(run / "checkpoints")  # the checkpoints folder too
    assert path == run / "checkpoints" / "best" and "run folder" in note


def test_without_a_complete_best_the_newest_complete_step_is_taken(tmp_path):
    run = _run(tmp_path, best=None)
    path, note = resolve_model_path(run)
    assert path == run / "checkpoints" / "step_00000004" and "has no best checkpoint" in note
    (path / "meta.json").unlink()  # an unfinished save is skipped
    shutil.copytree(path.parent / "step_00000002", path.parent / "best")
    (path.parent / "best" / "model.safetensors").write_bytes(b"x")  # a broken best is skipped too
    path, note = resolve_model_path(run)
    assert path == run / "checkpoints" / "step_00000002" and "no complete best" in note


def test_a_run_folder_without_any_checkpoint_is_a_checkpoint_error(tmp_path):
    run = _run(tmp_path, steps=(), best=None)
    with pytest.raises(CheckpointError, match="run folder without a complete checkpoint.*checkpoints/best"):
        resolve_model_path(run)


def test_from_pretrained_loads_a_run_folder_with_a_warning(tmp_path):
    import lmforge

    run = _run(tmp_path)
    with pytest.warns(UserWarning, match="is a run folder; using its best checkpoint"):
        model = lmforge.from_pretrained(run)
    assert model.config.n_embd == TINY["n_embd"]


# --- one answer: the verbs' loader and the trainer's checkpoint loading give the same module
def _lora_checkpoint(tmp_path):
    tok = CharTokenizer.train(["hello world, a tiny corpus"])
    torch.manual_seed(0)
    model = build({"vocab_size": tok.vocab_size, "context_length": 16, "n_layer": 2, "n_head": 2, "n_embd": 16,
                   "positional": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False})
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=("q", "v", "mlp_in")))
    with torch.no_grad():  # adapters away from zero, so that a missed rebuild changes the logits
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.1)
    run = tmp_path / "run"
    path = save_checkpoint(run / "checkpoints", "step_00000003", model, config={"run": {"name": "t"}},
                           trainer_state={"step": 3}, tokenizer=tok, step=3)
    return model, tok, run, path


def test_the_verbs_and_the_trainer_build_the_same_module_from_one_checkpoint(tmp_path):
    model, tok, run, path = _lora_checkpoint(tmp_path)
    by_verbs = load_model(path)
    by_trainer = load_checkpoint(path).build_model().eval()
    by_name = from_pretrained(run)  # the run folder: its newest complete checkpoint
    assert resolve_model_path(run)[0] == path
    for other in (by_trainer, by_name):
        assert [(n, type(m)) for n, m in by_verbs.named_modules()] == [(n, type(m)) for n, m in other.named_modules()]
        assert by_verbs.state_dict().keys() == other.state_dict().keys()
        assert all(torch.equal(by_verbs.state_dict()[k], other.state_dict()[k]) for k in by_verbs.state_dict())
    assert sum(isinstance(m, LoraLinear) for m in by_verbs.modules()) == 2 * 2  # per block: qkv (q, v slices), mlp_in
    x = torch.tensor([tok.encode("hello world")])
    model.eval()
    with torch.no_grad():
        want = model(x)
        for loaded in (by_verbs, by_trainer, by_name):
            assert torch.equal(loaded(x), want)


@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_value_model_round_trip(tmp_path, kind):
    """A PPO model (policy + value model) saves its value model's kind in the config; loading
    rebuilds it, so the weights load strictly and the policy's logits are unchanged."""
    from lmforge.model.heads import attach_value_model, value_model_of, values_of

    cfg = ModelConfig(arch="decoder", vocab_size=11, n_layer=1, n_head=2, n_embd=8, context_length=8)
    torch.manual_seed(0)
    model = attach_value_model(build(cfg), kind, build(cfg) if kind == "separate" else None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(model, tmp_path / "m")
    assert yaml.safe_load((tmp_path / "m" / CONFIG).read_text())["value_model"] == kind
    back = load_model(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3]])
    assert value_model_of(back) == kind
    torch.testing.assert_close(back(ids), model.eval()(ids))
    torch.testing.assert_close(values_of(back, ids), values_of(model, ids))
