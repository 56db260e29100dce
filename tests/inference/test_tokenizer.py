"""Tokenizers: our trained default, sentencepiece files, HF tokenizer.json."""
from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest

from llmenergy.errors import CheckpointError, UserError
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


def test_tokenizer_for_finds_it_where_the_releases_put_it(
        tmp_path: Path, tok: T.SentencePieceTokenizer) -> None:
    weights = tmp_path / "LLaMA" / "7B"  # Meta's LLaMA-1 layout: the tokenizer one level up
    weights.mkdir(parents=True)
    (tmp_path / "LLaMA" / "tokenizer.model").write_bytes(tok.path.read_bytes())
    found = T.tokenizer_for(str(weights), None)
    assert isinstance(found, T.SentencePieceTokenizer)
    assert found.path == tmp_path / "LLaMA" / "tokenizer.model"
    (weights / "tokenizer.model").write_bytes(tok.path.read_bytes())  # beside the weights wins
    assert T.tokenizer_for(str(weights), None).path == weights / "tokenizer.model"  # type: ignore[attr-defined]
    named = tmp_path / "named.model"
    named.write_bytes(tok.path.read_bytes())
    assert T.tokenizer_for(str(weights), str(named)).path == named  # type: ignore[attr-defined]


def test_tokenizer_for_synthetic_weights_is_the_projects_own(
        cache: Path, monkeypatch: pytest.MonkeyPatch, tok: T.SentencePieceTokenizer) -> None:
    monkeypatch.setenv("LLMENERGY_CACHE", str(cache))
    found = T.tokenizer_for("synthetic", None)
    assert found.path == tok.path  # type: ignore[attr-defined]


def test_tokenizer_for_says_where_it_looked(tmp_path: Path) -> None:
    weights = tmp_path / "LLaMA" / "7B"
    weights.mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        T.tokenizer_for(str(weights), None)
    assert str(info.value) == (f"no tokenizer.model or tokenizer.json in {weights} or in its "
                               f"parent {tmp_path / 'LLaMA'}; name the file with the model's "
                               "'tokenizer' key")


def test_tokenizer_lookup_and_plan_checks_do_not_import_torch(tmp_path: Path,
                                                              tok: T.SentencePieceTokenizer) -> None:
    (tmp_path / "tokenizer.model").write_bytes(tok.path.read_bytes())
    code = ("import sys; from llmenergy import checkpoints, config; "
            "import llmenergy.inference.tokenizer as T; "
            f"p = checkpoints.check_tokenizer({str(tmp_path)!r}, None, 1536); "
            "print(p, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "tokenizer.model"), "False"]
