"""Table 3 in miniature: E2E NLG on SmolLM2-135M-Instruct, every method, with forgetting and
intruder dimensions.

    bash experiments/table3.sh                     # trains, decodes and scores every row
    python -m experiments.table3 --config configs/table3.py --out runs/table3 --only REGEX

Arguments: seeds (runs of the rows that get several; default 3), steps (training steps of every
trained row; default STEPS), beam (beams of every row's decoding; default BEAM), model
(smollm2-135m, or tiny: a random 2-layer Llama with GPT-2's tokenizer, a few rows' data and MRs,
for smoke tests of the pipeline; without the quantized rows, which quantize a loaded file).

Returns a ConfigDict with
  base:    configs/e2e.py:model=smollm2-135m (the paper's LoRA on Wq, Wv: r=4, alpha 32, dropout
           0.1, AdamW, batch 8, label smoothing 0.1, lr 2e-4), cut to `steps` steps with a
           warmup of WARMUP_FRACTION of them (the paper's 500 warmup steps would outlast the
           run), and decoding with `beam` beams;
  runs:    one dict per (row, seed): {name, method, rank, targets, seed, train, overrides}; a
           row with train=False is scored as built (the zero-shot floor: LoRA's B starts at 0,
           so the model is the base's);
  scoring: split (test: 630 MRs), heldout (the general text forgetting is measured on),
           intruder_rows (the rows whose matrices are checked for intruder dimensions).

Rows (Hu et al. 2021, Table 3; the budgets the paper gives GPT-2 M scaled to SmolLM2 where
they are a fraction of the model):
  zero_shot  the base model through its chat template, untrained (the floor)
  full       FT, every weight, lr 5e-5 (Li & Liang 2021's E2E rate, as configs/e2e.py)
  lora       the paper's setting: Wq, Wv, r=4, alpha 32, dropout 0.1 (230,400 trained)
  lora_all   every linear layer (q, k, v, o, gate, up, down), r=8, alpha 16: today's practice
  qlora      lora_all over the nf4 base (QLoRA)
  qlora_gguf lora_all over the GGUF file's own Q4_1 blocks
  dora       DoRA in the paper's LoRA setting
  adapter_l  Adapter^L at about LoRA's budget (bottleneck 6; the paper's 0.37M row)
  adapter_h  Adapter^H at the paper's 3.1% of the model (11.09M of GPT-2 M's 354.92M;
             bottleneck 56 on SmolLM2: about 3.9M, 2.9%), lr 1e-4 as configs/e2e.py
  prelayer   PreLayer (prefix tuning) with l_p=10, l_i=4, lr 8e-5 as configs/e2e.py, started
             from the base model's activations of the first training row (its default)
  preembed   PreEmbed with l_p=10, l_i=4, lr 8e-5
"""

import ml_collections

from lora_jax.config import TINY_MODELS, load_config, method_overrides, parse_arg, set_dotted

STEPS = 100  # see experiments/README.md, "Table 3 in miniature": the sizing probes
WARMUP_FRACTION = 0.1
BEAM = 2
SEEDED_ROWS = ("full", "lora", "lora_all")  # the rows the issue asks 3 seeds of
# Every linear layer of a Llama block, as LoRA target patterns.
ALL_LINEAR = tuple(rf"/{m}/kernel" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"))
LORA_ALL = {"method.lora.targets": ALL_LINEAR, "method.lora.rank": 8, "method.lora.alpha": 16.0}
ROWS = {
    "zero_shot": {},
    "full": method_overrides("full", 5e-5),
    "lora": {},
    "lora_all": LORA_ALL,
    "qlora": {**LORA_ALL, "model.quantize": "nf4"},
    "qlora_gguf": {**LORA_ALL, "model.quantize": "gguf"},
    "dora": method_overrides("dora"),
    "adapter_l": method_overrides("adapter_l", 1e-4, bottleneck=6),
    "adapter_h": method_overrides("adapter_h", 1e-4, bottleneck=56),
    "prelayer": method_overrides("prelayer", 8e-5, prefix=10, infix=4),
    "preembed": method_overrides("preembed", 8e-5, prefix=10, infix=4),
}
# General text none of the rows trains on, read as plain text (`lora_jax.analysis.forgetting`):
# the GLUE SST-2 and CoLA dev sentences.
HELDOUT = ("sst2:dev", "cola:dev")
INTRUDER_ROWS = ("full", "lora", "lora_all", "qlora", "qlora_gguf", "dora")


def get_config(arg=None):
    args = parse_arg(arg, seeds=3, steps=STEPS, beam=BEAM, model="smollm2-135m")
    if args.model not in ("smollm2-135m", "tiny"):
        raise ValueError(f"model must be smollm2-135m or tiny, got {args.model!r}")
    base = load_config("configs/e2e.py:model=smollm2-135m")
    tiny = args.model == "tiny"
    if tiny:
        base.model.name, base.model.tokenizer = "", "gpt2"
        base.model.random_init = TINY_MODELS["llama"]
        base.data.max_train_examples, base.data.max_len = 64, 128
    base.train.max_steps = args.steps
    base.optim.warmup_steps = max(1, round(WARMUP_FRACTION * args.steps))
    base.train.eval_every = args.steps  # the dev loss once, at the end
    base.train.checkpoint_every = 50
    base.data.max_eval_examples = 16 if tiny else 200
    base.generate.beam_size = args.beam

    c = ml_collections.ConfigDict()
    c.study = "table3"
    c.base = base
    # Seed 0 of every row first, then the other seeds: a table half done has every row.
    c.runs = tuple({"name": f"method={row},seed={seed}", "method": row, "rank": 0, "targets": "",
                    "seed": seed, "train": row != "zero_shot",
                    "overrides": {**overrides, "seed": seed}}
                   for seed in range(args.seeds) for row, overrides in ROWS.items()
                   if (seed == 0 or row in SEEDED_ROWS)
                   and not (tiny and "model.quantize" in overrides))  # random weights: no file
    c.scoring = ml_collections.ConfigDict()
    c.scoring.split = "test"
    c.scoring.heldout = HELDOUT
    c.scoring.max_heldout = 8 if tiny else 0  # per source; 0: all of them
    c.scoring.max_examples = 6 if tiny else 0  # MRs decoded; 0: all of the split's
    c.scoring.decode_batch_size = 32
    c.scoring.intruder_rows = INTRUDER_ROWS
    for row in c.runs:  # every override names a field the base has (a typo fails here)
        probe = base.copy_and_resolve_references()
        for dotted, value in row["overrides"].items():
            set_dotted(probe, dotted, value)
    return c
