"""Adding a method is one file and one registry entry, shown rather than claimed.

The method here, a scaled LoRA (LoRA whose update is multiplied by a constant), is written as one
module of a package under the test's tmp_path, imported from there and registered at run time
(`METHODS`, monkeypatched). Nothing else learns of it, and yet the trainer, `evaluate`, a sweep,
and export and re-load all work with it, computing its function (not LoRA's).
"""

import dataclasses
import json
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import transformers

from conftest import tiny_config
from lora_jax import exports, methods
from lora_jax.config import TINY_MODELS
from lora_jax.interop import hub
from lora_jax.methods import lora
from lora_jax.models import family as model_family

NAME = "scaled_lora"
FACTOR = 3.0

# The whole method: its class, its config section (LoRA's fields, which `config.share_settings`
# copies from config.method.lora, plus its own `factor`) and its builder.
METHOD_FILE = '''
"""Scaled LoRA: y = W0 x + b + factor * s B A x (LoRA's update, multiplied by `factor`)."""

import dataclasses
from typing import Any

from lora_jax import config_rules as rules
from lora_jax.methods import lora
from lora_jax.methods.base import Registration


@dataclasses.dataclass(frozen=True)
class ScaledLoRA(lora.LoRA):
    """LoRA whose low-rank update is multiplied by `factor`."""

    name = "scaled_lora"
    factor: float = 2.0

    def output(self, module, adapter, x, y, dropped):
        path = lora.kernel_path(module)
        a, b = adapter[lora.LORA_A], adapter[lora.LORA_B]
        scale = self.factor * self.spec.scale(path, a.shape[-2])
        return y + lora.low_rank_update(x.astype(y.dtype), a, b, scale,
                                        self.spec.parts_for(path))

    def merge(self, params, added, buffers=None):
        return lora.fold_adapters(self.spec, params, added, self.factor)

    def describe(self) -> str:
        return f"scaled_lora(r={self.spec.rank}, factor={self.factor:g})"


def _defaults():
    c = lora.REGISTRATION.defaults()
    c.factor = 2.0
    return c


def _build(c: Any, family: Any) -> ScaledLoRA:
    return ScaledLoRA(lora.spec_from_config(c), bias=c.bias, factor=c.factor)


REGISTRATION = Registration(
    _defaults, {**lora.REGISTRATION.rules, "factor": rules.number(0, low_open=True)}, _build,
    extends=lora.LoRA.name)
'''


