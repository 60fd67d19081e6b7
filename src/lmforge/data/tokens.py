"""The token store: tokenize once into memory-mapped files, then cut training windows from them.

:meth:`TokenStore.build` streams the documents of one or more sources through a tokenizer
(``encode_batch`` on chunks of ``batch_docs`` documents), writes the ids as one flat binary
file per split (``train.bin`` / ``val.bin``, ``uint16`` when the vocabulary fits, else
``uint32``) plus a ``meta.json``, and memory-maps them. Each document is followed by the
tokenizer's eos id when it has one, so documents stay separated in the flat stream.

The store lives in ``cache_dir/<key>/`` where ``key`` hashes the tokenizer fingerprint, the
source fingerprints (spec + file path/size/mtime) and the split settings: unchanged inputs
reuse the store, changed data or a changed tokenizer give a new key and a new build. A build
writes into a hidden temporary folder and renames it into place only once complete, so a
killed build never leaves a half-written store that a later run would pick up.

Validation split, in order of preference:

* ``val_sources`` given: those sources are the validation split, all of ``sources`` is train.
* by document: a seeded permutation puts ``round(n_docs * val_fraction)`` whole documents in
  val (original order kept inside each split), so no document is in both splits;
* when that rounds to zero documents (e.g. one big file such as tiny shakespeare), the token
  stream is cut at ``(1 - val_fraction)`` like nanoGPT's 90/10 split; ``meta["split"]`` says
  ``"tokens"`` and ``meta["split_note"]`` explains it;
* ``val_fraction == 0``: no validation split (``val`` is empty).

Windows: :func:`random_windows` samples training batches, :func:`sequential_windows` walks a
split in order for evaluation, :func:`check_fits` raises a one-line :class:`DataError` when a
split is shorter than one window.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.data.sources import SourceSpec, iter_documents, source_fingerprint
from lmforge.errors import DataError
from lmforge.fsutil import publish_folder

__all__ = [
    "TokenStore",
    "random_windows",
    "sequential_windows",
    "num_sequential_windows",
    "check_fits",
    "token_dtype",
]

FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_COPY_CHUNK = 1 << 24  # tokens per chunk when splitting the stream on disk


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65535), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _as_specs(sources: Any, what: str) -> list[SourceSpec]:
    if isinstance(sources, (SourceSpec, str)):
        sources = [sources]
    out = []
    for s in sources:
        if isinstance(s, str):
            s = SourceSpec(path=s)
        if not isinstance(s, SourceSpec):
            raise DataError(f"{what}: expected SourceSpec or path strings, got {type(s).__name__}")
        out.append(s)
    if not out:
        raise DataError(f"{what}: expected at least one source, got none")
    return out


class TokenStore:
    """Token ids of a corpus, split into ``train`` and ``val`` 1-D memory-mapped arrays."""

    def __init__(self, path: Path, train: np.ndarray, val: np.ndarray, meta: dict):
        self.path = Path(path)
        self.train = train
        self.val = val
        self.meta = meta

    # ---- convenience ----------------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int | None:
        return self.meta["eos_id"]

    def split(self, name: str) -> np.ndarray:
        """``"train"`` or ``"val"``."""
        if name not in ("train", "val"):
            raise DataError(f"token store split: expected 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, train={len(self.train):,} tokens, "
                f"val={len(self.val):,} tokens, dtype={self.meta['dtype']}, "
                f"split={self.meta['split']})")

    # ---- key and loading ------------------------------------------------------------------

    @staticmethod
    def cache_key(sources: Sequence[SourceSpec], tokenizer: Any, *, val_fraction: float = 0.1,
                  val_sources: Sequence[SourceSpec] | None = None, seed: int = 0) -> str:
        """The cache folder name for these inputs (changes when data or tokenizer change)."""
        payload = {
            "format": FORMAT_VERSION,
            "tokenizer": tokenizer.fingerprint(),
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": tokenizer.eos_id,
            "sources": [source_fingerprint(s) for s in _as_specs(sources, "sources")],
            "val_sources": (None if val_sources is None else
                            [source_fingerprint(s) for s in _as_specs(val_sources, "val_sources")]),
            "val_fraction": None if val_sources is not None else float(val_fraction),
            "seed": None if val_sources is not None else int(seed),
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenStore:
        """Open a finished store folder (as written by :meth:`build`)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{path}: not a token store (no meta.json)")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{meta_file}: unreadable token store metadata ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{meta_file}: token store format {meta.get('format_version')!r}, "
                            f"expected {FORMAT_VERSION}")
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split in ("train", "val"):
            f = path / f"{split}.bin"
            n = int(meta[f"{split}_tokens"])
            size = f.stat().st_size if f.is_file() else -1
            if size != n * dtype.itemsize:
                raise DataError(f"{f}: token store is incomplete ({size} bytes, meta.json "
                                f"expects {n * dtype.itemsize})")
            arrays[split] = (np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n > 0
                             else np.zeros(0, dtype=dtype))
        return cls(path, arrays["train"], arrays["val"], meta)

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        sources: list[SourceSpec] | SourceSpec | str,
        tokenizer: Any,
        cache_dir: str | os.PathLike,
        *,
        val_fraction: float = 0.1,
        val_sources: list[SourceSpec] | SourceSpec | str | None = None,
        seed: int = 0,
        progress: bool = True,
        batch_docs: int = 1024,
    ) -> TokenStore:
        """Tokenize ``sources`` into ``cache_dir/<key>/``, or reuse the store already there."""
        specs = _as_specs(sources, "sources")
        val_specs = None if val_sources is None else _as_specs(val_sources, "val_sources")
        if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
        if not isinstance(batch_docs, int) or batch_docs < 1:
            raise DataError(f"batch_docs: expected a positive integer, got {batch_docs!r}")

        cache_dir = Path(cache_dir).expanduser()
        key = cls.cache_key(specs, tokenizer, val_fraction=val_fraction,
                            val_sources=val_specs, seed=seed)
        final = cache_dir / key
        existing = _try_load(final, key)
        if existing is not None:
            return existing

        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(cache_dir, key)
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = cache_dir / f"{_TMP_PREFIX}{key}-{tag}"
        tmp.mkdir()
        t0 = time.time()
        try:
            meta = _build_into(tmp, specs, val_specs, tokenizer, val_fraction=float(val_fraction),
                               seed=int(seed), progress=progress, batch_docs=batch_docs)
            meta.update(key=key, build_seconds=round(time.time() - t0, 3),
                        created=time.strftime("%Y-%m-%dT%H:%M:%S"))
            with open(tmp / "meta.json", "w") as fh:
                json.dump(meta, fh, indent=2, default=str)
            _publish(tmp, final, key)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(final)


