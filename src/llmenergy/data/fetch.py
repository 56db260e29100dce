"""``llmenergy data fetch alpaca|gsm8k``: download the real datasets, for users with internet.

Files come from their canonical public locations (the Stanford Alpaca and OpenAI
grade-school-math GitHub repositories), stream through sha256, and are renamed into
place only when whole (and, where a checksum is pinned, only when it matches).

Checksums: ``Source.sha256`` is None until pinned.  These constants were written
offline, so none could be verified; a fetch with no pinned checksum logs the
observed sha256 so that it can be pinned here after a first trusted download.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmenergy.atomic import atomic_path
from llmenergy.errors import DatasetError, NetworkError, UserError

log = logging.getLogger(__name__)

Opener = Callable[..., Any]
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Source:
    url: str
    filename: str
    sha256: str | None  # None: not pinned yet (see module docstring)


_GSM8K_BASE = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
SOURCES: dict[str, tuple[Source, ...]] = {
    "alpaca": (
        Source(
            "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
            "alpaca_data.json",
            None,
        ),
    ),
    # The first file of a dataset is the one prompts come from; the others support it.
    "gsm8k": (
        Source(f"{_GSM8K_BASE}/test.jsonl", "gsm8k_test.jsonl", None),
        Source(f"{_GSM8K_BASE}/train.jsonl", "gsm8k_train.jsonl", None),
    ),
}


def _offline(name: str, source: Source, dest: Path, reason: object) -> NetworkError:
    return NetworkError(
        f"cannot download {name} from {source.url} ({reason}); without network, fetch it "
        f"elsewhere and place it at {dest / source.filename}"
    )


def download(
    name: str, source: Source, dest: Path, *, opener: Opener = urllib.request.urlopen
) -> tuple[Path, str]:
    """Download one file into ``dest`` atomically; return (path, observed sha256)."""
    target = dest / source.filename
    digest = hashlib.sha256()
    try:
        with atomic_path(target) as tmp:
            with opener(source.url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
                while True:
                    chunk = response.read(CHUNK_BYTES)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
            observed = digest.hexdigest()
            if source.sha256 is not None and observed != source.sha256:
                raise DatasetError(
                    f"{target}: sha256 mismatch for {source.url}: expected {source.sha256}, "
                    f"got {observed}; the file was not written"
                )
    except urllib.error.HTTPError as exc:
        raise _offline(name, source, dest, f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _offline(name, source, dest, exc.reason) from None
    except (TimeoutError, ConnectionError) as exc:
        raise _offline(name, source, dest, exc or type(exc).__name__) from None
    except OSError as exc:
        raise DatasetError(f"{target}: cannot write: {exc.strerror or exc}") from None
    if source.sha256 is None:
        log.warning(
            "%s: no pinned sha256 for %s; observed %s (pin it in llmenergy/data/fetch.py)",
            target, source.url, observed,
        )
    else:
        log.info("%s: sha256 verified (%s)", target, observed)
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
) -> Path:
    """Download dataset ``name`` into ``dest``; return the path prompts are read from.

    A file already in place is kept when it matches its pinned checksum (or when none
    is pinned) unless ``force``; one that does not match is downloaded again.
    """
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; use one of {', '.join(SOURCES)}")
    dest = Path(dest)
    paths: list[Path] = []
    for source in SOURCES[name]:
        target = dest / source.filename
        if target.is_file() and not force:
            observed = _sha256_file(target)
            if source.sha256 is None or observed == source.sha256:
                log.info("%s: already present (sha256 %s); use --force to download again",
                         target, observed)
                paths.append(target)
                continue
            log.warning("%s: sha256 %s does not match the pinned one; downloading again",
                        target, observed)
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
    """``llmenergy data fetch NAME [--dest DIR] [--force]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="llmenergy data fetch",
        description="Download a real dataset (needs internet) and print its config entry.",
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="dataset to download")
    parser.add_argument("--dest", default="data", help="directory for the files (default: data)")
    parser.add_argument("--force", action="store_true", help="download even if present")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        path = fetch_dataset(args.name, args.dest, opener=opener, force=args.force)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    for source in SOURCES[args.name]:
        target = Path(args.dest) / source.filename
        sys.stdout.write(f"sha256 {_sha256_file(target)}  {target}\n")
    sys.stdout.write(f"\n{args.name} is at {path}. Add to config.yaml:\n\n")
    sys.stdout.write(config_snippet(args.name, args.dest))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
