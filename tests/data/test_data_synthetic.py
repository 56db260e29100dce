"""Synthetic generators: real formats, deterministic, correct arithmetic, varied content."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

from llmenergy.data import formats, synthetic
from llmenergy.data.formats import Gsm8kRecord

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def _eval(expr: str) -> float:
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(f"unexpected expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def test_gsm8k_answers_are_computed_and_loadable(tmp_path: Path) -> None:
    path = synthetic.write_gsm8k(tmp_path / "g.jsonl", 150, seed=3)
    records = formats.read_records(path, "gsm8k")
    assert len(records) == 150
    finals = set()
    for rec in records:
        assert isinstance(rec, Gsm8kRecord)
        calcs = re.findall(r"<<([^=<>]+)=(-?\d+)>>", rec.answer)
        assert calcs, rec.answer
        for expr, value in calcs:
            assert _eval(expr) == int(value), (expr, value)
        assert rec.final == calcs[-1][1]
        assert len(rec.answer.splitlines()) >= 3  # reasoning lines, then "#### n"
        finals.add(rec.final)
    assert any(f.startswith("-") for f in finals)  # negative answers occur
    assert len(finals) > 20


def test_alpaca_mix_has_empty_inputs_unicode_and_long_items(tmp_path: Path) -> None:
    path = synthetic.write_alpaca(tmp_path / "alpaca_data.json", 400, seed=0)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, list) and all(
        set(item) == {"instruction", "input", "output"} for item in raw
    )
    records = formats.read_records(path, "alpaca")
    empty = [r for r in records if r.input == ""]  # type: ignore[union-attr]
    assert 0 < len(empty) < len(records)
    assert any(any(ord(ch) > 127 for ch in r.input + r.instruction) for r in records)  # type: ignore[union-attr]
    lengths = sorted(len(r.input) for r in records)  # type: ignore[union-attr]
    assert lengths[-1] > 20 * max(1, lengths[len(lengths) // 2])
    sorts = [r for r in records if r.instruction.startswith("Sort")]  # type: ignore[union-attr]
    for r in sorts:
        assert sorted(int(x) for x in r.input.split(", ")) == [int(x) for x in r.output.split(", ")]  # type: ignore[union-attr]


def test_deterministic_per_seed_and_prefix_stable(tmp_path: Path) -> None:
    a = synthetic.write_gsm8k(tmp_path / "a.jsonl", 30, seed=7).read_bytes()
    b = synthetic.write_gsm8k(tmp_path / "b.jsonl", 30, seed=7).read_bytes()
    c = synthetic.write_gsm8k(tmp_path / "c.jsonl", 30, seed=8).read_bytes()
    longer = synthetic.write_gsm8k(tmp_path / "d.jsonl", 45, seed=7).read_bytes()
    assert a == b and a != c
    assert longer.startswith(a)
    x = synthetic.write_alpaca(tmp_path / "x.json", 20, seed=1).read_text(encoding="utf-8")
    y = synthetic.write_alpaca(tmp_path / "y.json", 20, seed=1).read_text(encoding="utf-8")
    z = synthetic.write_alpaca(tmp_path / "z.json", 20, seed=2).read_text(encoding="utf-8")
    assert x == y and x != z
    assert synthetic.alpaca_item(1, 5) == json.loads(x)[5]
