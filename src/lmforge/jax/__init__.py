"""lmforge.jax: the lmforge decoder as a JAX / Flax NNX twin of the PyTorch model.

Install the extra first: ``pip install lmforge[jax]`` (jax, flax with the NNX API, optax).

    from lmforge.jax import build, to_jax, to_torch, load_jax, generate
    jmodel = to_jax(torch_model)               # same weights, same logits
    tmodel = to_torch(jmodel)                  # and back, tensors identical

Files, in reading order: ``model.py`` (bigram -> head -> multi-head -> block -> GPT),
``convert.py`` (weights both ways, model folders), ``train.py`` (a jit-compiled train step with
optax, ``fit_jax``), ``generate.py`` (KV-cache decoding under jit), ``learn.py`` (the small
helpers the learning path in ``docs/jax/`` uses).
"""

from __future__ import annotations

from lmforge.errors import LMForgeError


class JaxNotInstalled(LMForgeError, ImportError):
    """The optional JAX extra is missing."""


def require_jax() -> None:
    """Raise one clear line when jax, flax (NNX) or optax cannot be imported."""
    missing = []
    for name in ("jax", "flax", "optax"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if not missing:
        from flax import nnx  # noqa: F401  (flax without the NNX API is too old)

        if not hasattr(nnx, "List"):
            missing.append("flax>=0.12 (with nnx.List)")
    if missing:
        raise JaxNotInstalled(f"lmforge.jax needs {', '.join(missing)}; install the extra: pip install lmforge[jax]")


require_jax()

from lmforge.jax.model import (Attention, BigramLM, Block, DecoderLM, Head, MLP, Transformer,  # noqa: E402
                               abstract_model, check_supported, cross_entropy, init_cache)
from lmforge.jax.convert import (build, from_state_dict, load_jax, save_jax, to_jax, to_torch,  # noqa: E402
                                 torch_state_dict)
from lmforge.jax.generate import generate, generate_text  # noqa: E402

__all__ = ["JaxNotInstalled", "require_jax", "build", "abstract_model", "check_supported", "init_cache", "cross_entropy",
           "BigramLM", "Head", "Attention", "MLP", "Block", "Transformer", "DecoderLM",
           "to_jax", "to_torch", "torch_state_dict", "from_state_dict", "load_jax", "save_jax",
           "generate", "generate_text"]
