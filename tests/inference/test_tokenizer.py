"""Tokenizers: our trained default, sentencepiece files, HF tokenizer.json."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from llmenergy.errors import UserError
from llmenergy.inference import model as M
from llmenergy.inference import tokenizer as T

TEXT = "### Instruction: Add 17 and 25.\n### Response:  The answer is 42. Ünïcödé ✓ 😀"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tok(cache: Path) -> T.SentencePieceTokenizer:
    return T.default_tokenizer(cache)


def test_default_tokenizer_round_trips_text(tok: T.SentencePieceTokenizer) -> None:
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == TEXT
    for line in T.synthetic_corpus(50, seed=99):
        assert tok.decode(tok.encode(line, bos=False, eos=False)) == line


def test_vocab_matches_llama_tiny(tok: T.SentencePieceTokenizer) -> None:
    assert tok.n_words == M.get_arch("llama-tiny").vocab_size
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    # the corpus is learnt: common words are single pieces, far shorter than bytes
    assert len(tok.encode("apples", bos=False, eos=False)) == 1


def test_ids_beyond_the_vocabulary_decode_modulo(tok: T.SentencePieceTokenizer) -> None:
    ids = tok.encode("How many apples", bos=False, eos=False)
    shifted = [i + 7 * tok.n_words for i in ids]  # as a 32000-id synthetic model emits
    assert tok.decode(shifted) == tok.decode(ids) == "How many apples"
    assert isinstance(tok.decode(list(range(31990, 32000))), str)


def test_cached_model_is_reused(cache: Path, tok: T.SentencePieceTokenizer) -> None:
    path = T.default_tokenizer_path(cache)
    before = path.stat().st_mtime_ns
    assert T.default_tokenizer_path(cache) == path
    assert path.stat().st_mtime_ns == before
    assert [p.name for p in cache.glob("*.tmp")] == []


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMENERGY_CACHE", str(tmp_path))
    assert T.cache_root() == tmp_path
    monkeypatch.delenv("LLMENERGY_CACHE")
    assert T.cache_root() == Path.home() / ".cache" / "llmenergy"


def _train_in(cache: str) -> None:
    T.default_tokenizer_path(cache)


def test_concurrent_processes_share_one_training(tmp_path: Path,
                                                 tok: T.SentencePieceTokenizer) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_train_in, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    models = list(tmp_path.glob("*.model"))
    assert len(models) == 1
    # training is deterministic: same bytes as the module's cache
    assert models[0].read_bytes() == tok.path.read_bytes()


def test_training_is_deterministic() -> None:
    corpus = T.synthetic_corpus(1500, seed=3)
    assert T.train_tokenizer(corpus, 400) == T.train_tokenizer(corpus, 400)


def test_corpus_depends_on_seed() -> None:
    assert T.synthetic_corpus(20, seed=1) == T.synthetic_corpus(20, seed=1)
    assert T.synthetic_corpus(20, seed=1) != T.synthetic_corpus(20, seed=2)


def test_load_tokenizer_from_a_checkpoint_directory(tmp_path: Path,
                                                    tok: T.SentencePieceTokenizer) -> None:
    (tmp_path / "tokenizer.model").write_bytes(tok.path.read_bytes())
    loaded = T.load_tokenizer(tmp_path)
    assert loaded.encode(TEXT, bos=False, eos=False) == tok.encode(TEXT, bos=False, eos=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        T.load_tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="not found"):
        T.load_tokenizer(tmp_path / "missing.model")


def test_hf_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(T.synthetic_corpus(500), trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    loaded = T.load_tokenizer(tmp_path)
    assert isinstance(loaded, T.HFTokenizer)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 3)
    ids = loaded.encode(TEXT, bos=True, eos=False)
    assert ids[0] == 1 and loaded.decode(ids[1:]) == TEXT
    assert isinstance(loaded.decode([loaded.n_words + 5]), str)
