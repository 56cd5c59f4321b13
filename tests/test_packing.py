"""Sequence packing: rows, batches, attention isolation, the loss per example, the trainer."""

import collections
import dataclasses
import json

import jax
import numpy as np
import pytest

from lora_jax import losses
from lora_jax.training import steps
from lora_jax.data import tasks
from lora_jax.config import load_config
from lora_jax.data import batching, e2e, tokenizers
from lora_jax.data.packing import pack_examples, packed_batches
from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from lora_jax.train import train
from conftest import REPO_ROOT, tiny_config

BUCKETS = (16, 32, 64, 128, 256, 512)
EOS = e2e.EOS_ID


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return tokenizers.load("gpt2")
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture
def e2e_rows(tokenizer, data_dir):
    """make(n) -> the first n encoded E2E training examples (distinct, 20 to 113 tokens)."""

    def make(n: int) -> list[dict]:
        rows = e2e.encode_e2e(e2e.read_e2e("train", data_dir=data_dir)[:n], tokenizer, 512)
        assert len({tuple(r["input_ids"]) for r in rows}) == n  # content identifies an example
        return rows

    return make


@pytest.fixture(scope="module")
def gpt2():
    """A tiny random GPT-2 (fp32, no dropout). Weights 5x the usual scale, so that attention is
    far from uniform and a leak between examples shows in the logits."""
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, initializer_range=0.1, embd_pdrop=0.0,
                        attn_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    params = model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
    apply = jax.jit(lambda batch: model.apply({"params": params}, batch["input_ids"],
                                              **steps.model_inputs(batch)).logits)
    return model, params, apply


def segments(batch: dict):
    """Yields (row, segment id, [positions]) for each packed example of a batch."""
    for b, row in enumerate(batch["segment_ids"]):
        for s in range(1, row.max() + 1):
            yield b, s, np.flatnonzero(row == s)


def contents(batches: list[dict]) -> collections.Counter:
    """How many times each example (by its input_ids) occurs in the batches."""
    return collections.Counter(tuple(batch["input_ids"][b, at]) for batch in batches
                               for b, _, at in segments(batch))


# --- pack_examples --------------------------------------------------------------------------


def test_first_fit_decreasing_by_length_then_index():
    lengths = [5, 3, 7, 2, 4, 4]
    examples = [{"input_ids": [1] * n} for n in lengths]
    # Placed 2(7), 0(5), 4(4), 5(4), 1(3), 3(2): 4 does not fit beside 2, 5 not beside 0 and 4.
    assert pack_examples(examples, 10) == [[2, 1], [0, 4], [5, 3]]
    assert pack_examples(examples, 7) == [[2], [0, 3], [4, 1], [5]]


