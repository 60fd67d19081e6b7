"""Tokenizers: text <-> token ids, behind one interface.

Four implementations share :class:`Tokenizer`:

* :class:`CharTokenizer` (``"char"``): one id per character seen in a corpus; unknown characters
  map to the unk token.
* :class:`ByteTokenizer` (``"byte"``): ids 0-255 are the UTF-8 bytes, then the special tokens;
  lossless on any text.
* :class:`BPETokenizer` (``"bpe"``): byte-level BPE trained with Hugging Face ``tokenizers``;
  lossless on any text.
* :class:`HFTokenizer` (``"hf"``): wraps an existing Hugging Face ``tokenizer.json`` (GPT-2,
  Llama, BERT WordPiece, ...).

Special tokens in ordinary text: the char and byte tokenizers never parse them, so the literal
text ``"<|eos|>"`` encodes as plain characters/bytes. BPE and HF tokenizers match their added
special tokens in the text (Hugging Face behaviour), so ``"<|eos|>"`` there encodes to ``eos_id``.
Either way ``decode(encode(s), skip_special_tokens=False) == s``.

Every tokenizer saves to one JSON file ``{"lmforge_tokenizer": kind, "version": 1, ...}``;
:func:`load_tokenizer` reads those files and plain Hugging Face ``tokenizer.json`` files.
:meth:`Tokenizer.to_hf_json` writes any kind as a Hugging Face ``tokenizer.json`` (char and byte
become BPE models without merges) that ``transformers.AutoTokenizer`` loads with the same ids.

Text that is not valid unicode (a lone surrogate, as Python makes of undecodable bytes with
``surrogateescape``) is an :class:`~lmforge.errors.InputError` for every kind; so are ids that
are not integers in ``decode``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from lmforge.chat import ASSISTANT, END, SYSTEM, USER, render, render_chat
from lmforge.errors import ConfigError, DataError, InputError, TokenizerError
from lmforge.fsutil import atomic_write

FORMAT_VERSION = 1

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>"
CHAR_SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate: a str that is not valid unicode


class UnknownCharWarning(UserWarning):
    """A char tokenizer met characters outside its vocabulary (they became the unk token)."""

# Known spellings of each special role, first match wins (ours, then Llama/BERT/GPT-2 styles).
_ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "bos": (BOS, "<s>", "[CLS]", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": (EOS, "</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>"),
    "pad": (PAD, "<pad>", "[PAD]"),
    "unk": (UNK, "<unk>", "[UNK]"),
}


class Tokenizer(ABC):
    """The interface every tokenizer implements.

    Subclasses provide ``_encode``/``_decode`` on plain lists and ``_payload`` for saving; this
    class adds bos/eos handling, id validation, batching, chat formatting and serialisation.
    ``encode`` never adds special tokens unless asked (``add_bos``/``add_eos``), for every kind.
    """

    kind: ClassVar[str]

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens: dict[str, int] = dict(special_tokens)
        found = {role: self._first_known(names) for role, names in _ROLE_CANDIDATES.items()}
        self.bos_id: int | None = found["bos"]
        self.eos_id: int | None = found["eos"]
        self.pad_id: int | None = found["pad"]
        self.unk_id: int | None = found["unk"]
        self.chat_template: str | None = None  # a Jinja chat template (lmforge.chat); None -> render_chat
        self._overrides: dict[str, Any] = {}
        self._fingerprint: str | None = None

    # --- what subclasses implement -------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (largest id + 1)."""

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    @abstractmethod
    def token_to_id(self, tok: str) -> int | None:
        """The id of token string ``tok``, or None if it is not in the vocabulary."""

    @abstractmethod
    def _id_to_token(self, i: int) -> str: ...

    @abstractmethod
    def _payload(self) -> dict[str, Any]:
        """The kind-specific part of :meth:`to_dict`."""

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _decode_batch(self, batch: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return [self._decode(ids, skip_special_tokens) for ids in batch]

    # --- public API ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``, optionally wrapped in bos/eos.

        ``add_special_tokens`` runs the tokenizer's own post-processor (an imported BERT
        tokenizer adds ``[CLS] ... [SEP]``, Llama's adds ``<s>``); None means: yes for imported
        (``"hf"``) tokenizers unless ``add_bos``/``add_eos`` are given, as ``transformers``
        does. char, byte and lmforge-trained BPE tokenizers have no post-processor.
        """
        self._check_text(text)
        post = self._use_post_processor(add_special_tokens, add_bos, add_eos)
        return self._wrap(self._encode_one(text, post), add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False,
                     add_special_tokens: bool | None = None) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in parallel where the backend can."""
        texts = list(texts)
        for t in texts:
            self._check_text(t)
        post = self._use_post_processor(add_special_tokens, add_bos, add_eos)
        return [self._wrap(ids, add_bos, add_eos) for ids in self._encode_many(texts, post)]

    # Whether encode() runs the post-processor when add_special_tokens is None (see HFTokenizer).
    post_process_by_default: ClassVar[bool] = False

    def _use_post_processor(self, add_special_tokens: bool | None, add_bos: bool,
                            add_eos: bool) -> bool:
        if add_special_tokens is None:
            return self.post_process_by_default and not (add_bos or add_eos)
        if not isinstance(add_special_tokens, bool):
            raise InputError(f"add_special_tokens: got {add_special_tokens!r}, expected True, "
                             f"False or None")
        return add_special_tokens

    def _encode_one(self, text: str, post_process: bool) -> list[int]:
        return self._encode(text)  # no post-processor: nothing to add

    def _encode_many(self, texts: list[str], post_process: bool) -> list[list[int]]:
        return self._encode_batch(texts)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor/array); bad UTF-8 becomes U+FFFD."""
        return self._decode(self._check_ids(ids), skip_special_tokens)

    def decode_batch(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of ``batch`` (a list of id lists or a 2-D tensor/array)."""
        rows = batch.tolist() if hasattr(batch, "tolist") else list(batch)
        return self._decode_batch([self._check_ids(r) for r in rows], skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        """The token string of id ``i``."""
        self._check_ids([i])
        return self._id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render ``[{"role": ..., "content": ...}]`` with the tokenizer's Jinja ``chat_template``
        when it has one (:func:`lmforge.chat.render`), else as lmforge's role-tagged text
        (:func:`lmforge.chat.render_chat`)."""
        if self.chat_template is not None:
            return render(messages, self, add_generation_prompt=add_generation_prompt)
        return render_chat(messages, add_generation_prompt)

    def configure(self, *, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                  unk_id: int | None = None, chat_template: str | None = None) -> "Tokenizer":
        """Set what a model file says about this vocabulary (its bos/eos/pad/unk ids, its chat
        template) instead of the guesses from token names; saved with the tokenizer."""
        given = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "unk_id": unk_id}
        for name, i in given.items():
            if i is None or i == getattr(self, name):  # only what differs from the guess is recorded
                continue
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name}: got {i!r}, expected an id in [0, {self.vocab_size})")
            setattr(self, name, i)
            self._overrides[name] = i
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise TokenizerError(f"chat_template: got {type(chat_template).__name__}, expected a Jinja string")
            self.chat_template = chat_template
            self._overrides["chat_template"] = chat_template
        self._fingerprint = None
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description from which :func:`load_tokenizer` rebuilds this."""
        d = {"lmforge_tokenizer": self.kind, "version": FORMAT_VERSION, **self._payload()}
        if self._overrides:
            d["overrides"] = dict(self._overrides)
        return d

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face ``tokenizer.json`` (text) that ``tokenizers`` and
        ``transformers.AutoTokenizer`` load with the same ids for text without literal special
        token strings (Hugging Face matches those in the text; char and byte tokenizers do not)."""
        return self._hf_backend().to_str(pretty=True)

    def _hf_backend(self) -> Any:
        """A ``tokenizers.Tokenizer`` equal to this one (see :meth:`to_hf_json`)."""
        raise TokenizerError(f"{type(self).__name__}: no Hugging Face tokenizer.json form; expected a char, "
                             f"byte, BPE or imported Hugging Face tokenizer")

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON of :meth:`to_dict`: equal iff the same tokenizer."""
        if self._fingerprint is None:
            canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to one JSON file, atomically (temp file, fsync, rename)."""
        atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    # --- helpers -------------------------------------------------------------------------
    def _first_known(self, names: Sequence[str]) -> int | None:
        for name in names:
            if (i := self.token_to_id(name)) is not None:
                return i
        return None

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise InputError(f"add_bos=True but this {self.kind} tokenizer has no bos token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise InputError(f"add_eos=True but this {self.kind} tokenizer has no eos token")
            ids.append(self.eos_id)
        return ids

    @staticmethod
    def _check_text(text: Any) -> None:
        if not isinstance(text, str):
            raise InputError(f"encode: expected text as str, got {type(text).__name__}")
        if m := _SURROGATE.search(text):  # e.g. undecodable bytes read with surrogateescape
            raise InputError(f"encode: text is not valid unicode (lone surrogate "
                             f"U+{ord(m.group()):04X} at index {m.start()}); expected text that "
                             f"encodes as UTF-8 (was it read from bytes that are not UTF-8?)")

    def _check_ids(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            if getattr(ids, "ndim", 1) != 1:
                raise InputError(f"decode: expected a 1-D sequence of ids, got shape "
                                 f"{tuple(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise InputError(f"decode: expected a sequence of integer token ids, got "
                             f"{type(ids).__name__}")
        ids = list(ids)
        for i in ids:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                raise InputError(f"decode: expected integer token ids, got {i!r:.40} "
                                 f"({type(i).__name__})")
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise InputError(f"token id {bad} out of range for vocab_size {self.vocab_size}")
        return ids


class CharTokenizer(Tokenizer):
    """One id per character: special tokens first (ids 0..), then the sorted characters.

    Characters not seen in training map to the unk token, so encoding never fails; each
    ``encode``/``encode_batch`` call that meets some warns once (:class:`UnknownCharWarning`)
    with their count.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], specials: Sequence[str] = CHAR_SPECIAL_TOKENS):
        specials = list(specials)
        if UNK not in specials or len(set(specials)) != len(specials):
            raise TokenizerError(f"char tokenizer specials: expected distinct tokens including "
                                 f"{UNK}, got {specials}")
        chars = sorted(set(chars) - set(specials))
        if any(len(c) != 1 for c in chars):
            raise TokenizerError("char tokenizer chars: expected single characters")
        self._itos = specials + chars
        self._stoi = {s: i for i, s in enumerate(self._itos)}
        super().__init__({s: i for i, s in enumerate(specials)})
        # Decoding table with the special tokens blanked out, for skip_special_tokens=True.
        self._itos_skip = [""] * len(specials) + chars

    @classmethod
    def train(cls, texts_or_files: Any, specials: Sequence[str] = CHAR_SPECIAL_TOKENS
              ) -> CharTokenizer:
        """Build the vocabulary from every character in texts (``str``) or files (``Path``)."""
        seen: set[str] = set()
        texts, files = _split_sources(texts_or_files)
        _require_text(texts, files, "char")
        for t in _iter_texts(texts, files):
            seen.update(t)
        return cls(seen, specials)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def _encode(self, text: str) -> list[int]:
        ids = self._lookup(text)
        self._warn_unknown([text], [ids])
        return ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = [self._lookup(t) for t in texts]
        self._warn_unknown(texts, out)
        return out

    def _lookup(self, text: str) -> list[int]:
        get, unk = self._stoi.get, self.unk_id
        return [get(c, unk) for c in text]

    def _warn_unknown(self, texts: list[str], encoded: list[list[int]]) -> None:
        """One warning per call naming how many characters were outside the vocabulary."""
        if not any(self.unk_id in ids for ids in encoded):  # the fast check: no unk id at all
            return
        stoi = self._stoi
        missing = [c for t in texts for c in t if c not in stoi]
        if not missing:  # the unk id came from a (single-character) unk token in the text
            return
        distinct = sorted(set(missing))
        shown = ", ".join(repr(c) for c in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
        warnings.warn(f"char tokenizer: {len(missing)} character(s) outside its vocabulary of "
                      f"{self.vocab_size} ({len(distinct)} distinct: {shown}) encoded as "
                      f"{self._itos[self.unk_id]}", UnknownCharWarning, stacklevel=5)  # the caller of encode

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        table = self._itos_skip if skip_special_tokens else self._itos
        return "".join(map(table.__getitem__, ids))

    def token_to_id(self, tok: str) -> int | None:
        return self._stoi.get(tok)

    def _id_to_token(self, i: int) -> str:
        return self._itos[i]

    def _payload(self) -> dict[str, Any]:
        n = len(self.special_tokens)
        return {"specials": self._itos[:n], "chars": self._itos[n:]}

    def _hf_backend(self) -> Any:
        # BPE without merges splits text into characters and maps each through the vocabulary,
        # unknown ones to unk; no pre-tokenizer (whitespace is a character like any other), and
        # Fuse joins the pieces back without the spaces a bare decode would put between them.
        from tokenizers import Tokenizer as _Backend
        from tokenizers import decoders, models

        unk = self._itos[self.unk_id]
        backend = _Backend(models.BPE(vocab=dict(self._stoi), merges=[], unk_token=unk))
        backend.decoder = decoders.Fuse()
        _add_specials(backend, self.special_tokens)
        return backend

    @classmethod
    def from_dict(cls, d: dict, where: str) -> CharTokenizer:
        return cls(_field(d, "chars", list, where), _field(d, "specials", list, where))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255 (id == byte value), then the special tokens.

    Byte tokens are named ``"<0xNN>"``; ``token_to_id`` also accepts a one-byte character.
    """

    kind = "byte"

    def __init__(self, specials: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        specials = list(specials)
        if len(set(specials)) != len(specials):
            raise TokenizerError(f"byte tokenizer specials: expected distinct tokens, "
                                 f"got {specials}")
        self._specials = specials
        super().__init__({s: 256 + i for i, s in enumerate(specials)})

    @property
    def vocab_size(self) -> int:
        return 256 + len(self._specials)

    def _encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise InputError(f"encode: text is not valid unicode ({e.reason} at {e.start})") from e

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not ids or max(ids) < 256:
            return bytes(ids).decode("utf-8", errors="replace")
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special_tokens:
                parts.append(self._specials[i - 256])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_to_id(self, tok: str) -> int | None:
        if tok in self.special_tokens:
            return self.special_tokens[tok]
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            digits = tok[3:5]
            return int(digits, 16) if all(c in "0123456789abcdefABCDEF" for c in digits) else None
        return ord(tok) if len(tok) == 1 and ord(tok) < 128 else None

    def _id_to_token(self, i: int) -> str:
        return f"<0x{i:02X}>" if i < 256 else self._specials[i - 256]

    def _payload(self) -> dict[str, Any]:
        return {"specials": list(self._specials)}

    def _hf_backend(self) -> Any:
        # Byte-level BPE without merges: the ByteLevel pre-tokenizer maps each UTF-8 byte to one
        # printable character (GPT-2's table) whose id is the byte value; its decoder maps back.
        from tokenizers import Tokenizer as _Backend
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in enumerate(_byte_level_chars())}
        backend = _Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        _add_specials(backend, self.special_tokens)
        return backend

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ByteTokenizer:
        return cls(_field(d, "specials", list, where))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` behind the lmforge interface.

    ``encode`` runs the file's post-processor by default, as ``transformers`` does: BERT's gives
    ``[CLS] ... [SEP]``, Llama's a leading ``<s>``, GPT-2's nothing. ``add_special_tokens=False``
    (or passing ``add_bos``/``add_eos``, which then add exactly what they name) switches it off.
    Padding and truncation configured in the file are switched off: lmforge batches itself.
    Added special tokens present in the text are matched as special tokens.
    """

    kind = "hf"
    post_process_by_default = True

    def __init__(self, backend: Any):
        backend.no_padding()  # lmforge pads and truncates batches itself
        backend.no_truncation()
        self._tk = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        added = backend.get_added_tokens_decoder()
        super().__init__({t.content: i for i, t in sorted(added.items()) if t.special})

    @classmethod
    def from_str(cls, hf_json: str, where: str = "<string>") -> HFTokenizer:
        """Build from the text of a Hugging Face ``tokenizer.json``."""
        from tokenizers import Tokenizer as _Backend

        try:
            return cls(_Backend.from_str(hf_json))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"{where}: not a valid Hugging Face tokenizer.json ({msg})") from e

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def _encode_one(self, text: str, post_process: bool) -> list[int]:
        return self._tk.encode(text, add_special_tokens=post_process).ids

    def _encode_many(self, texts: list[str], post_process: bool) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=post_process)]

    def _hf_backend(self) -> Any:
        from tokenizers import Tokenizer as _Backend

        return _Backend.from_str(self._tk.to_str())

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's (start, end) character offsets in it."""
        self._check_text(text)
        e = self._tk.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def _decode_batch(self, batch: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return self._tk.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, tok: str) -> int | None:
        return self._tk.token_to_id(tok)

    def _id_to_token(self, i: int) -> str:
        tok = self._tk.id_to_token(i)
        if tok is None:
            raise InputError(f"token id {i} is unused in this tokenizer's vocabulary")
        return tok

    def _payload(self) -> dict[str, Any]:
        # Embedded as a nested object so the file stays readable and the fingerprint canonical.
        return {"hf_tokenizer": json.loads(self._tk.to_str())}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> HFTokenizer:
        return cls.from_str(json.dumps(_field(d, "hf_tokenizer", dict, where)), where)


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained with Hugging Face ``tokenizers`` (GPT-2 style).

    All 256 byte symbols are in the initial alphabet and there is no normaliser or prefix space,
    so ``decode(encode(s)) == s`` for any string, including characters never seen in training.
    Special tokens take ids 0..len(specials)-1.
    """

    kind = "bpe"
    post_process_by_default = False  # trained here: no post-processor, nothing to add

    @classmethod
    def train(cls, texts_or_files: Any, vocab_size: int = 8000, min_frequency: int = 2,
              specials: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> BPETokenizer:
        """Train on texts (``str`` items) or files (``Path`` items); uses every CPU core."""
        from tokenizers import Tokenizer as _Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        specials = list(specials)
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"vocab_size: expected at least {256 + len(specials)} for byte-level "
                              f"BPE (256 bytes + {len(specials)} special tokens), got {vocab_size}")
        backend = _Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        texts, files = _split_sources(texts_or_files)
        _require_text(texts, files, "BPE")
        if files:
            backend.train([str(p) for p in files], trainer)
        else:
            backend.train_from_iterator(texts, trainer)
        return cls(backend)


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> character table, as a list indexed by byte value: printable Latin-1
    bytes stand for themselves, the other 68 take the characters from U+0100 on, in order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + extra))
            extra += 1
    return chars


def _add_specials(backend: Any, special_tokens: dict[str, int]) -> None:
    """Register lmforge's special tokens as Hugging Face special added tokens (same ids)."""
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, _ in sorted(special_tokens.items(), key=lambda kv: kv[1])])
    for t, i in special_tokens.items():
        if backend.token_to_id(t) != i:
            raise TokenizerError(f"special token {t!r}: id {i} in lmforge but "
                                 f"{backend.token_to_id(t)} in the Hugging Face form")


