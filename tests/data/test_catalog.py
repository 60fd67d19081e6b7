"""Named datasets (``catalog:NAME``, lmforge.data.catalog): mirror, cache and checked downloads,
served by a loopback HTTP server the tests start (127.0.0.1 only, never the internet); and the
catalog's recorded sha256/sizes against the real files of shared/data."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from lmforge.data import catalog
from lmforge.data.sources import SourceSpec, iter_documents, iter_records, source_fingerprint
from lmforge.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LMFORGE_DATA_MIRROR") or ROOT.parent / "shared" / "data")

TEXT = "label\ttext\nham\tsee you at 5\nspam\tWIN a prize now\nham\tok\n" * 50


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A loopback HTTP server over a folder; ``server.hits`` lists the paths requested."""
    root = tmp_path_factory.mktemp("www")
    hits: list[str] = []

    class Counting(_Handler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(root)))
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.root, httpd.hits = root, hits
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    """An empty cache, no mirror, downloads allowed."""
    monkeypatch.setenv("LMFORGE_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LMFORGE_DATA_MIRROR", raising=False)
    monkeypatch.delenv("LMFORGE_DATA_OFFLINE", raising=False)
    return tmp_path


def _served(server, name: str, data: bytes, *, gz: bool = False, sha: str | None = None) -> catalog.Dataset:
    """A dataset whose file the loopback server serves (gzip-compressed when ``gz``)."""
    url_path = f"{name}.tsv" + (".gz" if gz else "")
    (server.root / url_path).write_bytes(gzip.compress(data) if gz else data)
    return catalog.Dataset(name=name, file=f"test/{name}.tsv", url=f"{server.url}/{url_path}",
                           sha256=sha or hashlib.sha256(data).hexdigest(), size=len(data),
                           license="test", description="served by the test", gzip=gz)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name.startswith(".")]


# ------------------------------------------------------------------------------ download
def test_download_once_then_cache(server, folders):
    ds = _served(server, "plain", TEXT.encode())
    path = catalog.resolve(ds, progress=False)
    assert path == folders / "cache" / "test" / "plain.tsv"
    assert path.read_bytes() == TEXT.encode()
    n = len(server.hits)
    assert catalog.resolve(ds) == path and len(server.hits) == n  # cached: no second request
    assert catalog.locate(ds) == (path, "cache")
    assert _leftovers(folders / "cache") == []


def test_gzip_source_is_stored_decompressed(server, folders):
    data = "".join(json.dumps({"chosen": f"a{i}", "rejected": f"b{i}"}) + "\n" for i in range(300)).encode()
    ds = _served(server, "gz", data, gz=True)
    assert catalog.resolve(ds, progress=False).read_bytes() == data


