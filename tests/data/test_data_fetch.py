"""`llmenergy data fetch` up to the network boundary: a fake opener stands in for urllib."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import urllib.error
from collections.abc import Callable
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


def _pin(monkeypatch: pytest.MonkeyPatch, name: str, digests: list[str]) -> None:
    sources = fetch.SOURCES[name]
    pinned = tuple(dataclasses.replace(s, sha256=d) for s, d in zip(sources, digests, strict=True))
    monkeypatch.setitem(fetch.SOURCES, name, pinned)


def test_sources_point_at_canonical_locations() -> None:
    urls = [s.url for sources in fetch.SOURCES.values() for s in sources]
    assert all(u.startswith("https://raw.githubusercontent.com/") for u in urls)
    assert any("tatsu-lab/stanford_alpaca" in u and u.endswith("alpaca_data.json") for u in urls)
    assert sum("openai/grade-school-math" in u for u in urls) == 2


def test_fetch_with_matching_checksum_writes_loadable_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(tmp_path)
    sources = fetch.SOURCES["gsm8k"]
    _pin(monkeypatch, "gsm8k", [hashlib.sha256(payloads[s.url]).hexdigest() for s in sources])
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


def test_checksum_mismatch_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(tmp_path)
    _pin(monkeypatch, "alpaca", ["0" * 64])
    dest = tmp_path / "data"
    with pytest.raises(
        DatasetError,
        match=r"alpaca_data\.json: sha256 mismatch .* expected 0{64}, got [0-9a-f]{64}",
    ):
        fetch.fetch_dataset("alpaca", dest, opener=fake_opener(payloads))
    assert list(dest.iterdir()) == []


def test_unpinned_checksum_logs_the_observed_hash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payloads = _payloads(tmp_path)
    assert fetch.SOURCES["alpaca"][0].sha256 is None  # not pinned yet: see fetch.py docstring
    with caplog.at_level(logging.WARNING, logger="llmenergy.data.fetch"):
        path = fetch.fetch_dataset("alpaca", tmp_path / "d", opener=fake_opener(payloads))
    observed = hashlib.sha256(path.read_bytes()).hexdigest()
    assert observed in caplog.text and "no pinned sha256" in caplog.text


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
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payloads = _payloads(tmp_path)
    dest = tmp_path / "data"
    rc = fetch.main(["gsm8k", "--dest", str(dest)], opener=fake_opener(payloads))
    out = capsys.readouterr().out
    assert rc == 0
    for s in fetch.SOURCES["gsm8k"]:
        assert f"sha256 {hashlib.sha256(payloads[s.url]).hexdigest()}" in out
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
    assert err.startswith("error: cannot download alpaca") and "alpaca_data.json" in err


def test_unknown_dataset_and_force_redownload(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        fetch.fetch_dataset("mnist", tmp_path)
    payloads = _payloads(tmp_path)
    target = tmp_path / "alpaca_data.json"
    target.write_bytes(b"[]")
    fetch.fetch_dataset("alpaca", tmp_path, opener=fake_opener(payloads))
    assert target.read_bytes() == b"[]"  # kept: present and nothing pinned
    fetch.fetch_dataset("alpaca", tmp_path, opener=fake_opener(payloads), force=True)
    assert target.read_bytes() == payloads[fetch.SOURCES["alpaca"][0].url]


def test_present_file_failing_its_pinned_checksum_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payloads = _payloads(tmp_path)
    (source,) = fetch.SOURCES["alpaca"]
    _pin(monkeypatch, "alpaca", [hashlib.sha256(payloads[source.url]).hexdigest()])
    target = tmp_path / source.filename
    target.write_bytes(b"[] truncated")
    calls: list[str] = []
    fetch.fetch_dataset("alpaca", tmp_path, opener=fake_opener(payloads, calls))
    assert calls == [source.url] and target.read_bytes() == payloads[source.url]
