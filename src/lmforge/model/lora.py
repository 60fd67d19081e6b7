"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021).

A linear layer ``y = x W^T`` is fine-tuned as ``y = x W^T + (alpha/r) · x A^T B^T`` with W frozen,
A (r, in) random and B (out, r) zero at the start, so a fresh adapter changes nothing and only
r·(in + out) numbers per layer train.

Targets are named by *role*, not by module name, because lmforge fuses projections: the query,
key and value projections are one ``attn.qkv`` matrix and a gated MLP's gate and up one ``mlp.fc``.
Each role is a slice of a layer's output rows with its own A and B, exactly what PEFT does on
separate ``q_proj``/``k_proj``/... layers (so an adapter exports to PEFT unchanged). Every family
(GPT-2, Llama, Qwen, Gemma, BERT) is built from the same Attention and MLP, so the roles are found
the same way in all of them, whatever their checkpoints call the layers:

    q, k, v     rows of attn.qkv        o        attn.proj
    gate, up    the two halves of a gated mlp.fc (up: all of it when not gated)    down  mlp.proj
    attn = q,k,v,o   mlp = gate,up,down   all = both   mlp_in = gate,up   mlp_out = down

The families' own module names (PEFT ``target_modules`` spellings) are accepted as aliases:
``q_proj``...``down_proj`` (Llama, Mistral, Qwen, Gemma), ``c_attn``/``c_fc`` (GPT-2),
``query``/``key``/``value`` (BERT).

    model = apply_lora(model, LoraConfig(rank=8, alpha=16, targets=("q", "v")))
    with adapters_disabled(model):      # the base model, no copy (a DPO reference)
        ...
    save_adapter(model, "adapter/", base_path="model.gguf")   # megabytes
    merged = merge_lora(model)          # plain lmforge model, W += (alpha/r) B A

Adapted layers become :class:`LoraLinear` (an ``nn.Linear`` with the same ``weight``/``bias``
parameters), so the base model's state-dict keys do not change and adapter tensors are the keys
containing ``.lora.``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import CheckpointError, ConfigError, InteropError
from lmforge.fsutil import atomic_write
from lmforge.integrity import check_finite, verify_checksums, write_checksums
from lmforge.model.layers import Attention, MLP, dropout
from lmforge.model.packed import packed_product

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"), "all": ROLES,
          "mlp_in": ("gate", "up"), "mlp_out": ("down",)}
