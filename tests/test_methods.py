"""The method seam: parameter counts against the paper's formulas and Table 3's figures, what each
method trains, identity at step 0, merging, composition, saving and loading."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util

from lora_jax.interop import hub
from lora_jax import methods
from lora_jax.config import TINY_MODELS, base_config
from lora_jax.methods import NotMergeable
from lora_jax import exports
from lora_jax.models import family as model_family
from conftest import calibrated, tiny_config

GPT2_SIZES = {"medium": dict(n_layer=24, n_embd=1024, n_head=16),
              "large": dict(n_layer=36, n_embd=1280, n_head=20)}
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                    type_vocab_size=1, pad_token_id=1)


def model_of(model_type: str, task=None, **fields):
    hf = transformers.AutoConfig.for_model(model_type, **fields)
    return hub.model_from_hf_config(hf, task=task, num_labels=2 if task else None)


def abstract_params(model):
    """The params' shapes only: GPT-2 large is never allocated."""
    return jax.eval_shape(lambda k: model.init(k, jnp.ones((1, 8), jnp.int32))["params"],
                          jax.random.key(0))


def section(*use, also_train=(), **settings):
    c = base_config().method
    c.use = use
    c.also_train = also_train
    for dotted, value in settings.items():
        name, field = dotted.split("__")
        c[name][field] = value
    return c


def tiny_section(model_type: str, *use, **settings):
    """`section` with the family's LoRA targets and, for the encoder, its head trained."""
    fam = model_family(model_type)
    lm = model_type in ("gpt2", "qwen2")
    c = section(*use, also_train=() if lm else (r"^classifier/",), **settings)
    for name in LORA_LIKE:
        c[name].targets, c[name].split_outputs = fam.lora_targets, dict(fam.lora_split_outputs)
    c.vera.targets, c.vera.rank = fam.lora_targets, 4  # fused outputs adapted whole
    c.adalora.targets, c.adalora.init_rank, c.adalora.target_rank = fam.lora_targets, 4, 2
    for name in ("loha", "lokr"):  # fused outputs adapted whole, as PEFT's
        c[name].targets, c[name].rank = fam.lora_targets, 2
    return c


# LoRA's config section, LoRA's targets.
LORA_LIKE = ("lora", "dora", "pissa", "olora", "milora", "corda", "lora_ga", "lora_plus",
             "lora_fa")


def trained_count(model_type, params, method_section) -> int:
    stack = methods.build(method_section, model_family(model_type))
    _, trainable = jax.eval_shape(lambda p: stack.split(p, jax.random.key(0)), params)
    return methods.count_params(trainable)


def adapter_formula(l_adpt: int, d: int, r: int, l_ln: int) -> int:
    """The paper's |Theta| = L_Adpt (2 d r + r + d) + 2 L_LN d."""
    return l_adpt * (2 * d * r + r + d) + 2 * l_ln * d


@pytest.fixture(scope="module")
def gpt2():
    return {size: abstract_params(model_of("gpt2", vocab_size=50257, n_positions=1024, **f))
            for size, f in GPT2_SIZES.items()}


@pytest.mark.parametrize("size, r, expected", [
    ("large", 8, 875_808), ("large", 248, 23_002_848), ("medium", 224, 11_089_152)])
def test_adapter_l_counts_are_table_3s(gpt2, size, r, expected):
    f = GPT2_SIZES[size]
    count = trained_count("gpt2", gpt2[size], section("adapter_l", adapter_l__bottleneck=r))
    assert count == expected == adapter_formula(f["n_layer"], f["n_embd"], r, f["n_layer"])


