"""GPT-2 + LoRA on the E2E NLG challenge, with the LoRA paper's hyperparameters.

    python -m lora_jax.train --config configs/e2e.py:model=gpt2-medium --workdir DIR

Arguments: model (gpt2-medium, gpt2-large, gpt2-xl, tiny = random 2-layer GPT-2 for smoke runs).
gpt2-xl (1.5B, not in the paper's E2E table) holds its frozen weights in bf16, sharded over all
devices (mesh data=1, fsdp=-1), and recomputes blocks in the backward pass.

Hyperparameters: Hu et al. 2021, Table 11: AdamW (beta2 0.999 as the official scripts), weight
decay 0.01, LoRA dropout 0.1, batch 8, 5 epochs, 500 warmup steps then linear decay, label
smoothing 0.1, lr 2e-4, LoRA r=4 with alpha 32 on the query and value slices of the fused c_attn
(k untouched, as loralib's MergedLinear), sequence length 512 and the loss on the reference tokens
only. Decoding: beam 10, length penalty 0.9 (the paper; the repo's README says 0.8),
no_repeat_ngram_size 4, 64 new tokens.

`--config.data.packing=True` packs several training examples into each row of max_len (512)
tokens instead of padding each alone (lora_jax/data/packing.py); batch_size then counts packed
rows of up to 512 tokens, not examples, so adjust it (and the steps) to keep the paper's setting.
"""

import ml_collections

from lora_jax.config import TINY_MODELS, base_config, parse_arg

MODELS = {"gpt2-medium": "openai-community/gpt2-medium",
          "gpt2-large": "openai-community/gpt2-large",
          "gpt2-xl": "openai-community/gpt2-xl", "tiny": ""}
# GPT-2 XL's shape, for random-weight runs at full size (model.name='') and shape-only tests.
GPT2_XL = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_layer=48, n_embd=1600,
               n_head=25)


def get_config(arg=None):
    args = parse_arg(arg, model="gpt2-medium")
    if args.model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}")
    c = base_config()
    c.model.name = MODELS[args.model]
    c.model.random_init = GPT2_XL if args.model == "gpt2-xl" else TINY_MODELS["gpt2"]
    c.model.task = None
    c.model.tokenizer = "gpt2"  # the BPE files under $LORA_JAX_DATA_DIR/tokenizers/gpt2
    c.data.task = "e2e"
    c.data.max_len = 512
    c.data.batch_size = 8
    c.data.eval_batch_size = 16
    c.lora.targets = (r"attn/c_attn",)
    c.lora.split_outputs = ml_collections.ConfigDict({r"attn/c_attn": (True, False, True)})
    c.lora.rank = 4
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.lora.also_train = ()
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.01
    c.optim.b2 = 0.999
    c.optim.label_smoothing = 0.1
    c.train.epochs = 5
    if args.model == "gpt2-xl":
        # 1.5B parameters: frozen weights in bf16 and sharded over every device (FSDP), bf16
        # compute, blocks recomputed in the backward pass; adapters and AdamW stay fp32.
        c.model.dtype = c.model.param_dtype = "bfloat16"
        c.model.remat = True
        c.mesh.data = 1
        c.mesh.fsdp = -1
    c.train.eval_every = 5000
    c.train.checkpoint_every = 1000

    c.generate = ml_collections.ConfigDict()
    c.generate.beam_size = 10
    c.generate.length_penalty = 0.9
    c.generate.no_repeat_ngram_size = 4
    c.generate.max_new_tokens = 64
    return c
