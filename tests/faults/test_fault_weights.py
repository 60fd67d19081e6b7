"""Damaged weights of every kind lmforge reads: non-finite values refused at load with the
tensor named (``LMFORGE_ALLOW_NONFINITE=1`` lets them through), flipped or truncated bytes and
edited configs caught by the folder's checksums, and the CLI saying it in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.store import from_pretrained, load_model
from tests.faults import faultkit


def _poison(path, key_part: str, value=float("nan")) -> str:
    """Set one element of the first tensor whose name contains ``key_part``; returns its name."""
    tensors = load_file(str(path))
    name = next(k for k in tensors if key_part in k)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def _flip(path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def test_nan_in_a_model_folder_is_named_and_can_be_allowed(tmp_path, monkeypatch):
    folder = faultkit.model_folder(tmp_path / "m")
    (folder / "checksums.json").unlink()  # an older folder, or one whose checksums were rewritten
    name = _poison(folder / "model.safetensors", "norm", float("nan"))
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds 1 non-finite") as e:
        load_model(folder)
    assert "LMFORGE_ALLOW_NONFINITE=1" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("LMFORGE_ALLOW_NONFINITE", "1")
    assert torch.isnan(dict(load_model(folder).named_parameters())[name]).any()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_checkpoint_weights_refused_on_resume_and_by_the_verbs(tmp_path, capsys, value):
    from lmforge.train.checkpoint import load_checkpoint

    ck = faultkit.checkpoint(tmp_path / "ck")
    _poison(ck / "model.safetensors", "lm_head", value)
    faultkit.reseal(ck)
    with pytest.raises(CheckpointError, match=r"(tok_emb|lm_head)\.weight holds 1 non-finite"):
        load_checkpoint(ck).build_model()
    data = tmp_path / "d.txt"
    data.write_text(faultkit.TEXT)
    for args in (["generate", "--model", ck, "--prompt", "the", "--max-new-tokens", "2"],
                 ["eval", "--model", ck, "--data", data, "--cache-dir", tmp_path / "c", "--quiet"]):
        code, out = _cli(capsys, *args)
        assert code == 2 and "non-finite" in out.err and '"loss"' not in out.out, (code, out)


def test_flipped_byte_in_a_model_folder_is_caught_by_its_checksums(tmp_path, capsys):
    folder = faultkit.model_folder(tmp_path / "m")
    _flip(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: checksum mismatch"):
        load_model(folder)
    code, out = _cli(capsys, "info", folder)
    assert code == 2 and "checksum mismatch" in out.err and len(out.err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["truncate", "edit-config", "drop-tokenizer"])
def test_other_model_folder_damage(tmp_path, damage):
    folder = faultkit.model_folder(tmp_path / "m")
    if damage == "truncate":
        p = folder / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])
        msg = "size"
    elif damage == "edit-config":
        p = folder / "config.yaml"
        p.write_text(p.read_text().replace("n_head: 2", "n_head: 1"))
        msg = "config.yaml is corrupt"
    else:
        (folder / "tokenizer.json").unlink()
        msg = "tokenizer.json is missing"
    with pytest.raises(CheckpointError, match=msg):
        load_model(folder)


def test_nonfinite_hf_folder_refused(tmp_path):
    folder = faultkit.hf_folder(tmp_path / "hf")
    _poison(folder / "model.safetensors", "wte", float("inf"))
    with pytest.raises(CheckpointError, match="non-finite"):
        from_pretrained(folder)


def _gguf(tmp_path, qtype_name: str, poison):
    gg = pytest.importorskip("gguf")
    from tests.interop import test_gguf

    tok = test_gguf.train_tokenizer("bpe", ["the quick brown fox jumps over the lazy dog 12345 " * 20],
                                    vocab_size=300, min_frequency=1)
    model = test_gguf._tiny_model(tok.vocab_size, tie=False)
    qtype = getattr(gg.GGMLQuantizationType, qtype_name)
    return test_gguf.write_gguf(tmp_path / "m.gguf", poison(model) or model, tok, qtype=qtype)


def test_gguf_with_a_nan_norm_weight_refused(tmp_path, capsys):
    def nan_norm(model):
        with torch.no_grad():
            model.transformer.norm.weight[3] = float("nan")

    path = _gguf(tmp_path, "F32", nan_norm)
    with pytest.raises(CheckpointError, match=r"transformer.norm.weight holds 1 non-finite"):
        from_pretrained(path)
    code, out = _cli(capsys, "generate", "--model", path, "--prompt", "the", "--max-new-tokens", "2")
    assert code == 2 and "non-finite" in out.err


def test_gguf_with_inf_block_scales_refused(tmp_path, monkeypatch):
    import gguf.quants

    real = gguf.quants.quantize

    def inf_scale(arr, qtype):  # Q8_0 block: f16 scale then 32 int8; make the first scale +inf
        q = real(arr, qtype).copy()
        q.reshape(-1)[:2] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)
        return q

    monkeypatch.setattr(gguf.quants, "quantize", inf_scale)
    path = _gguf(tmp_path, "Q8_0", lambda m: None)
    with pytest.raises(CheckpointError, match="non-finite"):
        from_pretrained(path)


def _adapter(tmp_path):
    from lmforge.model.lora import LoraConfig, apply_lora, save_adapter

    model, _ = faultkit.tiny_model()
    apply_lora(model, LoraConfig(rank=2, alpha=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("damage", ["alpha", "nan", "shape"])
def test_damaged_adapter_refused_and_leaves_no_adapters(tmp_path, damage):
    from lmforge.model.lora import has_lora, load_adapter

    folder = _adapter(tmp_path)
    if damage == "alpha":  # 8 -> 800: no checksum would let this load silently
        meta = json.loads((folder / "adapter.json").read_text())
        meta["lora"]["alpha"] = 800
        (folder / "adapter.json").write_text(json.dumps(meta))
        msg = "adapter.json is corrupt"
    elif damage == "nan":
        _poison(folder / "adapter.safetensors", "lora", float("nan"))
        faultkit.reseal(folder, "checksums.json")
        msg = "non-finite"
    else:  # tensors that do not fit the config: refused after the adapters were attached
        t = load_file(str(folder / "adapter.safetensors"))
        k = next(iter(t))
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
        save_file(t, str(folder / "adapter.safetensors"))
        faultkit.reseal(folder, "checksums.json")
        msg = "shape"
    base, _ = faultkit.tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(CheckpointError, match=msg):
        load_adapter(base, folder)
    assert not has_lora(base) and not hasattr(base, "lora_config")
    assert [p.requires_grad for p in base.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_intact_adapter_still_loads(tmp_path):
    from lmforge.model.lora import has_lora, load_adapter

    folder = _adapter(tmp_path)
    base, _ = faultkit.tiny_model()
    assert has_lora(load_adapter(base, folder))


def test_exported_folder_carries_checksums(tmp_path, capsys):
    folder = faultkit.model_folder(tmp_path / "m")
    code, out = _cli(capsys, "export", "--model", folder, "--out", tmp_path / "hf")
    assert code == 0, out.err
    assert from_pretrained(tmp_path / "hf") is not None
    _flip(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: checksum mismatch"):
        from_pretrained(tmp_path / "hf")
