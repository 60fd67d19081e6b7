"""Public datasets by name: ``catalog:tinyshakespeare`` instead of a path on one machine.

Each :class:`Dataset` is one file: where it is published (a URL pinned to a commit), the sha256
and size of the exact bytes lmforge reads, its license, and the path it has inside a data folder
(``tinyshakespeare/input.txt``: the same layout in the cache and in a mirror). Recipes name it as
a data source, ``path: catalog:tinyshakespeare``, and :func:`resolve` finds the file:

1. a **mirror**: ``LMFORGE_DATA_MIRROR`` names a folder that holds the files in that layout (a
   shared copy, an offline machine's disk); used in place when its file is there;
2. the **cache**: ``LMFORGE_DATA_CACHE``, default ``~/.cache/lmforge/data``;
3. else the file is **downloaded** once into the cache (progress bar on a terminal), checked
   against its sha256, and renamed into place only then.

A file whose sha256 differs is never used: one line says which file and what was expected.
``LMFORGE_DATA_OFFLINE=1`` forbids downloads (a file must then be in the mirror or the cache).
``lmforge data list`` shows every dataset, its source, size, license and where it is found.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import DataError
from lmforge.fsutil import atomic_write

__all__ = ["Dataset", "DATASETS", "PREFIX", "get", "name_of", "resolve", "local_path", "locate", "download",
           "cache_dir", "mirror_dir", "listing", "format_listing"]

PREFIX = "catalog:"
MIRROR_ENV = "LMFORGE_DATA_MIRROR"
CACHE_ENV = "LMFORGE_DATA_CACHE"
OFFLINE_ENV = "LMFORGE_DATA_OFFLINE"
TIMEOUT_S = 30.0  # a stalled connection fails after this long without a byte
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Dataset:
    """One named file: where it comes from, what its bytes must hash to, and its terms."""

    name: str
    file: str  # path inside a data folder (cache or mirror), e.g. "tinyshakespeare/input.txt"
    url: str  # public source, pinned to a commit so the bytes cannot change
    sha256: str  # of the file lmforge reads (after decompression when ``gzip``)
    size: int  # bytes of that file
    license: str
    description: str
    gzip: bool = False  # the URL serves the file gzip-compressed
    format: str | None = None  # reader hint when the extension does not tell (SourceSpec.format)
    columns: tuple[str, ...] | None = None  # CSV/TSV without a header row (SourceSpec.columns)


def _gh(repo: str, commit: str, path: str) -> str:
    """The raw URL of a file of a public GitHub repository at one commit."""
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


# sha256 and sizes were computed on the files of lmforge's shared data folder, each copied
# byte-for-byte from the URL beside it (HH-RLHF: decompressed from the .gz served there).
_ENTRIES = [
    Dataset("tinyshakespeare", "tinyshakespeare/input.txt",
            _gh("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e", "data/tinyshakespeare/input.txt"),
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394,
            "MIT (char-rnn); the text is public domain",
            "tiny shakespeare: 40,000 lines of Shakespeare's plays, 65 characters (char-rnn, nanoGPT)"),
    Dataset("tinystories-train-subset", "tinystories/tinystories_v1_train_first_stories.txt",
            _gh("Niklas6/Mini_GPT", "0e9893779c9e2048205ea1339eb588983d72adc1", "tinystories.txt"),
            "727e8b228375be3075114c20729c93ed6e81ae5d8fe7faf7cb54b304f0322d70", 197_290,
            "CDLA-Sharing-1.0 (TinyStories upstream); the source repo states none",
            "TinyStories V1 train, the first ~200 stories (paragraphs separated by blank lines)"),
    Dataset("tinystories-valid-subset", "tinystories/tinystories_v1_valid_first_stories.txt",
            _gh("yuninxia/moe-routing-bench", "bb9bb0bd461aa77cf6ab89423b758f586a6f75d1", "data/tinystories_val.txt"),
            "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6", 794_375,
            "CDLA-Sharing-1.0 (TinyStories upstream); source repo MIT",
            "TinyStories V1 validation, the first ~900 stories (paragraphs separated by blank lines)"),
    Dataset("tinystories-sample", "tinystories/tinystories_sample.txt",
            _gh("stanford-cs336/assignment1-basics", "25a8a49f6460c83a30416d42348f2ef11d1dd185",
                "tests/fixtures/tinystories_sample.txt"),
            "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43", 3_794,
            "CDLA-Sharing-1.0 (TinyStories upstream); source repo MIT",
            "5 TinyStories separated by <|endoftext|> (the CS336 test fixture)"),
    Dataset("sms-spam", "sms_spam/SMSSpamCollection",
            _gh("SnehaKedia/sms-spam-detection-using-tensorflow-keras", "ae6d75701433e884ae62bca4bed8eb40c622c3d1",
                "smsspamcollection/SMSSpamCollection"),
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d", 477_907,
            "free with attribution (Almeida & Gomez Hidalgo), no warranty",
            "SMS Spam Collection v.1: 5,574 'label<TAB>text' lines, 747 spam (UCI)",
            format="tsv", columns=("label", "text")),
    Dataset("sst2-train", "sentiment/sst2_train.tsv",
            _gh("eyalbd2/Reproducing-AutoPrompt", "6288fb5bec9c572f2492875ae0111df5b6daed11",
                "glue_data/SST-2/train_full.tsv"),
            "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1", 3_806_081,
            "research use (SST / GLUE); source repo Apache-2.0",
            "GLUE SST-2 train: 67,349 sentences and phrases, 'sentence<TAB>label' with a header"),
    Dataset("sst2-dev", "sentiment/sst2_dev.tsv",
            _gh("eyalbd2/Reproducing-AutoPrompt", "6288fb5bec9c572f2492875ae0111df5b6daed11", "glue_data/SST-2/dev.tsv"),
            "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0", 94_931,
            "research use (SST / GLUE); source repo Apache-2.0",
            "GLUE SST-2 dev: 872 sentences, 'sentence<TAB>label' with a header"),
    Dataset("alpaca-335", "alpaca/alpaca_data_first335.json",
            _gh("Rock0421/test", "be0be479ea06cc9d55ff92d476ec93dee26b9bec", "alpaca_data.json"),
            "5dd50d474fb713dedbdd48a283fd4b0e72887e91e7911e985143a46421276326", 133_964,
            "CC BY-NC 4.0 (Stanford Alpaca): non-commercial research only",
            "Stanford Alpaca, the first 335 of 52,002 instruction/input/output records"),
    Dataset("book-instructions", "instruction_small/instruction-data.json",
            _gh("rasbt/LLMs-from-scratch", "28c65cdfbc3338e2e040016eea4b7fdf556e4d57",
                "ch07/01_main-chapter-code/instruction-data.json"),
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203_524,
            "Apache-2.0",
            "1,100 instruction/input/output records of 'Build a Large Language Model (From Scratch)', ch. 7"),
    Dataset("book-preferences", "preference/instruction-data-with-preference.json",
            _gh("rasbt/LLMs-from-scratch", "28c65cdfbc3338e2e040016eea4b7fdf556e4d57",
                "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"),
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", 386_968,
            "Apache-2.0",
            "the book's 1,100 instructions, each with a chosen and a rejected answer (DPO)"),
    Dataset("hh-rlhf-harmless-test", "preference/hh_rlhf_harmless_base_test.jsonl",
            _gh("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d", "harmless-base/test.jsonl.gz"),
            "14d765196c9f18d84f9bb3a78bac608c8f2915110ebcbd74ec95db7b7198b008", 3_280_164,
            "MIT",
            "Anthropic HH-RLHF harmless-base test: 2,312 chosen/rejected dialogues (offensive text by design)",
            gzip=True),
    Dataset("oasst-100-trees", "chat/oasst_en_100_trees.jsonl",
            _gh("LAION-AI/Open-Assistant", "f1e6ed9526f5817531f3ab85441a40b3671ddccb",
                "model/model_eval/manual/data/en_100_tree.jsonl"),
            "a27639214a5098bf9e1cc62a855c85c630b64ab48ee94655e7f6046438b0aedb", 979_838,
            "Apache-2.0",
            "OpenAssistant Conversations: 100 English message trees, 1,167 messages"),
    Dataset("gsm8k-train", "gsm8k/train.jsonl",
            _gh("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
                "grade_school_math/data/train.jsonl"),
            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4_166_206,
            "MIT",
            "GSM8K train: 7,473 grade-school maths question/answer pairs, final answer after '####'"),
]
DATASETS: dict[str, Dataset] = {d.name: d for d in _ENTRIES}


# ----------------------------------------------------------------------------- names
def name_of(path: str) -> str:
    """``catalog:NAME`` -> ``NAME``."""
    if not path.startswith(PREFIX) or not path[len(PREFIX):]:
        raise DataError(f"{path}: expected catalog:NAME (see `lmforge data list`)")
    return path[len(PREFIX):]


def get(name: str) -> Dataset:
    """The dataset called ``name`` (``catalog:`` prefix allowed); an unknown name lists the known ones."""
    key = name_of(name) if name.startswith(PREFIX) else name
    if key not in DATASETS:
        raise DataError(f"{PREFIX}{key}: no such dataset in the catalog; expected one of "
                        f"{', '.join(sorted(DATASETS))}")
    return DATASETS[key]


# ----------------------------------------------------------------------------- folders
def cache_dir() -> Path:
    """Where downloads go: ``LMFORGE_DATA_CACHE``, else ``$XDG_CACHE_HOME/lmforge/data`` (~/.cache)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "lmforge" / "data"