@pytest.fixture
def scaled(tmp_path, monkeypatch):
    """The method's module, imported from a package under tmp_path and registered."""
    package = tmp_path / "new_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scaled_lora.py").write_text(textwrap.dedent(METHOD_FILE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "new_methods", raising=False)
    monkeypatch.delitem(sys.modules, "new_methods.scaled_lora", raising=False)
    from new_methods import scaled_lora

    monkeypatch.setitem(methods.METHODS, NAME, scaled_lora.REGISTRATION)  # the registry entry
    return scaled_lora


def config_of(**overrides) -> ml_collections.ConfigDict:
    """The tests' tiny SST-2 run (random 2-layer BERT) training the scaled LoRA; the config is
    built after registering, so its `method` section has the method's (`base_config`)."""
    return tiny_config(**{"method.use": (NAME,), f"method.{NAME}.factor": FACTOR, **overrides})


def as_lora(trainable: dict, spec: lora.LoraSpec, factor: float) -> tuple:
    """The same adapters as plain LoRA with alpha * factor: the function the method must be."""
    scaled = dataclasses.replace(spec, alpha=spec.alpha * factor, alpha_pattern={
        k: v * factor for k, v in spec.alpha_pattern.items()})
    return (methods.MethodStack((lora.LoRA(scaled),)),
            {"params": trainable["params"], lora.LoRA.name: trainable[NAME]})


def test_the_config_has_its_section_and_lora_s_settings(scaled):
    c = config_of()
    assert c.method[NAME].factor == FACTOR
    # configs/glue.py sets LoRA up; share_settings gave the method, which extends LoRA, the same.
    assert tuple(c.method[NAME].targets) == tuple(c.method.lora.targets)
    assert c.method[NAME].rank == c.method.lora.rank
    from lora_jax.config_checks import check_config

    check_config(c, device_count=1)


def test_export_and_reload_compute_the_method_s_function(scaled, tmp_path):
    fields = dict(TINY_MODELS["bert"])
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = hub.model_from_hf_config(hf_config, task="classification", num_labels=2)
    ids = jnp.array([[5, 6, 7, 8, 9]])
    params = model.init(jax.random.key(0), ids)["params"]
    family = model_family("bert")
    c = config_of()
    stack = methods.build(c.method, family)
    assert isinstance(stack.methods[0], scaled.ScaledLoRA)
    frozen, trainable = stack.split(params, jax.random.key(1))
    # B is zero at init; move every leaf so that the update matters.
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    trainable = jax.tree_util.tree_unflatten(
        tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    logits = stack.adapt(model.apply)(frozen, trainable, ids).logits

    plain, same = as_lora(trainable, stack.methods[0].spec, FACTOR)
    np.testing.assert_allclose(logits, plain.adapt(model.apply)(frozen, same, ids).logits,
                               atol=1e-5)
    unscaled, _ = as_lora(trainable, stack.methods[0].spec, 1.0)
    lora_logits = unscaled.adapt(model.apply)(frozen, same, ids).logits
    assert np.abs(logits - lora_logits).max() > 1e-3  # the factor changes the function
    merged = stack.merge(frozen, trainable)
    np.testing.assert_allclose(model.apply({"params": merged}, ids).logits, logits, atol=1e-5)

    out = exports.save(tmp_path / "out", stack, c.method, trainable, model_type="bert",
                       task="classification", frozen=frozen)
    # No PEFT codec is registered for it: lora_jax's own format, never a LoRA that drops factor.
    assert (out / exports.CONFIG_NAME).is_file()
    loaded_stack, loaded = exports.load(out, params, family, "classification")
    assert loaded_stack.methods == stack.methods
    frozen_loaded = loaded_stack.frozen(params, loaded)
    np.testing.assert_allclose(
        loaded_stack.adapt(model.apply)(frozen_loaded, loaded, ids).logits, logits, atol=1e-6)


def test_the_trainer_and_evaluate_run_it(scaled, tmp_path):
    from lora_jax.evaluate import evaluate_metrics, load_run
    from lora_jax.train import train

    result = train(config_of(**{"train.max_steps": 4}), tmp_path)
    # Its low-rank leaves are LoRA's A and B (inherited): tiny BERT's q and v at rank 8.
    assert result["lora_params"] == 2 * 2 * 8 * (32 + 32)
    assert (tmp_path / "adapter" / exports.CONFIG_NAME).is_file()
    run = load_run(tmp_path)  # through exports.load and the registry
    assert isinstance(run.stack.methods[0], scaled.ScaledLoRA)
    assert run.stack.methods[0].factor == FACTOR
    scores = evaluate_metrics(run, max_examples=0)
    assert scores["accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)
    assert scores["loss"] == pytest.approx(result["loss"], rel=1e-5)
    # The trained adapters compute the method's function: LoRA at alpha * factor on them.
    plain, same = as_lora(run.trainable, run.stack.methods[0].spec, FACTOR)
    ids = jnp.array([[5, 6, 7, 8, 9]])
    np.testing.assert_allclose(
        run.stack.adapt(run.model.apply)(run.frozen, run.trainable, ids).logits,
        plain.adapt(run.model.apply)(run.frozen, same, ids).logits, atol=1e-5)


def test_a_sweep_trains_and_tabulates_it(scaled, tmp_path):
    from experiments import sweep

    config = ml_collections.ConfigDict({
        "base": config_of(**{"train.max_steps": 2}), "study": "methods",
        "runs": ({"name": f"method={NAME},seed=0", "method": NAME, "targets": "", "rank": 0,
                  "seed": 0, "overrides": {"method.use": (NAME,), "seed": 0}},)})
    [record] = sweep.sweep(config, tmp_path)
    assert record["method"] == NAME and record["lora_params"] == 2 * 2 * 8 * (32 + 32)
    assert json.loads((tmp_path / f"method={NAME},seed=0" / "record.json").read_text()) == record
    assert f"| {NAME} |" in (tmp_path / "results.md").read_text()
