"""load_prompts / check_dataset: selection, order, templates, k-shot, synthetic cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmenergy.data import synthetic
from llmenergy.data.prompts import DatasetSpec, Prompt, check_dataset, load_prompts
from llmenergy.errors import DatasetError


@pytest.fixture()
def gsm_file(tmp_path: Path) -> Path:
    return synthetic.write_gsm8k(tmp_path / "gsm8k_test.jsonl", 60, seed=11)


@pytest.fixture()
def alpaca_file(tmp_path: Path) -> Path:
    return synthetic.write_alpaca(tmp_path / "alpaca_data.json", 80, seed=12)


def spec(path: Path | str, fmt: str = "gsm8k", **kw: object) -> DatasetSpec:
    return DatasetSpec(
        name=kw.pop("name", fmt),
        format=fmt,
        path=str(path),  # type: ignore[arg-type]
        n_prompts=kw.pop("n_prompts", 20),
        **kw,
    )  # type: ignore[arg-type]


def test_selection_is_deterministic_and_seeded(gsm_file: Path) -> None:
    a = load_prompts(spec(gsm_file, seed=1))
    b = load_prompts(spec(gsm_file, seed=1))
    c = load_prompts(spec(gsm_file, seed=2))
    assert a == b
    assert [p.id for p in a] != [p.id for p in c]
    assert len({p.id for p in a}) == len(a) == 20
    assert all(isinstance(p, Prompt) and p.id.startswith("gsm8k-") for p in a)


def test_by_length_orders_the_same_selection(alpaca_file: Path) -> None:
    shuffled = load_prompts(spec(alpaca_file, "alpaca", n_prompts=30, seed=4))
    by_len = load_prompts(spec(alpaca_file, "alpaca", n_prompts=30, seed=4, order="by_length"))
    assert sorted(p.id for p in shuffled) == sorted(p.id for p in by_len)
    lengths = [len(p.text) for p in by_len]
    assert lengths == sorted(lengths)
    assert [len(p.text) for p in shuffled] != lengths


def test_prompt_fields_match_the_source_items(alpaca_file: Path, gsm_file: Path) -> None:
    items = json.loads(alpaca_file.read_text(encoding="utf-8"))
    for p in load_prompts(spec(alpaca_file, "alpaca", n_prompts=40)):
        item = items[int(p.id.rsplit("-", 1)[1])]
        assert p.reference == item["output"]
        assert item["instruction"] in p.text
        assert p.template == ("alpaca" if item["input"].strip() else "alpaca_no_input")
    lines = gsm_file.read_text(encoding="utf-8").splitlines()
    for p in load_prompts(spec(gsm_file)):
        item = json.loads(lines[int(p.id.rsplit("-", 1)[1])])
        assert item["answer"].endswith(f"#### {p.reference}")
        assert p.template == "gsm8k_0shot" and item["question"] in p.text


def test_too_many_prompts_is_an_error_naming_the_file(gsm_file: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"gsm8k_test\.jsonl: n_prompts=61 but the file has only 60 items"
    ):
        load_prompts(spec(gsm_file, n_prompts=61))
    with pytest.raises(DatasetError, match=r"61 items needed but the file has only 60"):
        check_dataset(spec(gsm_file, n_prompts=61))
    assert len(load_prompts(spec(gsm_file, n_prompts=60))) == 60


def test_kshot_from_train_file(tmp_path: Path, gsm_file: Path) -> None:
    train = synthetic.write_gsm8k(tmp_path / "gsm8k_train.jsonl", 40, seed=99)
    prompts = load_prompts(spec(gsm_file, kshot=3, train_path=str(train), n_prompts=10))
    assert {p.template for p in prompts} == {"gsm8k_3shot"}
    prefixes = {p.text[: p.text.rindex("Question: ")] for p in prompts}
    assert len(prefixes) == 1  # one fixed set of shots for every prompt
    (prefix,) = prefixes
    assert prefix.count("Question: ") == 3 and prefix.count("#### ") == 3 and "<<" not in prefix
    train_questions = [
        json.loads(line)["question"] for line in train.read_text(encoding="utf-8").splitlines()
    ]
    assert sum(q in prefix for q in train_questions) == 3


def test_kshot_from_the_same_file_never_asks_a_shot(gsm_file: Path) -> None:
    n_items = len(gsm_file.read_text(encoding="utf-8").splitlines())
    k = 5
    prompts = load_prompts(spec(gsm_file, kshot=k, train_path=str(gsm_file), n_prompts=n_items - k))
    for p in prompts:
        question = p.text[p.text.rindex("Question: ") :]
        assert p.text.count(question) == 1


def test_synthetic_path_generates_into_cache_and_reuses_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    s = DatasetSpec("demo", "alpaca", "synthetic", n_prompts=12, seed=5, order="by_length")
    first = load_prompts(s, cache_dir=cache)
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"
    mtime = files[0].stat().st_mtime_ns
    assert load_prompts(s, cache_dir=cache) == first
    assert files[0].stat().st_mtime_ns == mtime
    g = DatasetSpec("g", "gsm8k", "synthetic", n_prompts=6, kshot=2, train_path="synthetic")
    prompts = load_prompts(g, cache_dir=cache)
    assert {p.template for p in prompts} == {"gsm8k_2shot"}
    assert len(list(cache.glob("gsm8k-*train*.jsonl"))) == 1
    check_dataset(g)  # synthetic needs no file


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMENERGY_DATA_CACHE", str(tmp_path / "envcache"))
    load_prompts(DatasetSpec("d", "gsm8k", "synthetic", n_prompts=3))
    assert len(list((tmp_path / "envcache").glob("*.jsonl"))) == 1


@pytest.mark.parametrize(
    "kw,expected",
    [
        ({"format": "csv"}, "datasets.d.format: 'csv' must be one of alpaca, gsm8k"),
        ({"n_prompts": 0}, "datasets.d.n_prompts: 0 must be a positive integer"),
        ({"n_prompts": True}, "datasets.d.n_prompts: True must be an integer"),
        ({"order": "random"}, "datasets.d.order: 'random' must be one of shuffle, by_length"),
        ({"kshot": -1}, "datasets.d.kshot: -1 must be zero or positive"),
        ({"kshot": 4}, "datasets.d.train_path: kshot=4 needs a train file"),
        (
            {"kshot": 2, "template": "raw", "train_path": "x.jsonl"},
            "datasets.d.kshot: k-shot prompts need",
        ),
        ({"template": "alpaca"}, "template 'alpaca' does not fit format 'gsm8k'"),
    ],
)
def test_spec_validation_messages(gsm_file: Path, kw: dict[str, object], expected: str) -> None:
    base: dict[str, object] = {
        "name": "d",
        "format": "gsm8k",
        "path": str(gsm_file),
        "n_prompts": 5,
    }
    base.update(kw)
    s = DatasetSpec(**base)  # type: ignore[arg-type]
    for fn in (check_dataset, load_prompts):
        with pytest.raises(DatasetError, match=expected.replace(".", r"\.").replace("(", r"\(")):
            fn(s)


def test_from_dict_round_trip_and_unknown_keys() -> None:
    s = DatasetSpec.from_dict(
        "gsm", {"format": "gsm8k", "path": "synthetic", "n_prompts": 4, "kshot": 0}
    )
    assert DatasetSpec.from_dict("gsm", {k: v for k, v in s.to_dict().items() if k != "name"}) == s
    with pytest.raises(DatasetError, match=r"datasets\.gsm\.shots: unknown key"):
        DatasetSpec.from_dict("gsm", {"format": "gsm8k", "path": "p", "n_prompts": 1, "shots": 3})
    with pytest.raises(DatasetError, match=r"datasets\.gsm\.path: missing"):
        DatasetSpec.from_dict("gsm", {"format": "gsm8k", "n_prompts": 1})


def test_check_dataset_reads_only_the_head(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    good = [json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(50)]
    path.write_text("\n".join(good + ["{not json"]) + "\n", encoding="utf-8")
    check_dataset(spec(path, n_prompts=10))  # the bad line lies past the checked head
    with pytest.raises(DatasetError, match=r"big\.jsonl: line 51: invalid JSON"):
        load_prompts(spec(path, n_prompts=10))


def test_check_dataset_file_problems(tmp_path: Path, gsm_file: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.jsonl: dataset file not found.*data fetch"):
        check_dataset(spec(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match=r"train\.jsonl: dataset file not found"):
        check_dataset(spec(gsm_file, kshot=2, train_path=str(tmp_path / "train.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: the file holds no records"):
        check_dataset(spec(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "twelve"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad\.jsonl: line 1: field 'answer' does not end with"):
        check_dataset(spec(bad, n_prompts=1))
    with pytest.raises(DatasetError, match=r"alpaca\.jsonl: line 1: missing field 'instruction'"):
        check_dataset(spec(gsm_file.rename(tmp_path / "alpaca.jsonl"), "alpaca", n_prompts=1))