def _split_sources(texts_or_files: Any) -> tuple[list[str], list[Path]]:
    """Texts (``str``) or files (``Path``/PathLike), not mixed; files must exist."""
    single = isinstance(texts_or_files, (str, os.PathLike))
    items = [texts_or_files] if single else list(texts_or_files)
    files = [Path(x) for x in items if isinstance(x, os.PathLike)]
    if files and len(files) != len(items):
        raise DataError("training input: expected all texts (str) or all files (Path), not a mix")
    for p in files:
        if not p.is_file():
            raise DataError(f"{p}: training file not found")
        _check_utf8(p)
    for i, t in enumerate([] if files else items):
        if not isinstance(t, str):
            raise DataError(f"training text {i}: got {type(t).__name__}, expected str (or a Path)")
        if m := _SURROGATE.search(t):
            raise DataError(f"training text {i}: not valid unicode (lone surrogate U+{ord(m.group()):04X} "
                            f"at index {m.start()}); expected text that encodes as UTF-8")
    return ([] if files else items), files


def _check_utf8(path: Path) -> None:
    """DataError unless ``path`` is UTF-8 text (read in 1 MiB chunks, incrementally)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (invalid byte near offset {offset + max(e.start, 0)}); "
                                f"expected a UTF-8 text file (convert it, e.g. with iconv)") from None
            if not chunk:
                return
            offset += len(chunk)


def _require_text(texts: list[str], files: list[Path], kind: str) -> None:
    """DataError when there is nothing to learn a vocabulary from (no text, or only empty ones)."""
    if files and any(p.stat().st_size for p in files):
        return
    if not files and any(texts):
        return
    what = ", ".join(map(str, files)) if files else "the training texts"
    raise DataError(f"{what}: empty; expected some text to learn a {kind} vocabulary from")


def _iter_texts(texts: list[str], files: list[Path]) -> Iterable[str]:
    yield from texts
    for p in files:
        with open(p, encoding="utf-8", errors="replace") as f:
            while chunk := f.read(1 << 20):
                yield chunk


def _field(d: dict, name: str, typ: type, where: str) -> Any:
    value = d.get(name)
    if not isinstance(value, typ) or (typ is list and not all(isinstance(v, str) for v in value)):
        kind = "list of strings" if typ is list else typ.__name__
        raise TokenizerError(f"{where}: field {name!r} missing or not a {kind}")
    return value


_KINDS: dict[str, type] = {"char": CharTokenizer, "byte": ByteTokenizer,
                           "bpe": BPETokenizer, "hf": HFTokenizer}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load an lmforge tokenizer file, or a plain Hugging Face ``tokenizer.json`` (as ``"hf"``)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    try:
        text = path.read_text(encoding="utf-8")
        d = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: expected a JSON tokenizer file ({type(e).__name__})") from e
    if isinstance(d, dict) and "lmforge_tokenizer" in d:
        kind = d["lmforge_tokenizer"]
        if kind not in _KINDS:
            raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}; "
                                 f"expected one of {', '.join(_KINDS)}")
        if d.get("version") != FORMAT_VERSION:
            raise TokenizerError(f"{path}: tokenizer format version {d.get('version')!r}; "
                                 f"expected {FORMAT_VERSION}")
        tok = _KINDS[kind].from_dict(d, str(path))
        overrides = d.get("overrides", {})
        if not isinstance(overrides, dict) or set(overrides) - {"bos_id", "eos_id", "pad_id", "unk_id",
                                                                 "chat_template"}:
            raise TokenizerError(f"{path}: 'overrides': expected an object with bos_id/eos_id/pad_id/unk_id/"
                                 f"chat_template")
        return tok.configure(**overrides)
    if isinstance(d, dict) and "model" in d and ("version" in d or "added_tokens" in d):
        return HFTokenizer.from_str(text, str(path))
    raise TokenizerError(f"{path}: expected an lmforge tokenizer file (key 'lmforge_tokenizer') "
                         f"or a Hugging Face tokenizer.json (keys 'model', 'added_tokens')")


def train_tokenizer(kind: str, texts_or_files: Any = (), vocab_size: int | None = None, *,
                    min_frequency: int = 2, specials: Sequence[str] | None = None) -> Tokenizer:
    """Build a ``"char"``, ``"byte"`` or ``"bpe"`` tokenizer from texts (``str``) or files
    (``Path``); the CLI's ``lmforge tokenizer train`` calls this.

    ``vocab_size`` applies to BPE only (default 8000); byte ignores the input.
    """
    if kind == "byte":
        return ByteTokenizer(DEFAULT_SPECIAL_TOKENS if specials is None else specials)
    if kind == "char":
        return CharTokenizer.train(texts_or_files,
                                   CHAR_SPECIAL_TOKENS if specials is None else specials)
    if kind == "bpe":
        return BPETokenizer.train(texts_or_files, 8000 if vocab_size is None else vocab_size,
                                  min_frequency,
                                  DEFAULT_SPECIAL_TOKENS if specials is None else specials)
    raise ConfigError(f"tokenizer.kind: unknown kind {kind!r}; expected one of char, byte, bpe")
