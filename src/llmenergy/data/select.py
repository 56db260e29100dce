"""Choosing which items of a dataset become prompts, and in what order.

Selection and order are separate on purpose: for one seed, ``shuffle`` and
``by_length`` pick the *same* items and differ only in their order, so that an
ordering experiment changes nothing else.

* ``shuffle``: a seeded random sample of ``n`` item positions, in sampled order.
* ``by_length``: the same sample sorted by prompt length in characters, shortest
  first (ties keep the sampled order), so batches hold prompts of similar length.

Asking for more prompts than the file holds is an error (never a silent cap): the
prompt count enters every per-response metric.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from llmenergy.errors import DatasetError

Order = Literal["shuffle", "by_length"]
ORDERS: tuple[str, ...] = ("shuffle", "by_length")

T = TypeVar("T")


def sample_positions(n_items: int, n: int, seed: int, *, where: str = "dataset") -> list[int]:
    """``n`` distinct positions out of ``range(n_items)``, deterministic for ``seed``."""
    if n <= 0:
        raise DatasetError(f"{where}: n_prompts={n} must be a positive integer")
    if n > n_items:
        raise DatasetError(f"{where}: n_prompts={n} but the file has only {n_items} items")
    return random.Random(seed).sample(range(n_items), n)


def order_items(items: Sequence[T], order: str, length: Callable[[T], int]) -> list[T]:
    """``items`` in the requested order (see module docstring)."""
    if order == "shuffle":
        return list(items)
    if order == "by_length":
        return sorted(items, key=length)  # sorted() is stable: ties keep sampled order
    raise DatasetError(f"order {order!r} must be one of {', '.join(ORDERS)}")


def exclude_positions(n_items: int, excluded: set[int]) -> list[int]:
    """Positions of ``range(n_items)`` not in ``excluded`` (e.g. items used as k-shot examples)."""
    return [i for i in range(n_items) if i not in excluded]
