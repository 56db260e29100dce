"""Llama-2, Llama-3 and Llama-3.1 checkpoints as HF and Meta publish them.

Each family gets a tiny checkpoint with its real structure (GQA, ``rope_theta``,
Llama-3.1's ``llama3`` rope scaling, the tokenizer's vocabulary) in the real layout
(``config.json``, ``model-0000K-of-0000N.safetensors`` with
``model.safetensors.index.json``, ``tokenizer.json``/``tokenizer.model``; or Meta's
``params.json`` + ``consolidated.NN.pth``).  Logits at shards 1, 2 and 4 must equal
those of HF transformers' own ``LlamaForCausalLM`` on the same files: an
implementation written independently of ours (its half-split rotary layout, its
``llama3`` frequency scaling).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import engines_worker, logits_worker, run_ranks

from llmenergy import arch, checkpoints, config
from llmenergy.errors import ConfigError
from llmenergy.inference import tokenizer as T
from llmenergy.inference import weights as W
from llmenergy.inference.checkpoint import (
    open_checkpoint,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from llmenergy.inference.model import full_shapes
from llmenergy.planning.plan import format_plan

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama2-tiny", "llama3-tiny", "llama3.1-tiny"]
SEQ = 48  # long enough for the llama3 scaling of the slow frequencies to show in the logits


def _state(args: arch.ModelArgs, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g) * 0.05 + (1.0 if len(s) == 1 else 0.0))
            for n, s in full_shapes(args).items()}


def train_llama3_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE ``tokenizer.json`` with Llama-3's special tokens, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(T.synthetic_corpus(3000), trainer=trainer)
    tok.save(str(path))


def hf_release(directory: Path, name: str, *, n_files: int = 3) -> Path:
    """An HF repository of arch ``name``: config.json, sharded safetensors + index, tokenizer."""
    args = arch.SIZES[name]
    directory.mkdir(parents=True)
    if name.startswith("llama3"):
        train_llama3_tokenizer(directory / "tokenizer.json", args.vocab_size)
        bos, eos = checkpoints.special_tokens(directory / "tokenizer.json",
                                              T.HFTokenizer(directory / "tokenizer.json").tok.token_to_id)
    else:  # Llama-2 ships a sentencepiece tokenizer.model
        shutil.copyfile(T.default_tokenizer_path(), directory / "tokenizer.model")
        bos, eos = 1, 2
    save_hf_checkpoint(_state(args), args, directory, n_files=n_files,
                       config={"bos_token_id": bos, "eos_token_id": eos})
    return directory


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_release(root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, arch.TINY_VOCAB_SIZE, (2, SEQ), generator=torch.Generator().manual_seed(9))


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    with torch.inference_mode():
        return model.eval()(tokens).logits


# ----------------------------------------------------------------- architectures

def test_named_sizes_match_the_published_models() -> None:
    published = {"llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98,
                 "llama3-8b": 8.03, "llama3-70b": 70.55, "llama3.1-8b": 8.03, "llama3.1-70b": 70.55}
    for name, billions in published.items():
        assert arch.n_params(arch.SIZES[name]) / 1e9 == pytest.approx(billions, abs=0.01), name
    l3, l31 = arch.SIZES["llama3-8b"], arch.SIZES["llama3.1-70b"]
    assert (l3.hidden_dim, l3.kv_heads, l3.vocab_size, l3.rope_theta) == (14336, 8, 128256, 500000.0)
    assert l3.rope_scaling is None and arch.SIZES["llama2-7b"].max_seq_len == 4096
    assert l31.hidden_dim == 28672 and l31.rope_scaling == arch.RopeScaling(8.0, 1.0, 4.0, 8192)


def test_gqa_memory_and_shard_limits() -> None:
    l3 = arch.SIZES["llama3-8b"]
    # K and V, 32 layers, 8 KV heads of 128, 2 bytes: 128 KiB per token (a quarter of MHA 7B)
    assert arch.kv_cache_bytes(l3, 1, 1, "float16") == 2 * 32 * 8 * 128 * 2
    assert arch.kv_cache_bytes(arch.SIZES["llama2-7b"], 1, 1) == 4 * arch.kv_cache_bytes(l3, 1, 1)
    assert arch.weight_bytes(l3, "bfloat16") == 2 * 8_030_261_248
    assert arch.shard_problem("llama3-8b", l3, 16) == "llama3-8b × 16 shards: 16 does not divide 8 key/value heads"
    assert arch.shard_problem("llama3-70b", arch.SIZES["llama3-70b"], 8) is None


def test_llama3_scaling_equals_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmenergy.inference.model import rope_frequencies

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                      rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192})
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_frequencies(128, 2, 500000.0, scaling=arch.LLAMA3_ROPE_SCALING)[1].angle()
    torch.testing.assert_close(ours, inv.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(rope_frequencies(128, 2, 500000.0)[1].angle(), inv.float())


# ----------------------------------------------------------------- logits

@pytest.mark.parametrize("name", FAMILIES)
def test_hf_release_logits_equal_transformers_at_1_2_4_shards(
        name: str, releases: dict[str, Path], tokens: torch.Tensor) -> None:
    directory = releases[name]
    assert len(list(directory.glob("model-*-of-00003.safetensors"))) == 3
    want = hf_logits(directory, tokens)
    got = {1: logits_worker(0, name, str(directory), tokens)}
    for shards in (2, 4):
        ranks = run_ranks(logits_worker, shards, name, str(directory), tokens)
        assert all(torch.equal(r, ranks[0]) for r in ranks)
        got[shards] = ranks[0]
    for shards, logits in got.items():
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=2e-5, msg=f"{name} at {shards} shards")
    assert want.std() > 0.1


def test_ignoring_rope_scaling_changes_the_logits(releases: dict[str, Path], tokens: torch.Tensor) -> None:
    """Why llama3 scaling must be read: without it the same weights give other logits."""
    src = open_checkpoint(releases["llama3.1-tiny"])
    plain = src.args.replace(rope_scaling=None)
    model, _ = W.build(plain, "synthetic", device="cpu", dtype=torch.float32, max_batch_size=2,
                       max_seq_len=SEQ)
    src.load_into(model, rank=0, shards=1)
    with torch.inference_mode():
        unscaled = model(tokens, 0)
    assert (unscaled - hf_logits(releases["llama3.1-tiny"], tokens)).abs().max() > 1e-3


def test_meta_llama31_release_reshards_and_equals_transformers(
        tmp_path: Path, releases: dict[str, Path], tokens: torch.Tensor) -> None:
    """Meta's Llama-3.1 layout (params.json with ``use_scaled_rope``), MP 2, run at 4 shards."""
    args = arch.SIZES["llama3.1-tiny"]
    save_meta_checkpoint(_state(args), args, tmp_path / "meta", mp=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["n_kv_heads"] == 4
    four = run_ranks(logits_worker, 4, "llama3.1-tiny", str(tmp_path / "meta"), tokens)
    torch.testing.assert_close(four[0], hf_logits(releases["llama3.1-tiny"], tokens), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["llama3.1-tiny", "llama2-tiny"])
def test_compiled_engine_gives_the_reference_tokens_with_gqa(name: str) -> None:
    prompts = [[1, 17, 300, 42, 9, 88, 5], [1, 640, 7]]
    for out in run_ranks(engines_worker, 2, name, prompts, 8):
        assert out["compiled"]["free"] == out["reference"]["free"]
        assert out["compiled"]["stop"] == out["reference"]["stop"]
        for got, want in zip(out["compiled"]["logits"], out["reference"]["logits"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- tokenizer

def test_llama3_tokenizer_json_round_trips(releases: dict[str, Path]) -> None:
    path = releases["llama3-tiny"] / "tokenizer.json"
    tok = T.load_tokenizer(releases["llama3-tiny"])
    assert isinstance(tok, T.HFTokenizer)
    assert tok.bos_id == tok.tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == tok.tok.token_to_id("<|end_of_text|>")
    ids = tok.encode("Ada has 12 apples.", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) > 4
    assert tok.decode(ids[1:-1]) == "Ada has 12 apples."
    assert checkpoints.tokenizer_vocab_size(path) == tok.n_words <= arch.TINY_VOCAB_SIZE


def test_tiktoken_tokenizer_model_is_refused_in_one_line(tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.model"
    file.write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.tokenizer_vocab_size(file)
    assert str(info.value) == (f"{file}: a tiktoken BPE file (Meta's Llama-3 release) is not read here; "
                               "name the HF tokenizer.json instead")


# ----------------------------------------------------------------- plan

def cfg_data(models: dict[str, dict[str, Any]], shards: list[int]) -> dict[str, Any]:
    return {
        "output_dir": "results", "repeats": 1, "warmup_tokens": 2, "models": models,
        "datasets": {"gsm": {"format": "gsm8k", "path": "synthetic", "n_prompts": 2,
                             "max_prompt_len": 48}},
        "gpus": {"cpu": {"partition": "local", "gpus_per_node": 4, "memory_gb": 4, "device": "cpu"}},
        "collector": {"backend": "none", "idle_baseline_s": 0.1, "min_window_s": 0, "prefill_window_s": 0},
        "matrix": [{"model": list(models), "dataset": ["gsm"], "gpu": ["cpu"], "shards": shards,
                    "batch_size": [2], "max_gen_len": [4]}],
    }


def test_config_with_each_family_plans(releases: dict[str, Path], tmp_path: Path) -> None:
    args = arch.SIZES["llama3.1-tiny"]
    save_meta_checkpoint(_state(args), args, tmp_path / "meta", mp=2)
    shutil.copyfile(releases["llama3.1-tiny"] / "tokenizer.json", tmp_path / "meta" / "tokenizer.json")
    models = {name: {"arch": name, "weights": str(path)} for name, path in releases.items()}
    models["l31-meta"] = {"arch": "llama3.1-tiny", "weights": str(tmp_path / "meta")}
    cfg = config.from_dict(cfg_data(models, [1, 2, 4]))
    for name, path in releases.items():
        info = checkpoints.inspect_checkpoint(path, cfg.models[name].args)
        assert info.format == "hf" and len(info.files) == 3
        assert all(getattr(info.args, k) == getattr(arch.SIZES[name], k)
                   for k in (*checkpoints.STRUCTURAL, "vocab_size", "norm_eps"))
    doc = json.loads(format_plan(cfg, fmt="json"))
    assert len(doc["cells"]) == 12
    assert "models.l31-meta: Meta checkpoint of MP 2, resharded to 1, 4 at load" in doc["notes"]
    assert ("models.llama3-tiny: HF checkpoint (3 safetensors files, unsharded), split into 2, 4 "
            "shards at load") in doc["notes"]
    text = format_plan(cfg)
    assert "    models.l31-meta: Meta checkpoint of MP 2, resharded to 1, 4 at load" in text.splitlines()


def _rewrite(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_wrong_config_json_is_refused_one_line_per_key(releases: dict[str, Path], tmp_path: Path) -> None:
    weights = tmp_path / "l31"
    shutil.copytree(releases["llama3.1-tiny"], weights)
    models = {"m": {"arch": "llama3.1-tiny", "weights": str(weights)}}
    _rewrite(weights / "config.json", rope_theta=10000.0)
    with pytest.raises(ConfigError) as info:
        config.from_dict(cfg_data(models, [1]))
    assert str(info.value) == (f"config.yaml: models.m.weights: {weights / 'config.json'}: checkpoint does "
                               "not match the architecture: rope_theta 10000 (arch has 500000)")
    # several problems: every one reported, one line each
    _rewrite(weights / "config.json", rope_theta=500000.0, rope_scaling=None, num_key_value_heads=8)
    last = sorted(weights.glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-64])
    data = cfg_data(models | {"l3": {"arch": "llama3-tiny", "weights": str(tmp_path / "nowhere")}}, [1])
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    lines = str(info.value).splitlines()
    assert lines[0] == (f"config.yaml: models.m.weights: {weights / 'config.json'}: checkpoint does not "
                        "match the architecture: num_key_value_heads 8 (arch has 4)")
    assert lines[1].startswith(f"config.yaml: models.m.weights: {weights / 'config.json'}: checkpoint "
                               "does not match the architecture: rope_scaling None (arch has llama3 (factor 8")
    assert lines[2].startswith(f"config.yaml: models.m.weights: {last}: truncated: ")
    assert lines[3] == (f"config.yaml: models.l3.weights: checkpoint directory {str(tmp_path / 'nowhere')!r} "
                        "does not exist")
    assert len(lines) == 4


def test_unsupported_rope_type_names_the_key(releases: dict[str, Path], tmp_path: Path) -> None:
    weights = tmp_path / "l31"
    shutil.copytree(releases["llama3.1-tiny"], weights)
    _rewrite(weights / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"^config.yaml: models.m.weights: .*config.json: "
                                          r"rope_scaling.rope_type 'yarn' is not supported \(default or llama3\)$"):
        config.from_dict(cfg_data({"m": {"arch": "llama3.1-tiny", "weights": str(weights)}}, [1]))


def test_llmenergy_plan_on_real_format_checkpoints(releases: dict[str, Path], tmp_path: Path) -> None:
    """The CLI, in a fresh process, as a user runs it: plans in seconds, notes the resharding."""
    import yaml

    models = {name: {"arch": name, "weights": str(path)} for name, path in releases.items()}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data(models, [1, 4])))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "llmenergy.cli", "plan", "--config", str(cfg_path),
                          "--format", "json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=False)
    wall_s = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert len(doc["notes"]) == 3 and all("split into 4 shards at load" in n for n in doc["notes"])
    assert {c["mem_mb_source"] for c in doc["cells"]} == {"estimate"}
    assert wall_s < 30
