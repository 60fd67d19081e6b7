"""The model ``lmforge serve`` serves: loaded as ``lmforge chat`` and ``lmforge generate`` load it
(``lmforge.store.load_for_inference``)."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import InputError
from lmforge.store import load_for_inference


def load_model_for_serving(spec, quantize: str = "none", device: str = "cpu"):
    """``(model, tokenizer, name)`` for any model name ``lmforge.store`` resolves (a
    checkpoint, model or run folder, a Hugging Face folder or name, a ``.gguf`` file).
    ``quantize`` merges LoRA adapters and stores the linear weights in fewer bytes, as
    ``lmforge chat --quantize`` does (which checkpoint a run folder resolved to is said on stderr).
    ``name`` is what clients call the model (the file or folder name)."""
    model, tok, _, _ = load_for_inference(spec, device, quantize=quantize, need_tokenizer="serve")
    if getattr(model.config, "arch", None) != "decoder":
        raise InputError(f"{spec}: a {model.config.arch} model; serving needs a decoder language model")
    p = Path(spec)
    name = p.stem if p.suffix.lower() == ".gguf" else (p.resolve().name or str(spec))
    return model.eval(), tok, name
