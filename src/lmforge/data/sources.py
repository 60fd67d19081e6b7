"""Documents from anywhere: built-in corpora, local files, folders, globs, Hugging Face datasets.

A :class:`SourceSpec` says where the data lives. :func:`iter_records` yields its records (dicts:
a JSON object, a CSV/TSV row, a Parquet row, a dataset row; plain text and built-in corpora give
``{"text": ...}``), and :func:`iter_documents` is its projection onto the text field: documents as
strings, one at a time (a large file is never read whole unless it is plain text with no
separator, or a JSON array); :func:`source_fingerprint` is a short hash that changes when the
spec or the files behind it change, which is what the token cache keys on.

Paths:

* ``builtin:stories`` / ``builtin:arithmetic`` -- generated offline (``num_docs``, ``seed``);
  arithmetic also takes its difficulty: ``max_operand`` (operands 0..max_operand) and ``ops``
  (a string of operations such as ``"+-"``).
* a local file: ``.txt`` / ``.md`` (plain text; ``doc_separator`` splits it into documents),
  ``.jsonl`` / ``.json`` (JSON lines, or one JSON array of objects), ``.csv`` / ``.tsv``
  (header row), ``.parquet``.
* a folder (every supported file inside, recursively, sorted) or a glob (matches, sorted).
* ``catalog:NAME`` -- a named public dataset (``lmforge data list``): its checked local file from
  a mirror, the cache, or a download (:mod:`lmforge.data.catalog`); read as a local file, with the
  catalog's ``format`` / ``columns`` when the spec sets none.
* ``hf:owner/name`` -- ``datasets.load_dataset(owner/name, name, split=split, streaming=...)``.
  ``hf:json`` / ``hf:csv`` / ``hf:parquet`` / ``hf:text`` with ``data_files`` use the
  ``datasets`` packaged loaders on local files (works offline).

Empty documents (only whitespace) are skipped everywhere; ``limit`` counts the documents kept.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.chat import render_chat
from lmforge.data import catalog
from lmforge.data.builtin import ARITHMETIC_OPS, BUILTIN_CORPORA, BUILTIN_VERSION, builtin_documents
from lmforge.data.splits import record_label, split_records
from lmforge.errors import DataError, InputError

__all__ = [
    "SourceSpec",
    "iter_records",
    "iter_documents",
    "source_fingerprint",
    "resolve_files",
    "SUPPORTED_EXTENSIONS",
]

TEXT_EXTENSIONS = (".txt", ".md")
JSON_EXTENSIONS = (".jsonl", ".json")
CSV_EXTENSIONS = (".csv", ".tsv")
PARQUET_EXTENSIONS = (".parquet",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + CSV_EXTENSIONS + PARQUET_EXTENSIONS

# Bump when the way files are turned into documents changes (invalidates token caches).
_READER_VERSION = 2

_INSTALL_HINT = "install the data extras: pip install 'lmforge[data]'"


@dataclass
class SourceSpec:
    """Where documents come from. See the module docstring for the accepted ``path`` forms."""

    path: str
    text_field: str = "text"  # JSONL / JSON / CSV / Parquet / HF column holding the text
    split: str = "train"  # HF split
    name: str | None = None  # HF config name
    limit: int | None = None  # max documents kept (subset size)
    streaming: bool = False  # HF streaming
    num_docs: int = 2000  # size of built-in corpora
    seed: int = 0  # seed of built-in corpora
    doc_separator: str | None = None  # plain text: None = whole file is one document
    data_files: str | list[str] | None = None  # HF packaged loaders ("hf:json") on local files
    format: str | None = None  # file kind when the extension does not tell: txt, jsonl, json, csv, tsv, parquet
    columns: list[str] | None = None  # CSV/TSV without a header row: one name per column
    quoting: bool = True  # CSV/TSV cells may be "quoted"; false takes every line as it is (quotes are text)
    # One part of a seeded split of this source's records (e.g. pretrain on the texts a classifier
    # trains on, never on its test set): part train/val/test, fractions [val, test], stratified by a field.
    part: str | None = None
    part_split: list[float] | None = None
    part_seed: int = 0
    part_stratify: str | None = None
    # builtin:arithmetic difficulty; None keeps the generator's defaults (0..99, "+-*").
    max_operand: int | None = None
    ops: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise DataError(f"source path: expected a non-empty string, got {self.path!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"{self.path}: text_field must be a non-empty string, "
                            f"got {self.text_field!r}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            raise DataError(f"{self.path}: limit must be a positive integer or None, "
                            f"got {self.limit!r}")
        if not _is_int(self.num_docs) or self.num_docs < 1:
            raise DataError(f"{self.path}: num_docs must be a positive integer, "
                            f"got {self.num_docs!r}")
        if self.doc_separator is not None and (not isinstance(self.doc_separator, str)
                                               or self.doc_separator == ""):
            raise DataError(f"{self.path}: doc_separator must be None or a non-empty string, "
                            f"got {self.doc_separator!r}")
        if isinstance(self.data_files, tuple):
            self.data_files = list(self.data_files)
        if self.format is not None and ("." + str(self.format).lower()) not in SUPPORTED_EXTENSIONS:
            raise DataError(f"{self.path}: format must be one of "
                            f"{', '.join(e[1:] for e in SUPPORTED_EXTENSIONS)}, got {self.format!r}")
        if self.part is not None and (self.part not in ("train", "val", "test") or not self.part_split
                                      or len(self.part_split) != 2 or sum(self.part_split) >= 1
                                      or min(self.part_split) < 0):
            raise DataError(f"{self.path}: part must be train, val or test with part_split [val, test] fractions "
                            f"summing below 1; got part={self.part!r}, part_split={self.part_split!r}")
        if self.columns is not None and (not isinstance(self.columns, (list, tuple)) or not self.columns
                                         or not all(isinstance(c, str) and c for c in self.columns)):
            raise DataError(f"{self.path}: columns must be a non-empty list of column names, got {self.columns!r}")
        self._check_arithmetic_options()
        if self.kind == "catalog":
            catalog.get(self.path)  # an unknown name fails here, listing the known ones

    def _check_arithmetic_options(self) -> None:
        for key in ("max_operand", "ops"):
            if getattr(self, key) is not None and self.path != "builtin:arithmetic":
                raise DataError(f"{self.path}: {key} applies to builtin:arithmetic only")
        if self.max_operand is not None and (not _is_int(self.max_operand) or self.max_operand < 1):
            raise DataError(f"{self.path}: max_operand must be an integer >= 1, got {self.max_operand!r}")
        if self.ops is not None:
            ops = self.ops.replace(" ", "") if isinstance(self.ops, str) else None
            if not ops or any(o not in ARITHMETIC_OPS for o in ops) or len(set(ops)) != len(ops):
                raise DataError(f"{self.path}: ops must be a string of distinct operations from "
                                f"{''.join(ARITHMETIC_OPS)!r} (e.g. \"+-\"), got {self.ops!r}")

    def builtin_options(self) -> dict[str, Any]:
        """The generator options this spec sets (``max_operand``, ``ops`` as a tuple), for
        ``builtin:arithmetic`` and the tasks that read it as prompts or preference pairs."""
        out: dict[str, Any] = {}
        if self.max_operand is not None:
            out["max_operand"] = self.max_operand
        if self.ops is not None:
            out["ops"] = tuple(self.ops.replace(" ", ""))
        return out

    @property
    def kind(self) -> str:
        """``"builtin"``, ``"catalog"``, ``"hf"`` or ``"local"``."""
        if self.path.startswith("builtin:"):
            return "builtin"
        if self.path.startswith(catalog.PREFIX):
            return "catalog"
        if self.path.startswith("hf:"):
            return "hf"
        return "local"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def iter_records(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    """Yield the records of ``spec`` (at most ``spec.limit``) as dicts, each with a ``"_where"``
    key naming its file and line/row (for error messages).

    Raises :class:`DataError` when the path is missing, a file has an unsupported extension or
    holds no record (empty, or a header row only).
    """
    if spec.part is not None:
        raw: Iterable[dict] = _part(spec)
    elif spec.kind == "builtin":
        raw = ({"text": d, "_where": f"{spec.path} doc {i}"} for i, d in enumerate(_builtin(spec)))
    elif spec.kind == "hf":
        raw = _hf(spec)
    elif spec.kind == "catalog":
        raw = _local(catalog_local_spec(spec))
    else:
        raw = _local(spec)
    count = 0
    for rec in raw:
        yield rec
        count += 1
        if spec.limit is not None and count >= spec.limit:
            return
    if count == 0:
        raise DataError(f"{spec.path}: no records found (empty file, or a header row only)")


def read_records(specs: list[SourceSpec] | None) -> list[dict]:
    """Every record of every source, in order."""
    out: list[dict] = []
    for spec in specs or []:
        out.extend(iter_records(spec))
    return out


def _part(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    """The records of one part of a seeded (stratified) split: the same split a classification
    run makes with run.seed = part_seed and data.val_fraction/test_fraction = part_split."""
    whole = dataclasses.replace(spec, part=None, limit=None)
    records = list(iter_records(whole))
    key = (lambda r: record_label(r, spec.part_stratify)) if spec.part_stratify else None
    train, val, test = split_records(records, tuple(spec.part_split), spec.part_seed, key)
    yield from {"train": train, "val": val, "test": test}[spec.part]


def iter_documents(spec: SourceSpec) -> Iterator[str]:
    """Yield the non-empty documents of ``spec`` (at most ``spec.limit``): the text field of
    each record (a chat ``messages`` list is rendered with lmforge's chat template).

    Raises :class:`DataError` when the path is missing, a file has an unsupported extension,
    the text field is absent, or no non-empty document was found.
    """
    count = 0
    unlimited = dataclasses.replace(spec, limit=None)  # ``limit`` counts kept documents, not records
    try:
        for rec in iter_records(unlimited):
            doc = _text_value(rec, spec.text_field, rec.get("_where", spec.path))
            if not doc.strip():
                continue
            yield doc
            count += 1
            if spec.limit is not None and count >= spec.limit:
                return
    except DataError as e:
        if "no records found" not in str(e):
            raise
    if count == 0:
        where = "" if spec.kind == "builtin" else f" (text field {spec.text_field!r})"
        raise DataError(f"{spec.path}: empty corpus, no non-empty documents found{where}")


def read_json_records(path: str | os.PathLike, what: str = "record") -> list:
    """A whole ``.jsonl`` or ``.json`` (array) file as a list, for readers that need every record
    at once (preference pairs, prompt/answer sets); bad JSON names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        return records
    if suffix == ".json":
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        return data
    raise DataError(f"{path}: unsupported {what} file type {suffix!r}; expected .json or .jsonl")


def source_fingerprint(spec: SourceSpec) -> str:
    """A short hash of the spec and, for local files, each file's (path, size, mtime_ns).

    Built-in corpora hash the spec (and the generator version) only; catalog datasets the spec
    and the file's sha256 (wherever the file lies). Hub datasets hash the spec only: a dataset
    revised on the hub keeps its fingerprint.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"spec": spec.to_dict(), "reader": _READER_VERSION},
                        sort_keys=True, default=str).encode())
    if spec.kind == "builtin":
        h.update(f"builtin-version={BUILTIN_VERSION}".encode())
    elif spec.kind == "catalog":
        h.update(f"catalog-sha256={catalog.get(spec.path).sha256}".encode())
    elif spec.kind == "hf":
        for f in _hf_local_files(spec):
            h.update(_file_stamp(f).encode())
    else:
        for f in _local_files(spec):
            h.update(_file_stamp(f).encode())
    return h.hexdigest()[:16]


def catalog_local_spec(spec: SourceSpec) -> SourceSpec:
    """A ``catalog:NAME`` spec as the spec of its checked local file (mirror, cache or download),
    with the catalog's reader hints (format, columns) where the spec sets none."""
    ds = catalog.get(spec.path)
    return dataclasses.replace(spec, path=str(catalog.resolve(ds)), format=spec.format or ds.format,
                               columns=spec.columns or (list(ds.columns) if ds.columns else None))


def _local_files(spec: SourceSpec) -> list[Path]:
    """A file named with ``format`` is taken whatever its extension; otherwise resolve_files."""
    if spec.format and Path(spec.path).expanduser().is_file():
        return [Path(spec.path).expanduser()]
    return resolve_files(spec.path)


def resolve_files(path: str) -> list[Path]:
    """The files a local path stands for: the file, a folder's supported files, or a glob's
    matches, sorted. Raises :class:`DataError` when nothing is there."""
    p = Path(path).expanduser()
    if p.is_file():
        _check_extension(p)
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*")
                       if f.is_file() and f.suffix.lower() in SUPPORTED_EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{path}: folder has no supported files "
                            f"(expected {', '.join(SUPPORTED_EXTENSIONS)})")
        return files
    if glob.has_magic(path):
        matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(path), recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise DataError(f"{path}: glob matched no files")
        for f in files:
            _check_extension(f)
        return files
    raise DataError(f"{path}: no such file or folder")


