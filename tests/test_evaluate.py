"""`python -m lora_jax.evaluate` on finished tiny runs: GLUE dev metrics and E2E generation."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import tiny_config
from lora_jax.config import load_config
from lora_jax.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def evaluate_cli(workdir, *flags):
    proc = subprocess.run([sys.executable, "-m", "lora_jax.evaluate", "--workdir", str(workdir),
                           *flags], cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_glue_scores_equal_the_trainers_final_evaluation(tmp_path):
    result = train(tiny_config(), tmp_path)
    evaluate_cli(tmp_path)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)
    assert scores["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_e2e_writes_one_prediction_per_mr_and_the_five_scores(tmp_path):
    c = load_config(str(REPO / "configs/e2e.py") + ":model=tiny")
    c.data.max_train_examples, c.data.max_eval_examples = 32, 8
    c.data.max_len, c.data.batch_size, c.data.eval_batch_size = 128, 8, 8
    c.train.max_steps, c.train.eval_every, c.optim.warmup_steps = 2, 2, 1
    c.generate.max_new_tokens = 8
    train(c, tmp_path)
    evaluate_cli(tmp_path, "--max_examples=3", "--batch_size=3")
    lines = (tmp_path / "predictions.txt").read_text().split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # 3 MRs, one line each
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}


def test_evaluate_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_jax.evaluate", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "config.json" in proc.stderr


@pytest.mark.parametrize("method, export_file", [
    ("adapter_h", "method_config.json"), ("adalora", "adapter_config.json"),
    # PiSSA's and VeRA's exports are also checked without the trainer (tests/test_methods.py)
    pytest.param("pissa", "adapter_config.json", marks=pytest.mark.slow),
    pytest.param("vera", "adapter_config.json", marks=pytest.mark.slow)])
def test_a_methods_export_evaluates_as_the_trainer_did(tmp_path, method, export_file):
    """Adapter^H (not mergeable, lora_jax's own export), PiSSA (trained against a residual base,
    exported as a LoRA on the original one), VeRA (shared projections in the frozen tree) and
    AdaLoRA (its optimizer rule and loss term in the trainer's step) on GLUE: evaluate rebuilds
    the same function from the export."""
    from lora_jax.evaluate import evaluate_metrics, load_run

    overrides = {"method.use": (method,), "train.max_steps": 4}
    if method == "vera":
        overrides["method.vera.rank"] = 8
    if method == "adalora":  # every step masks, down to 2 of 4 triplets per module on average
        overrides.update({"method.adalora.init_rank": 4, "method.adalora.target_rank": 2})
    result = train(tiny_config(**overrides), tmp_path)
    assert (tmp_path / "adapter" / export_file).is_file()
    scores = evaluate_metrics(load_run(tmp_path), max_examples=0)
    assert scores["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)
    assert scores["loss"] == pytest.approx(result["loss"], rel=1e-5)


@pytest.mark.slow  # ~25 s; PreEmbed's decoding is also tested in tests/test_prefix.py
def test_e2e_decodes_a_prefix_method_kept_apart(tmp_path):
    """PreEmbed on E2E: the prompts get the virtual tokens, the model runs the method apart."""
    from lora_jax.evaluate import evaluate_generation, load_run

    c = load_config(str(REPO / "configs/e2e.py") + ":model=tiny,method=preembed")
    c.data.max_train_examples, c.data.max_eval_examples = 32, 8
    c.data.max_len, c.data.batch_size, c.data.eval_batch_size = 128, 8, 8
    c.train.max_steps, c.train.eval_every, c.optim.warmup_steps = 2, 2, 1
    c.generate.max_new_tokens, c.generate.beam_size = 4, 2
    train(c, tmp_path)
    run = load_run(tmp_path)
    assert not run.stack.mergeable
    lines, scores = evaluate_generation(run, "dev", max_examples=2, batch_size=2)
    assert len(lines) == 2 and set(scores) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}


def test_stop_ids_are_gpt2s_own_or_else_the_tokenizers_eos():
    from types import SimpleNamespace

    from lora_jax.evaluate import stop_ids
    from lora_jax.models import FAMILIES

    gpt2 = SimpleNamespace(family=FAMILIES["gpt2"], tokenizer=SimpleNamespace(eos_token_id=7))
    assert stop_ids(gpt2) == (50256, 628)
    llama = SimpleNamespace(family=FAMILIES["llama"], tokenizer=SimpleNamespace(eos_token_id=2))
    assert stop_ids(llama) == (2,)
    llama3 = SimpleNamespace(family=FAMILIES["llama"],
                             tokenizer=SimpleNamespace(eos_token_id=[128001, 128009]))
    assert stop_ids(llama3) == (128001, 128009)
    with pytest.raises(ValueError, match="eos_token_id"):
        stop_ids(SimpleNamespace(family=FAMILIES["qwen2"], tokenizer=SimpleNamespace()))


def save_bert(directory, seed: int):
    """A random 2-layer BERT classifier saved with transformers: two seeds give two bases of
    the same shapes and other weights."""
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, num_labels=2)
    torch.manual_seed(seed)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def test_an_export_knows_its_base_and_is_refused_on_another(tmp_path):
    """Adapters trained on base 0, put in a run on base 1 (same shapes, other weights): the
    export's base record names both bases; evaluate refuses, exports.load and AdapterSet.load
    warn. (Nothing recorded the base before: they loaded silently.)"""
    import shutil
    import warnings

    from lora_jax import evaluate, exports
    from lora_jax.adapter_set import AdapterSet
    from lora_jax.errors import OtherBase
    from lora_jax.training import fingerprints, setup

    runs = []
    for seed in (0, 1):
        config = tiny_config(**{"model.name": str(save_bert(tmp_path / f"base{seed}", seed)),
                                "model.tokenizer": "minilm", "train.max_steps": 2})
        train(config, tmp_path / f"run{seed}")
        runs.append((config, tmp_path / f"run{seed}"))
    (config0, run0), (config1, run1) = runs
    inputs = json.loads((run0 / "inputs.json").read_text())
    for export in ("adapter", "best_adapter"):
        record = json.loads((run0 / export / "base_model.json").read_text())
        assert record == {"base": inputs["base"]}
    evaluate.load_run(run1)  # its own adapters: fine
    shutil.rmtree(run1 / "adapter")
    shutil.copytree(run0 / "adapter", run1 / "adapter")
    with pytest.raises(OtherBase, match=r"trained on another base.*\n.*model.safetensors: "
                                        r"trained on sha256 \w+ in .*base0, loaded on sha256 "
                                        r"\w+ in .*base1"):
        evaluate.load_run(run1)
    base1 = setup.base(config1)
    record1 = fingerprints.base_inputs(config1.model)
    with pytest.warns(UserWarning, match="trained on another base"):
        exports.load(run0 / "adapter", base1.params, base1.family, base1.info["task"],
                     base_record=record1)
    with pytest.warns(UserWarning, match="trained on another base"):
        AdapterSet.load({"a": run0}, base1.params, base1.family, base1.info["task"],
                        base_record=record1)
    with warnings.catch_warnings():  # on its own base: no warning
        warnings.simplefilter("error")
        exports.load(run0 / "adapter", setup.base(config0).params, base1.family,
                     base1.info["task"], base_record=fingerprints.base_inputs(config0.model))
