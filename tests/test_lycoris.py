"""LoHa and LoKr against PEFT on tiny RoBERTa with a head and a tiny Llama (`test_successors`'
protocol: PEFT's start read from its file, the same 5 AdamW steps, PEFT's trained file read back,
PEFT loading our export, our merge equal to PEFT's kernel by kernel), and against their formulas
on GPT-2, whose Conv1D PEFT does not adapt with them."""

import dataclasses

import jax
import numpy as np
import peft
import pytest
import torch

from lora_jax import exports, methods
from lora_jax.methods import loha, lokr
from lora_jax.methods.base import SettingError
from test_initialisations import linear_case  # noqa: F401 (a fixture: RoBERTa, Llama)
from test_successors import check_against_peft, gpt2_case, roberta_case


def _config(case, config_type, **fields):
    task_type = peft.TaskType.SEQ_CLS if case.task else None
    return config_type(target_modules=case.targets, task_type=task_type, **fields)


def _factor_names(trainable, name) -> set[str]:
    return {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(trainable[name])}


def test_loha_matches_peft(linear_case, tmp_path):
    """At PEFT's default r = alpha = 8, PEFT training in float64 from the same start: the
    product of products makes a float32 run's rounding reach the tolerance in 5 Adam steps.
    Measured (tiny Llama, q and v): PEFT float32 ends 6.2e-6 from PEFT float64, ours 7.4e-6,
    and the two float32 runs 1.4e-5 apart; on RoBERTa at r=4, alpha=8, ours with the model in
    float64 (JAX_ENABLE_X64) ends 6.5e-8 from PEFT float64 and 1.07e-5 in float32: the
    difference is rounding, not the method."""
    _, _, trained = check_against_peft(linear_case, tmp_path,
                                       _config(linear_case, peft.LoHaConfig, r=8, alpha=8),
                                       loha.LoHa, peft_dtype=torch.float64)
    assert _factor_names(trained, "loha") == set(loha.LoHa.leaves)


# (settings, the factors each adapted kernel of the tiny models gets): width 32, so d_in = 32 =
# 4 x 8 near the square root; 2 x 16 or 16 x 2 with a factor.
LOKR_SETTINGS = {
    "w2 low-rank": (dict(r=2, alpha=4), {lokr.W1, lokr.W2A, lokr.W2B}),
    "w1 low-rank": (dict(r=2, alpha=4, decompose_both=True, decompose_factor=16),
                    {lokr.W1A, lokr.W1B, lokr.W2}),
}


@pytest.mark.parametrize("setting", list(LOKR_SETTINGS))
def test_lokr_matches_peft(linear_case, tmp_path, setting):
    fields, factors = LOKR_SETTINGS[setting]
    stack, _, trained = check_against_peft(linear_case, tmp_path,
                                           _config(linear_case, peft.LoKrConfig, **fields),
                                           lokr.LoKr)
    assert _factor_names(trained, "lokr") == factors
    assert stack.methods[0].decompose_factor == fields.get("decompose_factor", -1)


def _moved(trainable, seed=3):
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("method", [loha.LoHa((r"attn/c_attn",), rank=3, alpha=6.0),
                                    lokr.LoKr((r"attn/c_attn",), rank=2, alpha=6.0)],
                         ids=["loha", "lokr"])
def test_each_is_its_formula_on_gpt2(tmp_path, method):
    """On GPT-2's fused c_attn (d_in 32, d_out 96): the adapted output is x (W0 + dW^T) with dW
    built by numpy from the factors, the merged model computes it, and the export reads back."""
    case = gpt2_case(tmp_path / "base")
    stack = methods.MethodStack((method,))
    frozen, trainable = stack.split(case.params, jax.random.key(0))
    apply = stack.adapt(case.model.apply)
    base = case.jax_logits(apply, frozen, trainable)
    plain = case.jax_logits(lambda f, t, *a, **k: case.model.apply({"params": f}, *a, **k),
                            case.params, {})
    np.testing.assert_allclose(base, plain, atol=1e-6)  # dW = 0 at the start
    trainable = _moved(trainable)
    factors = {k: np.asarray(v, np.float64) for k, v in trainable[method.name]["h_0"]["attn"][
        "c_attn"].items()}
    if isinstance(method, loha.LoHa):
        f = factors
        delta = (f[loha.W1A] @ f[loha.W1B]) * (f[loha.W2A] @ f[loha.W2B])
    else:
        w1 = factors[lokr.W1]
        w2 = factors[lokr.W2A] @ factors[lokr.W2B] if lokr.W2A in factors else factors[lokr.W2]
        assert w1.shape == (8, 4) and w2.shape == (12, 8)  # 96 = 8 x 12, 32 = 4 x 8
        delta = np.kron(w1, w2)
    merged = stack.merge(frozen, trainable)
    kernel = np.asarray(merged["h_0"]["attn"]["c_attn"]["kernel"], np.float64)
    w0 = np.asarray(case.params["h_0"]["attn"]["c_attn"]["kernel"], np.float64)
    np.testing.assert_allclose(kernel, w0 + method.scale * delta.T, atol=1e-5)
    ours = case.jax_logits(apply, frozen, trainable)
    assert np.abs(ours - plain).max() > 1e-3
    np.testing.assert_allclose(
        case.jax_logits(lambda f, t, *a, **k: case.model.apply({"params": f}, *a, **k),
                        merged, {}), ours, atol=1e-4)
    exports.save(tmp_path / "out", stack, {}, trainable, frozen=frozen, model_type="gpt2",
                 task=None)
    back, tree = exports.load(tmp_path / "out", case.params, case.family, None)
    # The same settings, on the modules it adapted (named exactly).
    assert dataclasses.replace(back.methods[0], targets=method.targets) == method
    np.testing.assert_allclose(case.jax_logits(back.adapt(case.model.apply), case.params, tree),
                               ours, atol=1e-6)


def test_a_lokr_factor_that_does_not_divide_a_kernel_is_refused(tmp_path):
    case = gpt2_case(tmp_path / "base")  # c_attn: d_in 32, d_out 96
    stack = methods.MethodStack((lokr.LoKr((r"attn/c_attn",), rank=2, decompose_factor=3),))
    with pytest.raises(SettingError, match=r"decompose_factor 3 does not divide the kernel "
                                           r"h_0/attn/c_attn/kernel \(d_in 32, d_out 96\)"):
        stack.split(case.params, jax.random.key(0))


def test_a_peft_option_not_reproduced_is_refused(tmp_path):
    """PEFT's rank dropout would train another function: the file is refused, naming it."""
    from lora_jax.errors import FileFormatError

    case = roberta_case(tmp_path / "base")
    model = peft.get_peft_model(case.torch_model(), _config(case, peft.LoHaConfig, r=4,
                                                            rank_dropout=0.1))
    model.save_pretrained(tmp_path / "peft")
    with pytest.raises(FileFormatError, match=r"adapter_config.json: rank_dropout = 0.1 is not "
                                              r"supported here \(only 0.0\)"):
        exports.load(tmp_path / "peft", case.params, case.family, case.task)
