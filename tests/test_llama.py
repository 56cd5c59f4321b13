"""Llama, Mistral and Qwen2 parity with transformers on torch (fp32, eval mode, padded batches),
loaded through lora_jax.interop.hub from safetensors; KV-cached decoding against HF's generate."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from lora_jax import generate
from lora_jax.interop import hub
from lora_jax.interop.hub import load_pretrained
from lora_jax.models import LlamaConfig, LlamaForCausalLM, lm_loss
from lora_jax.models.llama import rope_frequencies
from conftest import dense_calls

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # Larger than the positions used, so that every band of the rule is exercised
               # (HF warns that it should be below max_position_embeddings; it computes alike).
               "original_max_position_embeddings": 256}
# Each case exercises something the others do not.
CASES = {
    # GQA 4:2, untied head.
    "llama_gqa2": ("llama", {}),
    # GQA 8:2 (4 query heads per KV head), head_dim 6 (not hidden / heads), all four attention
    # biases and the MLP's, tied embedding, llama3 RoPE.
    "llama_gqa4_head6_bias_tied_llama3": ("llama", dict(
        num_attention_heads=8, head_dim=6, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    # One KV head for all (MQA), linear RoPE scaling, another base.
    "llama_mqa_linear": ("llama", dict(num_key_value_heads=1, rope_parameters={
        "rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    # Mistral's sliding window, shorter than the rows (12 tokens).
    "mistral_window5": ("mistral", dict(sliding_window=5)),
    # Qwen2: q/k/v biases, tied, YaRN.
    "qwen2_tied_yarn": ("qwen2", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16})),
    # Qwen2 with a window on layers 1 and 2 only (max_window_layers=1), MHA.
    "qwen2_window_layers": ("qwen2", dict(num_hidden_layers=3, num_key_value_heads=4,
                                          use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1)),
}
HF_CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
              "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
              "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def hf_config(case: str):
    model_type, fields = CASES[case]
    return HF_CLASSES[model_type][0](**(BASE | fields))


def save_hf(config, directory, scale: float = 0.05, **save_options):
    """A random HF model of `config`, perturbed (RMSNorm weights off 1, biases off 0), saved."""
    torch.manual_seed(0)
    model = HF_CLASSES[config.model_type][1](config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.eval().save_pretrained(directory, **save_options)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (HF torch model, checkpoint dir), built once per case."""
    made = {}

    def get(case):
        if case not in made:
            path = tmp_path_factory.mktemp(case)
            made[case] = (save_hf(hf_config(case), path), path)
        return made[case]

    return get


def _reference(model, ids, mask):
    labels = torch.tensor(np.where(mask == 1, ids, -100))
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=labels,
                     output_hidden_states=True)


@pytest.mark.parametrize("case", CASES)
def test_logits_hidden_states_and_loss_match_hf(case, checkpoints, padded_batch):
    hf_model, path = checkpoints(case)
    ids, mask = padded_batch(VOCAB)
    model, params, _ = load_pretrained(path)
    ours = model.apply({"params": params}, ids, mask, output_hidden_states=True)
    ref = _reference(hf_model, ids, mask)
    keep = mask.astype(bool)  # padding positions are unspecified in both
    close = lambda a, b, what: np.testing.assert_allclose(  # noqa: E731
        np.asarray(a)[keep], b.numpy()[keep], atol=1e-5, rtol=0, err_msg=what)
    close(ours.logits, ref.logits, "logits")
    assert len(ours.hidden_states) == len(ref.hidden_states) == hf_model.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        close(a, b, f"hidden state {i}")
    np.testing.assert_allclose(float(lm_loss(ours.logits, ids, mask)), ref.loss.item(),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, plain", [
    ("llama_gqa4_head6_bias_tied_llama3", dict(rope=(("rope_theta", 10000.0),))),
    ("llama_mqa_linear", dict(rope=(("rope_theta", 500.0),))),
    ("qwen2_tied_yarn", dict(rope=(("rope_theta", 10000.0),))),
    ("mistral_window5", dict(windows=None)),
    ("qwen2_window_layers", dict(windows=None)),
])
def test_each_variant_changes_the_model(case, plain, checkpoints, padded_batch):
    """The parity above would also hold if a variant were ignored and the tiny model did not
    notice: without it (plain RoPE, no window) the logits differ well beyond the tolerance."""
    _, path = checkpoints(case)
    ids, mask = padded_batch(VOCAB)
    model, params, _ = load_pretrained(path)
    without = LlamaForCausalLM(dataclasses.replace(model.config, **plain))
    logits = model.apply({"params": params}, ids, mask).logits
    other = without.apply({"params": params}, ids, mask).logits
    keep = mask.astype(bool)
    assert np.abs(np.asarray(logits)[keep] - np.asarray(other)[keep]).max() > 1e-3


