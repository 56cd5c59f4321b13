"""LoRA ablations on a GLUE task: rank x adapted matrices (Table 6), which matrices (Table 5), seeds.

    python -m experiments.sweep --config configs/ablations.py:study=rank,task=sst2 --out DIR

Arguments: study (rank | targets | seeds | methods | grid), task (a GLUE task, default sst2, or
e2e), model (GLUE: minilm, tiny, roberta-base, roberta-large, default minilm; e2e: gpt2-medium,
gpt2-large, smollm2-135m, tiny, default gpt2-medium), seeds (runs per setting; default 1, and 3
for study=seeds), steps (> 0 sets train.max_steps, and on e2e a warmup of a tenth of them; 0
keeps the experiment config's epochs).

Returns a ConfigDict with
  base: configs/glue.py's config for task/model, the starting point of every run;
  runs: a tuple of dicts {name, rank, targets, seed, overrides}, where `overrides` maps dotted
    config fields ('method.lora.rank') to values; `experiments.sweep` applies them to `base`.
Run names read 'rank=4,targets=qv,seed=0'.

Studies:
  rank:    r in {1, 2, 4, 8, 64} x {Wq}, {Wq, Wv}, {Wq, Wk, Wv, Wo}          (Table 6, 15 settings)
  targets: Wq, Wk, Wv, Wo at r=8; (Wq, Wk), (Wq, Wv) at r=4; all four at r=2 (Table 5, 7 settings)
  seeds:   (Wq, Wv) at r=8                                                     (1 setting)
  grid:    r in {4, 8, 16, 32} x alpha in {16, 32, 64, 128} on (Wq, Wv): the grid practitioners
           search (16 settings); every member differs only in rank and alpha, so `--together`
           trains them as one program. Run names read 'rank=4,alpha=16,targets=qv,seed=0'.
  methods: LoRA and the paper's baselines with the experiment config's METHODS settings: on GLUE
           Table 2's (full, bitfit, adapter_h, adapter_p, adapter_d), on E2E Table 3's (full,
           top_layers, adapter_l, adapter_h, preembed, prelayer). Run names read
           'method=bitfit,seed=0'; a run's `method` names its METHODS entry.

Choices:
  - alpha stays fixed at the base config's value (8 for base-sized models) for every rank, as in
    the paper (Section 4.1: alpha is set to the first r tried and not tuned), so the scale alpha/r
    shrinks as r grows; with Adam this acts like rescaling the learning rate of the low-rank path.
  - model=minilm (all-MiniLM-L6-v2, 6 layers, width 384) uses batch 32, lr 1e-3 and max_len 64:
    a smaller model tolerates a larger learning rate, and GLUE single sentences (SST-2) rarely
    exceed 64 tokens, which makes a 15-run sweep affordable. Other models keep configs/glue.py's
    Table 9 hyperparameters.
  - Table 5 fixes the number of adapted parameters (r x number of matrices = 8) across settings.
  - GPT-2 (task=e2e, configs/e2e.py) fuses q, k and v into one c_attn projection: the adapted
    matrices among them become its `split_outputs` parts (each its own rank-r adapter, as
    loralib's MergedLinear), and Wo is attn/c_proj.
"""

import pathlib

import ml_collections

from lora_jax.config import load_config, parse_arg, set_dotted

# The encoder's attention projections (models/encoder.py), as LoRA target regexes.
MATRICES = {
    "q": r"/attention/self/query/kernel",
    "k": r"/attention/self/key/kernel",
    "v": r"/attention/self/value/kernel",
    "o": r"/attention/output/dense/kernel",
}
# The Llama family's attention projections (models/llama.py; SmolLM2-135M on e2e).
LLAMA_MATRICES = {m: rf"/self_attn/{m}_proj/kernel" for m in "qkvo"}
# GPT-2: q, k, v are the three output slices of the fused attn/c_attn; o is attn/c_proj (the
# MLP's c_proj is mlp/c_proj, which this pattern does not match).
GPT2_QKV = r"attn/c_attn"
GPT2_O = r"attn/c_proj"
RANKS = (1, 2, 4, 8, 64)
RANK_TARGETS = ("q", "qv", "qkvo")  # Table 6 rows
GRID_RANKS, GRID_ALPHAS = (4, 8, 16, 32), (16.0, 32.0, 64.0, 128.0)
TABLE_5 = (("q", 8), ("k", 8), ("v", 8), ("o", 8), ("qk", 4), ("qv", 4), ("qkvo", 2))
MINILM = {"data.batch_size": 32, "optim.lr": 1e-3, "data.max_len": 64}
PAIR_TASKS = ("mrpc", "rte", "stsb", "qnli", "qqp", "mnli")  # max_len 128 on MiniLM for pairs
# Table 2's budget comparison on MiniLM (6 blocks, width 384; head excluded): LoRA at the
# adapters' budget and an adapter at LoRA's. LoRA r=64 on Wq, Wv trains 589,824, Adapter^H
# (bottleneck 64) 605,184; Adapter^P at bottleneck 15 trains 71,514, LoRA r=8 73,728.
MATCHED_BUDGET = {
    "lora_r64": {"method.use": ("lora",), "method.lora.rank": 64},
    "adapter_p_r15": {"method.use": ("adapter_p",), "method.adapter_p.bottleneck": 15},
}
# On MiniLM every adapter and bias method trains at the miniature's lr 1e-3, as LoRA does: their
# papers' rates (1e-4 to 4e-4) are for full-length runs of base-sized models, and in a few hundred
# steps Adapter^P at 1e-4 stayed at the majority class on SST-2 (50.9%, 2 seeds of 250 steps).
# FT keeps its 2e-5 and VeRA its paper's 4e-3.
MINILM_METHOD_LR = {name: 1e-3 for name in
                    ("bitfit", "adapter_h", "adapter_l", "adapter_p", "adapter_d", "adapter_p_r15")}
