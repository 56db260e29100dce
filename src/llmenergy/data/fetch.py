"""``llmenergy data fetch alpaca|gsm8k``: download the real datasets, for users with internet.

Every file comes from its upstream GitHub repository at a pinned commit (never a
branch), streams into a temporary file next to its destination, is verified, and
only then is renamed into place: a mismatch deletes the temporary file and fails
with one line naming the expected and observed hashes.

Pins (from issue 15):

* GSM8K, openai/grade-school-math at ``3101c7d5…``: ``test.jsonl`` (1,319 lines,
  749,738 bytes) and ``train.jsonl`` (7,473 lines, 4,166,206 bytes) by sha256.
* Alpaca, tatsu-lab/stanford_alpaca at ``761dc5bf…``: ``alpaca_data.json`` by its git
  blob id (SHA-1 of ``blob <size>\\0`` + content), which the commit itself fixes, so
  the file is verified without a sha256 known in advance.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmenergy.atomic import atomic_path
from llmenergy.errors import DatasetError, NetworkError, UserError

log = logging.getLogger(__name__)

Opener = Callable[..., Any]
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
PROGRESS_INTERVAL_S = 5.0  # a progress line at most this often during a download

#: Where the pinned files live; ``--mirror URL`` (or env ``LLMENERGY_DATA_MIRROR``) stands in for it.
UPSTREAM = "https://raw.githubusercontent.com"
MIRROR_ENV = "LLMENERGY_DATA_MIRROR"

GSM8K_COMMIT = "3101c7d5072418e28b9008a6636bde82a006892c"
ALPACA_COMMIT = "761dc5bfbdeeffa89b8bff5d038781a4055f796a"


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    sha256: str | None = None  # hex digest of the content
    git_blob: str | None = None  # git's blob id: sha1(b"blob <size>\0" + content)
    size_bytes: int | None = None  # reported alongside a mismatch; not a check by itself

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None or self.git_blob is not None


_GSM8K_BASE = (f"{UPSTREAM}/openai/grade-school-math/{GSM8K_COMMIT}"
               "/grade_school_math/data")
SOURCES: dict[str, tuple[Source, ...]] = {
    "alpaca": (
        Source(f"{UPSTREAM}/tatsu-lab/stanford_alpaca/{ALPACA_COMMIT}"
               "/alpaca_data.json", "alpaca_data.json",
               git_blob="3779ddbc040543ab1834ef216c983d6fcc06cc9a"),
    ),
    # The first file of a dataset is the one prompts come from; the others support it.
    "gsm8k": (
        Source(f"{_GSM8K_BASE}/test.jsonl", "gsm8k_test.jsonl",
               sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
               size_bytes=749_738),
        Source(f"{_GSM8K_BASE}/train.jsonl", "gsm8k_train.jsonl",
               sha256="17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
               size_bytes=4_166_206),
    ),
}


def mirrored(source: Source, mirror: str | None) -> Source:
    """``source`` fetched from ``mirror`` instead of raw.githubusercontent.com.

    A mirror holds the upstream paths under its own base URL (``MIRROR/<owner>/<repo>/
    <commit>/<path>``), as a pull-through proxy or a copied tree does; ``http(s)://``
    and ``file://`` bases work. The pinned hashes still decide whether a file is kept.
    """
    if not mirror:
        return source
    if not source.url.startswith(UPSTREAM + "/"):
        raise DatasetError(f"{source.url}: not under {UPSTREAM}, so a mirror cannot stand in for it")
    return replace(source, url=mirror.rstrip("/") + source.url[len(UPSTREAM):])


def _offline(name: str, source: Source, dest: Path, reason: object) -> NetworkError:
    return NetworkError(
        f"cannot download {name} from {source.url} ({reason}); without network, fetch it "
        f"elsewhere and place it at {dest / source.filename}, or name a mirror with --mirror URL "
        f"(env {MIRROR_ENV})"
    )


def git_blob_id(path: Path) -> str:
    """Git's object id of file ``path`` as a blob (what ``git hash-object`` prints)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 - git's id
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mismatch(source: Source, path: Path, sha256: str) -> str | None:
    """Why file ``path`` (whose sha256 is ``sha256``) is not ``source``'s, or None.

    One line naming the expected and the observed hash (and the sizes, when pinned).
    """
    if source.sha256 is not None and sha256 != source.sha256:
        kind, want, got = "sha256", source.sha256, sha256
    elif source.git_blob is not None and (blob := git_blob_id(path)) != source.git_blob:
        kind, want, got = "git blob id", source.git_blob, blob
    else:
        return None
    size = path.stat().st_size
    sizes = (f" (expected {source.size_bytes} bytes, got {size})"
             if source.size_bytes is not None and size != source.size_bytes else "")
    return f"{kind} mismatch for {source.url}: expected {want}, got {got}{sizes}"


def _total_bytes(response: Any) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value and str(value).isdigit() else None