def _try_load(folder: Path, key: str) -> TokenStore | None:
    """The store in ``folder`` when it is complete and has ``key``; a broken one is removed."""
    if not folder.exists():
        return None
    try:
        store = TokenStore.load(folder)
        if store.meta.get("key") == key:
            return store
    except (DataError, KeyError, ValueError, OSError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _publish(tmp: Path, final: Path, key: str) -> None:
    """Publish the finished temp folder (another process may have won the race)."""
    try:
        publish_folder(tmp, final)
        return
    except OSError:
        if _try_load(final, key) is not None:
            return  # someone else finished the same build first; ours is discarded
    publish_folder(tmp, final)  # _try_load removed a broken one


def _remove_stale_temps(cache_dir: Path, key: str) -> None:
    """Delete temp folders of this key left by killed builds on this host."""
    host = socket.gethostname()
    for d in cache_dir.glob(f"{_TMP_PREFIX}{key}-*"):
        rest = d.name[len(f"{_TMP_PREFIX}{key}-"):]
        try:
            h, pid, _ = rest.rsplit("-", 2)
            pid = int(pid)
        except ValueError:
            continue
        if h != host:
            continue
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def _tokenize_to_file(specs: list[SourceSpec], tokenizer: Any, out: Path, dtype: np.dtype,
                      batch_docs: int, progress: bool) -> tuple[np.ndarray, list[int]]:
    """Append every document's ids (+ eos) to ``out``; return per-document lengths and the
    number of documents of each source."""
    eos = tokenizer.eos_id
    vocab = int(tokenizer.vocab_size)
    no_post = {"add_special_tokens": False} if getattr(tokenizer, "post_process_by_default", False) else {}
    lengths: list[np.ndarray] = []
    per_source: list[int] = []

    def flush(fh, batch: list[str]) -> None:
        # documents are separated by eos only: no post-processor specials ([CLS], <s>) per document
        encoded = tokenizer.encode_batch(batch, **no_post)
        lens = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(lens.sum()))
        if flat.size and (flat.min() < 0 or flat.max() >= vocab):
            bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
            raise DataError(f"tokenizer produced id {bad}, outside 0..{vocab - 1} "
                            "(its vocab_size)")
        if eos is not None:
            lens = lens + 1
            ends = np.cumsum(lens) - 1
            full = np.empty(int(lens.sum()), dtype=np.int64)
            mask = np.ones(full.size, dtype=bool)
            mask[ends] = False
            full[mask] = flat
            full[ends] = eos
            flat = full
        fh.write(flat.astype(dtype).tobytes())
        lengths.append(lens)

    with open(out, "ab") as fh:
        for spec in specs:
            total = min(spec.num_docs, spec.limit or spec.num_docs) if spec.kind == "builtin" \
                else spec.limit
            bar = tqdm(total=total, unit="doc", desc=f"tokenizing {spec.path}",
                       disable=not progress, dynamic_ncols=True)
            n = 0
            batch: list[str] = []
            try:
                for doc in iter_documents(spec):
                    batch.append(doc)
                    if len(batch) >= batch_docs:
                        flush(fh, batch)
                        n += len(batch)
                        bar.update(len(batch))
                        batch = []
                if batch:
                    flush(fh, batch)
                    n += len(batch)
                    bar.update(len(batch))
            finally:
                bar.close()
            per_source.append(n)
    doc_lens = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    if doc_lens.size == 0 or int(doc_lens.sum()) == 0:
        raise DataError(f"{', '.join(s.path for s in specs)}: empty corpus, no tokens produced")
    return doc_lens, per_source