def test_rope_frequencies_equal_hf():
    """Our numpy rules give HF's inverse frequencies and attention scaling, for each type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for case in ("llama_gqa4_head6_bias_tied_llama3", "llama_mqa_linear", "qwen2_tied_yarn"):
        config = hf_config(case)
        kind = config.rope_parameters["rope_type"]
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
        ours, our_scaling = rope_frequencies(LlamaConfig.from_hf(config))
        np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6, err_msg=case)
        assert our_scaling == pytest.approx(scaling, rel=1e-7)


def test_sharded_checkpoint_loads_the_same_params(checkpoints, tmp_path):
    hf_model, path = checkpoints("llama_gqa2")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(hub.weight_files(tmp_path)) > 2  # really sharded, through the index
    _, whole, _ = load_pretrained(path)
    _, sharded, _ = load_pretrained(tmp_path)
    flat_whole, flat_sharded = (traverse_util.flatten_dict(p) for p in (whole, sharded))
    assert flat_whole.keys() == flat_sharded.keys()
    for key in flat_whole:
        np.testing.assert_array_equal(flat_whole[key], flat_sharded[key])


def test_param_paths_mirror_hf_keys(checkpoints):
    """Every HF tensor is one of our leaves under `hf_module_name`, and every leaf has one."""
    for case in ("llama_gqa2", "qwen2_tied_yarn"):
        hf_model, _ = checkpoints(case)
        config = LlamaConfig.from_hf(hf_model.config)
        shapes = jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0),
                                jnp.zeros((1, 4), jnp.int32))["params"]
        ours = {hub.hf_keys(p, config.model_type)[0]: s.shape
                for p, s in traverse_util.flatten_dict(shapes).items()}
        theirs = {k: tuple(v.shape[::-1]) if k.endswith("proj.weight") or k == "lm_head.weight"
                  else tuple(v.shape) for k, v in hf_model.state_dict().items()}
        if hf_model.config.tie_word_embeddings:
            theirs.pop("lm_head.weight")  # the same tensor as the embedding
        assert ours == theirs, case
        assert ("model.layers.0.self_attn.q_proj.bias" in ours) == (case == "qwen2_tied_yarn")


def test_every_projection_is_a_plain_dense(checkpoints):
    """LoRA intercepts nn.Dense.__call__ by module path: every kernel must pass through one."""
    _, path = checkpoints("llama_gqa2")
    model, params, _ = load_pretrained(path)
    seen, kernels = dense_calls(model, params, jnp.zeros((1, 4), jnp.int32))
    assert seen == kernels and len(kernels) == 2 * 7 + 1  # 7 projections per block, the head


def test_bf16_params_and_compute(checkpoints, padded_batch):
    _, path = checkpoints("qwen2_tied_yarn")
    ids, mask = padded_batch(VOCAB)
    model32, params32, _ = load_pretrained(path)
    model16, params16, _ = load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    logits16 = model16.apply({"params": params16}, ids, mask).logits
    assert logits16.dtype == jnp.bfloat16
    keep = mask.astype(bool)
    # bf16's relative step 2**-8 through 2 blocks: a few 1e-2 on logits of size ~1.
    np.testing.assert_allclose(np.asarray(logits16, np.float32)[keep],
                               np.asarray(model32.apply({"params": params32}, ids, mask).logits)
                               [keep], atol=5e-2, rtol=0)


def test_unsupported_options_are_named():
    config = hf_config("llama_gqa2")
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        LlamaConfig.from_hf(config)
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="head_dim=5 must be even"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=5)
    with pytest.raises(ValueError, match="swishy"):
        LlamaConfig(hidden_act="swishy")


def test_checkpoint_missing_a_weight_is_refused(checkpoints, tmp_path):
    from safetensors.numpy import save_file

    _, path = checkpoints("llama_gqa2")
    state = hub.load_state_dict(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path)


def test_remat_keeps_outputs_and_lora_gradients(checkpoints, padded_batch):
    from lora_jax.methods import lora

    _, path = checkpoints("llama_gqa2")
    ids, mask = padded_batch(VOCAB)
    plain, params, _ = load_pretrained(path)
    remat, _, _ = load_pretrained(path, remat=True)
    spec = lora.LoraSpec(targets=("q_proj", "v_proj", "down_proj"), rank=2, dropout=0.1)
    frozen, trainable = lora.split(spec, params, jax.random.key(1))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1, trainable)  # B != 0: A gets gradients

    def loss_and_grads(model):
        apply = lora.adapt(model.apply, spec)

        def loss(trainable):
            logits = apply(frozen, trainable, ids, mask, deterministic=False,
                           lora_rng=jax.random.key(4)).logits
            return lm_loss(logits, ids, mask)

        return jax.jit(jax.value_and_grad(loss))(trainable)

    (loss_plain, grads_plain), (loss_remat, grads_remat) = map(loss_and_grads, (plain, remat))
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    for g_remat, g_plain in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads_plain)):
        assert np.abs(g_plain).max() > 0
        np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: remat.apply({"params": p}, ids).logits.sum()))(
        params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize("case", ["llama_gqa2", "mistral_window5"])
def test_packed_rows_equal_examples_alone(case, checkpoints):
    """segment_ids: two examples packed in one row give the logits each has alone."""
    _, path = checkpoints(case)
    model, params, _ = load_pretrained(path)
    rng = np.random.default_rng(3)
    first, second = rng.integers(3, VOCAB, 7), rng.integers(3, VOCAB, 9)
    row = np.concatenate([first, second])[None]
    segments = np.array([[1] * 7 + [2] * 9])
    positions = np.array([list(range(7)) + list(range(9))])
    packed = model.apply({"params": params}, row, position_ids=positions,
                         segment_ids=segments).logits[0]
    alone = [model.apply({"params": params}, x[None]).logits[0] for x in (first, second)]
    np.testing.assert_allclose(packed, np.concatenate(alone), atol=1e-5, rtol=0)


def test_attention_dropout_is_seeded(checkpoints, padded_batch):
    """attention_dropout > 0 takes the explicit path (GQA heads repeated, window kept)."""
    _, path = checkpoints("mistral_window5")
    ids, mask = padded_batch(VOCAB)
    model, params, _ = load_pretrained(path)
    clean = model.apply({"params": params}, ids, mask).logits
    dropping = LlamaForCausalLM(dataclasses.replace(model.config, attention_dropout=0.3))
    run = lambda seed, rate_model=dropping: rate_model.apply(  # noqa: E731
        {"params": params}, ids, mask, deterministic=False,
        rngs={"dropout": jax.random.key(seed)}).logits
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    # At rate 0 the explicit path is the same function as the kernel's.
    zero = LlamaForCausalLM(dataclasses.replace(model.config, attention_dropout=1e-9))
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(run(1, zero))[keep], np.asarray(clean)[keep],
                               atol=1e-5, rtol=0)


# --- Decoding -----------------------------------------------------------------------------------

MAX_NEW, PAD = 12, 0


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """case -> (HF model, our model, params): larger noise gives peaked, varied next tokens."""
    made = {}

    def get(case):
        if case not in made:
            config = HF_CLASSES[CASES[case][0]][0](**(BASE | CASES[case][1] | dict(
                vocab_size=300, pad_token_id=PAD, eos_token_id=PAD)))
            path = tmp_path_factory.mktemp(f"decode_{case}")
            hf_model = save_hf(config, path, scale=0.3)
            model, params, _ = load_pretrained(path)
            made[case] = (hf_model, model, params, _stop_id(model, params))
        return made[case]

    return get


def _stop_id(model, params) -> int:
    """A token that ends some of the prompts' greedy continuations, not all: both ways of
    ending (by the stop id, at max_new_tokens) are then exercised."""
    runs = generate.greedy_search(model.apply, {"params": params}, _prompts(),
                                  max_new_tokens=MAX_NEW, eos_ids=PAD, pad_id=PAD)
    counts = {}
    for seq in runs:
        for token in set(seq[2:]):
            counts[token] = counts.get(token, 0) + 1
    return next(t for t, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n < len(runs))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # HF's decoding steps are tiny: more threads only spin
    yield
    torch.set_num_threads(threads)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, 300, size=n).tolist() for n in (1, 9, 4, 13, 6, 2)]


def _hf_generate(hf_model, prompts, num_beams, stop, **options):
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=MAX_NEW, do_sample=False, num_beams=num_beams,
                                    eos_token_id=[stop], pad_token_id=PAD, **options)
        seq = out[0, len(prompt):].tolist()
        outputs.append(seq[:-1] if seq and seq[-1] == stop else seq)
    return outputs


@pytest.mark.parametrize("case", ["llama_gqa2", "qwen2_tied_yarn", "mistral_window5"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_cached_decoding_matches_hf_generate(case, num_beams, decoders):
    """Our prompts decode in one left-padded batch, HF's one at a time: the same token ids."""
    hf_model, model, params, stop = decoders(case)
    prompts = _prompts()
    reference = _hf_generate(hf_model, prompts, num_beams, stop,
                             **({} if num_beams == 1 else dict(length_penalty=0.9)))
    if num_beams == 1:
        ours = generate.greedy_search(model.apply, {"params": params}, prompts,
                                      max_new_tokens=MAX_NEW, eos_ids=stop, pad_id=PAD)
    else:
        ours = generate.beam_search(model.apply, {"params": params}, prompts, num_beams=num_beams,
                                    length_penalty=0.9, max_new_tokens=MAX_NEW, eos_ids=stop,
                                    pad_id=PAD)
    assert ours == reference
    assert any(len(seq) < MAX_NEW for seq in reference)  # some stop early, by the stop id


def test_cached_forward_matches_full_forward(decoders):
    """Prefill a left-padded batch, then one token at a time, through the sliding window."""
    _, model, params, _ = decoders("mistral_window5")
    ids, mask = generate.left_pad(_prompts()[:4], 13, PAD)
    extra = np.random.default_rng(1).integers(3, 300, size=(4, 4))
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = model.apply({"params": params}, full_ids, full_mask, positions).logits
    out = jax.jit(functools.partial(model.apply, cache=17))(
        {"params": params}, ids, full_mask, positions[:, :13])
    steps = [out.logits]
    step = jax.jit(model.apply)
    for t in range(13, 17):
        out = step({"params": params}, full_ids[:, t:t + 1], full_mask, positions[:, t:t + 1],
                   cache=out.cache)
        steps.append(out.logits)
    keep = full_mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[keep], np.asarray(full)[keep],
                               atol=1e-4, rtol=0)
    assert out.cache.keys[0].shape == (4, 17, 2, 8)  # K = 2 heads per slot, not N = 4
