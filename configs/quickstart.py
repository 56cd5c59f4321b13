"""The README's main job: LoRA on the real all-MiniLM-L6-v2 for SST-2, on a CPU in minutes.

    python -m lora_jax.train --config configs/quickstart.py --workdir runs/quickstart

LoRA r=8 (alpha 16) on query and value plus a fresh classifier head, batch 32, lr 1e-3, on the
local GLUE files; evaluates on the 872 dev sentences and exports the adapters in PEFT's format.
"""

from lora_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.name = "minilm"
    c.model.task = "classification"
    c.model.num_labels = 2
    c.data.task = "sst2"
    c.data.max_len = 64  # SST-2 sentences are short: 64 tokens cover all but a handful
    c.data.batch_size = 32
    c.method.lora.targets = (r"/query/kernel", r"/value/kernel")
    c.method.lora.rank = 8
    c.method.lora.alpha = 16.0
    c.method.also_train = (r"^classifier/",)
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.06
    c.optim.weight_decay = 0.01
    c.train.max_steps = 1000
    c.train.log_every = 20
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    return c
