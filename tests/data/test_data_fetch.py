"""`llmenergy data fetch` up to the network boundary: a fake opener or a local HTTP server.

Expected hashes come from other programs (``git hash-object``, ``sha256sum``) or from
published vectors, never from the code under test.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import logging
import subprocess
import threading
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmenergy.data import fetch, formats, synthetic
from llmenergy.errors import DatasetError, NetworkError


def fake_opener(
    payloads: dict[str, bytes], calls: list[str] | None = None
) -> Callable[..., io.BytesIO]:
    def open_url(url: str, timeout: float | None = None) -> io.BytesIO:
        if calls is not None:
            calls.append(url)
        return io.BytesIO(payloads[url])

    return open_url


def fake_offline_opener(exc: Exception) -> Callable[..., io.BytesIO]:
    def open_url(url: str, timeout: float | None = None) -> io.BytesIO:
        raise exc

    return open_url


def _payloads(tmp_path: Path) -> dict[str, bytes]:
    alpaca = synthetic.write_alpaca(tmp_path / "src" / "a.json", 5, seed=0).read_bytes()
    test = synthetic.write_gsm8k(tmp_path / "src" / "t.jsonl", 5, seed=0).read_bytes()
    train = synthetic.write_gsm8k(tmp_path / "src" / "r.jsonl", 9, seed=1).read_bytes()
    (a,), (t, r) = fetch.SOURCES["alpaca"], fetch.SOURCES["gsm8k"]
    return {a.url: alpaca, t.url: test, r.url: train}


def _external_hash(tool: list[str], content: bytes, tmp_path: Path) -> str:
    """A hash computed by another program than llmenergy (git, coreutils)."""
    blob = tmp_path / "external-hash-input"
    blob.write_bytes(content)
    out = subprocess.run([*tool, str(blob)], capture_output=True, text=True, check=True).stdout
    blob.unlink()
    return out.split()[0]


@pytest.fixture
def payloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The test payloads (:func:`_payloads`), every source pinned to them (:func:`_pin_to`)."""
    content = _payloads(tmp_path)
    _pin_to(monkeypatch, content, tmp_path)
    return content


def _pin_to(monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes], tmp_path: Path) -> None:
    """Pin every source to ``payloads`` the way the real pins are kinded: GSM8K by sha256
    (from ``sha256sum``), Alpaca by git blob id (from ``git hash-object``)."""
    for name, sources in fetch.SOURCES.items():
        pinned = []
        for s in sources:
            content = payloads[s.url]
            if s.git_blob is not None:
                blob = _external_hash(["git", "hash-object"], content, tmp_path)
                pinned.append(dataclasses.replace(s, git_blob=blob, size_bytes=len(content)))
            else:
                digest = _external_hash(["sha256sum"], content, tmp_path)
                pinned.append(dataclasses.replace(s, sha256=digest, size_bytes=len(content)))
        monkeypatch.setitem(fetch.SOURCES, name, tuple(pinned))


def test_sources_are_pinned_to_upstream_commits() -> None:
    (alpaca,), (test, train) = fetch.SOURCES["alpaca"], fetch.SOURCES["gsm8k"]
    assert alpaca.url == ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
                          "761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json")
    assert alpaca.git_blob == "3779ddbc040543ab1834ef216c983d6fcc06cc9a"
    base = ("https://raw.githubusercontent.com/openai/grade-school-math/"
            "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/")
    assert (test.url, train.url) == (base + "test.jsonl", base + "train.jsonl")
    assert test.sha256 == "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
    assert train.sha256 == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
    assert (test.size_bytes, train.size_bytes) == (749_738, 4_166_206)
    for s in (alpaca, test, train):
        assert s.pinned and "/master/" not in s.url and "/main/" not in s.url


