"""The LoRA transform on a small Flax model defined here, knowing nothing of LoRA."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lora_jax.methods import lora
from lora_jax.methods.lora import LoraSpec

D_IN, D_HIDDEN, D_OUT = 16, 24, 6


class FusedMLP(nn.Module):
    """A plain Flax model: a fused (d -> 3d) projection, like GPT-2's c_attn, and a head."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        qkv = nn.Dense(3 * D_HIDDEN, name="qkv")(x)
        h = nn.gelu(qkv.reshape(*x.shape[:-1], 3, D_HIDDEN).sum(-2))
        h = nn.Dropout(0.5)(h, deterministic=deterministic)
        return nn.Dense(D_OUT, name="head")(nn.Dense(D_HIDDEN, name="proj")(h))


@pytest.fixture(scope="module")
def setup():
    model = FusedMLP()
    x = jax.random.normal(jax.random.key(1), (4, 5, D_IN))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, x


def _randomize_b(trainable, key):
    """Non-zero B so that the low-rank path actually contributes."""
    flat = traverse_util.flatten_dict(trainable)
    keys = jax.random.split(key, len(flat))
    for k, (path, v) in zip(keys, sorted(flat.items())):
        if path[-1] == lora.LORA_B:
            flat[path] = 0.1 * jax.random.normal(k, v.shape)
    return traverse_util.unflatten_dict(flat)


def test_adapter_tree_shapes_and_zero_b(setup):
    model, params, _ = setup
    spec = LoraSpec(targets=("qkv", "proj"), rank=4, split_outputs={"qkv": (True, False, True)})
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, trainable["lora"])
    assert shapes == {
        "qkv": {"lora_a": (2, 4, D_IN), "lora_b": (2, D_HIDDEN, 4)},
        "proj": {"lora_a": (4, D_HIDDEN), "lora_b": (D_HIDDEN, 4)},
    }
    assert trainable["params"] == {}
    assert all(not np.any(leaf) for leaf in jax.tree_util.tree_leaves(
        {k: v["lora_b"] for k, v in trainable["lora"].items()}))
    assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(params)
    for leaf in jax.tree_util.tree_leaves(trainable):
        assert leaf.dtype == jnp.float32


def test_step_zero_equals_base_exactly(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("qkv", "proj", "head"), rank=2, dropout=0.3)
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    base = model.apply({"params": params}, x)
    adapted = lora.adapt(model.apply, spec)(frozen, trainable, x, lora_rng=jax.random.key(3))
    np.testing.assert_array_equal(adapted, base)


def test_forward_is_w0x_plus_scaled_bax(setup):
    """The adapted Dense equals the closed form W0 x + b + (alpha/r) B A x."""
    model, params, x = setup
    spec = LoraSpec(targets=("proj",), rank=3, alpha=12.0)
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    trainable = _randomize_b(trainable, jax.random.key(4))

    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.path == ("proj",) and context.method_name == "__call__":
            captured["x"], captured["y"] = args[0], out
        return out

    with nn.intercept_methods(capture):
        lora.adapt(model.apply, spec)(frozen, trainable, x)
    a, b = trainable["lora"]["proj"]["lora_a"], trainable["lora"]["proj"]["lora_b"]
    w0, bias = params["proj"]["kernel"], params["proj"]["bias"]
    expected = captured["x"] @ w0 + bias + (12.0 / 3) * (captured["x"] @ a.T @ b.T)
    np.testing.assert_allclose(captured["y"], expected, rtol=1e-5, atol=1e-5)


def test_split_outputs_adapt_only_flagged_parts(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("qkv",), rank=4, split_outputs={"qkv": (True, False, True)})
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    trainable = _randomize_b(trainable, jax.random.key(4))
    merged = lora.merge(spec, frozen, trainable)
    delta = merged["qkv"]["kernel"] - params["qkv"]["kernel"]
    q, k, v = np.split(np.asarray(delta), 3, axis=-1)
    assert np.abs(q).max() > 0 and np.abs(v).max() > 0
    np.testing.assert_array_equal(k, 0)
    a, b = trainable["lora"]["qkv"]["lora_a"], trainable["lora"]["qkv"]["lora_b"]
    scale = spec.alpha / spec.rank
    np.testing.assert_allclose(q, scale * (b[0] @ a[0]).T, atol=1e-6)
    np.testing.assert_allclose(v, scale * (b[1] @ a[1]).T, atol=1e-6)