def _split_by_documents(all_file: Path, train_file: Path, val_file: Path, dtype: np.dtype,
                        doc_lens: np.ndarray, is_val: np.ndarray) -> None:
    """Copy the flat stream into train/val files, whole documents at a time, in chunks."""
    offsets = np.concatenate([[0], np.cumsum(doc_lens)])
    total = int(offsets[-1])
    data = np.memmap(all_file, dtype=dtype, mode="r", shape=(total,))
    with open(train_file, "wb") as ft, open(val_file, "wb") as fv:
        for a in range(0, total, _COPY_CHUNK):
            b = min(a + _COPY_CHUNK, total)
            d0 = int(np.searchsorted(offsets, a, side="right")) - 1
            d1 = int(np.searchsorted(offsets, b, side="left"))
            lo = np.clip(offsets[d0:d1], a, b)
            hi = np.clip(offsets[d0 + 1:d1 + 1], a, b)
            mask = np.repeat(is_val[d0:d1], hi - lo)
            chunk = np.asarray(data[a:b])
            ft.write(chunk[~mask].tobytes())
            fv.write(chunk[mask].tobytes())
    del data


def _copy_tail(src: Path, dst: Path, dtype: np.dtype, start: int, total: int) -> None:
    data = np.memmap(src, dtype=dtype, mode="r", shape=(total,))
    with open(dst, "wb") as fh:
        for a in range(start, total, _COPY_CHUNK):
            fh.write(np.asarray(data[a:min(a + _COPY_CHUNK, total)]).tobytes())
    del data


