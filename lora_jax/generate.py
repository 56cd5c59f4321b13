"""KV-cached greedy and beam search for our causal language models (`GPT2LMHeadModel` and the
Llama family's `LlamaForCausalLM`: Llama, Mistral, Qwen2), token for token as HF's `generate`.

The prompts of a batch are left-padded to one width W; positions come from the attention mask, so a
padded prompt decodes exactly as it would alone. The prompt is run once (prefill) into a cache of
W + max_new_tokens slots, then each step feeds one token per row. Each search is one jitted
`lax.while_loop` over static shapes, compiled once per (apply_fn, batch, W, options).

The model is reached only through `apply_fn(params, input_ids, attention_mask=..., position_ids=...,
cache=...)`, the calling convention of `model.apply`, so the same search runs plain params or LoRA
adapters kept apart:

    ids = beam_search(model.apply, {"params": params}, prompts, num_beams=10, ...)
    adapted = lora.adapt(model.apply, spec)
    apply_fn = lambda p, *args, **kwargs: adapted(p[0], p[1], *args, **kwargs)
    ids = beam_search(apply_fn, (frozen, trainable), prompts, num_beams=10, ...)

`apply_fn` is a static jit argument (a lambda or partial compares by identity): make it once and
reuse it, and keep the weights in `params` (traced) rather than closed over (baked into the
program).

Both searches return each prompt's continuation without the prompt, without padding, and without
the stop token that ended it (HF's output is prompt + continuation + that stop token). Positions
reach prompt length + max_new_tokens - 1, which must stay below the model's maximum position
(GPT-2's n_positions: JAX clamps an out-of-range embedding lookup silently).
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[..., object]  # returns .logits and .cache (GPT2Output, LlamaOutput)

# HF's "very large negative" score: marks candidates that may not be chosen, without creating NaNs.
_NEG = -1.0e9
# Prompt widths are rounded up to a multiple of this, so similar batches share a compilation.
_WIDTH_MULTIPLE = 8


def greedy_search(
    apply_fn: ApplyFn,
    params: object,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: int | Sequence[int],
    pad_id: int | None = None,
    no_repeat_ngram_size: int = 0,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Greedy decoding, as HF's `generate(do_sample=False, num_beams=1)`.

    Args:
      apply_fn: `model.apply`-like: apply_fn(params, input_ids, attention_mask=, position_ids=,
        cache=) -> output with `.logits` and `.cache` (see the module docstring for LoRA).
      params: its first argument, e.g. {"params": params}.
      prompts: token ids per prompt, each non-empty, of any lengths.
      max_new_tokens: tokens to generate at most per prompt.
      eos_ids: stop token(s), e.g. a model family's `stop_ids`.
      pad_id: the token under padding (masked, never in the output); default the first stop id.
      no_repeat_ngram_size: if n > 0, never complete an n-gram already in prompt + continuation.
      batch_size: prompts per jitted call (the last batch is padded to it); None: all at once.

    Returns:
      The continuation of each prompt, without its stop token.
    """
    eos = _as_ids(eos_ids)
    run = functools.partial(_greedy, apply_fn, max_new_tokens=max_new_tokens, eos_ids=eos,
                            ngram=no_repeat_ngram_size)
    return _decode_batches(run, params, prompts, max_new_tokens, eos, pad_id, batch_size)


