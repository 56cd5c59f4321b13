"""E2E: the official CSVs against SOURCES.md's counts, grouping per MR, and GPT-2 encoding in
microsoft/LoRA's format (MR text + <|endoftext|> + ' ' + reference + <|endoftext|>)."""

import re

import pytest

from lora_jax.data import tokenizers
from lora_jax.data.e2e import encode_e2e, encode_prompt, format_mr, read_e2e
from lora_jax.metrics.e2e import group_by_mr

# SOURCES.md: CSV records and distinct MRs.
COUNTS = {"train": (42_061, 4_862), "dev": (4_672, 547), "test": (4_693, 630)}


@pytest.mark.parametrize("split", list(COUNTS))
def test_counts_match_sources_md(data_dir, split):
    pairs = read_e2e(split, data_dir=data_dir)
    rows, mrs = COUNTS[split]
    assert len(pairs) == rows
    groups = group_by_mr(pairs)
    assert len(groups) == mrs
    assert sum(len(refs) for _, refs in groups) == rows
    # CRLF line ends (train, dev) must not leak into the fields.
    assert not any(mr.endswith("\r") or ref.endswith("\r") for mr, ref in pairs)
    assert all(mr.startswith("name[") for mr, _ in pairs)


def test_multiline_reference(data_dir):
    pairs = read_e2e("train", data_dir=data_dir)
    multiline = [ref for _, ref in pairs if "\n" in ref]
    assert len(multiline) == 2  # quoted fields that span two lines
    assert multiline[0].startswith("Giraffe is a coffee shop providing take a service")


def test_first_test_pairs(data_dir):
    pairs = read_e2e("test", data_dir=data_dir)
    assert pairs[0] == ("name[Blue Spice], eatType[coffee shop], area[city centre]",
                        "A coffee shop in the city centre area called Blue Spice.")
    mr, refs = group_by_mr(pairs)[0]
    assert mr == pairs[0][0] and refs[1] == "Blue Spice is a coffee shop in city centre."


def test_group_by_mr_keeps_first_appearance_order():
    pairs = [("b", "1"), ("a", "2"), ("b", "3"), ("c", "4"), ("a", "5")]
    assert group_by_mr(pairs) == [("b", ["1", "3"]), ("a", ["2", "5"]), ("c", ["4"])]


# MRs as microsoft/LoRA examples/NLG/data/e2e/test.txt writes them (text before '||').
@pytest.mark.parametrize("mr,expected", [
    ("name[Blue Spice], eatType[coffee shop], area[city centre]",
     "name : Blue Spice | Type : coffee shop | area : city centre"),
    ("name[The Phoenix], eatType[pub], food[French], priceRange[£20-25], customer rating[high], "
     "area[city centre], familyFriendly[no], near[Crowne Plaza Hotel]",
     "name : The Phoenix | Type : pub | food : French | price : £ 20 - 25 | customer rating : high"
     " | area : city centre | family friendly : no | near : Crowne Plaza Hotel"),
    ("name[The Cricketers], eatType[restaurant], food[Chinese], priceRange[less than £20], "
     "customer rating[low], area[riverside], familyFriendly[yes], near[All Bar One]",
     "name : The Cricketers | Type : restaurant | food : Chinese | price : less than £ 20 | "
     "customer rating : low | area : riverside | family friendly : yes | near : All Bar One"),
    ("name[Giraffe], eatType[pub], food[Fast food], area[riverside], familyFriendly[no], "
     "near[Rainbow Vegetarian Café]",
     "name : Giraffe | Type : pub | food : Fast food | area : riverside | family friendly : no | "
     "near : Rainbow Vegetarian Café"),
])
def test_format_mr_matches_lora_repo(mr, expected):
    assert format_mr(mr) == expected


@pytest.mark.parametrize("bad", ["", "name:Blue Spice", "name[Blue Spice] eatType[pub]", "name[x"])
def test_format_mr_rejects_other_text(bad):
    with pytest.raises(ValueError, match="expected an MR"):
        format_mr(bad)


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return tokenizers.load("gpt2")  # $LORA_JAX_DATA_DIR or ../shared/data
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_gpt2_tokenizer(tokenizer, tmp_path):
    assert len(tokenizer) == 50_257 and tokenizer.eos_token_id == 50_256
    with pytest.raises(FileNotFoundError, match="LORA_JAX_DATA_DIR"):
        tokenizers.load("gpt2", data_dir=tmp_path)


