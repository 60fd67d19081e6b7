"""lmforge: build, train, fine-tune and align transformer language models from first principles."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def from_pretrained(path: str | Path, device: str = "cpu", with_tokenizer: bool = False):
    """Load a model from an lmforge checkpoint/model folder, a Hugging Face model folder or a
    ``.gguf`` file (llama.cpp; dequantized to float32, tokenizer and chat template included).

    Returns the model in eval mode (and its tokenizer, or None, with ``with_tokenizer=True``).
    """
    from lmforge.errors import CheckpointError

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; expected an lmforge or Hugging Face model folder "
                              f"or a .gguf file")
    if p.is_file() and p.suffix.lower() == ".gguf":
        from lmforge.interop.gguf import load_gguf

        return load_gguf(p, device=device, with_tokenizer=with_tokenizer)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from lmforge.interop.hf import load_hf

        return load_hf(p, device=device, with_tokenizer=with_tokenizer)
    from lmforge.model.io import load_model

    return load_model(p, device=device, with_tokenizer=with_tokenizer)