@pytest.mark.parametrize("size", ["medium", "large"])
def test_every_method_counts_as_the_papers_formula(gpt2, size):
    f, params = GPT2_SIZES[size], gpt2[size]
    L, d = f["n_layer"], f["n_embd"]
    # Adapter^H: two adapters a block; it trains the model's LayerNorms (two a block and ln_f).
    assert trained_count("gpt2", params, section("adapter_h", adapter_h__bottleneck=16)) == \
        adapter_formula(2 * L, d, 16, 2 * L + 1)
    assert trained_count("gpt2", params, section("adapter_p", adapter_p__bottleneck=16)) == \
        adapter_formula(L, d, 16, 0)
    assert trained_count("gpt2", params, section("adapter_d", adapter_d__bottleneck=16,
                                                 adapter_d__drop_lowest=5)) == \
        adapter_formula(L - 5, d, 16, 0)
    # LoRA on q and v of the fused c_attn: 2 L_LoRA d r with L_LoRA = 2 L matrices.
    lora = section("lora", lora__targets=(r"attn/c_attn",), lora__rank=4,
                   lora__split_outputs={r"attn/c_attn": (True, False, True)})
    assert trained_count("gpt2", params, lora) == 2 * (2 * L) * d * 4
    if size == "medium":
        assert trained_count("gpt2", params, lora) == 393_216
    # PreEmbed d (l_p + l_i); PreLayer L d (l_p + l_i).
    assert trained_count("gpt2", params, section("preembed", preembed__prefix=10,
                                                 preembed__infix=5)) == d * 15
    assert trained_count("gpt2", params, section("prelayer", prelayer__prefix=10,
                                                 prelayer__infix=5)) == L * d * 15
    # FT^Top2: every weight of the last two blocks (12 d^2 + 13 d each: 4 kernels, 2 LNs).
    assert trained_count("gpt2", params, section("top_layers")) == 2 * (12 * d * d + 13 * d)


def test_bitfit_and_full_on_roberta_base_are_table_2s():
    params = abstract_params(model_of("roberta", task="classification", **ROBERTA_BASE))
    d, L = 768, 12
    # Biases a layer: q, k, v, attention output, intermediate (4d), output, two LayerNorms; then
    # the embeddings' LayerNorm and the head's two biases.
    bitfit = trained_count("roberta", params, section("bitfit"))
    assert bitfit == L * (4 * d + 4 * d + d + 2 * d) + d + (d + 2) == 102_914  # the paper's 0.1M
    with_head = trained_count("roberta", params, section("bitfit", also_train=(r"^classifier/",)))
    assert with_head == bitfit + d * d + d * 2  # the head's kernels join its biases
    full = trained_count("roberta", params, section("full"))
    assert full == methods.count_params(params) and round(full / 1e6) == 125  # the paper's 125M


# The Llama family as tiny Qwen2: Llama's shape (GQA) with q/k/v biases, which BitFit trains.
TINY_QWEN2 = TINY_MODELS["llama"] | {"model_type": "qwen2"}


@pytest.fixture(scope="module", params=["gpt2", "bert", "qwen2"])
def tiny(request):
    fields = dict(TINY_QWEN2 if request.param == "qwen2" else TINY_MODELS[request.param])
    model_type = fields.pop("model_type")
    task = "classification" if model_type == "bert" else None
    model = model_of(model_type, task=task, **fields)
    params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return model_type, model, params


# Every method whose adapted model equals the base at step 0 (PreEmbed and PreLayer add tokens:
# tests/test_prefix.py).
ALL = ("lora", "full", "top_layers", "bitfit", "adapter_h", "adapter_l", "adapter_p", "adapter_d",
       "dora", "pissa", "olora", "milora", "corda", "lora_ga", "lora_plus", "lora_fa", "vera",
       "adalora", "loha", "lokr")


@pytest.mark.parametrize("name", ALL)
def test_each_method_starts_as_the_base_model_and_moves_when_trained(tiny, name):
    model_type, model, params = tiny
    stack = calibrated(methods.build(tiny_section(model_type, name), model_family(model_type)),
                       model.apply, params)
    frozen, trainable = stack.split(params, jax.random.key(1))
    ids = jnp.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    base = model.apply({"params": params}, ids).logits
    adapted = stack.adapt(model.apply)
    np.testing.assert_allclose(adapted(frozen, trainable, ids).logits, base, atol=1e-6)
    # Frozen and trainable share no leaf, and together cover the base exactly (besides the
    # methods' buffers, held in the frozen tree under their names).
    frozen_paths = {p for p in traverse_util.flatten_dict(frozen) if p[0] != name}
    full_paths = set(traverse_util.flatten_dict(trainable["params"]))
    assert not frozen_paths & full_paths
    assert frozen_paths | full_paths == set(traverse_util.flatten_dict(params))
    # A random move of every trained value changes the function.
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    after = adapted(frozen, moved, ids).logits
    assert float(jnp.abs(after - base).max()) > 1e-3
    # Mergeable methods fold into plain weights computing the same function; the others say so.
    if stack.mergeable:
        merged = stack.merge(frozen, moved)
        np.testing.assert_allclose(model.apply({"params": merged}, ids).logits, after, atol=1e-5)
    else:
        with pytest.raises(NotMergeable, match=name):
            stack.merge(frozen, moved)