def beam_search(
    apply_fn: ApplyFn,
    params: object,
    prompts: Sequence[Sequence[int]],
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: int | Sequence[int],
    pad_id: int | None = None,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Beam search, as HF's `generate(num_beams=k, do_sample=False, early_stopping=False)`.

    Each step keeps the best max(2, 1 + len(eos_ids)) * k continuations of all beams (summed
    log-softmax scores). Of those, the first k that end in a stop token (or reach max_new_tokens)
    join the k finished hypotheses, scored sum_logprobs / generated_len ** length_penalty (the stop
    token counts in the length); the best k others run on. A prompt stops once all k finished slots
    are full and the best running beam, scored at its current length, cannot beat the worst
    finished one (HF's `early_stopping=False` heuristic), or at max_new_tokens.

    Args:
      apply_fn, params, prompts, max_new_tokens, eos_ids, pad_id, no_repeat_ngram_size,
        batch_size: as in `greedy_search`.
      num_beams: beams k per prompt (1 runs this search with one beam; HF would switch to greedy).
      length_penalty: exponent on the length; > 0 favours longer hypotheses.

    Returns:
      The best finished hypothesis of each prompt, without its stop token.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    eos = _as_ids(eos_ids)
    # HF divides float32 scores by the Python float n ** length_penalty, rounded to float32.
    divisors = np.array([n**length_penalty for n in range(1, max_new_tokens + 1)], np.float32)
    run = functools.partial(_beam, apply_fn, divisors=divisors, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, eos_ids=eos, ngram=no_repeat_ngram_size)
    return _decode_batches(run, params, prompts, max_new_tokens, eos, pad_id, batch_size)


def left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int):
    """Prompts right-aligned in [N, width] int32 arrays.

    Returns:
      (input_ids, attention_mask), the mask 0 over the padding.
    """
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _as_ids(eos_ids: int | Sequence[int]) -> tuple[int, ...]:
    return (int(eos_ids),) if np.isscalar(eos_ids) else tuple(int(i) for i in eos_ids)


def _decode_batches(run, params, prompts, max_new_tokens, eos, pad_id, batch_size):
    """Pads and batches the prompts, runs the jitted search, and crops its outputs."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    empty = [i for i, p in enumerate(prompts) if not len(p)]
    if empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token")
    if not prompts:
        return []
    pad_id = (eos[0] if eos else 0) if pad_id is None else pad_id
    width = -(-max(len(p) for p in prompts) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
    batch_size = batch_size or len(prompts)
    pending = []  # dispatch every batch before fetching any, so host and device overlap
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        chunk += [[pad_id]] * (batch_size - len(chunk))  # a fixed shape: one compilation
        ids, mask = left_pad(chunk, width, pad_id)
        pending.append((len(prompts[start:start + batch_size]), run(params, ids, mask)))
    outputs = []
    for n, (tokens, lengths) in pending:
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        for row in range(n):
            seq = tokens[row, :lengths[row]].tolist()
            outputs.append(seq[:-1] if seq and seq[-1] in eos else seq)
    return outputs


def _positions(mask: jax.Array) -> jax.Array:
    """Position ids of left-padded rows: 0 at each row's first real token (HF's rule)."""
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def _is_stop(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    return functools.reduce(jnp.logical_or, [tokens == e for e in eos_ids],
                            jnp.zeros(tokens.shape, bool))


def _banned_ngrams(seq: jax.Array, first: jax.Array, end: jax.Array, n: int,
                   vocab: int) -> jax.Array:
    """[R, vocab] True for tokens that would repeat an n-gram of seq[r, first[r]:end].

    As HF's NoRepeatNGramLogitsProcessor: every n-gram whose first n - 1 tokens equal the last
    n - 1 tokens bans its last token.

    Args:
      seq: [R, L] token buffer.
      first: [R] the first real slot of each row (after its left padding).
      end: scalar, the number of slots filled, the same for every row.
      n: the n-gram size.
      vocab: the logits' size.
    """
    rows, length = seq.shape
    if n > length:
        return jnp.zeros((rows, vocab), bool)
    count = length - n + 1
    windows = jnp.stack([seq[:, j:j + count] for j in range(n)], axis=-1)  # [R, count, n]
    start = jnp.arange(count)
    inside = (start[None, :] >= first[:, None]) & (start[None, :] + n <= end)
    # Where end < n - 1 the slice start is clamped, but then no window is inside either.
    suffix = jax.lax.dynamic_slice_in_dim(seq, end - (n - 1), n - 1, axis=1)
    hit = inside & jnp.all(windows[..., :-1] == suffix[:, None, :], axis=-1)
    return jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], windows[..., -1]].max(hit)


def _prefill(apply_fn, params, ids, mask, max_new_tokens):
    """Runs the prompts into a fresh cache; returns (last logits [B, V], cache, slot mask, lengths).

    Generated tokens are real from the start in the slot mask: causality hides the later ones.
    """
    batch = ids.shape[0]
    slots = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    out = apply_fn(params, ids, attention_mask=slots, position_ids=_positions(mask),
                   cache=ids.shape[1] + max_new_tokens)
    return out.logits[:, -1].astype(jnp.float32), out.cache, slots, jnp.sum(mask, axis=1)


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens", "eos_ids", "ngram"))
def _greedy(apply_fn, params, ids, mask, *, max_new_tokens, eos_ids, ngram):
    """Returns (generated tokens [B, max_new_tokens], lengths [B] up to and with the stop token)."""
    batch, width = ids.shape
    logits, cache, slots, lengths = _prefill(apply_fn, params, ids, mask, max_new_tokens)
    seq = jnp.concatenate([ids, jnp.zeros((batch, max_new_tokens), ids.dtype)], axis=1)
    first = width - lengths

    def body(state):
        step, seq, done, n_out, cache, logits = state
        if ngram:
            banned = _banned_ngrams(seq, first, width + step, ngram, logits.shape[-1])
            logits = jnp.where(banned, -jnp.inf, logits)
        token = jnp.argmax(logits, axis=-1).astype(seq.dtype)
        seq = seq.at[:, width + step].set(token)
        n_out = jnp.where(done, n_out, step + 1)
        done = done | _is_stop(token, eos_ids)
        out = apply_fn(params, token[:, None], attention_mask=slots,
                       position_ids=(lengths + step)[:, None], cache=cache)
        return step + 1, seq, done, n_out, out.cache, out.logits[:, -1].astype(jnp.float32)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    zeros = jnp.zeros(batch, jnp.int32)
    state = (jnp.int32(0), seq, jnp.zeros(batch, bool), zeros, cache, logits)
    _, seq, _, n_out, _, _ = jax.lax.while_loop(cond, body, state)
    return seq[:, width:], n_out


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, j], ...] for x [B, M, ...] and index [B, J]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _cache_rows(cache, rows: jax.Array):
    """The cache of the given rows (beams), all sharing the cache's index."""
    return cache._replace(keys=tuple(x[rows] for x in cache.keys),
                          values=tuple(x[rows] for x in cache.values))