def test_checksum_mismatch_is_one_line_and_nothing_is_kept(server, folders):
    ds = _served(server, "tampered", TEXT.encode(), sha="0" * 64)
    with pytest.raises(DataError) as e:
        catalog.resolve(ds, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "catalog:tampered" in msg and "sha256" in msg and "not used" in msg
    assert not (folders / "cache" / "test" / "tampered.tsv").exists()
    assert _leftovers(folders / "cache") == []


def test_http_error_names_the_dataset_and_the_mirror_variable(server, folders):
    ds = replace(_served(server, "gone", b"x"), url=f"{server.url}/no-such-file")
    with pytest.raises(DataError, match=r"catalog:gone: cannot download .*HTTP 404.*LMFORGE_DATA_MIRROR"):
        catalog.resolve(ds, progress=False)


def test_offline_without_mirror_or_cache_is_one_line(server, folders, monkeypatch):
    monkeypatch.setenv("LMFORGE_DATA_OFFLINE", "1")
    ds = _served(server, "offline", b"abc")
    n = len(server.hits)
    with pytest.raises(DataError) as e:
        catalog.resolve(ds)
    assert len(server.hits) == n  # no request was made
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("catalog:offline: not in the cache") and "LMFORGE_DATA_MIRROR" in msg


# -------------------------------------------------------------------------------- mirror
def test_mirror_is_used_in_place_and_checked(server, folders, monkeypatch):
    ds = _served(server, "mirrored", TEXT.encode())
    mirror = folders / "mirror"
    (mirror / "test").mkdir(parents=True)
    (mirror / ds.file).write_bytes(TEXT.encode())
    monkeypatch.setenv("LMFORGE_DATA_MIRROR", str(mirror))
    n = len(server.hits)
    assert catalog.resolve(ds) == mirror / ds.file and len(server.hits) == n
    (mirror / ds.file).write_bytes(TEXT.replace("WIN", "win").encode())  # same size, other bytes
    with pytest.raises(DataError, match=r"catalog:mirrored: .* \(mirror\) has sha256 .*expected sha256 .*not used"):
        catalog.resolve(ds)


# ------------------------------------------------------------------------- data sources
def test_catalog_source_reads_like_its_file(server, folders, monkeypatch):
    """A ``catalog:`` spec yields the records of the downloaded file read directly, with the
    catalog's format/columns hints; its fingerprint follows the sha256, not where the file lies."""
    data = "ham\tsee you at 5\nspam\tWIN a prize now\n" * 20
    ds = replace(_served(server, "sms-test", data.encode()), format="tsv", columns=("label", "text"))
    monkeypatch.setitem(catalog.DATASETS, ds.name, ds)
    spec = SourceSpec(path="catalog:sms-test", quoting=False)
    got = [{k: v for k, v in r.items() if k != "_where"} for r in iter_records(spec)]
    local = SourceSpec(path=str(catalog.resolve(ds)), format="tsv", columns=["label", "text"], quoting=False)
    assert got == [{k: v for k, v in r.items() if k != "_where"} for r in iter_records(local)]
    assert len(got) == 40 and got[1] == {"label": "spam", "text": "WIN a prize now"}
    assert list(iter_documents(SourceSpec(path="catalog:sms-test", text_field="text", limit=2))) == [
        "see you at 5", "WIN a prize now"]
    before = source_fingerprint(spec)
    mirror = folders / "mirror"
    (mirror / "test").mkdir(parents=True)
    (mirror / ds.file).write_bytes(data.encode())
    monkeypatch.setenv("LMFORGE_DATA_MIRROR", str(mirror))
    assert source_fingerprint(spec) == before  # same bytes elsewhere: token caches still hit
    monkeypatch.setitem(catalog.DATASETS, ds.name, replace(ds, sha256="1" * 64))
    assert source_fingerprint(spec) != before


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(DataError, match=r"catalog:shakespeare: no such dataset in the catalog; expected one of "
                                        r".*tinyshakespeare"):
        SourceSpec(path="catalog:shakespeare")


# ------------------------------------------------------------------------- the real files
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data (the mirror) is not beside the checkout")
def test_recorded_hashes_match_the_real_files(monkeypatch, tmp_path, capsys):
    """Every catalog entry's size and sha256 are those of the real file in shared/data, so
    ``lmforge data list`` with that mirror shows every dataset as mirrored."""
    for ds in catalog.DATASETS.values():
        f = SHARED / ds.file
        assert f.is_file(), ds.file
        assert (f.stat().st_size, catalog.file_sha256(f)) == (ds.size, ds.sha256), ds.name
    monkeypatch.setenv("LMFORGE_DATA_MIRROR", str(SHARED))
    monkeypatch.setenv("LMFORGE_DATA_CACHE", str(tmp_path / "cache"))
    assert {r["status"] for r in catalog.listing()} == {"mirrored"}
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"catalog:{name} " in out for name in catalog.DATASETS)
    assert main(["data", "path", "sst2-dev"]) == 0
    assert capsys.readouterr().out.strip() == str(SHARED / "sentiment" / "sst2_dev.tsv")


def test_data_list_json_without_mirror(folders, capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [f"catalog:{n}" for n in catalog.DATASETS]
    assert all(r["status"] == "-" and r["source"].startswith("https://raw.githubusercontent.com/") for r in rows)
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 and r["license"] for r in rows)


def test_recipes_benchmarks_and_readme_name_data_not_shared_paths():
    """No recipe, benchmark or README command reads ../shared; every catalog name they use exists."""
    files = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "benchmarks").glob("*.py"))
    files.append(ROOT / "README.md")
    for f in files:
        assert "../shared" not in f.read_text(encoding="utf-8"), f
    names = set()
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(f.read_text(encoding="utf-8"))
        for stage in [raw] + list((raw.get("stages") or {}).values() if isinstance(raw.get("stages"), dict)
                                  else raw.get("stages") or []):
            for key in ("sources", "val_sources", "test_sources"):
                for s in ((stage.get("data") or {}).get(key) or []):
                    path = s["path"] if isinstance(s, dict) else s
                    if path.startswith("catalog:"):
                        names.add(path)
    assert len(names) >= 10
    for name in names:
        catalog.get(name)