# --------------------------------------------------------------------------------------------
# Built-in corpora
# --------------------------------------------------------------------------------------------


def _builtin(spec: SourceSpec) -> Iterator[str]:
    name = spec.path[len("builtin:"):]
    if name not in BUILTIN_CORPORA:
        raise DataError(f"{spec.path}: unknown built-in corpus; expected one of "
                        f"{', '.join('builtin:' + k for k in BUILTIN_CORPORA)}")
    yield from builtin_documents(name, spec.num_docs, spec.seed, **spec.builtin_options())


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def _check_extension(f: Path) -> None:
    if f.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{f}: unsupported file extension {f.suffix or '(none)'!r}; expected "
                        f"one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _file_stamp(f: Path) -> str:
    st = f.stat()
    return f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n"


def _local(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    for f in _local_files(spec):
        ext = "." + spec.format.lower() if spec.format else f.suffix.lower()
        if ext in TEXT_EXTENSIONS:
            for i, part in enumerate(_read_text(f, spec.doc_separator)):
                yield {spec.text_field: part, "_where": f"{f} doc {i}"}
        elif ext in JSON_EXTENSIONS:
            yield from _read_json(f)
        elif ext in CSV_EXTENSIONS:
            yield from _read_csv(f, delimiter="\t" if ext == ".tsv" else ",", columns=spec.columns,
                                 quoting=spec.quoting)
        else:
            yield from _read_parquet(f)


def _read_text(f: Path, separator: str | None) -> Iterator[str]:
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not valid UTF-8 text (byte {e.start})") from None
    if separator is None:
        if text.strip():
            yield text
        return
    for part in text.split(separator):
        part = part.strip()
        if part:
            yield part


def _missing_field(where: str, field: str, present: Iterable[str]) -> DataError:
    names = ", ".join(repr(str(k)) for k in present) or "(none)"
    return DataError(f"{where}: no field {field!r}; fields present: {names}")


def _text_value(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with field {field!r}, "
                        f"got {type(record).__name__}")
    if field not in record:
        raise _missing_field(where, field, [k for k in record if k != "_where"])
    value = record[field]
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        try:  # a conversation: rendered with lmforge's chat template
            return render_chat(value)
        except InputError as e:
            raise DataError(f"{where}: field {field!r}: {e}") from None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}; expected a string")
    return value


