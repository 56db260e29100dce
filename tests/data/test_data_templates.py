"""Prompt templates: Alpaca with/without input, GSM8K k-shot prefixes, raw."""

from __future__ import annotations

import pytest

from llmenergy.data import templates
from llmenergy.data.formats import AlpacaRecord, Gsm8kRecord
from llmenergy.errors import DatasetError


def test_alpaca_with_input_has_all_headings_in_order() -> None:
    rec = AlpacaRecord(0, "Translate the phrase.", "bonjour ☀", "hello")
    text, name = templates.render(rec, "alpaca")
    assert name == "alpaca"
    positions = [text.index(h) for h in ("### Instruction:", "### Input:", "### Response:")]
    assert positions == sorted(positions) and positions[0] > 0  # preamble first
    assert "Translate the phrase." in text and "bonjour ☀" in text
    assert text.endswith("### Response:\n")
    assert "hello" not in text  # the reference never leaks into the prompt


@pytest.mark.parametrize("empty", ["", "   \n"])
def test_alpaca_without_input_drops_the_input_section(empty: str) -> None:
    text, name = templates.render(AlpacaRecord(1, "Name two rivers.", empty, "x"), "alpaca")
    assert name == "alpaca_no_input"
    assert "### Input:" not in text and "### Instruction:\nName two rivers." in text
    assert text.endswith("### Response:\n")


def test_raw_family_passes_text_through() -> None:
    assert templates.render(AlpacaRecord(0, "Do it.", "", "o"), "raw") == ("Do it.", "raw")
    assert templates.render(AlpacaRecord(0, "Do it.", "with this", "o"), "raw") == (
        "Do it.\n\nwith this",
        "raw",
    )
    assert templates.render(Gsm8kRecord(0, "How many?", "#### 1", "1"), "raw") == (
        "How many?",
        "raw",
    )


def test_gsm8k_zero_and_kshot() -> None:
    q = Gsm8kRecord(
        5, "Lee has 2 bags of 6 eggs. How many eggs?", "2*6=<<2*6=12>>12\n#### 12", "12"
    )
    text, name = templates.render(q, "gsm8k")
    assert name == "gsm8k_0shot"
    assert text.startswith("Question: Lee has") and text.endswith("\nAnswer:")
    shots = [
        Gsm8kRecord(0, "A?", "It is 3+4 = <<3+4=7>>7.\n#### 7", "7"),
        Gsm8kRecord(1, "B?", "10/2 = <<10/2=5>>5\n#### 5", "5"),
    ]
    prefix = templates.kshot_prefix(shots)
    text, name = templates.render(q, "gsm8k", prefix=prefix, kshot=len(shots))
    assert name == f"gsm8k_{len(shots)}shot"
    assert "<<" not in text and ">>" not in text  # calculator annotations removed
    assert text.index("A?") < text.index("B?") < text.index("Lee has")
    assert text.count("#### ") == len(shots)  # worked answers keep their final marker
    assert text.count("Question: ") == len(shots) + 1


def test_resolve_family_defaults_and_mismatch() -> None:
    assert templates.resolve_family("alpaca", None) == "alpaca"
    assert templates.resolve_family("gsm8k", None) == "gsm8k"
    assert templates.resolve_family("gsm8k", "raw") == "raw"
    with pytest.raises(
        DatasetError, match="dataset 'd': template 'alpaca' does not fit format 'gsm8k'"
    ):
        templates.resolve_family("gsm8k", "alpaca", name="d")
    with pytest.raises(DatasetError, match="does not fit"):
        templates.resolve_family("alpaca", "gsm8k_4shot")