def test_merge_equals_adapted_forward_and_unmerge_recovers_w0(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("qkv", "proj", "head"), rank=4, alpha=16.0,
                    split_outputs={"qkv": (True, False, True)}, also_train=("head/bias",))
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    trainable = _randomize_b(trainable, jax.random.key(4))
    adapted = lora.adapt(model.apply, spec)(frozen, trainable, x)
    merged = lora.merge(spec, frozen, trainable)
    np.testing.assert_allclose(model.apply({"params": merged}, x), adapted, atol=1e-5, rtol=1e-5)
    assert not np.allclose(adapted, model.apply({"params": params}, x), atol=1e-3)
    recovered = lora.unmerge(spec, merged, trainable)
    assert jax.tree_util.tree_structure(recovered) == jax.tree_util.tree_structure(frozen)
    jax.tree_util.tree_map(lambda r, f: np.testing.assert_allclose(r, f, atol=1e-6),
                           recovered, frozen)


def test_dropout_only_on_low_rank_path(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("proj",), rank=4, dropout=0.5)
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    apply = lora.adapt(model.apply, spec)
    # B = 0: whatever the mask, the output is the base model's, so W0 x saw no dropout.
    np.testing.assert_array_equal(apply(frozen, trainable, x, lora_rng=jax.random.key(5)),
                                  model.apply({"params": params}, x))
    trainable = _randomize_b(trainable, jax.random.key(4))
    y1 = apply(frozen, trainable, x, lora_rng=jax.random.key(5))
    y2 = apply(frozen, trainable, x, lora_rng=jax.random.key(6))
    y_eval = apply(frozen, trainable, x)
    assert not np.allclose(y1, y2)
    np.testing.assert_array_equal(y1, apply(frozen, trainable, x, lora_rng=jax.random.key(5)))
    assert not np.allclose(y1, y_eval)


def test_no_dropout_is_deterministic_across_rngs(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("proj",), rank=4, dropout=0.0)
    frozen, trainable = lora.split(spec, params, jax.random.key(2))
    trainable = _randomize_b(trainable, jax.random.key(4))
    apply = lora.adapt(model.apply, spec)
    np.testing.assert_array_equal(apply(frozen, trainable, x, lora_rng=jax.random.key(5)),
                                  apply(frozen, trainable, x, lora_rng=jax.random.key(6)))


def test_init_distributions():
    params = {"big": {"kernel": jnp.zeros((512, 256))}}
    gauss = lora.init(LoraSpec(targets=("big",), rank=16, init="gaussian"), params,
                      jax.random.key(0))["big"]["lora_a"]
    assert gauss.shape == (16, 512)
    assert abs(float(gauss.std()) - 1 / 16) < 0.003
    kaiming = lora.init(LoraSpec(targets=("big",), rank=16, init="kaiming"), params,
                        jax.random.key(0))["big"]["lora_a"]
    bound = 1 / math.sqrt(512)
    assert float(jnp.abs(kaiming).max()) <= bound
    assert abs(float(kaiming.std()) - bound / math.sqrt(3)) < 0.003


def test_scaling_and_per_pattern_overrides(setup):
    _, params, _ = setup
    spec = LoraSpec(targets=("qkv", "proj", "head"), rank=4, alpha=8.0,
                    rank_pattern={"head": 2}, alpha_pattern={"proj": 32.0})
    _, trainable = lora.split(spec, params, jax.random.key(0))
    assert trainable["lora"]["head"]["lora_a"].shape == (2, D_HIDDEN)
    assert trainable["lora"]["proj"]["lora_a"].shape == (4, D_HIDDEN)
    assert spec.scale("proj/kernel", 4) == 8.0
    assert spec.scale("head/kernel", 2) == 4.0
    assert spec.scale("qkv/kernel", 4) == 2.0
    rs = LoraSpec(targets=("qkv",), rank=16, alpha=8.0, rslora=True)
    assert rs.scale("qkv/kernel", 16) == 2.0


