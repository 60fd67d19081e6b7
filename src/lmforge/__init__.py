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

from lmforge.version import __version__

# public name -> the module that defines it (imported on first use: lazy, so that `import lmforge`
# loads neither torch nor any submodule)
_PUBLIC: dict[str, str] = {
    "from_pretrained": "lmforge.store",
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

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # next time: a plain attribute
        return value
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