def _build_into(tmp: Path, specs: list[SourceSpec], val_specs: list[SourceSpec] | None,
                tokenizer: Any, *, val_fraction: float, seed: int, progress: bool,
                batch_docs: int) -> dict:
    vocab = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab)
    all_file, train_file, val_file = tmp / "all.bin", tmp / "train.bin", tmp / "val.bin"
    doc_lens, per_source = _tokenize_to_file(specs, tokenizer, all_file, dtype, batch_docs,
                                             progress)
    n_docs, total = int(doc_lens.size), int(doc_lens.sum())
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer.fingerprint(),
        "vocab_size": vocab,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "sources": [{"spec": s.to_dict(), "fingerprint": source_fingerprint(s), "n_docs": k}
                    for s, k in zip(specs, per_source)],
        "val_sources": None,
        "val_fraction": val_fraction,
        "seed": seed,
        "n_docs": n_docs,
    }

    if val_specs is not None:
        os.rename(all_file, train_file)
        val_lens, val_per_source = _tokenize_to_file(val_specs, tokenizer, val_file, dtype,
                                                     batch_docs, progress)
        meta["val_sources"] = [{"spec": s.to_dict(), "fingerprint": source_fingerprint(s),
                                "n_docs": k} for s, k in zip(val_specs, val_per_source)]
        meta.update(split="val_sources", split_note="validation split from val_sources",
                    n_train_docs=n_docs, n_val_docs=int(val_lens.size),
                    train_tokens=total, val_tokens=int(val_lens.sum()))
        return meta

    n_val = min(int(round(n_docs * val_fraction)), n_docs - 1)
    if val_fraction == 0.0:
        os.rename(all_file, train_file)
        val_file.touch()
        meta.update(split="none", split_note="val_fraction is 0: no validation split",
                    n_train_docs=n_docs, n_val_docs=0, train_tokens=total, val_tokens=0)
    elif n_val <= 0:
        cut = int(total * (1.0 - val_fraction))
        _copy_tail(all_file, val_file, dtype, cut, total)
        os.truncate(all_file, cut * dtype.itemsize)
        os.rename(all_file, train_file)
        meta.update(split="tokens",
                    split_note=(f"corpus has {n_docs} document(s), too few for a {val_fraction:g} "
                                f"split by document: the token stream was cut at "
                                f"{1.0 - val_fraction:g} (first {cut} tokens train, the rest val)"),
                    n_train_docs=None, n_val_docs=None, train_tokens=cut, val_tokens=total - cut)
    else:
        perm = np.random.default_rng(seed).permutation(n_docs)
        is_val = np.zeros(n_docs, dtype=bool)
        is_val[perm[:n_val]] = True
        _split_by_documents(all_file, train_file, val_file, dtype, doc_lens, is_val)
        all_file.unlink()
        val_tokens = int(doc_lens[is_val].sum())
        meta.update(split="documents",
                    split_note=f"{n_val} of {n_docs} documents (seeded shuffle) in val",
                    n_train_docs=n_docs - n_val, n_val_docs=n_val,
                    train_tokens=total - val_tokens, val_tokens=val_tokens)
    return meta


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def check_fits(tokens: Any, context: int, split_name: str = "train") -> int:
    """Return ``len(tokens)``; raise :class:`DataError` when it is shorter than one window
    (``context + 1`` tokens: ``context`` inputs and the target after the last)."""
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise DataError(f"context: expected a positive integer, got {context!r}")
    n = len(tokens)
    if n < context + 1:
        raise DataError(f"{split_name} split has {n} tokens, but one window of context {context} "
                        f"needs at least {context + 1}; use more data or a smaller context")
    return n


def _to_tensors(tokens: Any, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(context + 1, dtype=np.int64)[None, :]
    buf = np.asarray(tokens[idx]).astype(np.int64, copy=False)
    x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
    return x, y


def random_windows(tokens: np.ndarray, context: int, batch_size: int,
                   generator: torch.Generator | None = None, *, split_name: str = "train"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``batch_size`` random windows: ``x, y`` int64 ``(batch_size, context)`` with
    ``y[:, t] == x[:, t + 1]`` (the next token). Starts are uniform in
    ``[0, len(tokens) - context - 1]``, drawn from ``generator`` (a CPU generator)."""
    n = check_fits(tokens, context, split_name)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size: expected a positive integer, got {batch_size!r}")
    starts = torch.randint(0, n - context, (batch_size,), generator=generator).numpy()
    return _to_tensors(tokens, starts.astype(np.int64, copy=False), context)


def num_sequential_windows(n_tokens: int, context: int, stride: int | None = None) -> int:
    """How many windows :func:`sequential_windows` yields for a stream of ``n_tokens``."""
    stride = context if stride is None else stride
    if n_tokens < context + 1:
        return 0
    return (n_tokens - context - 1) // stride + 1


def sequential_windows(tokens: np.ndarray, context: int, batch_size: int,
                       stride: int | None = None, max_batches: int | None = None, *,
                       split_name: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows in stream order for evaluation: starts ``0, stride, 2*stride, ...`` (stride
    defaults to ``context``, i.e. non-overlapping targets) while a whole window fits. With the
    default stride every target token is scored exactly once except a tail of fewer than
    ``context`` tokens. Batches hold ``batch_size`` windows (the last may hold fewer);
    ``max_batches`` stops early."""
    n = check_fits(tokens, context, split_name)
    stride = context if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise DataError(f"stride: expected a positive integer, got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 0):
        raise DataError(f"max_batches: expected a non-negative integer or None, "
                        f"got {max_batches!r}")
    starts = np.arange(0, n - context, stride, dtype=np.int64)
    for i, b in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _to_tensors(tokens, starts[b:b + batch_size], context)