def test_bitfit_trains_exactly_the_biases_and_top_layers_the_top_blocks(tiny):
    model_type, _, params = tiny
    fam = model_family(model_type)
    flat = traverse_util.flatten_dict(params)
    stack = methods.build(section("bitfit"), fam)
    _, trainable = stack.split(params, jax.random.key(0))
    assert set(traverse_util.flatten_dict(trainable["params"])) == {p for p in flat
                                                                    if p[-1] == "bias"}
    stack = methods.build(section("top_layers", top_layers__count=1), fam)
    _, trainable = stack.split(params, jax.random.key(0))
    trained = set(traverse_util.flatten_dict(trainable["params"]))
    assert trained and all(fam.layer_index("/".join(p)) == 1 for p in trained)
    assert trained == {p for p in flat if fam.layer_index("/".join(p)) == 1}


def test_lora_bias_options_train_the_biases_loralib_names(tiny):
    model_type, _, params = tiny
    if model_type != "bert":
        pytest.skip("the encoder's separate q, v make 'lora_only' visible")
    fam = model_family(model_type)
    flat = traverse_util.flatten_dict(params)
    for bias, expected in [("none", set()),
                           ("all", {p for p in flat if p[-1] == "bias"}),
                           ("lora_only", {p for p in flat if p[-1] == "bias"
                                          and p[-2] in ("query", "value")})]:
        stack = methods.build(section("lora", lora__bias=bias), fam)
        _, trainable = stack.split(params, jax.random.key(0))
        assert set(traverse_util.flatten_dict(trainable["params"])) == expected, bias


def test_methods_compose_and_the_stack_names_them(tiny):
    model_type, model, params = tiny
    if model_type != "bert":
        pytest.skip("one family suffices")
    stack = methods.build(section("lora", "bitfit", "adapter_p"), model_family(model_type))
    frozen, trainable = stack.split(params, jax.random.key(0))
    assert set(trainable) == {"params", "lora", "adapter_p"}
    assert stack.describe() == "lora(r=8) + bitfit + adapter_p(r=8)"
    ids = jnp.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(stack.adapt(model.apply)(frozen, trainable, ids).logits,
                               model.apply({"params": params}, ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="distinct names"):
        methods.MethodStack((stack.methods[0], stack.methods[0]))


def _mergeable(name: str) -> bool:
    return methods.METHODS[name].build(tiny_section("bert", name)[name],
                                       model_family("bert")).mergeable


MERGEABLE = [name for name in methods.METHODS if _mergeable(name)]


@pytest.fixture(scope="module")
def tiny_bert():
    fields = dict(TINY_MODELS["bert"])
    model = model_of(fields.pop("model_type"), task="classification", **fields)
    return model, model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]


@pytest.mark.parametrize("first, second", list(itertools.permutations(MERGEABLE, 2)))
def test_every_composable_pair_merges_into_the_function_it_trains(tiny_bert, first, second):
    """method.use=(first, second), both on the same kernels where both adapt kernels: either
    the config checks refuse the pair, naming both, or its merged model computes what the
    stack computes, after a random move of everything trained."""
    from lora_jax.config_checks import check_config
    from lora_jax.errors import ConfigError

    config = tiny_config()
    config.method = tiny_section("bert", first, second)
    try:
        check_config(config, device_count=1)
    except ConfigError as error:
        assert f"{first} and {second} cannot run together" in str(error) or \
            f"{second} and {first} cannot run together" in str(error), str(error)
        return
    model, params = tiny_bert
    stack = calibrated(methods.build(config.method, model_family("bert")), model.apply, params)
    frozen, trainable = stack.split(params, jax.random.key(1))
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    moved = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    ids = jnp.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    adapted = stack.adapt(model.apply)(frozen, moved, ids).logits
    merged = model.apply({"params": stack.merge(frozen, moved)}, ids).logits
    np.testing.assert_allclose(merged, adapted, atol=1e-5)


