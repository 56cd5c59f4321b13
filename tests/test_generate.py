"""Greedy and beam search against transformers' `generate` on torch, with the same random GPT-2.

HF decodes each prompt alone (no padding); we decode them all in one left-padded batch, so equal ids
also show that padding changes nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax import generate
from lora_jax.methods import lora
from lora_jax.interop.hub import load_pretrained
from lora_jax.models.gpt2 import GPT2Output, KVCache

VOCAB, MAX_NEW = 500, 20
# Stop ids that this model generates now and then (checked below: some outputs stop, some don't).
STOP, STOPS = 7, (7, 479)
# Tokens this model generates most often: as prompts they make its n-grams get banned; as four stop
# ids they crowd the top candidates of beam search.
FREQUENT = (415, 303, 14, 215, 332, 433, 7, 285)
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """HF's beam search steps are tiny here: more torch threads only spin, and when the CPUs are
    shared with other processes that slows it down some 30 times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(HF torch model, our model, our params) of one tiny random GPT-2, through safetensors."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=PAD, eos_token_id=PAD,
    )
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(config)
    # Large noise makes the next-token distributions peaked and varied: no near-ties between
    # candidates (which float rounding could order either way) and no endless repetition.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("gpt2")
    hf_model.eval().save_pretrained(path)
    model, params, _ = load_pretrained(path)
    return hf_model, model, params


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """24 random prompts of 1 to 20 tokens, then 8 of 4 to 20 tokens drawn from FREQUENT."""
    rng = np.random.default_rng(0)
    lengths = [1, 20, 2, 13] + rng.integers(1, 21, size=20).tolist()
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]
    return prompts + [rng.choice(FREQUENT, size=n).tolist() for n in rng.integers(4, 21, size=8)]