def test_real_rows_fit_hold_every_example_once_and_are_deterministic(e2e_rows):
    rows = e2e_rows(600)
    packed = pack_examples(rows, 128)
    assert sorted(i for row in packed for i in row) == list(range(600))
    fill = [sum(len(rows[i]["input_ids"]) for i in row) for row in packed]
    assert max(fill) <= 128
    tokens = sum(fill)
    assert len(packed) <= -(-tokens // 128) + 10  # close to the lower bound on rows
    assert pack_examples(rows, 128) == packed


def test_an_over_long_example_is_a_clear_error():
    examples = [{"input_ids": [1] * 5}, {"input_ids": [1] * 11}]
    with pytest.raises(ValueError, match="example 1 has 11 tokens, more than .*max_len=10"):
        pack_examples(examples, 10)
    with pytest.raises(ValueError, match="example 0 is empty"):
        pack_examples([{"input_ids": []}], 10)


# --- packed_batches -------------------------------------------------------------------------


def test_batches_carry_each_example_with_its_own_positions(e2e_rows):
    rows = e2e_rows(200)
    packed = pack_examples(rows, 128)
    batches = packed_batches(rows, packed, 1, seed=0, epoch=0, pad_id=EOS, buckets=BUCKETS)
    # Batch size 1 drops nothing: every example exactly once in the epoch.
    assert contents(batches) == collections.Counter(tuple(r["input_ids"]) for r in rows)
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    for batch in batches:
        assert {k: (v.dtype, v.shape[0]) for k, v in batch.items()} == {
            k: (np.int32, 1) for k in
            ("input_ids", "loss_mask", "attention_mask", "segment_ids", "position_ids")}
        seg = batch["segment_ids"][0]
        n = int((seg > 0).sum())
        assert batch["input_ids"].shape[1] == batching.bucket_length(n, BUCKETS) <= 128
        # Examples sit back to back from the start, numbered 1..k; then padding.
        assert np.all(seg[:n] > 0) and np.all(np.diff(seg[:n]) >= 0) and np.all(seg[n:] == 0)
        np.testing.assert_array_equal(batch["attention_mask"][0], seg > 0)
        for key in ("loss_mask", "position_ids"):
            assert np.all(batch[key][0, n:] == 0)
        assert np.all(batch["input_ids"][0, n:] == EOS)
        for _, _, at in segments(batch):
            example = by_ids[tuple(batch["input_ids"][0, at])]
            np.testing.assert_array_equal(batch["position_ids"][0, at], np.arange(len(at)))
            np.testing.assert_array_equal(batch["loss_mask"][0, at], example["loss_mask"])


def test_epoch_order_is_seeded_and_the_remainder_dropped(e2e_rows):
    rows = e2e_rows(200)
    packed = pack_examples(rows, 128)
    assert len(packed) % 4  # so that a remainder is dropped

    def epoch(seed, epoch):
        return packed_batches(rows, packed, 4, seed=seed, epoch=epoch, pad_id=EOS, buckets=BUCKETS)

    first = epoch(0, 0)
    assert len(first) == len(packed) // 4
    seen = contents(first)
    assert max(seen.values()) == 1
    dropped = len(rows) - sum(seen.values())
    assert 0 < dropped <= max(map(len, packed)) * (len(packed) % 4)
    again = epoch(0, 0)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    order = [batch["input_ids"][:, :8].tobytes() for batch in first]
    assert order != [batch["input_ids"][:, :8].tobytes() for batch in epoch(0, 1)]
    assert order != [batch["input_ids"][:, :8].tobytes() for batch in epoch(1, 0)]


def test_task_packs_when_asked():
    examples = [{"input_ids": [7] * n, "loss_mask": [1] * n} for n in (9, 3, 12, 5, 7, 1, 15)]
    task = tasks.Task("e2e", "lm", None, examples, [], EOS, (16,), "loss", packing=True,
                      max_len=16)
    rows = task.packed_rows
    assert task.packed_rows is rows  # computed once
    assert task.steps_per_epoch(2) == len(rows) // 2 == len(task.train_batches(2, 0, 0))
    assert all("segment_ids" in batch for batch in task.train_batches(2, 0, 0))
    plain = dataclasses.replace(task, packing=False)
    assert plain.steps_per_epoch(2) == 3 == len(plain.train_batches(2, 0, 0))
    assert all("segment_ids" not in batch for batch in plain.eval_batches(2))


# --- the model and the loss -----------------------------------------------------------------


def per_example_losses(batch: dict, logits) -> dict[tuple, tuple[float, float]]:
    """{input_ids: (summed target NLL, target count)} through `losses.loss_sum`, one example at a
    time (its loss mask alone)."""
    found = {}
    for b, s, at in segments(batch) if "segment_ids" in batch else unpacked(batch):
        row = {k: v[b : b + 1] for k, v in batch.items()}  # one row: 1/B of the work
        only = np.zeros_like(row["loss_mask"])
        only[0, at] = row["loss_mask"][0, at]
        total, weight = losses.loss_sum("lm", logits[b : b + 1], {**row, "loss_mask": only})
        found[tuple(batch["input_ids"][b, at])] = (float(total), float(weight))
    return found


def unpacked(batch: dict):
    for b, mask in enumerate(batch["attention_mask"]):
        yield b, 1, np.flatnonzero(mask)


def test_packed_loss_per_example_equals_unpacked(gpt2, e2e_rows):
    _, _, apply = gpt2
    rows = e2e_rows(12)
    packed = pack_examples(rows, 256)
    assert len(packed) < len(rows) and max(map(len, packed)) >= 3
    [packed_batch] = packed_batches(rows, packed, len(packed), seed=0, epoch=0, pad_id=EOS,
                                    buckets=BUCKETS)
    [alone] = batching.epoch_batches(rows, len(rows), seed=0, epoch=0, shuffle=False,
                                     pad_id=EOS, buckets=BUCKETS)
    expected = per_example_losses(alone, apply(alone))
    got = per_example_losses(packed_batch, apply(packed_batch))
    assert got.keys() == expected.keys()
    for key, (total, weight) in expected.items():
        assert got[key][1] == weight > 0
        assert got[key][0] == pytest.approx(total, rel=1e-5)

    # The check can fail: without segment ids every later example of a row reads the earlier
    # ones, and its loss moves by 10x the tolerance above or more (4e-4 to 4e-3 here).
    leaky = {k: v for k, v in packed_batch.items() if k != "segment_ids"}
    leaked = per_example_losses(packed_batch, apply(leaky))
    later = [tuple(packed_batch["input_ids"][b, at]) for b, s, at in segments(packed_batch)
             if s > 1]
    assert all(abs(leaked[k][0] - expected[k][0]) > 1e-4 * expected[k][0] for k in later)


def test_an_example_does_not_see_its_neighbours(gpt2, e2e_rows):
    _, _, apply = gpt2
    rows = e2e_rows(12)
    batches = packed_batches(rows, pack_examples(rows, 256), 1, seed=0, epoch=0, pad_id=EOS,
                             buckets=BUCKETS)
    batch = next(b for b in batches if b["segment_ids"].max() >= 3)
    seg = batch["segment_ids"]
    changed = dict(batch)
    middle = seg == 2
    changed["input_ids"] = np.where(middle, (batch["input_ids"] + 1000) % 50257, batch["input_ids"])
    before, after = np.asarray(apply(batch)), np.asarray(apply(changed))
    others = (seg != 2) & (seg != 0)
    np.testing.assert_allclose(after[others], before[others], atol=1e-6, rtol=0)
    assert np.abs(after[middle] - before[middle]).max() > 1e-2  # the change itself shows


def test_one_segment_is_the_plain_model(gpt2):
    model, params, _ = gpt2
    ids = np.random.default_rng(0).integers(0, 50257, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    plain = model.apply({"params": params}, ids, mask).logits
    packed = model.apply({"params": params}, ids, mask, segment_ids=mask).logits
    np.testing.assert_allclose(np.asarray(packed)[mask == 1], np.asarray(plain)[mask == 1],
                               atol=1e-6, rtol=0)
    assert np.isfinite(np.asarray(packed)).all()  # padding queries are not fully masked
    with pytest.raises(ValueError, match="segment_ids .* cache"):
        model.apply({"params": params}, ids, segment_ids=mask, cache=16)


def test_loss_never_predicts_across_examples():
    logits = jax.random.normal(jax.random.key(0), (1, 5, 7))
    ids = np.array([[1, 2, 3, 4, 5]])
    batch = {"input_ids": ids, "loss_mask": np.ones_like(ids),
             "segment_ids": np.array([[1, 1, 2, 2, 0]])}
    total, weight = losses.loss_sum("lm", logits, batch)
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    # Targets 1 (from 0) and 3 (from 2); 2 starts the next example, 4 is padding.
    assert float(weight) == 2.0
    assert float(total) == pytest.approx(-(logp[0, 2] + logp[2, 4]), rel=1e-6)


# --- configuration and the trainer ----------------------------------------------------------


def test_packing_a_glue_task_is_an_error():
    with pytest.raises(ValueError, match=r"data.packing applies to language-model tasks \(e2e\), "
                                         r"not sst2"):
        tasks.build_task(tiny_config(**{"data.packing": True}).data, tokenizer=None)


def e2e_run_config(data_dir, **fields):
    c = load_config(str(REPO_ROOT / "configs/e2e.py") + ":model=tiny")
    c.data.data_dir = str(data_dir)
    c.data.max_train_examples, c.data.max_eval_examples, c.data.eval_batch_size = 16, 8, 8
    for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        c.model.random_init[name] = 0.0  # no dropout: both runs compute the same function
    c.model.random_init.initializer_range = 0.1  # strong attention: a leak would show in the loss
    c.method.lora.dropout = 0.0
    c.train.log_every, c.optim.warmup_steps = 1, 1
    for dotted, value in fields.items():
        section, name = dotted.split(".")
        c[section][name] = value
    return c


def test_trainer_with_packing_matches_the_unpacked_first_step(tmp_path, data_dir, tokenizer):
    packed = e2e_run_config(data_dir, **{"data.packing": True})
    rows = tasks.build_task(packed.data, tokenizer).packed_rows
    assert 1 < len(rows) < 16
    # All 16 examples in the first batch of both runs: all packed rows, or all 16 unpacked.
    packed.data.batch_size, packed.train.epochs = len(rows), 2
    plain = e2e_run_config(data_dir, **{"data.batch_size": 16, "train.max_steps": 1})
    result = train(packed, tmp_path / "packed")
    train(plain, tmp_path / "plain")

    def losses(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]

    packed_losses = losses("packed")
    assert len(packed_losses) == 2  # epochs * (rows // batch_size)
    assert np.isfinite(packed_losses).all() and np.isfinite(result["loss"])
    # The adapters start as the identity (B = 0), so the first step's loss is the base model's
    # mean over the same target tokens, however they are batched.
    assert packed_losses[0] == pytest.approx(losses("plain")[0], rel=1e-5)
