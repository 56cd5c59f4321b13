"""GPT-2 parity with transformers on torch (fp32, eval mode), loaded through lora_jax.interop.hub."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from lora_jax.interop.hub import load_pretrained
from lora_jax.models import GPT2Config, GPT2LMHeadModel, lm_loss
from conftest import dense_calls

VOCAB = 97


@pytest.fixture
def hf_gpt2(tmp_path, perturb_weights):
    """A tiny random HF GPT-2 saved as safetensors: (torch model, checkpoint dir)."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = perturb_weights(transformers.GPT2LMHeadModel(config))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def _torch_reference(model, ids, mask):
    labels = torch.tensor(np.where(mask == 1, ids, -100))
    with torch.no_grad():
        return model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels,
            output_hidden_states=True,
        )


def test_logits_and_hidden_states_match_hf(hf_gpt2, padded_batch):
    hf_model, path = hf_gpt2
    ids, mask = padded_batch(VOCAB)
    model, params, _ = load_pretrained(path)
    ours = model.apply({"params": params}, ids, mask, output_hidden_states=True)
    ref = _torch_reference(hf_model, ids, mask)

    keep = mask.astype(bool)  # padding positions are unspecified in both

    def close(a, b, what):
        a, b = np.asarray(a)[keep], b.numpy()[keep]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=what)

    close(ours.logits, ref.logits, "logits")
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        close(a, b, f"hidden state {i}")


def test_lm_loss_matches_hf(hf_gpt2, padded_batch):
    hf_model, path = hf_gpt2
    ids, mask = padded_batch(VOCAB)
    model, params, _ = load_pretrained(path)
    logits = model.apply({"params": params}, ids, mask).logits
    ref = _torch_reference(hf_model, ids, mask)
    loss = lm_loss(logits, ids, mask)
    np.testing.assert_allclose(float(loss), ref.loss.item(), atol=1e-5, rtol=0)


def test_hidden_states_only_on_request(hf_gpt2, padded_batch):
    model, params, _ = load_pretrained(hf_gpt2[1])
    ids, mask = padded_batch(VOCAB)
    assert model.apply({"params": params}, ids, mask).hidden_states is None


def test_bf16_params_and_compute(hf_gpt2, padded_batch):
    _, path = hf_gpt2
    ids, mask = padded_batch(VOCAB)
    model32, params32, _ = load_pretrained(path)
    model16, params16, _ = load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    logits16 = model16.apply({"params": params16}, ids, mask).logits
    logits32 = model32.apply({"params": params32}, ids, mask).logits
    assert logits16.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits16, np.float32)).all()
    keep = mask.astype(bool)
    # bf16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.4%); rounding the weights and every
    # activation through 2 blocks of |logits| ~ 1 compounds to a few 1e-2 at most.
    np.testing.assert_allclose(
        np.asarray(logits16, np.float32)[keep], np.asarray(logits32)[keep], atol=5e-2, rtol=0
    )


def test_param_paths_mirror_hf():
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(GPT2LMHeadModel(config).init, jax.random.key(0), ids)
    paths = {"/".join(p): s.shape for p, s in traverse_util.flatten_dict(shapes["params"]).items()}
    block = {
        "ln_1/scale": (32,), "ln_1/bias": (32,),
        "attn/c_attn/kernel": (32, 96), "attn/c_attn/bias": (96,),
        "attn/c_proj/kernel": (32, 32), "attn/c_proj/bias": (32,),
        "ln_2/scale": (32,), "ln_2/bias": (32,),
        "mlp/c_fc/kernel": (32, 128), "mlp/c_fc/bias": (128,),
        "mlp/c_proj/kernel": (128, 32), "mlp/c_proj/bias": (32,),
    }
    expected = {
        "wte/embedding": (VOCAB, 32), "wpe/embedding": (16, 32),
        "ln_f/scale": (32,), "ln_f/bias": (32,),
    }
    expected |= {f"h_{i}/{name}": shape for i in range(2) for name, shape in block.items()}
    assert paths == expected