class _Finished(NamedTuple):
    """The k best finished hypotheses of each prompt, best first."""

    tokens: jax.Array  # [B, k, max_new_tokens] generated tokens, the stop token included
    scores: jax.Array  # [B, k] sum of log-probs / length ** length_penalty; -1e9 if empty
    done: jax.Array  # [B, k] whether the slot holds a hypothesis
    length: jax.Array  # [B, k] number of generated tokens


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_beams", "max_new_tokens", "eos_ids",
                                             "ngram"))
def _beam(apply_fn, params, ids, mask, *, divisors, num_beams, max_new_tokens, eos_ids, ngram):
    """Returns (best hypothesis' tokens [B, max_new_tokens], its length [B], stop token included).

    Follows HF's `_beam_search` step by step (see `beam_search`); names note HF's where they differ.
    """
    batch, width = ids.shape
    k = num_beams
    keep = max(2, 1 + len(eos_ids)) * k  # HF's beams_to_keep: always >= k candidates not stopping
    logits, cache, slots, lengths = _prefill(apply_fn, params, ids, mask, max_new_tokens)
    # Every beam starts as the prompt; only beam 0 may extend it at first (the others score -1e9).
    logits, slots, lengths = (jnp.repeat(x, k, axis=0) for x in (logits, slots, lengths))
    cache = _cache_rows(cache, jnp.repeat(jnp.arange(batch), k))
    seq = jnp.concatenate([ids, jnp.zeros((batch, max_new_tokens), ids.dtype)], axis=1)
    seq = jnp.repeat(seq[:, None], k, axis=1)  # running sequences [B, k, W + max_new]
    first = width - lengths
    vocab = logits.shape[-1]

    def body(state):
        step, seq, scores, fin, open_, cache, logits = state
        logp = jax.nn.log_softmax(logits, axis=-1)
        if ngram:
            banned = _banned_ngrams(seq.reshape(batch * k, -1), first, width + step, ngram, vocab)
            logp = jnp.where(banned, -jnp.inf, logp)
        total = (logp.reshape(batch, k, vocab) + scores[:, :, None]).reshape(batch, k * vocab)
        top_scores, top = jax.lax.top_k(total, keep)
        source, token = top // vocab, (top % vocab).astype(seq.dtype)
        candidates = _take(seq, source).at[:, :, width + step].set(token)
        stops = _is_stop(token, eos_ids) | (step + 1 >= max_new_tokens)

        # The k best candidates that did not stop run on.
        running = top_scores + stops.astype(jnp.float32) * _NEG
        scores, chosen = jax.lax.top_k(running, k)
        seq, source = _take(candidates, chosen), _take(source, chosen)

        # Among the first k candidates, those that stopped may replace worse finished hypotheses,
        # unless this prompt is already decided.
        just_done = stops & (jnp.arange(keep) < k)[None, :]
        final = top_scores / divisors[step]
        final = final + (~open_)[:, None].astype(jnp.float32) * _NEG
        final = final + (~just_done).astype(jnp.float32) * _NEG
        length = jnp.full((batch, keep), step + 1)
        new = _Finished(candidates[:, :, width:], final, just_done, length)
        _, best = jax.lax.top_k(jnp.concatenate([fin.scores, new.scores], axis=1), k)
        fin = jax.tree.map(lambda a, b: _take(jnp.concatenate([a, b], axis=1), best), fin, new)

        # HF's early_stopping=False test: can the best running beam, at its current length,
        # still beat the worst finished one? (Sticky: once decided, a prompt stays decided.)
        best_running = scores[:, :1] / divisors[step]
        worst_final = jnp.where(fin.done, jnp.min(fin.scores, axis=1, keepdims=True), _NEG)
        open_ = open_ & jnp.any(best_running > worst_final, axis=1)

        cache = _cache_rows(cache, (source + jnp.arange(batch)[:, None] * k).reshape(-1))
        out = apply_fn(params, seq[:, :, width + step].reshape(-1, 1), attention_mask=slots,
                       position_ids=(lengths + step)[:, None], cache=cache)
        logits = out.logits[:, -1].astype(jnp.float32)
        return step + 1, seq, scores, fin, open_, out.cache, logits

    def cond(state):
        step, *_, open_, _, _ = state
        return (step < max_new_tokens) & jnp.any(open_)

    scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_NEG)
    fin = _Finished(
        jnp.zeros((batch, k, max_new_tokens), ids.dtype),
        jnp.full((batch, k), _NEG, jnp.float32),
        jnp.zeros((batch, k), bool),
        jnp.zeros((batch, k), jnp.int32),
    )
    state = (jnp.int32(0), seq, scores, fin, jnp.ones(batch, bool), cache, logits)
    fin = jax.lax.while_loop(cond, body, state)[3]
    return fin.tokens[:, 0], fin.length[:, 0]