def _record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object (a record), got {type(rec).__name__}")
    return {**rec, "_where": where}


def _read_json(f: Path) -> Iterator[dict[str, Any]]:
    try:
        with open(f, encoding="utf-8-sig") as fh:
            head = fh.read(4096).lstrip()
            fh.seek(0)
            if head.startswith("["):  # a JSON array of objects
                try:
                    records = json.load(fh)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
                for i, rec in enumerate(records):
                    yield _record(rec, f"{f} record {i}")
                return
            for lineno, line in enumerate(fh, start=1):  # JSON lines
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{lineno}: invalid JSON line: {e.msg}") from None
                yield _record(rec, f"{f}:{lineno}")
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not valid UTF-8 text (byte {e.start})") from None


def _read_csv(f: Path, delimiter: str, columns: list[str] | None = None,
              quoting: bool = True) -> Iterator[dict[str, Any]]:
    """Rows as dicts: keyed by the header row, or by ``columns`` for a file without one. With
    ``quoting=False`` a line is split on the delimiter as it is (quotes are part of the text)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents can be long
    mode = csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE
    try:
        with open(f, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, fieldnames=columns, delimiter=delimiter, quoting=mode)
            header = reader.fieldnames or []
            if not header:
                return
            for i, row in enumerate(reader, start=1 if columns else 2):
                if i == 1 and _is_header(row, columns):  # a header row after all: names, not a record
                    continue
                if None in row:  # more cells than names
                    raise DataError(f"{f}:{i}: {len(header) + len(row[None])} cells, expected {len(header)} "
                                    f"({', '.join(header)})")
                yield {**{k: ("" if v is None else v) for k, v in row.items()}, "_where": f"{f}:{i}"}
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not valid UTF-8 text (byte {e.start})") from None


def _is_header(row: dict[str, Any], columns: list[str]) -> bool:
    """The first row of a file read with ``columns`` is a header when its cells are those names."""
    cells = [str(row.get(c) or "").strip().lower() for c in columns]
    return None not in row and cells == [c.strip().lower() for c in columns]


def _read_parquet(f: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{f}: reading Parquet needs pyarrow; {_INSTALL_HINT}") from None
    pf = pq.ParquetFile(f)
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield {**rec, "_where": f"{f} row {row}"}
            row += 1


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


def _hf_local_files(spec: SourceSpec) -> list[Path]:
    files = spec.data_files
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    elif isinstance(files, dict):  # {"train": [...], ...}
        files = [x for v in files.values() for x in ([v] if isinstance(v, str) else v)]
    out: list[Path] = []
    for x in files:
        matches = sorted(glob.glob(os.path.expanduser(str(x)), recursive=True))
        out.extend(Path(m) for m in matches if Path(m).is_file())
    return out


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the Hugging Face hub (``HF_ENDPOINT`` or huggingface.co) open
    within ``timeout`` seconds? Name lookup included (it runs in a thread: sockets' own timeout
    does not cover it)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def _check_hub_reachable(spec: SourceSpec) -> None:
    """Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set), ``datasets`` reads its cache; otherwise
    an unreachable hub is one clear line now instead of ~25 s of retries and a traceback."""
    if _hub_offline() or hub_reachable():
        return
    host = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    raise DataError(f"{spec.path}: cannot reach the Hugging Face hub ({host}); for a dataset already in "
                    f"the local cache set HF_DATASETS_OFFLINE=1, or point the source at local files "
                    f"(path: FILE.jsonl / hf:json with data_files)")


def _hf(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec.path}: Hugging Face datasets need the 'datasets' package; "
                        f"{_INSTALL_HINT}") from None
    repo = spec.path[len("hf:"):]
    if not repo:
        raise DataError(f"{spec.path}: expected hf:<owner/name> or hf:json with data_files")
    if spec.data_files is not None and not _hf_local_files(spec):
        raise DataError(f"{spec.path}: data_files {spec.data_files!r} matched no files")
    if spec.data_files is None:  # a hub dataset: fail in seconds, not after the client's retries
        _check_hub_reachable(spec)
    kwargs: dict[str, Any] = {"split": spec.split, "streaming": spec.streaming}
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    try:
        ds = datasets.load_dataset(repo, spec.name, **kwargs)
    except Exception as e:  # hub unreachable, unknown dataset / config / split, bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{spec.path}: could not load Hugging Face dataset (config "
                        f"{spec.name!r}, split {spec.split!r}): {type(e).__name__}: {msg}"
                        ) from None
    # No .take()/.select() for ``limit``: the readers stop after ``limit`` records, so a stream
    # is read only as far as needed.
    for i, rec in enumerate(ds):
        yield {**rec, "_where": f"{spec.path} row {i}"}
