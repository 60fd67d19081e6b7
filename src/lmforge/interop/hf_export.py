"""Exports beyond a plain decoder: LoRA models (merged into the weights, or the adapter alone in
PEFT's format) and classifiers (as ``GPT2ForSequenceClassification`` / ``LlamaForSequenceClassification``).

:func:`lmforge.interop.hf.export_hf` writes a decoder whose every tensor has a Hugging Face
place. This module decides what to do with the two kinds of tensors that have none:

* LoRA adapters (``...lora.q.A``): ``merge=True`` folds them into their base weights first
  (:func:`lmforge.model.lora.merge_lora`, W += (alpha/r) B A); ``fmt="peft"`` writes the
  adapter alone (:func:`lmforge.model.lora.export_peft`), for ``peft.PeftModel`` on the base.
* a classification head (``classifier.out``): transformers' decoder classifiers score the
  hidden state of the **last non-pad token** with a linear layer **without a bias**. An lmforge
  classifier matches that exactly only with ``model.pooling: last``; its bias is folded into
  GPT-2's final LayerNorm bias (``W (beta + W⁺ b) = W beta + b`` when the K x C matrix W has
  rank K), while Llama's RMSNorm has no bias to fold into, so a Llama classifier exports only
  with a zero bias. Everything else is refused with one line, never approximated.

BERT classifiers are refused too: ``BertForSequenceClassification`` sends the CLS vector
through a trained dense + tanh pooler, a layer lmforge's classifier does not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.errors import InteropError
from lmforge.fsutil import atomic_write
from lmforge.interop.hf import (CONFIG, TOKENIZER, TOKENIZER_CONFIG, config_to_hf, export_hf, state_dict_to_hf,
                               tokenizer_config_to_hf)
from lmforge.model.config import ModelConfig
from lmforge.model.lora import export_peft, has_lora, merge_lora

FORMATS = ("hf", "peft")


def classifier_problem(cfg: ModelConfig) -> str | None:
    """Why a classifier has no exact ``*ForSequenceClassification`` twin (None: it has one)."""
    if cfg.arch == "encoder":
        return ("BertForSequenceClassification pools CLS through a trained dense+tanh pooler that lmforge's "
                f"classifier (pooling {cfg.pooling}, one linear layer) does not have; no exact export")
    if cfg.pooling != "last":
        return (f"model.pooling is {cfg.pooling!r}; transformers' GPT2/LlamaForSequenceClassification score the "
                f"last non-pad token, so only a classifier trained with pooling: last exports exactly")
    return None


def _fold_bias(state: dict[str, torch.Tensor], cfg: ModelConfig, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Make ``score(h) = W h`` equal ``W h + b``: GPT-2's final LayerNorm bias beta becomes
    beta + W⁺ b (float64), exact when W (K, C) has full row rank; Llama needs b == 0."""
    if not bias.abs().max().item():
        return
    if cfg.norm != "layernorm" or not cfg.bias:
        raise InteropError("classifier: its head has a bias but LlamaForSequenceClassification's score layer has "
                           "none and RMSNorm has no bias to fold it into; no exact export")
    w, b = weight.double(), bias.double()  # (K, C), (K,)
    shift = torch.linalg.pinv(w) @ b  # (C,)
    if (w @ shift - b).abs().max().item() > 1e-9 * max(1.0, b.abs().max().item()):
        raise InteropError("classifier: its bias cannot be folded into the final LayerNorm (the head's weight "
                           "has rank below the number of classes); no exact export")
    key = "transformer.norm.bias"
    state[key] = (state[key].double() + shift).to(state[key].dtype)