def mirror_dir() -> Path | None:
    """The read-only folder ``LMFORGE_DATA_MIRROR`` names (None when unset)."""
    env = os.environ.get(MIRROR_ENV, "").strip()
    return Path(env).expanduser() if env else None


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- checks
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each file hashed once


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered for as long as its size and mtime stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _check(ds: Dataset, path: Path, where: str) -> Path:
    """``path`` when its bytes are the dataset's; otherwise a DataError (the file is not used)."""
    size = path.stat().st_size
    digest = file_sha256(path) if size == ds.size else None
    if digest != ds.sha256:
        got = f"sha256 {digest[:16]}..." if digest else f"{size} bytes"
        want = f"sha256 {ds.sha256[:16]}..." if digest else f"{ds.size} bytes"
        raise DataError(f"{PREFIX}{ds.name}: {path} ({where}) has {got}, expected {want}; not used ({_fix(where)})")
    return path


def _fix(where: str) -> str:
    if where == "mirror":
        return f"replace the file or unset {MIRROR_ENV}"
    return "delete it to download it again"


# ----------------------------------------------------------------------------- resolution
def locate(ds: Dataset) -> tuple[Path | None, str]:
    """Where the dataset's file is without downloading: ``(path, "mirror" | "cache")`` or ``(None, "")``.
    Nothing is checked here (see :func:`resolve`)."""
    mirror = mirror_dir()
    if mirror is not None and (mirror / ds.file).is_file():
        return mirror / ds.file, "mirror"
    cached = cache_dir() / ds.file
    if cached.is_file():
        return cached, "cache"
    return None, ""