def test_every_projection_is_a_plain_dense():
    """LoRA intercepts nn.Dense.__call__ by module path: every kernel must pass through one."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    seen, kernels = dense_calls(model, params, ids)
    assert seen == kernels and len(kernels) == 8


def test_dropout_needs_rng_and_is_seeded(hf_gpt2, padded_batch):
    model, params, _ = load_pretrained(hf_gpt2[1])
    ids, mask = padded_batch(VOCAB)
    run = lambda seed: model.apply(
        {"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(seed)}
    ).logits
    clean = model.apply({"params": params}, ids, mask).logits
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), clean)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="swishy"):
        GPT2Config(activation_function="swishy")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla(padded_batch):
    """The fused cuDNN kernel (bf16, head_dim 64) agrees with XLA on the same bf16 weights."""
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=128, n_layer=2, n_head=2,
        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
    )
    ids, mask = padded_batch(VOCAB)
    params = GPT2LMHeadModel(config).init(jax.random.key(0), ids)["params"]
    cudnn = GPT2LMHeadModel(dataclasses.replace(config, attention_implementation="cudnn"))
    fused = cudnn.apply({"params": params}, ids, mask).logits
    plain = GPT2LMHeadModel(config).apply({"params": params}, ids, mask).logits
    keep = mask.astype(bool)
    # Both run bf16 matmuls with float32 softmax; they differ only in accumulation order.
    np.testing.assert_allclose(
        np.asarray(fused, np.float32)[keep], np.asarray(plain, np.float32)[keep], atol=2e-2, rtol=0
    )


def test_remat_keeps_params_outputs_and_lora_gradients():
    """Recomputing blocks in the backward pass changes memory, not the model: the same param tree,
    and through `lora.adapt` (dropout on) the same loss and adapter gradients."""
    from lora_jax.methods import lora

    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    plain, remat = GPT2LMHeadModel(config), GPT2LMHeadModel(dataclasses.replace(config, remat=True))
    ids = jnp.arange(16).reshape(2, 8) % 100
    params = plain.init(jax.random.key(0), ids)["params"]
    assert (jax.tree_util.tree_structure(remat.init(jax.random.key(0), ids)["params"])
            == jax.tree_util.tree_structure(params))
    spec = lora.LoraSpec(targets=("attn/c_attn",), rank=2, dropout=0.1)
    frozen, trainable = lora.split(spec, params, jax.random.key(1))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1, trainable)  # B != 0: A gets gradients

    def loss_and_grads(model):
        apply = lora.adapt(model.apply, spec)

        def loss(trainable):
            logits = apply(frozen, trainable, ids, deterministic=False,
                           rngs={"dropout": jax.random.key(3)}, lora_rng=jax.random.key(4)).logits
            return lm_loss(logits, ids, jnp.ones_like(ids))

        return jax.jit(jax.value_and_grad(loss))(trainable)

    (loss_plain, grads_plain), (loss_remat, grads_remat) = map(loss_and_grads, (plain, remat))
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    for g_remat, g_plain in zip(jax.tree_util.tree_leaves(grads_remat),
                                jax.tree_util.tree_leaves(grads_plain)):
        assert np.abs(g_plain).max() > 0
        np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: remat.apply(
        {"params": params}, ids).logits.sum()))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr  # the blocks are really rematerialised


def test_options_it_does_not_reproduce_are_refused_by_name():
    hf = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4)
    assert GPT2Config.from_hf(hf).n_embd == 32
    for option, value in (("scale_attn_by_inverse_layer_idx", True),
                          ("scale_attn_weights", False), ("add_cross_attention", True)):
        with pytest.raises(ValueError, match=f"GPT-2 with {option}={value!r} is not supported"):
            GPT2Config.from_hf(transformers.GPT2Config(**{option: value}))
