"""FAKE dataset pins for tests: ``llmenergy data fetch`` verifies against the test's files.

The real pins name the upstream files (tests/data/test_data_fetch.py checks them),
which cannot be fetched here. With env ``FAKE_DATA_PINS`` naming a JSON file
``{filename: {"sha256": ...} | {"git_blob": ...}, ...}``, the pins of those files in
``llmenergy.data.fetch.SOURCES`` are replaced once the module is imported (URLs,
mirror handling, download and verification stay the real ones), so a local mirror
of small files in the real formats can stand in for upstream.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import ModuleType

from fake_import_hook import after_import

TARGET = "llmenergy.data.fetch"
ENV = "FAKE_DATA_PINS"


def patch(module: ModuleType, pins: dict[str, dict[str, object]]) -> None:
    for name, sources in list(module.SOURCES.items()):
        module.SOURCES[name] = tuple(
            dataclasses.replace(s, **{"sha256": None, "git_blob": None, "size_bytes": None, **pins[s.filename]})
            if s.filename in pins else s
            for s in sources)


def install() -> None:
    path = os.environ.get(ENV)
    if path:
        pins = json.loads(Path(path).read_text())
        after_import(TARGET, lambda module: patch(module, pins))