@pytest.mark.parametrize("name", ["adapter_h", "bitfit", "lora", "dora", "pissa", "olora",
                                  "milora", "corda", "lora_ga", "lora_fa", "vera", "adalora", "loha",
                                  "lokr"])
def test_a_saved_method_loads_back_to_the_same_function(tmp_path, tiny, name):
    model_type, model, params = tiny
    task = "classification" if model_type == "bert" else None
    c = tiny_section(model_type, name)
    fam = model_family(model_type)
    stack = calibrated(methods.build(c, fam), model.apply, params)
    frozen, trainable = stack.split(params, jax.random.key(1))
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    trainable = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    exports.save(tmp_path / "out", stack, c, trainable, model_type=model_type, task=task,
                 frozen=frozen)
    peft_format = name in ("lora", "dora", "pissa", "olora", "milora", "corda", "lora_ga",
                           "lora_fa", "vera", "adalora", "loha", "lokr")
    assert (tmp_path / "out" / ("adapter_config.json" if peft_format
                                else exports.CONFIG_NAME)).is_file()
    loaded_stack, loaded = exports.load(tmp_path / "out", params, fam, task)
    ids = jnp.array([[5, 6, 7, 8, 9]])
    frozen_loaded = loaded_stack.frozen(params, loaded)
    np.testing.assert_allclose(loaded_stack.adapt(model.apply)(frozen_loaded, loaded, ids).logits,
                               stack.adapt(model.apply)(frozen, trainable, ids).logits, atol=1e-5)


def test_loading_a_method_export_checks_every_tensor(tmp_path, tiny):
    import safetensors.numpy

    from lora_jax.errors import FileFormatError

    model_type, _, params = tiny
    c = section("adapter_p")
    stack = methods.build(c, model_family(model_type))
    _, trainable = stack.split(params, jax.random.key(1))
    exports.save(tmp_path, stack, c, trainable, model_type=model_type, task=None)
    path = tmp_path / exports.WEIGHTS_NAME
    tensors = safetensors.numpy.load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][:1]
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(FileFormatError, match="expected"):
        exports.load(tmp_path, params, model_family(model_type), None)


@pytest.mark.parametrize("config_file, method, expected", [
    ("e2e", "full", 354_823_168), ("e2e", "top_layers", 25_192_448), ("e2e", "adapter_l", 368_784),
    ("e2e", "adapter_h", 11_164_928), ("e2e", "prelayer", 344_064), ("e2e", "preembed", 14_336),
    ("e2e", "lora", 393_216),
    ("glue", "bitfit", 102_144 + 770 + 768 * 768 + 768 * 2), ("glue", "adapter_d", 278_960 + 592_130),
    ("glue", "adapter_p", 894_528 + 592_130), ("glue", "dora", 294_912 + 18_432 + 592_130),
    ("glue", "pissa", 294_912 + 592_130), ("glue", "lora_plus", 294_912 + 592_130),
    ("glue", "vera", 43_008 + 592_130), ("e2e", "dora", 393_216 + 49_152),
    ("glue", "olora", 294_912 + 592_130), ("glue", "milora", 294_912 + 592_130),
    ("glue", "lora_fa", 147_456 + 592_130), ("glue", "corda", 294_912 + 592_130),
    ("glue", "lora_ga", 294_912 + 592_130), ("glue", "loha", 294_912 + 592_130),
    ("glue", "lokr", 26_112 + 592_130),
    ("e2e", "lora_plus", 393_216)])
def test_the_configs_method_settings_train_the_counts_their_comments_give(gpt2, config_file,
                                                                           method, expected):
    """configs/e2e.py on GPT-2 medium and configs/glue.py on RoBERTa-base (the head, 592,130
    parameters, trained in full next to every GLUE method)."""
    from lora_jax.config import load_config
    from conftest import REPO_ROOT

    if config_file == "e2e":
        c = load_config(f"{REPO_ROOT}/configs/e2e.py:model=gpt2-medium,method={method}")
        params, model_type = gpt2["medium"], "gpt2"
    else:
        c = load_config(f"{REPO_ROOT}/configs/glue.py:task=sst2,method={method}")
        params = abstract_params(model_of("roberta", task="classification", **ROBERTA_BASE))
        model_type = "roberta"
    assert trained_count(model_type, params, c.method) == expected