def resolve(name: str | Dataset, progress: bool | None = None) -> Path:
    """The checked local file of a dataset: the mirror's, the cache's, or downloaded into the cache.

    Raises :class:`DataError` for an unknown name, a file whose sha256 differs, or a file that is
    nowhere and cannot be downloaded (offline: the line names the variable to set).
    """
    ds = name if isinstance(name, Dataset) else get(name)
    path, where = locate(ds)
    if path is not None:
        return _check(ds, path, where)
    if _offline():
        raise DataError(f"{PREFIX}{ds.name}: not in the cache ({cache_dir()}){_mirror_note(ds)} and "
                        f"{OFFLINE_ENV} forbids downloads; set {MIRROR_ENV} to a folder holding {ds.file}, "
                        f"or unset {OFFLINE_ENV} to download it from {ds.url}")
    return download(ds, progress=progress)


def _mirror_note(ds: Dataset) -> str:
    mirror = mirror_dir()
    return f" nor in the mirror {mirror}" if mirror is not None else f", no mirror ({MIRROR_ENV} unset)"


def download(ds: Dataset, progress: bool | None = None) -> Path:
    """Fetch ``ds.url`` into the cache: streamed to a temporary file beside the target, sha256
    checked, then renamed into place (a failed or wrong download leaves nothing behind)."""
    target = cache_dir() / ds.file
    try:
        atomic_write(target, lambda tmp: _fetch_checked(ds, tmp, progress))
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, zlib.error) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DataError(f"{PREFIX}{ds.name}: cannot download {ds.url} ({reason}); it is not in the cache "
                        f"({cache_dir()}){_mirror_note(ds)}: set {MIRROR_ENV} to a folder holding {ds.file}, "
                        f"or connect to the internet") from None
    return target


