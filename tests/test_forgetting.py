"""Forgetting (lora_jax.analysis.forgetting): held-out plain-text loss on cases with a known
answer, on a random 2-layer GPT-2 (configs/e2e.py:model=tiny)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.analysis.forgetting import heldout_loss, read_heldout, text_rows
from lora_jax.config import load_config
from lora_jax.training import setup

TEXTS = ["a gripping , funny film .", "it 's a bad movie and a long one", "ok", "the"]


@pytest.fixture(scope="module")
def runs():
    """(LoRA run as built: B = 0, full fine-tuning's run as built: the params themselves)."""
    lora = load_config("configs/e2e.py:model=tiny")
    full = load_config("configs/e2e.py:model=tiny")
    full.method.use = ("full",)
    return setup.build(lora), setup.build(full)


def test_an_unchanged_model_forgets_nothing(runs):
    lora, full = runs
    before, after = heldout_loss(full, TEXTS), heldout_loss(lora, TEXTS)
    assert after["loss"] - before["loss"] == 0.0  # LoRA's B = 0 adds exact zeros
    assert before["tokens"] == sum(len(r["input_ids"]) - 1 for r in text_rows(
        TEXTS, full.tokenizer, 512))


def test_a_changed_model_does(runs):
    lora, _ = runs
    moved = jax.tree_util.tree_map(lambda x: x + 0.5, lora.trainable)
    before = heldout_loss(lora, TEXTS)["loss"]
    after = heldout_loss(dataclasses.replace(lora, trainable=moved), TEXTS)["loss"]
    assert abs(after - before) > 1e-3


def test_the_loss_is_the_mean_next_token_nll_over_all_texts(runs):
    """Against a direct computation: the model's log-softmax at each position, every token but
    each text's first predicted, averaged over all tokens (longer texts weigh more)."""
    _, full = runs
    rows = text_rows(TEXTS, full.tokenizer, 512)
    nll = []
    for row in rows:
        ids = jnp.asarray([row["input_ids"]])
        params = full.stack.merge(full.frozen, full.trainable)  # FT trains every weight
        logits = full.model.apply({"params": params}, ids).logits[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll += [-float(logp[t - 1, row["input_ids"][t]]) for t in range(1, len(row["input_ids"]))]
    assert heldout_loss(full, TEXTS)["loss"] == pytest.approx(np.mean(nll), rel=1e-5)


def test_a_model_that_predicts_nothing_scores_log_vocab(runs):
    _, full = runs
    # GPT-2 ties its LM head to wte: zero embeddings give zero logits, a uniform distribution.
    trained = jax.tree_util.tree_map(lambda x: x, full.trainable)  # FT: every weight trainable
    wte = trained["params"]["wte"]
    wte["embedding"] = jnp.zeros_like(wte["embedding"])
    uniform = dataclasses.replace(full, trainable=trained)
    vocab = wte["embedding"].shape[0]
    assert heldout_loss(uniform, TEXTS)["loss"] == pytest.approx(math.log(vocab), rel=1e-6)


def test_rows_predict_every_token_but_the_first():
    class Tokenizer:  # adds a BOS (id 1) before what it encodes, as Llama's do
        bos_token_id = 1

        def __call__(self, texts, add_special_tokens=True):
            def encode(text):
                return ([1] if add_special_tokens else []) + [ord(ch) for ch in text]

            if isinstance(texts, str):
                return {"input_ids": encode(texts)}
            return {"input_ids": [encode(t) for t in texts]}

    rows = text_rows(["ab", "", "xyz"], Tokenizer(), max_len=3)
    assert rows == [{"input_ids": [1, 97, 98], "loss_mask": [0, 1, 1]},
                    {"input_ids": [1, 120, 121], "loss_mask": [0, 1, 1]}]  # cut at 3; "" dropped


def test_read_heldout_reads_the_glue_sentences(data_dir):
    sst2 = read_heldout(("sst2:dev",), data_dir=data_dir)
    assert len(sst2) == 872 and sst2[0].startswith("it 's a charming and often affecting journey")
    both = read_heldout(("sst2:dev", "cola:dev"), data_dir=data_dir, limit=5)
    assert len(both) == 10
    mrpc = read_heldout(("mrpc:dev",), data_dir=data_dir, limit=4)
    assert len(mrpc) == 4  # a pair task gives both sentences of each pair
    with pytest.raises(ValueError, match="task:split"):
        read_heldout(("sst2",), data_dir=data_dir)
    with pytest.raises(ValueError):
        read_heldout(("nosuchtask:dev",), data_dir=data_dir)
    with pytest.raises(ValueError, match="no held-out text"):
        read_heldout((), data_dir=data_dir)
