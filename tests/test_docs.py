"""The docs name every column the project writes and every config key it reads: each field
of each Arrow schema in :mod:`llmenergy.cellfiles` and each property of the config's JSON
schema appears, as a whole word, in README.md or docs/*.md."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmenergy import cellfiles

ROOT = Path(__file__).parents[1]
SCHEMAS = ("EVENTS_SCHEMA", "METRICS_SCHEMA", "POWER_SCHEMA", "RESPONSES_SCHEMA")


def _doc_words() -> set[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {w for p in pages for w in re.findall(r"[A-Za-z_0-9]+", p.read_text())}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_column_is_named_in_the_docs(name: str) -> None:
    words = _doc_words()
    schema = getattr(cellfiles, name)
    missing = [c for c in schema.names if c not in words]
    assert not missing, f"{name}: columns no doc names: {missing} (README.md or docs/*.md)"


def test_the_check_sees_a_column_no_doc_names() -> None:
    """The word set is the docs' own, not everything: a made-up column name is not in it."""
    assert "balance_idle_j" in _doc_words()
    assert "decode_energy_per_flop_j" not in _doc_words()


def _schema_keys(node: object) -> set[str]:
    """Every property name anywhere in a JSON schema (nested objects, items, $defs, ...)."""
    if isinstance(node, list):
        return set().union(*(_schema_keys(v) for v in node))
    if not isinstance(node, dict):
        return set()
    keys = set(node.get("properties", {}))
    return keys.union(*(_schema_keys(v) for v in node.values()))


def test_every_config_key_is_named_in_the_docs() -> None:
    schema = json.loads((ROOT / "src/llmenergy/schemas/config.schema.json").read_text())
    keys = _schema_keys(schema)
    assert {"matrix", "collector", "min_window_s", "precision"} <= keys  # the walk reaches nested keys
    missing = sorted(keys - _doc_words())
    assert not missing, f"config keys no doc names: {missing} (README.md or docs/*.md)"
