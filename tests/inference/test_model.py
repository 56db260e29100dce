"""Model architecture table, size helpers, sharding checks, meta build, and TP equality."""
from __future__ import annotations

import time

import pytest
import torch
from dist_helpers import logits_worker, run_ranks

from llmenergy.errors import ConfigError, UserError
from llmenergy.inference import model as M
from llmenergy.inference import tp
from llmenergy.inference import weights as W

GQA_ARGS = M.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256,
                       multiple_of=16, max_seq_len=64)


@pytest.mark.parametrize("name", ["llama-7b", "llama-13b", "llama-30b", "llama-65b",
                                  "llama2-70b", "llama-tiny"])
def test_n_params_matches_the_built_model(name: str) -> None:
    tp.ensure_model_parallel()
    args = M.get_arch(name)
    model = M.build_on_meta(args, max_batch_size=1, max_seq_len=16)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == M.n_params(args)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == M.full_shapes(args)


def test_published_sizes() -> None:
    # Meta's published parameter counts, in billions (rounded)
    published = {"llama-7b": 6.7, "llama-13b": 13.0, "llama-30b": 32.5, "llama-65b": 65.2,
                 "llama2-70b": 69.0}
    for name, billions in published.items():
        assert M.n_params(M.get_arch(name)) / 1e9 == pytest.approx(billions, rel=0.01), name
    assert M.get_arch("llama2-70b").hidden_dim == 28672
    assert M.get_arch("llama-7b").hidden_dim == 11008


def test_byte_helpers() -> None:
    args = M.get_arch("llama-7b")
    assert M.weight_bytes(args, torch.float16) == 2 * M.n_params(args)
    assert M.weight_bytes(args, torch.float32) == 4 * M.n_params(args)
    # K and V, 32 layers, 4096 wide, 2 bytes, 2048 positions: 1 GiB per sequence
    assert M.kv_cache_bytes(args, 1, 2048, torch.float16) == 2 * 32 * 2048 * 4096 * 2
    gqa = M.get_arch("llama2-70b")
    assert M.kv_cache_bytes(gqa, 4, 100, torch.float16) == 2 * 80 * 4 * 100 * 8 * 128 * 2


def test_unknown_arch_names_the_model() -> None:
    with pytest.raises(ConfigError, match="'llama-8b'"):
        M.get_arch("llama-8b")


def test_shard_problems() -> None:
    assert tp.shard_problem("llama-13b", M.get_arch("llama-13b"), 16) == (
        "llama-13b × 16 shards: 16 does not divide 40 attention heads")
    assert "8 key/value heads" in tp.shard_problem("llama2-70b", M.get_arch("llama2-70b"), 16)
    assert tp.shard_problem("llama-65b", M.get_arch("llama-65b"), 32) is None
    assert tp.shard_problem("llama-30b", M.get_arch("llama-30b"), 4) is None
    assert "52 attention heads" in tp.shard_problem("llama-30b", M.get_arch("llama-30b"), 8)
    with pytest.raises(UserError, match="does not divide 40"):
        tp.check_shards("llama-13b", M.get_arch("llama-13b"), 16)


def test_tiny_fits_four_shards() -> None:
    assert tp.shard_problem("llama-tiny", M.get_arch("llama-tiny"), 4) is None


def test_meta_build_of_7b_is_fast_and_allocates_nothing() -> None:
    tp.ensure_model_parallel()
    start = time.perf_counter()
    model = M.build_on_meta(M.get_arch("llama-7b"), max_batch_size=64, max_seq_len=2048)
    assert time.perf_counter() - start < 5.0
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def test_materialize_sets_dtype_norms_and_caches() -> None:
    model, info = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.bfloat16,
                          max_batch_size=2, max_seq_len=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.all(model.norm.weight == 1)
    assert model.layers[0].attention.cache_k.shape == (2, 4, 16, 32)
    assert not any(p.requires_grad for p in model.parameters())
    assert info.dtype == "bfloat16" and info.format == "synthetic" and info.shards == 1
    assert info.n_params_local == M.n_params(M.get_arch("llama-tiny"))


def test_kv_cache_decoding_matches_full_forward() -> None:
    model, _ = W.build(GQA_ARGS, "synthetic", device="cpu", dtype=torch.float32,
                       max_batch_size=2, max_seq_len=16)
    tokens = torch.randint(0, GQA_ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens, 0)
        parts = [model(tokens[:, :7], 0)] + [model(tokens[:, i:i + 1], i) for i in range(7, 12)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    assert full.std() > 0.1  # not degenerate


def test_synthetic_weights_depend_on_seed_only() -> None:
    a, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=3,
                   max_batch_size=1, max_seq_len=8)
    b, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=3,
                   max_batch_size=1, max_seq_len=8)
    c, _ = W.build("llama-tiny", "synthetic", device="cpu", dtype=torch.float32, seed=4,
                   max_batch_size=1, max_seq_len=8)
    wa, wb, wc = (m.layers[1].feed_forward.w2.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.allclose(wa, wc)
    # uniform with std 1/sqrt(fan_in)
    assert float(wa.std()) == pytest.approx(1 / wa.shape[1] ** 0.5, rel=0.05)


def test_hash_matches_python_reference() -> None:
    values = [0, 1, 77, 2**31 - 1, 2**31, 2**32 - 1]
    got = W.hash32(torch.tensor([W._i32(v) for v in values], dtype=torch.int32))
    assert [int(g) & 0xFFFFFFFF for g in got] == [W.hash32_reference(v) for v in values]


def test_synthetic_block_slices_agree_with_full_tensor() -> None:
    full = torch.empty(12, 10)
    W.synthetic_block(full, key=9, full_shape=(12, 10), row0=0, col0=0, std=1.0)
    rows = torch.empty(4, 10)
    W.synthetic_block(rows, key=9, full_shape=(12, 10), row0=8, col0=0, std=1.0)
    cols = torch.empty(12, 5)
    W.synthetic_block(cols, key=9, full_shape=(12, 10), row0=0, col0=5, std=1.0)
    assert torch.equal(rows, full[8:]) and torch.equal(cols, full[:, 5:])


def test_tiny_synthetic_logits_equal_at_one_and_two_shards() -> None:
    tokens = torch.randint(0, M.TINY_VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(0))
    one = run_ranks(logits_worker, 1, "llama-tiny", "synthetic", tokens)
    two = run_ranks(logits_worker, 2, "llama-tiny", "synthetic", tokens)
    assert (one[0] - two[0]).abs().max() < 1e-4
    assert torch.equal(two[0], two[1])  # every rank sees the gathered logits
    assert one[0].std() > 0.1


def test_gqa_logits_equal_at_one_and_four_shards() -> None:
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    one = run_ranks(logits_worker, 1, GQA_ARGS, "synthetic", tokens)
    four = run_ranks(logits_worker, 4, GQA_ARGS, "synthetic", tokens)
    assert (one[0] - four[2]).abs().max() < 1e-4


def test_bad_shard_count_fails_at_build() -> None:
    args = M.ModelArgs(dim=48, n_layers=1, n_heads=3, vocab_size=96, multiple_of=16)
    with pytest.raises(AssertionError, match="2 does not divide 3 attention heads"):
        run_ranks(logits_worker, 2, args, "synthetic", torch.zeros(1, 2, dtype=torch.long))