def test_git_blob_id_matches_git_on_known_vectors(tmp_path: Path) -> None:
    empty, hello = tmp_path / "empty", tmp_path / "hello"
    empty.write_bytes(b"")
    hello.write_bytes(b"hello\n")
    # The ids git itself gives these contents (the empty blob is in every git's source).
    assert fetch.git_blob_id(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert fetch.git_blob_id(hello) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_sha256_check_on_a_known_vector(tmp_path: Path) -> None:
    abc = tmp_path / "abc"
    abc.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
    source = fetch.Source("https://example.invalid/abc", "abc", sha256=digest, size_bytes=3)
    assert fetch.mismatch(source, abc, fetch._sha256_file(abc)) is None
    abc.write_bytes(b"abd")
    problem = fetch.mismatch(source, abc, fetch._sha256_file(abc))
    assert problem is not None and f"expected {digest}, got " in problem


def test_fetch_with_matching_checksum_writes_loadable_files(tmp_path: Path, payloads: dict[str, bytes]) -> None:
    sources = fetch.SOURCES["gsm8k"]
    calls: list[str] = []
    path = fetch.fetch_dataset("gsm8k", tmp_path / "data", opener=fake_opener(payloads, calls))
    assert path == tmp_path / "data" / sources[0].filename
    assert calls == [s.url for s in sources]
    for s in sources:
        assert (tmp_path / "data" / s.filename).read_bytes() == payloads[s.url]
    assert len(formats.read_records(path, "gsm8k")) == 5
    # A second fetch keeps the verified files and touches no network.
    fetch.fetch_dataset(
        "gsm8k", tmp_path / "data", opener=fake_offline_opener(AssertionError("net"))
    )


def test_alpaca_is_verified_by_its_git_blob_id(tmp_path: Path, payloads: dict[str, bytes]) -> None:
    path = fetch.fetch_dataset("alpaca", tmp_path / "data", opener=fake_opener(payloads))
    assert path.read_bytes() == payloads[fetch.SOURCES["alpaca"][0].url]
    assert len(formats.read_records(path, "alpaca")) == 5


@pytest.mark.parametrize(("name", "kind"), [("alpaca", "git blob id"), ("gsm8k", "sha256")])
def test_a_tampered_file_fails_with_one_line_and_leaves_nothing(
    tmp_path: Path, payloads: dict[str, bytes], name: str, kind: str
) -> None:
    source = fetch.SOURCES[name][0]
    good = payloads[source.url]
    tampered = good.replace(b"a", b"e", 1)  # same size, one byte different
    assert tampered != good and len(tampered) == len(good)
    want = source.git_blob if name == "alpaca" else source.sha256
    got = _external_hash(["git", "hash-object"] if name == "alpaca" else ["sha256sum"],
                         tampered, tmp_path)
    dest = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        fetch.fetch_dataset(name, dest, opener=fake_opener({**payloads, source.url: tampered}))
    message = str(info.value)
    assert message == (f"{dest / source.filename}: {kind} mismatch for {source.url}: "
                       f"expected {want}, got {got}; the file was not written")
    assert list(dest.iterdir()) == []  # neither the file nor its temporary


def test_a_short_download_names_the_sizes(tmp_path: Path, payloads: dict[str, bytes]) -> None:
    source = fetch.SOURCES["gsm8k"][0]
    cut = payloads[source.url][:-10]
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match=rf"\(expected {len(cut) + 10} bytes, got {len(cut)}\)"):
        fetch.fetch_dataset("gsm8k", dest, opener=fake_opener({**payloads, source.url: cut}))
    assert list(dest.iterdir()) == []


