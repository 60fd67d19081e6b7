"""lmforge: build, train, fine-tune and align transformer language models from first principles.

The top-level namespace is the public API a script needs most (imported on first use, so
``import lmforge`` stays fast); everything else lives in its module (``lmforge.model``,
``lmforge.tokenizer``, ``lmforge.generate``, ``lmforge.data``, ``lmforge.train``, ...). The
token-level ``generate`` stays in ``lmforge.generate``: that name here is the module::

    import lmforge
    model, tok = lmforge.from_pretrained("runs/demo/checkpoints/best", with_tokenizer=True)
    print(lmforge.generate_text(model, tok, "Once upon a time", max_new_tokens=50))
"""

import importlib as _importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "build": "lmforge.model",
    "ModelConfig": "lmforge.model",
    "PRESETS": "lmforge.model",
    "load_tokenizer": "lmforge.tokenizer",
    "train_tokenizer": "lmforge.tokenizer",
    "SamplingConfig": "lmforge.generate",
    "generate_text": "lmforge.generate",
    "stream_text": "lmforge.generate",
    "embed": "lmforge.embeddings",
    "resolve_device": "lmforge.device",
    "LMForgeError": "lmforge.errors",
}

__all__ = ["__version__", "from_pretrained", *_PUBLIC]


def from_pretrained(path, device="cpu", with_tokenizer: bool = False):
    """Load a model from an lmforge checkpoint/model folder, a Hugging Face model folder or a
    ``.gguf`` file (llama.cpp; dequantized to float32, tokenizer and chat template included).

    Returns the model in eval mode (and its tokenizer, or None, with ``with_tokenizer=True``).
    A training run folder loads its best checkpoint (else its newest), with a warning saying so.
    """
    import warnings

    from lmforge.errors import CheckpointError
    from lmforge.model.resolve import resolve_model_path

    p, note = resolve_model_path(path)
    if note:
        warnings.warn(note, stacklevel=2)
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


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # next time: a plain attribute
        return value
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
