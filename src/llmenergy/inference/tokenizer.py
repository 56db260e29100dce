"""Tokenizers: sentencepiece ``tokenizer.model``, HF ``tokenizer.json``, and our own.

:func:`default_tokenizer` returns a small BPE sentencepiece model trained here,
deterministically, on a synthetic corpus written by :func:`synthetic_corpus`
(instruction-like requests and arithmetic word problems built from word lists
in this module).  It is cached under ``$LLMENERGY_CACHE`` or
``~/.cache/llmenergy``; a file lock plus an atomic rename keep concurrent ranks
from clashing.  ``llama-tiny``'s vocabulary equals its size.

Ids at or above ``n_words`` (a synthetic 7B model has 32000 ids, our tokenizer
fewer) decode as ``id % n_words`` so random models never crash decoding.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from llmenergy.arch import TINY_VOCAB_SIZE
from llmenergy.atomic import atomic_path
from llmenergy.checkpoints import TOKENIZER_FILES, resolve_tokenizer, special_tokens
from llmenergy.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

CORPUS_VERSION = 1
CORPUS_SEED = 1234
CORPUS_SENTENCES = 12000


class Tokenizer(Protocol):
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the model has no padding piece

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file (LLaMA's ``tokenizer.model`` or ours)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.n_words = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        self.pad_id = int(self.sp.pad_id())

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = list(self.sp.encode(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.sp.decode([int(i) % self.n_words for i in ids]))


class HFTokenizer:
    """An HF ``tokenizer.json`` read with the ``tokenizers`` library.

    Begin/end of sequence are ``bos_token``/``eos_token`` when given, else LLaMA-1/2's
    ``<s>``/``</s>`` or Llama-3's ``<|begin_of_text|>``/``<|end_of_text|>``.
    """

    def __init__(self, path: str | os.PathLike[str], *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str = "<pad>") -> None:
        from tokenizers import Tokenizer as HFTok

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: tokenizer.json not found")
        self.tok = HFTok.from_file(str(self.path))
        self.n_words = int(self.tok.get_vocab_size(with_added_tokens=True))
        pad = self.tok.token_to_id(pad_token)
        if bos_token is None or eos_token is None:
            try:
                self.bos_id, self.eos_id = special_tokens(self.path, self.tok.token_to_id)
            except CheckpointError as exc:
                raise UserError(str(exc)) from None
        else:
            bos, eos = self.tok.token_to_id(bos_token), self.tok.token_to_id(eos_token)
            if bos is None or eos is None:
                raise UserError(f"{self.path}: tokens {bos_token!r}/{eos_token!r} not in vocabulary")
            self.bos_id, self.eos_id = int(bos), int(eos)
        self.pad_id = -1 if pad is None else int(pad)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False).ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode([int(i) % self.n_words for i in ids]))


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a file or a checkpoint directory holding one."""
    p = Path(path)
    if p.is_dir():
        for name in TOKENIZER_FILES:
            if (p / name).is_file():
                return load_tokenizer(p / name)
        raise UserError(f"{p}: no tokenizer.model or tokenizer.json in this directory")
    if p.suffix == ".json":
        return HFTokenizer(p)
    return SentencePieceTokenizer(p)


def tokenizer_for(weights: str, tokenizer: str | None) -> Tokenizer:
    """A model's tokenizer: ``tokenizer`` when named, else the one beside the weights or in
    their parent directory (Meta's LLaMA-1 layout), else, for synthetic weights, the
    project's own. See :func:`llmenergy.checkpoints.resolve_tokenizer` (which
    ``llmenergy plan`` runs too); a missing one is a one-line :class:`CheckpointError`.
    """
    path = resolve_tokenizer(weights, tokenizer)
    return default_tokenizer() if path is None else load_tokenizer(path)