def test_also_train_moves_leaves_out_of_frozen(setup):
    _, params, _ = setup
    spec = LoraSpec(targets=("proj",), rank=2, also_train=("^head/",))
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    assert "head" not in frozen
    assert set(trainable["params"]["head"]) == {"kernel", "bias"}
    full = lora.combine(frozen, trainable)
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(params)


# ---- bad input -------------------------------------------------------------


def test_pattern_matching_nothing_lists_kernel_paths(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match="'c_attn' matches no kernel") as err:
        lora.split(LoraSpec(targets=("c_attn",)), params, jax.random.key(0))
    for path in ("qkv/kernel", "proj/kernel", "head/kernel"):
        assert path in str(err.value)


@pytest.mark.parametrize("rank", [0, -1, D_IN + 1])
def test_rank_out_of_range(setup, rank):
    _, params, _ = setup
    with pytest.raises(ValueError, match=rf"rank {rank} for 'qkv/kernel'"):
        lora.split(LoraSpec(targets=("qkv",), rank=rank), params, jax.random.key(0))


def test_rank_bound_uses_the_split_part_size():
    params = {"fused": {"kernel": jnp.zeros((64, 3 * 8))}}
    spec = LoraSpec(targets=("fused",), rank=9, split_outputs={"fused": (True, False, True)})
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        lora.split(spec, params, jax.random.key(0))


def test_adapters_on_a_base_of_other_shapes(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("proj",), rank=2)
    _, trainable = lora.split(spec, params, jax.random.key(0))
    # The same module names with a wider 'proj', as adapters trained on a smaller base.
    bigger = dict(params)
    bigger["proj"] = {"kernel": jnp.zeros((D_HIDDEN, 2 * D_HIDDEN)), "bias": jnp.zeros(2 * D_HIDDEN)}
    with pytest.raises(ValueError, match=r"'proj/kernel'.*\(24, 24\).*\(24, 48\)"):
        lora.adapt(model.apply, spec)(bigger, trainable, x)
    with pytest.raises(ValueError, match=r"'proj/kernel'.*\(24, 24\).*\(24, 48\)"):
        lora.merge(spec, bigger, trainable)


def test_also_train_pattern_matching_nothing(setup):
    _, params, _ = setup
    with pytest.raises(ValueError, match="'classifier' matches no parameter"):
        lora.split(LoraSpec(targets=("proj",), also_train=("classifier",)), params,
                   jax.random.key(0))


def test_adapter_on_a_kernel_that_is_not_a_dense_is_an_error():
    """A matched kernel outside nn.Dense would get an adapter that silently does nothing."""

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))
            return nn.Dense(3, name="out")(x @ kernel)

    model = Custom()
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)["params"]
    spec = LoraSpec(targets=(r"^kernel",), rank=2)
    frozen, trainable = lora.split(spec, params, jax.random.key(1))
    with pytest.raises(ValueError, match=r"never applied.*\['kernel'\]"):
        lora.adapt(model.apply, spec)(frozen, trainable, x)
    lora.adapt(model.apply, spec, strict=False)(frozen, trainable, x)


def test_adapters_whose_a_and_b_disagree_on_the_rank(setup):
    model, params, x = setup
    spec = LoraSpec(targets=("proj",), rank=2)
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    trainable["lora"]["proj"]["lora_b"] = jnp.zeros((D_HIDDEN, 3))
    with pytest.raises(ValueError, match=r"'proj/kernel'.*disagree on the rank \(2 vs 3\)"):
        lora.adapt(model.apply, spec)(frozen, trainable, x)