def _hf_generate(hf_model, prompts, *, eos_ids, num_beams=1, **options) -> list[list[int]]:
    """HF's continuations, one prompt at a time, stop token kept."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                num_beams=num_beams, eos_token_id=list(eos_ids), pad_token_id=PAD, **options,
            )
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def _strip_stop(seq: list[int], eos_ids) -> list[int]:
    return seq[:-1] if seq and seq[-1] in eos_ids else seq


def _ours(apply_fn, params, prompts, *, num_beams=1, **options) -> list[list[int]]:
    if num_beams == 1:
        return generate.greedy_search(apply_fn, params, prompts, max_new_tokens=MAX_NEW,
                                      pad_id=PAD, **options)
    return generate.beam_search(apply_fn, params, prompts, num_beams=num_beams,
                                max_new_tokens=MAX_NEW, pad_id=PAD, **options)


CASES = {
    "greedy": dict(eos_ids=(STOP,)),
    "greedy_ngram2_two_stops": dict(eos_ids=STOPS, no_repeat_ngram_size=2),
    "beam4": dict(num_beams=4, eos_ids=(STOP,)),
    "beam10_lp0.9_ngram4_two_stops": dict(
        num_beams=10, eos_ids=STOPS, length_penalty=0.9, no_repeat_ngram_size=4
    ),
    "beam2_ngram2_four_stops": dict(num_beams=2, eos_ids=FREQUENT[:4], no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_hf_generate(gpt2, prompts, case):
    hf_model, model, params = gpt2
    options = CASES[case]
    reference = _hf_generate(hf_model, prompts, **options)
    ours = _ours(model.apply, {"params": params}, prompts, **options)
    assert ours == [_strip_stop(seq, options["eos_ids"]) for seq in reference]
    # Both ways of ending are exercised: by a stop token, and at max_new_tokens (except with four
    # frequent stop ids, where every prompt soon stops).
    stopped = [seq[-1] in options["eos_ids"] for seq in reference]
    assert any(stopped)
    assert not all(stopped) or len(options["eos_ids"]) == 4


def test_cached_forward_matches_full_forward(gpt2, prompts):
    """Prefill a left-padded batch, then feed one token at a time: the logits of a full pass."""
    _, model, params = gpt2
    ids, mask = generate.left_pad(prompts[:4], 20, PAD)
    extra = np.random.default_rng(1).integers(1, VOCAB, size=(4, 3))
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = model.apply({"params": params}, full_ids, full_mask, positions).logits

    prefill = jax.jit(functools.partial(model.apply, cache=23))
    step = jax.jit(model.apply)
    out = prefill({"params": params}, ids, full_mask, positions[:, :20])
    steps = [out.logits]
    for t in range(20, 23):
        out = step({"params": params}, full_ids[:, t:t + 1], full_mask, positions[:, t:t + 1],
                   cache=out.cache)
        steps.append(out.logits)
    cached = np.concatenate(steps, axis=1)
    keep = full_mask.astype(bool)
    # The whole-model tolerance: with weights of size ~0.3 the logits reach ~10, and the very same
    # forward run batched or row by row already differs by ~2e-5 in float32.
    np.testing.assert_allclose(cached[keep], np.asarray(full)[keep], atol=1e-4, rtol=0)


def _bigram_table() -> np.ndarray:
    """Next-token log-probabilities [VOCAB, VOCAB] given the last token, for a 2-beam search from
    prompt [0] with stop ids 4 and 5 (sums of log-probs in brackets):

      step 1: the beams are 1 (-0.69) and 2 (-0.71).
      step 2: the best candidates are 1 4 (stop, -1.29), 1 3 (-1.51), 2 4 (stop), 2 5 (stop),
              then 2 6 (-1.92). The best 2k = 4 hold one candidate that did not stop; HF keeps 3k
              for two stop ids, so 2 6 runs on as the second beam.
      step 3: 2 6 4 (stop) scores -1.93 / 3 = -0.642 and beats 1 4 at -1.29 / 2 = -0.646.

    Keeping 2k candidates only, the answer would be 1 (4) instead of 2 6 (4).
    """
    rows = {
        0: {1: 0.5, 2: 0.49},
        1: {4: 0.55, 3: 0.44},
        2: {4: 0.36, 5: 0.33, 6: 0.30},
        3: {7: 0.3, 8: 0.2, 9: 0.15, 4: 0.05, 5: 0.04},
        6: {4: 0.99},
    }
    probs = np.full((VOCAB, VOCAB), 1.0 / VOCAB)
    for token, row in rows.items():
        rest = (1.0 - sum(row.values())) / (VOCAB - len(row))
        probs[token] = rest
        probs[token, list(row)] = list(row.values())
    return np.log(probs).astype(np.float32)


def test_beam_keeps_enough_candidates_for_several_stop_ids(gpt2):
    """HF keeps max(2, 1 + len(eos_ids)) * num_beams candidates per step (see `_bigram_table`).

    HF runs with its next-token scores replaced by the table (through a logits processor), we run
    a bigram model with the table as logits."""
    hf_model, _, _ = gpt2
    table = _bigram_table()

    class Bigram(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return torch.from_numpy(table)[input_ids[:, -1]]

    def bigram_apply(table, input_ids, attention_mask=None, position_ids=None, cache=None):
        if isinstance(cache, int):  # a cache only to carry the index (and be reordered)
            zeros = (jnp.zeros((input_ids.shape[0], cache, 1, 1)),)
            cache = KVCache(zeros, zeros, jnp.zeros((), jnp.int32))
        cache = cache._replace(index=cache.index + input_ids.shape[1])
        return GPT2Output(table[input_ids], None, cache)

    prompts = [[0], [9, 0]]  # 9 has a uniform row: the second prompt only adds padding
    options = dict(num_beams=2, eos_ids=(4, 5))
    ours = _ours(bigram_apply, jnp.asarray(table), prompts, **options)
    reference = _hf_generate(hf_model, prompts, logits_processor=[Bigram()], **options)
    assert reference == [[2, 6, 4], [2, 6, 4]]
    assert ours == [[2, 6], [2, 6]]


def test_cached_greedy_equals_uncached_argmax(gpt2, prompts):
    """Reference: re-run the whole sequence every step and take the argmax of its last logits."""
    _, model, params = gpt2
    width = max(map(len, prompts))
    ids, mask = generate.left_pad(prompts, width, PAD)
    ids, mask = (np.pad(x, ((0, 0), (0, MAX_NEW))) for x in (ids, mask))  # room for new tokens
    forward = jax.jit(lambda ids, mask: model.apply(
        {"params": params}, ids, mask, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)).logits)
    done = np.zeros(len(prompts), bool)
    reference = [[] for _ in prompts]
    for step in range(MAX_NEW):
        token = np.argmax(np.asarray(forward(ids, mask))[:, width + step - 1], axis=-1)
        ids[:, width + step], mask[:, width + step] = token, 1
        for row in np.flatnonzero(~done):
            done[row] = token[row] == STOP
            if not done[row]:
                reference[row].append(int(token[row]))
    ours = generate.greedy_search(model.apply, {"params": params}, prompts,
                                  max_new_tokens=MAX_NEW, eos_ids=STOP, pad_id=PAD)
    assert ours == reference
    assert done.any() and not done.all()


def test_lora_adapters_apart_equal_merged(gpt2, prompts):
    """The interception of nn.Dense reaches every cached step: adapters kept apart decode as the
    merged weights do, and differently from the base model."""
    _, model, params = gpt2
    spec = lora.LoraSpec(targets=(r"attn/c_attn", r"mlp/c_fc"), rank=4, alpha=8.0,
                         split_outputs={r"attn/c_attn": (True, False, True)})
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 100))
    trainable = jax.tree_util.tree_map_with_path(  # B is zero at init: give it values
        lambda path, x: 0.3 * jax.random.normal(next(keys), x.shape)
        if path[-1].key == lora.LORA_B else x,
        trainable,
    )
    merged = lora.merge(spec, frozen, trainable)
    adapted = lora.adapt(model.apply, spec)
    apart = lambda p, *args, **kwargs: adapted(p[0], p[1], *args, **kwargs)
    for options in (CASES["greedy"], CASES["beam4"]):
        kept_apart = _ours(apart, (frozen, trainable), prompts, **options)
        assert kept_apart == _ours(model.apply, {"params": merged}, prompts, **options)
        assert kept_apart != _ours(model.apply, {"params": params}, prompts, **options)


def test_batches_are_padded_to_one_shape(gpt2, prompts):
    """batch_size splits the prompts (the last batch padded with dummies): same ids."""
    _, model, params = gpt2
    run = functools.partial(generate.greedy_search, model.apply, {"params": params},
                            max_new_tokens=MAX_NEW, eos_ids=STOP, pad_id=PAD)
    assert run(prompts, batch_size=7) == run(prompts)


def test_empty_prompt_is_refused(gpt2):
    _, model, params = gpt2
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate.greedy_search(model.apply, {"params": params}, [[1], []], max_new_tokens=2,
                               eos_ids=STOP)
