"""Synthetic datasets in the real on-disk formats, built from our own word lists.

``write_alpaca`` writes an ``alpaca_data.json``-shaped JSON array; ``write_gsm8k``
writes GSM8K-shaped JSON lines whose answers hold reasoning lines (with
``<<expr=value>>`` calculator annotations, as the real format has) and end with
``#### <number>``.  Both are deterministic for a seed, and item ``i`` depends only on
``(seed, i)``, so a larger ``n`` extends a smaller one.  No text comes from the real
datasets: everything is composed here.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmenergy.atomic import write_text

NAMES = (
    "Amara", "Björn", "Chloé", "Dmitri", "Esi", "Farid", "Greta", "Hiroshi", "Inés",
    "Jonas", "Kavya", "Lior", "Malia", "Nikolai", "Oyelaran", "Priya", "Quentin",
    "Rosa", "Søren", "Tomás", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoë",
)
ITEMS = (
    ("notebook", "notebooks"), ("pencil", "pencils"), ("mango", "mangoes"),
    ("ticket", "tickets"), ("candle", "candles"), ("plant pot", "plant pots"),
    ("kite", "kites"), ("jar of honey", "jars of honey"), ("bus pass", "bus passes"),
)
MACHINES = (
    ("bakery oven", "loaves"), ("printer", "pages"), ("loom", "scarves"),
    ("3D printer", "brackets"), ("juicer", "bottles of juice"),
)
TOPICS = (
    "tide pools", "the history of the bicycle", "urban beekeeping", "night trains",
    "the water cycle", "crossword puzzles", "volcanic islands", "public libraries",
    "the café culture of Montréal", "paper lanterns", "glaciers", "chess openings",
    "the Ōsaka street markets", "solar cookers", "migratory birds", "sourdough bread",
)
FORMS = ("poem", "paragraph", "product description", "short story", "tweet", "haiku")
ADJECTIVES = (
    "quiet", "bright", "curious", "ancient", "gentle", "restless", "crisp", "vivid",
    "humble", "stormy", "golden", "tangled", "weightless", "patient",
)
NOUNS = (
    "river", "lantern", "harbor", "meadow", "engine", "orchard", "compass", "valley",
    "workshop", "signal", "garden", "bridge", "archive", "kettle", "festival",
)
VERBS = (
    "carries", "remembers", "greets", "shelters", "outlasts", "follows", "mirrors",
    "gathers", "answers", "wakes",
)
UNICODE_WORDS = (
    "naïve", "façade", "Zürich", "smörgåsbord", "piñata", "東京", "Ελλάδα", "Москва",
    "café ☕", "jalapeño", "crème brûlée", "straße", "🌍 planet", "niño",
)
CATEGORIES = {
    "fruits": ("apple", "pear", "plum", "kiwi", "fig", "guava", "lychee", "quince"),
    "musical instruments": ("cello", "oboe", "sitar", "marimba", "banjo", "tabla", "harp"),
    "colors": ("teal", "amber", "crimson", "indigo", "ochre", "lilac", "olive"),
    "tools": ("chisel", "wrench", "trowel", "awl", "level", "clamp", "rasp"),
}
SENTIMENT = {
    "positive": ("delightful", "wonderful", "a joy to use", "better than expected"),
    "negative": ("disappointing", "flimsy", "a waste of money", "worse than expected"),
}


def _sentence(rng: random.Random) -> str:
    return (
        f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
        f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."
    )


def _paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(n_sentences))


# --------------------------------------------------------------------------- Alpaca
def _alpaca_write(rng: random.Random) -> dict[str, str]:
    form, topic = rng.choice(FORMS), rng.choice(TOPICS)
    return {
        "instruction": f"Write a {form} about {topic}.",
        "input": "",
        "output": _paragraph(rng, rng.randint(1, 4)),
    }


def _alpaca_summarize(rng: random.Random) -> dict[str, str]:
    # Occasionally very long inputs, to exercise long prompts.
    n = rng.choice((2, 3, 5, 8, 40)) if rng.random() < 0.9 else 120
    text = _paragraph(rng, n)
    return {
        "instruction": "Summarize the following text in one sentence.",
        "input": text,
        "output": text.split(". ")[0].rstrip(".") + ".",
    }


def _alpaca_sort(rng: random.Random) -> dict[str, str]:
    numbers = [rng.randint(-50, 500) for _ in range(rng.randint(4, 9))]
    return {
        "instruction": "Sort these numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _alpaca_list(rng: random.Random) -> dict[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    picked = rng.sample(CATEGORIES[category], rng.randint(2, 5))
    return {
        "instruction": f"Name {len(picked)} {category}.",
        "input": "",
        "output": "\n".join(f"{i + 1}. {w}" for i, w in enumerate(picked)),
    }


def _alpaca_reverse(rng: random.Random) -> dict[str, str]:
    word = rng.choice(UNICODE_WORDS)
    return {
        "instruction": "Reverse the characters of the given word.",
        "input": word,
        "output": word[::-1],
    }


def _alpaca_count(rng: random.Random) -> dict[str, str]:
    word = rng.choice(UNICODE_WORDS + NOUNS)
    vowels = sum(ch in "aeiouAEIOU" for ch in word)
    return {
        "instruction": f"How many of the letters a, e, i, o, u appear in “{word}”?",
        "input": "",
        "output": f"There are {vowels} of them in “{word}”.",
    }


def _alpaca_sentiment(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(SENTIMENT))
    noun = rng.choice(NOUNS)
    return {
        "instruction": "Classify the sentiment of this review as positive or negative.",
        "input": f"The {noun} I ordered was {rng.choice(SENTIMENT[label])}.",
        "output": label.capitalize(),
    }


_ALPACA_KINDS: tuple[Callable[[random.Random], dict[str, str]], ...] = (
    _alpaca_write, _alpaca_summarize, _alpaca_sort, _alpaca_list,
    _alpaca_reverse, _alpaca_count, _alpaca_sentiment,
)


def alpaca_item(seed: int, index: int) -> dict[str, str]:
    """Item ``index`` of the synthetic Alpaca dataset for ``seed``."""
    rng = random.Random(f"llmenergy-alpaca-{seed}-{index}")
    return rng.choice(_ALPACA_KINDS)(rng)


# --------------------------------------------------------------------------- GSM8K
def _calc(expr: str, value: int) -> str:
    return f"{expr} = <<{expr.replace(' ', '').replace('×', '*')}={value}>>{value}"


def _gsm_change(rng: random.Random) -> tuple[str, list[str], int]:
    name, (one, many) = rng.choice(NAMES), rng.choice(ITEMS)
    qty, price = rng.randint(2, 9), rng.randint(2, 15)
    cost = qty * price
    bill = rng.choice([b for b in (20, 50, 100, 200) if b >= cost])
    question = (
        f"{name} buys {qty} {many} that cost ${price} per {one} and pays with a "
        f"${bill} bill. How much change, in dollars, does {name} get back?"
    )
    lines = [f"The {many} cost {_calc(f'{qty} × {price}', cost)} dollars.",
             f"The change is {_calc(f'{bill} - {cost}', bill - cost)} dollars."]
    return question, lines, bill - cost


def _gsm_machine(rng: random.Random) -> tuple[str, list[str], int]:
    machine, things = rng.choice(MACHINES)
    rate, hours, stop = rng.randint(12, 90), rng.randint(5, 12), rng.randint(1, 3)
    days = rng.randint(2, 30)
    worked = hours - stop
    per_day = rate * worked
    total = per_day * days
    question = (
        f"A {machine} makes {rate} {things} every hour. Each day it is switched on for "
        f"{hours} hours but sits idle for {stop} of them. How many {things} does it make "
        f"in {days} days?"
    )
    lines = [f"It works {_calc(f'{hours} - {stop}', worked)} hours a day.",
             f"Each day it makes {_calc(f'{rate} × {worked}', per_day)} {things}.",
             f"Over {days} days it makes {_calc(f'{per_day} × {days}', total)} {things}."]
    return question, lines, total


def _gsm_share(rng: random.Random) -> tuple[str, list[str], int]:
    name, (_, many) = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 8), rng.randint(2, 12)
    left = rng.randint(0, 20)
    start = friends * each + left
    question = (
        f"{name} had {start:,} {many}. {name} gave {each} to each of {friends} friends. "
        f"How many {many} does {name} have left?"
    )
    given = friends * each
    lines = [f"{name} gave away {_calc(f'{friends} × {each}', given)} {many}.",
             f"{name} has {_calc(f'{start} - {given}', left)} {many} left."]
    return question, lines, left


def _gsm_discount(rng: random.Random) -> tuple[str, list[str], int]:
    name = rng.choice(NAMES)
    price = 20 * rng.randint(3, 150)
    pct = rng.choice((10, 15, 25, 40, 50))
    off = price * pct // 100
    question = (
        f"A bicycle shop marks a ${price:,} bike down by {pct}%. {name} buys it at the "
        f"sale price. How many dollars does {name} pay?"
    )
    lines = [f"The discount is {_calc(f'{price} × {pct} / 100', off)} dollars.",
             f"{name} pays {_calc(f'{price} - {off}', price - off)} dollars."]
    return question, lines, price - off


def _gsm_temperature(rng: random.Random) -> tuple[str, list[str], int]:
    start, drop = rng.randint(-5, 10), rng.randint(6, 25)
    rise = rng.randint(1, 5)
    mid = start - drop
    end = mid + rise
    question = (
        f"At dusk the temperature in a mountain village was {start} degrees. Overnight it "
        f"fell by {drop} degrees, then rose by {rise} degrees before sunrise. What was "
        f"the temperature at sunrise, in degrees?"
    )
    lines = [f"After falling it was {_calc(f'{start} - {drop}', mid)} degrees.",
             f"At sunrise it was {_calc(f'{mid} + {rise}', end)} degrees."]
    return question, lines, end


_GSM_KINDS: tuple[Callable[[random.Random], tuple[str, list[str], int]], ...] = (
    _gsm_change, _gsm_machine, _gsm_share, _gsm_discount, _gsm_temperature,
)


def gsm8k_item(seed: int, index: int) -> dict[str, str]:
    """Item ``index`` of the synthetic GSM8K dataset for ``seed``."""
    rng = random.Random(f"llmenergy-gsm8k-{seed}-{index}")
    question, lines, result = rng.choice(_GSM_KINDS)(rng)
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {result}"}


# --------------------------------------------------------------------------- writers
def _items(make: Callable[[int, int], dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    return [make(seed, i) for i in range(n)]


def write_alpaca(path: str | Path, n: int, seed: int) -> Path:
    """Write ``n`` synthetic Alpaca items as an ``alpaca_data.json``-style array."""
    path = Path(path)
    write_text(path, json.dumps(_items(alpaca_item, n, seed), indent=4, ensure_ascii=False) + "\n")
    return path


def write_gsm8k(path: str | Path, n: int, seed: int) -> Path:
    """Write ``n`` synthetic GSM8K items as JSON lines (one ``{question, answer}`` a line)."""
    path = Path(path)
    lines = [json.dumps(item, ensure_ascii=False) for item in _items(gsm8k_item, n, seed)]
    write_text(path, "\n".join(lines) + "\n")
    return path
