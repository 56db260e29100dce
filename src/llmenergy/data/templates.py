"""Prompt templates: Alpaca instruction prompts and GSM8K (k-shot) question prompts.

Template names (the value recorded on each :class:`~llmenergy.data.prompts.Prompt`):

| Name | Used for |
|---|---|
| `alpaca` | an Alpaca item with a non-empty input |
| `alpaca_no_input` | an Alpaca item whose input is empty |
| `gsm8k_0shot` | a GSM8K question alone |
| `gsm8k_{k}shot` | a GSM8K question after k worked examples from the train file |
| `raw` | the instruction (and input) or the question with no wrapping |

A spec picks a template *family* (`alpaca`, `gsm8k`, `raw`, or None for the format's
default); the concrete name above follows from the item and from `kshot`.
All wording here is our own.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from llmenergy.data.formats import AlpacaRecord, Gsm8kRecord, Record
from llmenergy.errors import DatasetError

FAMILIES: dict[str, tuple[str, ...]] = {
    "alpaca": ("alpaca", "raw"),
    "gsm8k": ("gsm8k", "raw"),
}
DEFAULT_FAMILY: dict[str, str] = {"alpaca": "alpaca", "gsm8k": "gsm8k"}

ALPACA_WITH_INPUT = (
    "Below is a task for you, described by an instruction and paired with an input that "
    "gives it context. Write a response that carries out the task.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is a task for you, described by an instruction. "
    "Write a response that carries out the task.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)
GSM8K_QUESTION = "Question: {question}\nAnswer:"
GSM8K_SHOT = "Question: {question}\nAnswer: {answer}\n\n"

# GSM8K solutions carry calculator annotations such as "<<48/2=24>>"; shots drop them.
_CALC_RE = re.compile(r"<<[^<>]*>>")


def resolve_family(fmt: str, template: str | None, *, name: str = "dataset") -> str:
    """The template family for a spec, checked against its format."""
    if template is None:
        return DEFAULT_FAMILY[fmt]
    allowed = FAMILIES[fmt]
    if template not in allowed:
        raise DatasetError(
            f"dataset {name!r}: template {template!r} does not fit format {fmt!r}; "
            f"use one of {', '.join(allowed)}"
        )
    return template


def gsm8k_name(kshot: int) -> str:
    return f"gsm8k_{kshot}shot"


def strip_calculator(answer: str) -> str:
    """A GSM8K solution without its ``<<expr=value>>`` annotations."""
    return _CALC_RE.sub("", answer)


def kshot_prefix(shots: Sequence[Gsm8kRecord]) -> str:
    """The worked-example prefix placed before a GSM8K question."""
    return "".join(
        GSM8K_SHOT.format(question=s.question.strip(), answer=strip_calculator(s.answer).strip())
        for s in shots
    )


def render_alpaca(record: AlpacaRecord, family: str) -> tuple[str, str]:
    """(prompt text, template name) for an Alpaca record."""
    has_input = bool(record.input.strip())
    if family == "raw":
        text = record.instruction
        if has_input:
            text = f"{record.instruction}\n\n{record.input}"
        return text, "raw"
    if has_input:
        text = ALPACA_WITH_INPUT.format(instruction=record.instruction, input=record.input)
        return text, "alpaca"
    return ALPACA_NO_INPUT.format(instruction=record.instruction), "alpaca_no_input"


def render_gsm8k(record: Gsm8kRecord, family: str, prefix: str, kshot: int) -> tuple[str, str]:
    """(prompt text, template name) for a GSM8K record; ``prefix`` from :func:`kshot_prefix`."""
    if family == "raw":
        return record.question, "raw"
    return prefix + GSM8K_QUESTION.format(question=record.question.strip()), gsm8k_name(kshot)


def render(record: Record, family: str, *, prefix: str = "", kshot: int = 0) -> tuple[str, str]:
    """(prompt text, template name) for any record."""
    if isinstance(record, AlpacaRecord):
        return render_alpaca(record, family)
    return render_gsm8k(record, family, prefix, kshot)
