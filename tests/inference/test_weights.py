"""Meta and HF checkpoints: resharding loads, round trips, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import probe_worker, reshard_worker, run_ranks

from llmenergy.errors import CheckpointError
from llmenergy.inference import checkpoint as C
from llmenergy.inference import model as M
from llmenergy.inference import weights as W

# GQA, and every split dimension divisible by 4
ARGS = M.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=16,
                   max_seq_len=64)
TOKENS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))


def random_state(args: M.ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in M.full_shapes(args).items():
        if len(shape) == 1:  # norms: around one, but not one, so loading them matters
            state[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    return state


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state(ARGS)


@pytest.fixture(scope="module")
def meta_mp2(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> Path:
    directory = tmp_path_factory.mktemp("meta_mp2")
    C.save_meta_checkpoint(state, ARGS, directory, mp=2)
    return directory


def load_local(weights: Path | str, arch: M.ModelArgs | str = ARGS) -> M.Transformer:
    model, _ = W.build(arch, weights, device="cpu", dtype=torch.float32, max_batch_size=2,
                       max_seq_len=8)
    return model


def logits(model: M.Transformer) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS, 0)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_meta_mp2_gives_equal_logits_at_1_2_and_4_shards(
        meta_mp2: Path, state: dict[str, torch.Tensor]) -> None:
    assert sorted(p.name for p in meta_mp2.glob("*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]
    one = logits(load_local(meta_mp2))
    two = run_ranks(probe_worker, 2, ARGS, str(meta_mp2), TOKENS)
    four = run_ranks(probe_worker, 4, ARGS, str(meta_mp2), TOKENS)
    assert (two[1]["logits"] - one).abs().max() < 1e-4
    assert (four[3]["logits"] - one).abs().max() < 1e-4
    assert_same_state(four[0]["state"], state)  # split 2 → 4 is exact
    info = four[2]["info"]
    assert (info["format"], info["source_mp"], info["shards"], info["rank"]) == ("meta", 2, 4, 2)
    assert one.std() > 0.1


def test_hf_format_gives_the_same_logits(tmp_path: Path, meta_mp2: Path,
                                         state: dict[str, torch.Tensor]) -> None:
    C.save_hf_checkpoint(state, ARGS, tmp_path)
    ck = C.open_checkpoint(tmp_path)
    assert ck.format == "hf" and ck.args.kv_heads == 4 and ck.args.hidden_dim == ARGS.hidden_dim
    ref = logits(load_local(meta_mp2))
    # the stored q/k rows really are in HF's permuted order
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(stored, state["layers.0.attention.wq.weight"])
    assert (logits(load_local(tmp_path)) - ref).abs().max() < 1e-4
    two = run_ranks(probe_worker, 2, ARGS, str(tmp_path), TOKENS)
    assert (two[0]["logits"] - ref).abs().max() < 1e-4
    assert_same_state(two[0]["state"], state)


def test_reshard_round_trip_mp2_to_4_to_1_is_lossless(
        tmp_path: Path, meta_mp2: Path, state: dict[str, torch.Tensor]) -> None:
    run_ranks(reshard_worker, 4, ARGS, str(meta_mp2), str(tmp_path))
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == 4
    assert C.open_checkpoint(tmp_path).mp == 4
    assert_same_state(C.full_state_dict(load_local(tmp_path)), state)


def test_llama1_params_without_vocab_take_it_from_the_embedding(
        tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    params = C.params_json(ARGS) | {"vocab_size": -1}
    C.save_meta_checkpoint(state, params, tmp_path, mp=1)
    assert C.open_checkpoint(tmp_path).args.vocab_size == 256


def test_named_arch_must_match_the_checkpoint(meta_mp2: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint has dim 64 but llama-tiny has 128"):
        load_local(meta_mp2, "llama-tiny")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_local(tmp_path / "nope")


def test_directory_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("x")
    with pytest.raises(CheckpointError, match="neither a Meta checkpoint"):
        load_local(tmp_path)


def test_missing_params_json(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    C.save_meta_checkpoint(state, ARGS, tmp_path, mp=1)
    (tmp_path / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json is missing"):
        load_local(tmp_path)


def test_gap_in_shard_files(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    C.save_meta_checkpoint(state, ARGS, tmp_path, mp=4)
    (tmp_path / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError, match=r"without gaps, found \[0, 1, 3\]"):
        load_local(tmp_path)


def test_mismatched_shapes(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    C.save_meta_checkpoint(state, ARGS, tmp_path, mp=2)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params | {"multiple_of": 64}))
    with pytest.raises(CheckpointError, match=r"feed_forward.w1.weight has shape \(88, 64\), "
                                              r"expected \(96, 64\) for MP2"):
        load_local(tmp_path, ARGS.replace(multiple_of=64))


def test_corrupt_shard(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    C.save_meta_checkpoint(state, ARGS, tmp_path, mp=1)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot load"):
        load_local(tmp_path)


def test_hf_missing_tensor(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    C.save_hf_checkpoint({k: v for k, v in state.items() if k != "norm.weight"}, ARGS, tmp_path)
    with pytest.raises(CheckpointError, match="missing tensor model.norm.weight"):
        load_local(tmp_path)


def test_split_that_does_not_divide(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="does not split into 3 files"):
        C.save_meta_checkpoint(state, ARGS, tmp_path, mp=3)


def test_hf_permutation_is_inverted() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    assert torch.equal(C.hf_unpermute(C.hf_permute(w, 4), 4), w)
    assert not torch.equal(C.hf_permute(w, 4), w)