def test_unpinned_source_logs_the_observed_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    payloads = _payloads(tmp_path)
    (source,) = fetch.SOURCES["alpaca"]
    monkeypatch.setitem(fetch.SOURCES, "alpaca", (dataclasses.replace(source, git_blob=None),))
    with caplog.at_level(logging.WARNING, logger="llmenergy.data.fetch"):
        path = fetch.fetch_dataset("alpaca", tmp_path / "d", opener=fake_opener(payloads))
    observed = _external_hash(["sha256sum"], path.read_bytes(), tmp_path)
    assert observed in caplog.text and "no pinned checksum" in caplog.text


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib's name
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server (the real urllib opener talks to it); yields (root, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_http_verifies_and_logs_progress(
    tmp_path: Path, payloads: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, http_root: tuple[Path, str],
) -> None:
    root, base = http_root
    served = {}
    for s in fetch.SOURCES["gsm8k"]:
        (root / s.filename).write_bytes(payloads[s.url])
        served[s.url] = dataclasses.replace(s, url=f"{base}/{s.filename}")
    monkeypatch.setitem(fetch.SOURCES, "gsm8k", tuple(served.values()))
    monkeypatch.setattr(fetch, "CHUNK_BYTES", 256)
    monkeypatch.setattr(fetch, "PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="llmenergy.data.fetch"):
        path = fetch.fetch_dataset("gsm8k", tmp_path / "data")
    assert path.read_bytes() == (root / path.name).read_bytes()
    total_mb = len(path.read_bytes()) / 1e6
    assert f"of {total_mb:.1f} MB" in caplog.text and "%)" in caplog.text  # Content-Length seen
    assert "verified" in caplog.text
    (root / "gsm8k_test.jsonl").write_bytes(b"{}\n")  # the server now serves something else
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        fetch.fetch_dataset("gsm8k", tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


@pytest.mark.parametrize(
    "exc,reason",
    [
        (
            urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
            "name resolution",
        ),
        (urllib.error.HTTPError("u", 404, "Not Found", None, None), "HTTP 404"),  # type: ignore[arg-type]
        (TimeoutError("timed out"), "timed out"),
    ],
)
def test_offline_raises_network_error_saying_where_to_put_files(
    tmp_path: Path, exc: Exception, reason: str
) -> None:
    dest = tmp_path / "data"
    with pytest.raises(NetworkError) as info:
        fetch.fetch_dataset("gsm8k", dest, opener=fake_offline_opener(exc))
    message = str(info.value)
    assert reason in message and str(dest / "gsm8k_test.jsonl") in message and "\n" not in message
    assert not (dest / "gsm8k_test.jsonl").exists()


def test_main_prints_hash_and_config_snippet(
    tmp_path: Path, payloads: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "data"
    rc = fetch.main(["gsm8k", "--dest", str(dest)], opener=fake_opener(payloads))
    out = capsys.readouterr().out
    assert rc == 0
    for s in fetch.SOURCES["gsm8k"]:
        assert f"sha256 {_external_hash(['sha256sum'], payloads[s.url], tmp_path)}" in out
    assert "format: gsm8k" in out and f"path: {(dest / 'gsm8k_test.jsonl').as_posix()}" in out
    assert "train_path:" in out


def test_main_offline_returns_user_error_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = fetch.main(
        ["alpaca", "--dest", str(tmp_path)],
        opener=fake_offline_opener(urllib.error.URLError("no route")),
    )
    assert rc == NetworkError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("llmenergy: error: cannot download alpaca") and "alpaca_data.json" in err


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        fetch.fetch_dataset("mnist", tmp_path)


def test_present_verified_file_is_kept_and_force_downloads_again(
    tmp_path: Path, payloads: dict[str, bytes]
) -> None:
    (source,) = fetch.SOURCES["alpaca"]
    target = tmp_path / source.filename
    target.write_bytes(payloads[source.url])
    fetch.fetch_dataset("alpaca", tmp_path, opener=fake_offline_opener(AssertionError("net")))
    calls: list[str] = []
    fetch.fetch_dataset("alpaca", tmp_path, opener=fake_opener(payloads, calls), force=True)
    assert calls == [source.url] and target.read_bytes() == payloads[source.url]


def test_present_file_failing_its_pinned_hash_is_fetched_again(tmp_path: Path, payloads: dict[str, bytes]) -> None:
    (source,) = fetch.SOURCES["alpaca"]
    target = tmp_path / source.filename
    target.write_bytes(b"[] truncated")
    calls: list[str] = []
    fetch.fetch_dataset("alpaca", tmp_path, opener=fake_opener(payloads, calls))
    assert calls == [source.url] and target.read_bytes() == payloads[source.url]


def _mirror_tree(root: Path, payloads: dict[str, bytes]) -> None:
    """Lay the payloads out as a mirror of raw.githubusercontent.com: the upstream paths."""
    for url, content in payloads.items():
        rel = url.removeprefix(fetch.UPSTREAM + "/")
        assert rel != url, url
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)


def test_mirror_stands_in_for_upstream_over_http(
    tmp_path: Path, payloads: dict[str, bytes], capsys: pytest.CaptureFixture[str], http_root: tuple[Path, str]
) -> None:
    """`--mirror URL`: every pinned file comes from URL + the upstream path, by the real
    urllib opener, and is still verified against its pin."""
    root, base = http_root
    _mirror_tree(root / "gh", payloads)
    dest = tmp_path / "data"
    assert fetch.main(["gsm8k", "--dest", str(dest), "--mirror", f"{base}/gh/"]) == 0
    for s in fetch.SOURCES["gsm8k"]:
        assert (dest / s.filename).read_bytes() == payloads[s.url]
    assert "format: gsm8k" in capsys.readouterr().out
    # The mirror serves a different file: the pin still rejects it.
    (alpaca,) = fetch.SOURCES["alpaca"]
    (root / "gh" / alpaca.url.removeprefix(fetch.UPSTREAM + "/")).write_bytes(b"[]")
    assert fetch.main(["alpaca", "--dest", str(dest), "--mirror", f"{base}/gh"]) == DatasetError.exit_code
    err = capsys.readouterr().err
    assert f"git blob id mismatch for {base}/gh/tatsu-lab/stanford_alpaca/" in err
    assert not (dest / alpaca.filename).exists()


def test_mirror_from_the_environment_and_a_file_url(
    tmp_path: Path, payloads: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Env LLMENERGY_DATA_MIRROR, here a ``file://`` copy of the tree (a site without any proxy)."""
    _mirror_tree(tmp_path / "copy", payloads)
    monkeypatch.setenv(fetch.MIRROR_ENV, (tmp_path / "copy").as_uri())
    dest = tmp_path / "data"
    assert fetch.main(["alpaca", "--dest", str(dest)]) == 0
    (alpaca,) = fetch.SOURCES["alpaca"]
    assert (dest / alpaca.filename).read_bytes() == payloads[alpaca.url]
    # Without the mirror (and offline) the same command names the option.
    monkeypatch.delenv(fetch.MIRROR_ENV)
    with pytest.raises(NetworkError, match=r"--mirror URL \(env LLMENERGY_DATA_MIRROR\)"):
        fetch.fetch_dataset("alpaca", tmp_path / "other",
                            opener=fake_offline_opener(urllib.error.URLError("no route")))


def test_mirrored_keeps_the_pin_and_only_swaps_the_host() -> None:
    (source,) = fetch.SOURCES["alpaca"]
    m = fetch.mirrored(source, "https://proxy.example.org/raw-github/")
    assert m.url == ("https://proxy.example.org/raw-github/tatsu-lab/stanford_alpaca/"
                     "761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json")
    assert (m.git_blob, m.filename) == (source.git_blob, source.filename)
    assert fetch.mirrored(source, None) is source
    with pytest.raises(DatasetError, match="a mirror cannot stand in"):
        fetch.mirrored(dataclasses.replace(source, url="https://elsewhere.org/x.json"), "http://m")
