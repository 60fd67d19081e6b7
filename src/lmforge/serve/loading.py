"""The model ``lmforge serve`` serves: loaded as ``lmforge chat`` and ``lmforge generate`` load it."""

from __future__ import annotations

from pathlib import Path

from lmforge import from_pretrained
from lmforge.device import resolve_device
from lmforge.errors import CheckpointError, InputError
from lmforge.model.resolve import resolve_model_path


def load_model_for_serving(spec, quantize: str = "none", device: str = "cpu"):
    """``(model, tokenizer, name, note)`` for a checkpoint, model or run folder (its best
    checkpoint), Hugging Face folder or ``.gguf`` file. ``quantize`` "fp16"/"int8" merges LoRA
    adapters and stores the linear weights in fewer bytes, as ``lmforge chat --quantize`` does.
    ``name`` is what clients call the model (the file or folder name); ``note`` says which
    checkpoint a run folder resolved to (or is None)."""
    dev = resolve_device(device, key="--device")
    path, note = resolve_model_path(spec)
    model, tok = from_pretrained(path, device=dev, with_tokenizer=True)
    if tok is None:
        raise CheckpointError(f"{spec}: no tokenizer.json beside the weights; serving needs the model's tokenizer")
    if getattr(model.config, "arch", None) != "decoder":
        raise InputError(f"{spec}: a {model.config.arch} model; serving needs a decoder language model")
    if quantize != "none":
        from lmforge.model.lora import has_lora, merge_lora
        from lmforge.model.quantize import quantize_model

        if has_lora(model):
            merge_lora(model)
        quantize_model(model, quantize)
    p = Path(spec)
    name = p.stem if p.suffix.lower() == ".gguf" else (p.resolve().name or str(spec))
    return model.eval(), tok, name, note
