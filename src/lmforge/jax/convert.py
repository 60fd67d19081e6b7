"""Weights both ways between lmforge's PyTorch models and their JAX twins.

The JAX modules carry the PyTorch parameter names (``transformer.blocks.0.attn.qkv``...), so a
parameter's PyTorch name is its path in the Flax module plus one leaf name:

    Flax leaf    PyTorch leaf   note
    kernel       weight         Linear: Flax stores (in, out), PyTorch (out, in) -> transposed
    embedding    weight         Embed / nn.Embedding: same layout
    scale        weight         LayerNorm / RMSNorm
    bias         bias

A tied LM head has no parameter of its own in JAX (the logits use ``tok_emb.attend``); PyTorch's
state dict lists it as ``lm_head.weight``, the same tensor as ``transformer.tok_emb.weight``.

Model folders: :func:`load_jax` reads an lmforge model folder or checkpoint (``config.yaml`` +
``model.safetensors``) or a Hugging Face folder (``config.json``), through the PyTorch loaders,
and :func:`save_jax` writes an lmforge model folder that ``lmforge.store.load_model`` reads.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from lmforge.errors import InteropError
from lmforge.jax.model import seed_dropout, abstract_model, check_supported
from lmforge.model import build as torch_build
from lmforge.model.config import ModelConfig
from lmforge.store import from_pretrained, save_model

_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def named_params(model: nnx.Module):
    """(PyTorch name, Flax Param, transposed?) for every parameter of a JAX model."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            *modules, leaf = path
            name = ".".join(str(p) for p in (*modules, _TORCH_LEAF[leaf]))
            yield name, node, leaf == "kernel"


def _tied_head(model: nnx.Module) -> bool:
    cfg = getattr(model, "config", None)  # None: a single layer (Attention, Block, ...)
    return cfg is not None and cfg.arch == "decoder" and cfg.tie_embeddings


def torch_state_dict(model: nnx.Module) -> dict[str, torch.Tensor]:
    """The JAX model's parameters as a PyTorch state dict of the twin model (CPU tensors)."""
    state = {}
    for name, param, transposed in named_params(model):
        value = np.asarray(param.get_value())
        # a copy: a view would alias the JAX buffer (which jit may donate and reuse)
        state[name] = torch.from_numpy(np.array(value.T if transposed else value, copy=True, order="C"))
    if _tied_head(model):
        state["lm_head.weight"] = state["transformer.tok_emb.weight"]
    return state


def from_state_dict(model: nnx.Module, state: dict) -> nnx.Module:
    """Copy a PyTorch state dict (tensors or arrays) into the JAX model, checking every name and shape."""
    expected = {}
    for name, param, transposed in named_params(model):
        expected[name] = (param, transposed)
    ignored = {"lm_head.weight"} if _tied_head(model) else set()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - ignored)
    if missing:
        raise InteropError(f"weights lack {len(missing)} parameter(s) of the JAX model, first {missing[0]!r}; "
                           f"expected the state dict of a model with the same config")
    if unexpected:
        raise InteropError(f"weights have {len(unexpected)} parameter(s) the JAX model lacks, first "
                           f"{unexpected[0]!r}; expected the state dict of a model with the same config")
    for name, (param, transposed) in expected.items():
        value = state[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        value = np.array(value.T if transposed else value, copy=True)  # never alias PyTorch's storage
        current = param.get_value()
        if value.shape != current.shape:
            want = current.shape[::-1] if transposed else current.shape
            got = value.shape[::-1] if transposed else value.shape
            raise InteropError(f"{name}: weight of shape {tuple(got)} does not fit the model's {tuple(want)}")
        param.set_value(jnp.asarray(value, dtype=current.dtype))
    return model


def _unwrap(module):
    """The plain module inside torch.compile / DDP wrappers."""
    while hasattr(module, "_orig_mod") or hasattr(module, "module"):
        module = getattr(module, "_orig_mod", None) or module.module
    return module


def build(config: ModelConfig | str | dict, seed: int = 0, abstract: bool = False) -> nnx.Module:
    """The JAX model for ``config`` (a ModelConfig, a preset name or a dict of fields).

    Its weights are those of the PyTorch twin built after ``torch.manual_seed(seed)`` (GPT-2's
    initialisation, the same numbers on both sides; the global torch RNG is left untouched).
    Drawing them in PyTorch and copying them over is also much faster on a CPU than tracing
    Flax's initializers one parameter at a time. ``abstract=True`` gives shapes only.
    Constructing a module directly (``DecoderLM(cfg, rngs=nnx.Rngs(0))``) uses the Flax
    initializers written in the modules above: the same distributions, other numbers."""
    model = abstract_model(config, seed)
    if abstract:
        return model
    seed_dropout(model, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return from_state_dict(model, torch_build(ModelConfig.coerce(config)).state_dict())


def to_jax(torch_model, seed: int = 0) -> nnx.Module:
    """A JAX twin of an lmforge PyTorch model, holding the same weights."""
    torch_model = _unwrap(torch_model)
    cfg = getattr(torch_model, "config", None)
    if cfg is None:
        raise InteropError(f"to_jax: expected an lmforge model (with .config), got {type(torch_model).__name__}")
    check_supported(cfg)
    model = abstract_model(cfg, seed=seed)
    seed_dropout(model, seed)
    return from_state_dict(model, torch_model.state_dict())


def to_torch(jax_model: nnx.Module):
    """The lmforge PyTorch model holding the JAX model's weights (tensors equal to the last bit)."""
    model = torch_build(jax_model.config)
    model.load_state_dict(torch_state_dict(jax_model))
    return model


def load_jax(path: str | Path, with_tokenizer: bool = False):
    """A JAX model from any model ``lmforge.store`` loads (an lmforge model folder, checkpoint or
    run folder, a Hugging Face folder, a .gguf file)."""
    model, tok = from_pretrained(path, with_tokenizer=True)
    jmodel = to_jax(model)
    return (jmodel, tok) if with_tokenizer else jmodel


def save_jax(jax_model: nnx.Module, folder: str | Path, tokenizer=None, config: dict | None = None) -> Path:
    """Write an lmforge model folder (model.safetensors + config.yaml [+ tokenizer.json])."""
    return save_model(to_torch(jax_model), folder, tokenizer=tokenizer, config=config)