# STS-B's regression head on MiniLM collapses to the mean score at lr 1e-3 (LoRA, 300 steps:
# dev Pearson 0.02, eval loss 2.49 = the scores' variance); at 4e-4, Table 9's RoBERTa-base rate
# for STS-B, it learns (Pearson 0.17 at 300 steps and rising). On that task every run at the
# miniature's rate (LoRA, its successors but VeRA, the adapters, BitFit) takes 4e-4 instead.
MINILM_TASK_LR = {"stsb": 4e-4}
STUDIES = ("rank", "targets", "seeds", "methods", "grid")


def settings(study: str) -> list[tuple[str, int]]:
    """The (targets, rank) settings a LoRA study covers, in table order."""
    if study == "rank":
        return [(t, r) for t in RANK_TARGETS for r in RANKS]
    if study == "targets":
        return list(TABLE_5)
    if study == "seeds":
        return [("qv", 8)]
    if study == "grid":
        return [("qv", r) for r in GRID_RANKS]
    raise ValueError(f"study={study!r}: expected one of {STUDIES}")


def target_overrides(targets: str, gpt2: bool, llama: bool = False) -> dict:
    """The lora.* overrides that adapt the matrices named in `targets` (e.g. 'qv')."""
    if llama:
        return {"method.lora.targets": tuple(LLAMA_MATRICES[m] for m in targets)}
    if not gpt2:
        return {"method.lora.targets": tuple(MATRICES[m] for m in targets)}
    patterns = ((GPT2_QKV,) if set(targets) & set("qkv") else ()) + ((GPT2_O,) if "o" in targets
                                                                      else ())
    parts = {GPT2_QKV: tuple(m in targets for m in "qkv")} if set(targets) & set("qkv") else {}
    return {"method.lora.targets": patterns, "method.lora.split_outputs": parts}


def run(targets: str, rank: int, seed: int, gpt2: bool = False, llama: bool = False,
        alpha: float | None = None) -> dict:
    """One named LoRA run: its settings and the config overrides that make it; `alpha` (None:
    the base config's) is named in the run and set."""
    own_alpha = {} if alpha is None else {"alpha": alpha}
    return {
        "name": f"rank={rank},{'' if alpha is None else f'alpha={alpha:g},'}targets={targets},"
                f"seed={seed}",
        "method": "lora", "rank": rank, **own_alpha, "targets": targets, "seed": seed,
        "overrides": {"method.lora.rank": rank,
                      **{f"method.lora.{k}": v for k, v in own_alpha.items()},
                      **target_overrides(targets, gpt2, llama), "seed": seed},
    }


def method_runs(config_file: pathlib.Path, seeds: int, extra: dict | None = None,
                learning_rates: dict | None = None) -> list[dict]:
    """One run per entry of the experiment config's METHODS table (LoRA first) and of `extra`,
    per seed; `learning_rates` replaces the lr of the methods it names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(config_file.stem, config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = {**module.METHODS, **(extra or {})}
    lrs = learning_rates or {}
    return [{"name": f"method={name},seed={s}", "method": name, "rank": 0, "targets": "",
             "seed": s, "overrides": {**overrides, **({"optim.lr": lrs[name]} if name in lrs
                                                     else {}), "seed": s}}
            for name, overrides in table.items() for s in range(seeds)]


def get_config(arg=None):
    args = parse_arg(arg, study="rank", task="sst2", model="", seeds=0, steps=0)
    if args.study not in STUDIES:
        raise ValueError(f"study={args.study!r}: expected one of {STUDIES}")
    seeds = args.seeds or (3 if args.study == "seeds" else 1)
    gpt2 = args.task == "e2e"
    model = args.model or ("gpt2-medium" if gpt2 else "minilm")
    experiment = pathlib.Path(__file__).with_name("e2e.py" if gpt2 else "glue.py")
    if gpt2:
        base = load_config(f"{experiment}:model={model}")
    else:
        base = load_config(f"{experiment}:task={args.task},model={model}")
    method_lr = dict(MINILM_METHOD_LR)
    if model == "minilm":
        for dotted, value in MINILM.items():
            set_dotted(base, dotted, value)
        if args.task in PAIR_TASKS:
            base.data.max_len = 128
        if args.task in MINILM_TASK_LR:
            base.optim.lr = MINILM_TASK_LR[args.task]
            method_lr = {name: base.optim.lr for name in method_lr}
    if args.steps > 0:
        base.train.max_steps = args.steps
        if gpt2 and base.optim.warmup_steps > args.steps // 10:
            # The E2E recipe's 500 warmup steps would outlast a short run: a tenth of it, as
            # configs/table3.py.
            base.optim.warmup_steps = max(1, round(0.1 * args.steps))

    c = ml_collections.ConfigDict()
    c.study = args.study
    c.base = base
    if args.study == "methods":
        minilm = model == "minilm" and not gpt2
        c.runs = tuple(method_runs(experiment, seeds, MATCHED_BUDGET if minilm else None,
                                   method_lr if minilm else None))
    else:
        llama = model == "smollm2-135m"  # the real decoder on e2e: q, k, v, o are separate
        alphas = GRID_ALPHAS if args.study == "grid" else (None,)
        c.runs = tuple(run(t, r, s, gpt2 and not llama, llama, alpha)
                       for t, r in settings(args.study) for alpha in alphas
                       for s in range(seeds))
    return c