def _fetch_checked(ds: Dataset, tmp: Path, progress: bool | None) -> None:
    """Stream the URL into ``tmp`` (decompressing when ``ds.gzip``), hashing as it goes."""
    from tqdm.auto import tqdm

    h, size = hashlib.sha256(), 0
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if ds.gzip else None
    request = urllib.request.Request(ds.url, headers={"User-Agent": "lmforge"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp, open(tmp, "wb") as out:
        total = resp.headers.get("Content-Length")
        bar = tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                   desc=f"{PREFIX}{ds.name}", disable=None if progress is None else not progress,
                   file=sys.stderr, leave=False)
        with bar:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                bar.update(len(block))
                data = inflate.decompress(block) if inflate else block
                out.write(data)
                h.update(data)
                size += len(data)
            if inflate:
                tail = inflate.flush()
                out.write(tail)
                h.update(tail)
                size += len(tail)
    if size != ds.size or h.hexdigest() != ds.sha256:
        raise DataError(f"{PREFIX}{ds.name}: the download from {ds.url} has sha256 {h.hexdigest()[:16]}... "
                        f"({size} bytes), expected {ds.sha256[:16]}... ({ds.size} bytes); not used")


def local_path(path: str | os.PathLike) -> Path:
    """``catalog:NAME`` -> its checked local file (:func:`resolve`); any other path as it is."""
    return resolve(str(path)) if str(path).startswith(PREFIX) else Path(path)


# ----------------------------------------------------------------------------- listing
def listing() -> list[dict]:
    """One row per dataset: its name, size, license, source and where it is found (checked)."""
    rows = []
    for ds in DATASETS.values():
        path, where = locate(ds)
        status = "-"
        if path is not None:
            try:
                _check(ds, path, where)
                status = "mirrored" if where == "mirror" else "cached"
            except DataError:
                status = f"{where}: sha256 mismatch"
        rows.append({"name": PREFIX + ds.name, "size": ds.size, "license": ds.license, "status": status,
                     "path": str(path) if path else None, "source": ds.url + (" (gzip)" if ds.gzip else ""),
                     "sha256": ds.sha256, "description": ds.description})
    return rows


def format_listing(rows: list[dict]) -> str:
    """``lmforge data list``: a table (name, size, status, license), each source on the line below."""
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'name':<{width}}  {'size':>8}  {'status':<10}  license"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {_human(r['size']):>8}  {r['status']:<10}  {r['license']}")
        lines.append(f"{'':<{width}}  {r['description']}")
        lines.append(f"{'':<{width}}  source: {r['source']}")
    mirror = mirror_dir()
    lines.append(f"cache: {cache_dir()} ({CACHE_ENV}); mirror: {mirror if mirror else 'none'} ({MIRROR_ENV})")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- CLI
def add_cli_args(p) -> None:
    """``lmforge data list [--json]`` / ``lmforge data path NAME...`` (fetching what is missing)."""
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="every named dataset: size, license, source, cached or mirrored")
    ls.add_argument("--json", action="store_true")
    get_ = sub.add_parser("path", help="print the local file of each dataset (downloading it if needed)")
    get_.add_argument("names", nargs="+", help="catalog names, with or without the catalog: prefix")


def run_cli(args) -> int:
    if args.action == "list":
        rows = listing()
        print(json.dumps(rows, indent=2) if args.json else format_listing(rows))
        return 0
    for name in args.names:
        print(resolve(name))
    return 0