# the names families give these layers -> roles (unambiguous ones only: GPT-2's c_proj is o and down)
ALIASES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),  # Llama, Qwen, Gemma
           "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
           "c_attn": ("q", "k", "v"), "c_fc": ("up",),  # GPT-2
           "query": ("q",), "key": ("k",), "value": ("v",)}  # BERT
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    also_train: tuple[str, ...] = ()  # parameter-name prefixes left trainable (e.g. a new head)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        self.also_train = tuple(self.also_train)
        p = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            p.append(f"lora.rank: got {self.rank!r}, expected a positive integer")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            p.append(f"lora.alpha: got {self.alpha!r}, expected a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            p.append(f"lora.dropout: got {self.dropout!r}, expected a number in [0, 1)")
        unknown = [t for t in self.targets if t not in ROLES and t not in GROUPS and t not in ALIASES]
        if unknown or not self.targets:
            p.append(f"lora.targets: got {list(self.targets)!r}, expected roles from "
                     f"{', '.join(ROLES + tuple(GROUPS))} (or layer names such as q_proj, down_proj)")
        if p:
            raise ConfigError(p)

    @property
    def roles(self) -> tuple[str, ...]:
        """The targets with groups expanded, in a fixed order."""
        want = {r for t in self.targets for r in GROUPS.get(t, ALIASES.get(t, (t,)))}
        return tuple(r for r in ROLES if r in want)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["also_train"] = list(self.targets), list(self.also_train)
        return d


class LoraAdapter(nn.Module):
    """One low-rank update: A (r, in) Kaiming-uniform as in PEFT, B (out, r) zero."""

    def __init__(self, n_in: int, n_out: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, n_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(n_out, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """B A (out, in), computed in ``dtype`` (float64 by default: merging rounds only once)."""
        return self.B.detach().to(dtype) @ self.A.detach().to(dtype)


class LoraLinear(nn.Linear):
    """``nn.Linear`` plus low-rank updates on slices of its output rows.

    ``slices`` maps a role to its rows ``(start, stop)``; each gets its own adapter in
    ``self.lora[role]``. ``enabled`` False gives the base layer.
    """

    calls_packed_product = True  # forward runs its base through model.packed itself (packed_linears reads this)

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], cfg: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: keys unchanged
        for attr in ("is_residual_proj",):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        w = base.weight
        self.slices = dict(slices)
        self.lora = nn.ModuleDict({role: LoraAdapter(self.in_features, b - a, cfg.rank, w.device, w.dtype)
                                   for role, (a, b) in self.slices.items()})
        self.scale = cfg.scale
        self.drop = nn.Dropout(cfg.dropout)
        self.enabled = True
        self.train(base.training)  # new submodules start in training mode; follow the model's mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_product(self, x)  # (B, T, out): F.linear, or its packed twin during generation
        if not self.enabled:
            return y
        h = dropout(self.drop, x)
        for role, (a, b) in self.slices.items():
            ad = self.lora[role]
            # in place on the slice: linear's backward does not need its output
            y[..., a:b] += self.scale * F.linear(F.linear(h, ad.A), ad.B)  # (B, T, r) -> (B, T, b-a)
        return y

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A, summed in float64 and rounded once to W's dtype."""
        w = self.weight.detach().to(torch.float64, copy=True)  # a copy even when W is float64
        for role, (a, b) in self.slices.items():
            w[a:b] += self.scale * self.lora[role].delta()  # (rows, in)
        return w.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora={list(self.slices)}, scale={self.scale:g}"


# ======================================================================== applying
def _targets(model: nn.Module, cfg: LoraConfig) -> list[tuple[nn.Module, str, dict[str, tuple[int, int]]]]:
    """(parent module, attribute name, role slices) for every linear layer the roles touch."""
    roles = set(cfg.roles)
    out = []
    for m in model.modules():
        if isinstance(m, Attention):
            hd, nh, nkv = m.head_dim, m.n_head, m.n_kv_head
            rows = {"q": (0, nh * hd), "k": (nh * hd, (nh + nkv) * hd), "v": ((nh + nkv) * hd, (nh + 2 * nkv) * hd)}
            qkv = {r: s for r, s in rows.items() if r in roles}
            if qkv:
                out.append((m, "qkv", qkv))
            if "o" in roles:
                out.append((m, "proj", {"o": (0, m.proj.out_features)}))
        elif isinstance(m, MLP):
            n = m.fc.out_features
            if m.gated:  # gate rows, then up rows (SwiGLU, GeGLU)
                fc = {r: s for r, s in (("gate", (0, n // 2)), ("up", (n // 2, n))) if r in roles}
            else:  # one input projection: the up role
                fc = {"in": (0, n)} if "up" in roles else {}
            if fc:
                out.append((m, "fc", fc))
            if "down" in roles:
                out.append((m, "proj", {"out": (0, m.proj.out_features)}))
    return out


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Add adapters for ``cfg.targets`` (in place; returns the model) and freeze everything else
    (except parameters named by ``cfg.also_train``). The model's outputs do not change."""
    if has_lora(model):
        raise ConfigError("lora: this model already has adapters (merge_lora first to add new ones)")
    found = _targets(model, cfg)
    if not found:
        raise ConfigError(f"lora.targets: {list(cfg.targets)} match no layer of this "
                          f"{type(model).__name__} (LoRA adapts attention and MLP projections)")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, slices in found:
        setattr(parent, name, LoraLinear(getattr(parent, name), slices, cfg))
    for name, p in model.named_parameters():
        if ".lora." in name or any(name.startswith(pre) for pre in cfg.also_train):
            p.requires_grad_(True)
    model.lora_config = cfg
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (keys containing ``.lora.``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base (every adapter off); restored after."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W[rows] += scale · B A) and put plain
    ``nn.Linear`` layers back: the result is the base architecture, saveable and exportable as
    usual. In place; returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight = nn.Parameter(child.merged_weight(), requires_grad=True)
                if child.bias is not None:
                    lin.bias = child.bias
                if hasattr(child, "is_residual_proj"):
                    lin.is_residual_proj = child.is_residual_proj
                setattr(parent, name, lin)
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ======================================================================== adapter files
def base_checksum(model: nn.Module) -> str:
    """SHA-256 of the base model's tensors (adapters excluded), in key order: which weights an
    adapter was trained on, whatever file they were loaded from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if ".lora." in k:
            continue
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_adapter(model: nn.Module, folder: str | Path, base_path: str | Path | None = None) -> Path:
    """Write ``adapter.safetensors`` (the adapter tensors only) and ``adapter.json`` (LoRA config,
    base model path and checksum)."""
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    if cfg is None or not has_lora(model):
        raise ConfigError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    meta = {"format": "lmforge-lora", "version": 1, "lora": cfg.to_dict(),
            "base": {"path": str(base_path) if base_path is not None else None, "sha256": base_checksum(model)}}
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")
    write_checksums(folder, (ADAPTER_WEIGHTS, ADAPTER_CONFIG))  # last: an edited adapter.json is refused
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected an adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        LoraConfig(**meta["lora"])
        meta["base"]["sha256"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not an lmforge adapter config ({type(e).__name__})") from None
    return meta


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add the adapter saved in ``folder`` to ``model`` (its base): applies the saved LoRA config
    and loads the tensors. A model whose base weights differ from those the adapter was trained
    on, a folder whose files do not match its ``checksums.json``, or adapter tensors holding NaN/inf
    are a :class:`CheckpointError`; a refused adapter leaves the model as it was (no adapters)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    verify_checksums(folder, required=(ADAPTER_WEIGHTS, ADAPTER_CONFIG))  # older folders have none
    meta = read_adapter_config(folder)
    if has_lora(model):
        raise ConfigError("load_adapter: the model already has adapters")
    got = base_checksum(model)
    if got != meta["base"]["sha256"]:
        raise CheckpointError(f"{folder}: adapter was trained on base {meta['base']['path'] or '(unnamed)'} "
                              f"(sha256 {meta['base']['sha256'][:12]}), this model's weights differ "
                              f"(sha256 {got[:12]})")
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: missing or corrupt ({str(e).splitlines()[0][:120]})") from None
    check_finite(tensors.items(), folder / ADAPTER_WEIGHTS)
    cfg = LoraConfig(**meta["lora"])
    before = [(parent, name, getattr(parent, name)) for parent, name, _ in _targets(model, cfg)]
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    apply_lora(model, cfg)
    try:
        expected = lora_state_dict(model)
        if set(tensors) != set(expected):
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: adapter tensors do not match its config "
                                  f"({len(tensors)} in the file, {len(expected)} expected)")
        for k, t in tensors.items():
            if t.shape != expected[k].shape:
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: {k}: shape {tuple(t.shape)}, expected "
                                      f"{tuple(expected[k].shape)}")
        model.load_state_dict(tensors, strict=False)
    except BaseException:  # put the base layers back: a refused adapter leaves nothing attached
        for parent, name, module in before:
            setattr(parent, name, module)
        for p, flag in trainable:
            p.requires_grad_(flag)
        del model.lora_config
        raise
    return model


# ======================================================================== PEFT export
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "out": "mlp.down_proj"}


def export_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)
    for the Llama-style Hugging Face export of the base (:func:`lmforge.interop.hf.export_hf`):
    ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` then gives the same logits. Llama,
    Qwen2/2.5, Qwen3 and Gemma 3 all name their projections q_proj ... down_proj, so one mapping
    serves every RoPE family."""
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    mc = getattr(model, "config", None)
    if cfg is None or not has_lora(model):
        raise ConfigError("export_peft: the model has no LoRA adapters")
    if mc is None or mc.arch != "decoder" or mc.positional != "rope":
        raise InteropError("export_peft: PEFT export covers Llama-style decoders (rope: Llama, Qwen, Gemma "
                           "exports); GPT-2's fused c_attn has no per-role adapters")
    tensors: dict[str, torch.Tensor] = {}
    modules = set()
    for name, m in model.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        layer = int(name.split(".")[2])  # transformer.blocks.{i}.attn.qkv
        for role, ad in m.lora.items():
            hf = PEFT_MODULES[role]
            modules.add(hf.split(".")[1])
            key = f"base_model.model.model.layers.{layer}.{hf}"
            tensors[f"{key}.lora_A.weight"] = ad.A.detach().cpu().contiguous().clone()
            tensors[f"{key}.lora_B.weight"] = ad.B.detach().cpu().contiguous().clone()
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
                "lora_dropout": cfg.dropout, "target_modules": sorted(modules), "bias": "none",
                "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
                "init_lora_weights": True, "modules_to_save": None,
                "base_model_name_or_path": base_model_name_or_path}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", json.dumps(peft_cfg, indent=2) + "\n")
    return out
