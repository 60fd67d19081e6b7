"""State files that cannot run code: nested dicts and lists of tensors, numbers and strings.

``torch.save`` writes a pickle, and unpickling a file runs whatever its author put in it (a class
whose ``__reduce__`` calls ``os.system`` is enough). Trainer states, rollout caches and reference
log-probs are shared like models are, so lmforge stores them as one safetensors file instead::

    tensors      each tensor of the state, named t0, t1, ... (safetensors: raw bytes + a JSON header)
    metadata     {"lmforge_state": "<JSON of the structure>"}: the dicts, lists, numbers and strings,
                 with {"__tensor__": "t3"} where a tensor goes

Reading it parses JSON and copies bytes: nothing in the file is ever called. The JSON marks what
plain JSON cannot say, so a state comes back exactly as it was saved (an optimizer's integer keys,
the tuples of Python's ``random.getstate()``, numpy's RNG array)::

    {"__tuple__": [...]}                              a tuple
    {"__dict__": [[key, value], ...]}                 a dict with non-string (or "__"-prefixed) keys
    {"__ndarray__": {"dtype": "uint32", "shape": [624], "data": [...]}}   a numpy array
    {"__float__": "nan"}                              nan, inf, -inf
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.errors import CheckpointError

__all__ = ["STATE_KEY", "save_state", "load_state", "encode_state", "decode_state"]

STATE_KEY = "lmforge_state"
_NUMPY_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64"}
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__", "__float__")


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(JSON-able structure, {name: tensor})`` for ``obj``; TypeError for a value of another kind."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            key = t.untyped_storage().data_ptr() if t.numel() else None
            if key is not None and key in storages:  # safetensors refuses tensors sharing memory
                t = t.clone()
            elif key is not None:
                storages.add(key)
            name = f"t{len(tensors)}"
            tensors[name] = t
            return {"__tensor__": name}
        if isinstance(x, np.ndarray):
            if x.dtype.name not in _NUMPY_DTYPES:
                raise TypeError(f"{where}: numpy arrays of dtype {x.dtype} cannot be stored")
            data = [_float(v) for v in x.ravel().tolist()] if x.dtype.kind == "f" else x.ravel().tolist()
            return {"__ndarray__": {"dtype": x.dtype.name, "shape": list(x.shape), "data": data}}
        if isinstance(x, np.generic):
            x = x.item()
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return _float(x)
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"__dict__": [[enc(k, where), enc(v, f"{where}.{k}")] for k, v in x.items()]}
        raise TypeError(f"{where}: a {type(x).__name__} cannot be stored in a state file "
                        f"(only tensors, numpy arrays, numbers, strings, None, lists, tuples and dicts)")

    return enc(obj, "state"), tensors


def _float(v: float) -> Any:
    return v if math.isfinite(v) else {"__float__": repr(v)}


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """The object :func:`encode_state` described; ValueError for anything it could not have written."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode_state(v, tensors, where) for v in tree]
    if not isinstance(tree, dict):
        raise ValueError(f"{where}: unexpected {type(tree).__name__}")
    tag = next((k for k in _TAGS if k in tree), None)
    if tag is None:
        return {k: decode_state(v, tensors, f"{where}.{k}") for k, v in tree.items()}
    if len(tree) != 1:
        raise ValueError(f"{where}: {tag} object with extra keys {sorted(tree)}")
    body = tree[tag]
    if tag == "__tensor__":
        if not isinstance(body, str) or body not in tensors:
            raise ValueError(f"{where}: refers to tensor {body!r}, which the file does not hold")
        return tensors[body]
    if tag == "__tuple__":
        if not isinstance(body, list):
            raise ValueError(f"{where}: __tuple__ must hold a list")
        return tuple(decode_state(v, tensors, where) for v in body)
    if tag == "__dict__":
        if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise ValueError(f"{where}: __dict__ must hold [key, value] pairs")
        out = {}
        for k, v in body:
            k = decode_state(k, tensors, where)
            if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                raise ValueError(f"{where}: a dict key must be a number, string or tuple, got {type(k).__name__}")
            out[k] = decode_state(v, tensors, f"{where}.{k}")
        return out
    if tag == "__float__":
        if body not in ("nan", "inf", "-inf"):
            raise ValueError(f"{where}: __float__ must be 'nan', 'inf' or '-inf', got {body!r}")
        return float(body)
    # __ndarray__
    if not isinstance(body, dict) or body.get("dtype") not in _NUMPY_DTYPES \
            or not isinstance(body.get("shape"), list) or not isinstance(body.get("data"), list):
        raise ValueError(f"{where}: __ndarray__ needs a dtype (one of {sorted(_NUMPY_DTYPES)}), a shape and data")
    data = [decode_state(v, tensors, where) for v in body["data"]]
    if not all(isinstance(v, (int, float, bool)) for v in data):
        raise ValueError(f"{where}: __ndarray__ data must be numbers")
    try:
        return np.array(data, dtype=body["dtype"]).reshape(body["shape"])
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{where}: __ndarray__ does not fit its dtype and shape ({e})") from None


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` (nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings) to ``path``."""
    from safetensors.torch import save_file

    tree, tensors = encode_state(obj)
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(tree, separators=(",", ":"))})


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read a file :func:`save_state` wrote; a file of any other kind (a pickle, say) is refused
    with one CheckpointError line, and nothing in it is run."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected an lmforge state file (safetensors)")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    looks_safetensors = len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"
    if not looks_safetensors and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):  # pickle / torch.save zip
        raise CheckpointError(f"{path} is a pickle (torch.save) file, which can run code when loaded; lmforge "
                              f"refuses it and reads only its safetensors state files")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors state file "
                              f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    if STATE_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file without lmforge state (no {STATE_KEY!r} "
                              f"metadata); expected a file lmforge wrote")
    try:
        return decode_state(json.loads(meta[STATE_KEY]), tensors)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: its lmforge state is corrupt ({str(e)[:200]})") from None
