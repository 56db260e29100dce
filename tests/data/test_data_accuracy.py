"""Answer extraction and scoring for GSM8K-style outputs."""

from __future__ import annotations

import pytest

from llmenergy.data.accuracy import extract_answer, is_correct, normalise_number

EXTRACTION = [
    # (generated text, extracted answer)
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234,567", "1234567"),
    ("The change is 12 dollars. #### $12", "12"),
    ("#### -$5", "-5"),
    ("####$-5", "-5"),
    ("#### −8", "-8"),
    ("It costs 2.50 each, so 3 cost #### 7.50", "7.5"),
    ("First 5 then 9.\n#### 14\n\nQuestion: Tom has 3 ...\nAnswer: 3+1=4\n#### 4", "14"),
    ("No marker: 10 cats and 12 dogs make 22 animals.", "22"),
    ("The answer is -13 degrees.", "-13"),
    ("Between 3-4 hours", "4"),
    ("The total is $1,250.00.", "1250"),
    ("Numbers 1,2,3", "3"),
    ("It was 0.50 then 007.", "7"),
    ("#### 0", "0"),
    ("-0.0 units", "0"),
    ("version x2 is not a number", None),
    ("no digits at all", None),
    ("", None),
    ("#### unknown, but 9 is likely", "9"),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer_table(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text,reference,correct",
    [
        ("#### 18", "18", True),
        ("so she pays $18.00", "18", True),
        ("#### 1,000", "1000", True),
        ("#### 1000", "1,000", True),
        ("#### -7", "-7", True),
        ("#### 7", "-7", False),
        ("#### 17", "18", False),
        ("nothing numeric", "18", False),
        ("#### 18", None, False),
        ("#### 2.5", "2.50", True),
        ("The answer is 5", "Five", False),
    ],
)
def test_is_correct(text: str, reference: str | None, correct: bool) -> None:
    assert is_correct(text, reference) is correct


def test_normalise_number_rejects_non_numbers() -> None:
    assert normalise_number(" $3,000 ") == "3000"
    assert normalise_number("3 apples") is None
    assert normalise_number("") is None