def export_classifier_hf(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a decoder classifier as ``GPT2ForSequenceClassification`` or
    ``LlamaForSequenceClassification`` (same class logits in transformers); refuses, with one
    line, what would not match exactly (see the module docstring)."""
    cfg = model.config
    problem = classifier_problem(cfg)
    if problem:
        raise InteropError(problem)
    dtype = next(model.parameters()).dtype
    hf_cfg = config_to_hf(cfg, tokenizer, dtype)  # names any other field with no HF equivalent
    family = _family_name(hf_cfg)
    labels = list(cfg.labels) if cfg.labels else [f"LABEL_{i}" for i in range(cfg.num_classes)]
    hf_cfg.update(architectures=[f"{family}ForSequenceClassification"], num_labels=cfg.num_classes,
                  id2label={str(i): name for i, name in enumerate(labels)},
                  label2id={name: i for i, name in enumerate(labels)}, tie_word_embeddings=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("classifier.", "lm_head."))}
    weight, bias = model.classifier.out.weight.detach(), model.classifier.out.bias.detach()
    _fold_bias(state, cfg, weight, bias)
    plain = ModelConfig(**{**cfg.to_dict(), "num_classes": 0, "labels": None, "tie_embeddings": True})
    hf_state = state_dict_to_hf(state, plain)  # the backbone (the LM head has no place in a classifier)
    hf_state["score.weight"] = weight.cpu().contiguous().clone()  # (K, C)
    return _write(out_dir, hf_cfg, hf_state, tokenizer, cfg.context_length)


def _family_name(hf_cfg: dict) -> str:
    """GPT2 or Llama, from the causal-LM class name config_to_hf picked."""
    return hf_cfg["architectures"][0].removesuffix("LMHeadModel").removesuffix("ForCausalLM")


def _write(out_dir, hf_cfg: dict, hf_state: dict, tokenizer, context_length: int) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda p: save_file(hf_state, str(p), metadata={"format": "pt"}))
    atomic_write(out / CONFIG, json.dumps(hf_cfg, indent=2) + "\n")
    if tokenizer is not None:
        atomic_write(out / TOKENIZER, tokenizer.to_hf_json())
        atomic_write(out / TOKENIZER_CONFIG, json.dumps(tokenizer_config_to_hf(tokenizer, context_length), indent=2)
                     + "\n")
    return out


def export_model(model: nn.Module, out_dir: str | Path, tokenizer=None, fmt: str = "hf", merge: bool = False,
                 base: str | None = None) -> str:
    """Export any lmforge model the way ``lmforge export`` does; returns what was written, in words.

    ``fmt="hf"``: a Hugging Face model folder (a LoRA model needs ``merge=True``: adapters folded
    into the weights); a classifier becomes ``*ForSequenceClassification``. ``fmt="peft"``: the
    LoRA adapter alone, for ``PeftModel.from_pretrained(base_model, out_dir)`` (``base`` names
    the base model in ``adapter_config.json``)."""
    if fmt not in FORMATS:
        raise InteropError(f"--format: got {fmt!r}, expected one of {', '.join(FORMATS)}")
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise InteropError(f"model: got {type(model).__name__} without an lmforge ModelConfig; expected an lmforge model")
    lora = has_lora(model)
    if fmt == "peft":
        if not lora:
            raise InteropError("--format peft: this model has no LoRA adapters; use --format hf")
        if merge:
            raise InteropError("--format peft writes the adapter alone; --merge goes with --format hf")
        if cfg.num_classes:
            raise InteropError("--format peft: the model has a classification head; PEFT export covers causal LMs "
                               "(use --format hf --merge)")
        export_peft(model, out_dir, base_model_name_or_path=base)
        return ("PEFT adapter: adapter_config.json, adapter_model.safetensors; load it with "
                f"PeftModel.from_pretrained(base, {str(out_dir)!r})"
                + (f" on the base {base} exported with lmforge export --format hf" if base else ""))
    if lora:
        if not merge:
            raise InteropError("this model has LoRA adapters: add --merge to fold them into the weights, or use "
                               "--format peft to write the adapter alone")
        merge_lora(model)
    if cfg.num_classes:
        export_classifier_hf(model, out_dir, tokenizer)
        kind = f"{_family_name(config_to_hf(cfg))}ForSequenceClassification"
        if getattr(tokenizer, "pad_id", None) is None:  # transformers finds the last token by the pad id
            kind += " (no pad token: transformers scores one text per batch until config.pad_token_id is set)"
    else:
        export_hf(model, out_dir, tokenizer=tokenizer)
        kind = config_to_hf(cfg)["architectures"][0]
    merged = ", LoRA merged" if lora else ""
    files = "config.json, model.safetensors" + (", tokenizer.json, tokenizer_config.json" if tokenizer else "")
    return f"Hugging Face {kind}{merged}: {files}"
