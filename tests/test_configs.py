"""Every experiment config loads, carries the paper's numbers, and rejects bad arguments."""

import pathlib

import pytest

from lora_jax.config import load_config
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
