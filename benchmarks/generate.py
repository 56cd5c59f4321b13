"""Beam-search throughput: lora_jax's KV-cached beam search against transformers' generate.

Both decode the same prompts with the same random weights of a GPT-2 shape (saved once by
transformers, loaded by lora_jax), beam 10, length penalty 0.9, no_repeat_ngram_size 4: the E2E
settings of the paper.

    python benchmarks/generate.py --size medium --prompts 8 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}
EOS = 50256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=10)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from lora_jax import generate
    from lora_jax.interop.hub import load_pretrained

    n_layer, n_embd, n_head = SIZES[args.size]
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, params, _ = load_pretrained(tmp)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, args.prompts)
    prompts = [rng.integers(0, EOS, n).tolist() for n in lengths]
    options = dict(num_beams=args.beams, length_penalty=0.9, no_repeat_ngram_size=4,
                   max_new_tokens=args.max_new_tokens)

    def ours():
        return generate.beam_search(model.apply, {"params": params}, prompts, eos_ids=EOS,
                                    pad_id=EOS, batch_size=args.prompts, **options)

    ours()  # compile
    start = time.perf_counter()
    ours_ids = ours()
    ours_s = time.perf_counter() - start

    torch.set_grad_enabled(False)
    width = max(lengths)  # the same batch for transformers, left-padded as generation wants
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=EOS,
                      pad_token_id=EOS, **options)
    hf_s = time.perf_counter() - start
    hf_ids = [row[width:].tolist() for row in out]
    same = sum(a == [t for t in b if t != EOS] for a, b in zip(ours_ids, hf_ids))

    device = jax.devices()[0].device_kind
    print(f"GPT-2 {args.size} shape, {args.prompts} prompts of {args.prompt_len // 2}-"
          f"{args.prompt_len} tokens, beam {args.beams}, {args.max_new_tokens} new tokens")
    print(f"lora_jax ({device}): {args.prompts / ours_s:.2f} sequences/s ({ours_s:.1f} s)")
    print(f"transformers generate (torch {torch.__version__}, cpu): "
          f"{args.prompts / hf_s:.2f} sequences/s ({hf_s:.1f} s)")
    print(f"ratio {hf_s / ours_s:.2f}x; identical outputs for {same}/{args.prompts} prompts")


if __name__ == "__main__":
    main()