def test_encode_e2e_format(tokenizer):
    mr = "name[Alimentum], area[city centre], familyFriendly[no]"
    ref = "There is a place in the city centre, Alimentum, that is not family-friendly."
    [row] = encode_e2e([(mr, ref)], tokenizer, max_len=512)
    ids, mask = row["input_ids"], row["loss_mask"]
    assert tokenizer.decode(ids) == (
        "name : Alimentum | area : city centre | family friendly : no<|endoftext|>"
        " There is a place in the city centre, Alimentum, that is not family-friendly."
        "<|endoftext|>")
    prompt = encode_prompt(mr, tokenizer)
    assert ids[: len(prompt)] == prompt and prompt[-1] == 50_256
    assert prompt[:-1] == tokenizer(format_mr(mr))["input_ids"]
    target = tokenizer(" " + ref)["input_ids"] + [50_256]
    assert ids[len(prompt):] == target
    # Loss only on the reference and the final EOS.
    assert mask == [0] * len(prompt) + [1] * len(target)


def test_encode_e2e_real_rows(tokenizer, data_dir):
    pairs = read_e2e("train", data_dir=data_dir)
    multiline = [p for p in pairs if "\n" in p[1]][:1]
    rows = encode_e2e(pairs[:300] + multiline, tokenizer, max_len=512)
    for row in rows:
        assert len(row["input_ids"]) == len(row["loss_mask"]) <= 128
        first = row["loss_mask"].index(1)
        assert row["input_ids"][first - 1] == 50_256 and row["input_ids"][-1] == 50_256
        assert set(row["loss_mask"][first:]) == {1}
    # An embedded newline becomes one space, as a one-line reference.
    assert "\n" not in tokenizer.decode(rows[-1]["input_ids"])
    assert "The Bakers. This coffee shop" in tokenizer.decode(rows[-1]["input_ids"])


def test_encode_e2e_truncates_like_the_repo(tokenizer):
    mr, ref = "name[Blue Spice], eatType[coffee shop]", "A coffee shop called Blue Spice."
    full = encode_e2e([(mr, ref)], tokenizer, max_len=512)[0]
    prompt = len(encode_prompt(mr, tokenizer))
    cut = encode_e2e([(mr, ref)], tokenizer, max_len=prompt + 2)[0]
    assert cut["input_ids"] == full["input_ids"][: prompt + 2]
    assert cut["loss_mask"] == [0] * prompt + [1, 1]
    with pytest.raises(ValueError, match=re.escape(f"max_len={prompt}")):
        encode_e2e([(mr, ref)], tokenizer, max_len=prompt)
    assert encode_e2e([], tokenizer, max_len=512) == []


def test_hub_source(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, split))
        return datasets.Dataset.from_dict({"meaning_representation": ["name[A]", "name[A]"],
                                           "human_reference": ["A.", "It is A."]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_e2e("dev", source="hub") == [("name[A]", "A."), ("name[A]", "It is A.")]
    assert calls == [("e2e_nlg", "validation")]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown E2E split 'valid'"):
        read_e2e("valid", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"e2e/devset.csv not found.*LORA_JAX_DATA_DIR"):
        read_e2e("dev", data_dir=tmp_path)
    path = tmp_path / "e2e" / "devset.csv"
    path.parent.mkdir()
    path.write_bytes(b'mr,ref\r\n"name[A]","A is\r\nhere."\r\n"name[B]"\r\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: expected 2 fields")):
        read_e2e("dev", data_dir=tmp_path)
    path.write_bytes(b'mr,ref\r\n"name[A]","A is\r\nhere."\r\n')
    assert read_e2e("dev", data_dir=tmp_path) == [("name[A]", "A is\r\nhere.")]


def test_tokenizers_by_the_name_a_config_gives(tmp_path):
    # A family's data-dir tokenizer ('gpt2') is found under the data dir, not on the hub.
    assert tokenizers.directory("gpt2", data_dir=tmp_path) == tmp_path / "tokenizers" / "gpt2"
    # Any other name is a checkpoint's: a directory (or a hub id, or a packaged short name).
    assert tokenizers.directory(str(tmp_path)) == tmp_path
    assert tokenizers.directory(None, checkpoint=tmp_path) == tmp_path
    with pytest.raises(ValueError, match="needs config.model.tokenizer"):
        tokenizers.directory(None)
