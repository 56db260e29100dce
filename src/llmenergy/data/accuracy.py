"""Answer extraction and scoring for GSM8K-style numeric answers.

``extract_answer`` takes the number after the first ``####`` when one follows it (the
first, because a model that keeps generating often starts a new worked example),
else the last number in the text.  Numbers may carry a sign (``-`` or the Unicode
minus), a ``$``, thousands commas and a decimal part; the result is normalised:
no ``$``, no commas, no trailing decimal zeros (``"$1,250.50"`` → ``"1250.5"``).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number, optionally signed and with a dollar sign in either order ("-$5", "$-5").
# Thousands groups only count as such when well formed ("1,234" but not "1,2,3").
_NUMBER = (
    r"(?<![\w.])(?P<sign>[-−](?=\s?\$?\d|\d))?\s?\$?\s?(?P<sign2>-)?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?![\d])"
)
NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*" + _NUMBER)


def _normalise(match: re.Match[str]) -> str:
    negative = bool(match.group("sign") or match.group("sign2"))
    digits = match.group("digits").replace(",", "")
    frac = (match.group("frac") or "").rstrip("0")
    if frac == ".":
        frac = ""
    digits = digits.lstrip("0") or "0"
    text = digits + frac
    if negative and text.strip("0.") != "":
        text = "-" + text
    return text


def normalise_number(text: str) -> str | None:
    """``text`` as a normalised number if it is one (``"$1,000"`` → ``"1000"``), else None."""
    match = NUMBER_RE.fullmatch(text.strip())
    return _normalise(match) if match else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a generated text, normalised, or None if there is none."""
    marker = _MARKER_RE.search(text)
    if marker is not None:
        return _normalise(marker)
    matches = list(NUMBER_RE.finditer(text))
    return _normalise(matches[-1]) if matches else None


def _as_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def is_correct(text: str, reference: str | None) -> bool:
    """Whether the answer extracted from ``text`` equals the numeric ``reference``.

    Numbers compare by value (``"18.0"`` equals ``"18"``).  A reference that is not a
    number (an Alpaca output) compares as trimmed text with the extracted answer, which
    is almost never equal: score only GSM8K-format datasets.
    """
    if reference is None:
        return False
    got = extract_answer(text)
    if got is None:
        return False
    want = normalise_number(reference)
    if want is None:
        return got == reference.strip()
    a, b = _as_decimal(got), _as_decimal(want)
    return a is not None and b is not None and a == b