def _copy(response: Any, out: Any, digest: Any, label: str) -> int:
    """Stream ``response`` into ``out`` and ``digest``, logging progress; return bytes."""
    total, done = _total_bytes(response), 0
    last = time.monotonic()
    while True:
        chunk = response.read(CHUNK_BYTES)
        if not chunk:
            break
        digest.update(chunk)
        out.write(chunk)
        done += len(chunk)
        if time.monotonic() - last >= PROGRESS_INTERVAL_S:
            last = time.monotonic()
            of = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else ""
            log.info("%s: %.1f MB%s", label, done / 1e6, of)
    return done


def download(
    name: str, source: Source, dest: Path, *, opener: Opener = urllib.request.urlopen
) -> tuple[Path, str]:
    """Download one file into ``dest`` atomically; return (path, observed sha256).

    The content goes to a temporary file beside the target and is renamed over it
    only once verified; on any failure the temporary file is deleted.
    """
    target = dest / source.filename
    digest = hashlib.sha256()
    log.info("%s: downloading %s", target, source.url)
    t0 = time.monotonic()
    try:
        with atomic_path(target) as tmp:
            with opener(source.url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
                size = _copy(response, out, digest, str(target))
            observed = digest.hexdigest()
            problem = mismatch(source, tmp, observed)
            if problem is not None:
                raise DatasetError(f"{target}: {problem}; the file was not written")
    except urllib.error.HTTPError as exc:
        raise _offline(name, source, dest, f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _offline(name, source, dest, exc.reason) from None
    except (TimeoutError, ConnectionError) as exc:
        raise _offline(name, source, dest, exc or type(exc).__name__) from None
    except OSError as exc:
        raise DatasetError(f"{target}: cannot write: {exc.strerror or exc}") from None
    log.info("%s: %.1f MB in %.1f s", target, size / 1e6, time.monotonic() - t0)
    if not source.pinned:
        log.warning(
            "%s: no pinned checksum for %s; observed sha256 %s (pin it in llmenergy/data/fetch.py)",
            target, source.url, observed,
        )
    else:
        log.info("%s: verified (sha256 %s)", target, observed)
    return target, observed


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_dataset(
    name: str,
    dest: str | Path,
    *,
    opener: Opener = urllib.request.urlopen,
    force: bool = False,
    mirror: str | None = None,
) -> Path:
    """Download dataset ``name`` into ``dest``; return the path prompts are read from.

    A file already in place is kept when it matches its pinned hash (or when none is
    pinned) unless ``force``; one that does not match is downloaded again. ``mirror``:
    a base URL that stands in for raw.githubusercontent.com (see :func:`mirrored`).
    """
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; use one of {', '.join(SOURCES)}")
    dest = Path(dest)
    paths: list[Path] = []
    for upstream in SOURCES[name]:
        source = mirrored(upstream, mirror)
        target = dest / source.filename
        if target.is_file() and not force:
            problem = mismatch(source, target, _sha256_file(target))
            if problem is None:
                log.info("%s: already present%s; use --force to download again",
                         target, " and verified" if source.pinned else "")
                paths.append(target)
                continue
            log.warning("%s: %s; downloading again", target, problem)
        path, _ = download(name, source, dest, opener=opener)
        paths.append(path)
    return paths[0]


def config_snippet(name: str, dest: str | Path) -> str:
    """The ``datasets:`` entry to paste into config.yaml after a fetch."""
    dest = Path(dest)
    files = [dest / s.filename for s in SOURCES[name]]
    lines = ["datasets:", f"  {name}:", f"    format: {name}", f"    path: {files[0].as_posix()}",
             "    n_prompts: 256", "    seed: 0"]
    if name == "gsm8k":
        lines += [f"    train_path: {files[1].as_posix()}", "    kshot: 0   # e.g. 8 for 8-shot"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, *, opener: Opener = urllib.request.urlopen) -> int:
    """``llmenergy data fetch NAME [--dest DIR] [--force] [--mirror URL]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="llmenergy data fetch",
        description="Download a real dataset (needs internet) and print its config entry.",
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="dataset to download")
    parser.add_argument("--dest", default="data", help="directory for the files (default: data)")
    parser.add_argument("--force", action="store_true", help="download even if present")
    parser.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or None, metavar="URL",
                        help=f"base URL that stands in for {UPSTREAM} (a proxy or a copy of the "
                             "same paths; http(s):// or file://); default: env "
                             f"{MIRROR_ENV}, else upstream")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.mirror:
            log.info("fetching from mirror %s (instead of %s)", args.mirror, UPSTREAM)
        path = fetch_dataset(args.name, args.dest, opener=opener, force=args.force, mirror=args.mirror)
    except UserError as exc:
        sys.stderr.write("".join(f"llmenergy: error: {line}\n" for line in str(exc).splitlines()))
        return exc.exit_code
    for source in SOURCES[args.name]:
        target = Path(args.dest) / source.filename
        sys.stdout.write(f"sha256 {_sha256_file(target)}  {target}\n")
    sys.stdout.write(f"\n{args.name} is at {path}. Add to config.yaml:\n\n")
    sys.stdout.write(config_snippet(args.name, args.dest))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