def cache_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``$LLMENERGY_CACHE``, else ``~/.cache/llmenergy``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("LLMENERGY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmenergy"


def default_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> SentencePieceTokenizer:
    """The project's own tokenizer (trained once, then cached)."""
    return SentencePieceTokenizer(default_tokenizer_path(cache_dir))


def default_tokenizer_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached default tokenizer model, training it first if needed."""
    directory = cache_root(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{CORPUS_VERSION}:{CORPUS_SEED}:{CORPUS_SENTENCES}:"
                         f"{TINY_VOCAB_SIZE}".encode()).hexdigest()[:12]
    target = directory / f"tokenizer-v{CORPUS_VERSION}-{tag}.model"
    if target.is_file():
        return target
    with _file_lock(directory / f".{target.name}.lock"):
        if not target.is_file():  # another process may have finished meanwhile
            log.info("training the default tokenizer into %s", target)
            with atomic_path(target) as tmp:
                tmp.write_bytes(train_tokenizer(synthetic_corpus(), TINY_VOCAB_SIZE))
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def train_tokenizer(sentences: Sequence[str], vocab_size: int) -> bytes:
    """Train a byte-fallback BPE sentencepiece model; deterministic for given input."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        shuffle_input_sentence=False, num_threads=1, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=True, minloglevel=2)
    return model.getvalue()


# --------------------------------------------------------------------- corpus

_NAMES = ("Ada Bruno Chen Dara Elif Farid Greta Hugo Ines Jonas Kemal Lena Malik Nora Omar "
          "Priya Quentin Rosa Sami Tove Umar Vera Wen Xena Yusuf Zoe").split()
_ITEMS = ("apples pears lemons books pencils marbles stamps coins tickets cookies candles "
          "bottles shirts plates cups boxes bricks tiles seeds eggs bananas notebooks "
          "crayons buttons shells cards balloons sandwiches muffins oranges").split()
_PLACES = ("market school library garden bakery harbor museum station farm office kitchen "
           "workshop village park factory").split()
_UNITS = ("dollars euros minutes hours meters liters kilograms pages miles points").split()
_VERBS = ("buys sells gives away finds loses collects bakes packs receives borrows").split()
_TASKS = [
    "Write a short poem about the {adj} {noun}.",
    "Explain how a {noun} works to a {person}.",
    "Give three tips for keeping a {noun} {adj}.",
    "Summarize the following text in one sentence.",
    "Translate the phrase '{adj} {noun}' into simple words.",
    "List five facts about the {noun}.",
    "Describe a {adj} day at the {place}.",
    "Suggest a name for a {adj} {noun} shop.",
    "Compare a {noun} with a {noun2} and name two differences.",
    "Classify the {noun} as useful or decorative and explain why.",
    "Rewrite this sentence so that it sounds more {adj}.",
    "Plan a visit to the {place} for a {person}.",
    "Why is the {noun} important for a {person}?",
    "Create a recipe that uses {noun} and {noun2}.",
    "Tell a story about a {person} who finds a {adj} {noun}.",
]
_ADJS = ("quiet bright small large green old new friendly careful happy strange simple "
         "clean busy warm cold colorful heavy light modern ancient").split()
_NOUNS = ("river computer bicycle garden clock bridge letter window lamp piano camera "
          "kite robot ladder mountain engine umbrella telescope compass lighthouse").split()
_PERSONS = ("child student teacher farmer doctor traveler scientist painter cook "
            "friend neighbor").split()


def _problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item, place = rng.choice(_ITEMS), rng.choice(_PLACES)
    a, b, c = rng.randint(2, 99), rng.randint(2, 40), rng.randint(2, 12)
    kind = rng.randrange(4)
    if kind == 0:
        return (f"{name} has {a} {item}. {name} {rng.choice(_VERBS)} {b} more at the {place}. "
                f"How many {item} does {name} have now? Answer: {a + b}")
    if kind == 1:
        return (f"{name} buys {c} boxes of {item} with {b} {item} in each box. How many "
                f"{item} are there in total? The answer is {b * c}.")
    if kind == 2:
        return (f"{name} earns {a} {rng.choice(_UNITS)} a day at the {place} and gives "
                f"{other} {min(a, b)} of them. What is left? {a} - {min(a, b)} = {a - min(a, b)}")
    return (f"There are {a * c} {item} shared equally among {c} friends. How many does each "
            f"friend get? {a * c} / {c} = {a}")


def _instruction(rng: random.Random) -> str:
    noun, noun2 = rng.sample(_NOUNS, 2)
    text = rng.choice(_TASKS).format(adj=rng.choice(_ADJS), noun=noun, noun2=noun2,
                                     person=rng.choice(_PERSONS), place=rng.choice(_PLACES))
    reply = (f"Sure. The {noun} is {rng.choice(_ADJS)} and the {noun2} is "
             f"{rng.choice(_ADJS)}, so a {rng.choice(_PERSONS)} would enjoy both.")
    return f"### Instruction: {text}\n### Response: {reply}"


def synthetic_corpus(n_sentences: int = CORPUS_SENTENCES, seed: int = CORPUS_SEED) -> list[str]:
    """Instruction-like requests and arithmetic word problems, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [_problem(rng) if rng.random() < 0.5 else _instruction(rng)
            for _ in range(n_sentences)]
