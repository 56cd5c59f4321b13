"""Several adapters over one base (lora_jax.adapter_set): mixed batches give every row what its
adapter gives alone; merging, unmerging and switching adapters round-trip within bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import tiny_config
from test_peft_adapters import roberta_dir  # noqa: F401  (a fixture: a perturbed tiny RoBERTa)
from lora_jax import methods
from lora_jax.adapter_set import AdapterSet
from lora_jax.config import load_config
from lora_jax.training import setup

Q, K, V, O = (r"/attention/self/query/kernel", r"/attention/self/key/kernel",
              r"/attention/self/value/kernel", r"/attention/output/dense/kernel")


def trained_like(trainable, seed: int) -> dict:
    """`trainable` with every leaf moved by noise, B included: as if trained (B = 0 would hide
    a wrong adapter)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x)).astype(np.float32),
        jax.device_get(trainable))


def adapter(config, base, seed: int):
    stack = methods.build(config.method, base.family)
    _, trainable = stack.split(base.params, jax.random.key(seed))
    return stack, trained_like(trainable, seed)


@pytest.fixture(scope="module")
def bert_set():
    """Three adapters on one tiny BERT: other ranks, alphas, rsLoRA, targets and heads."""
    base = setup.base(tiny_config())
    settings = [dict(rank=4, alpha=8.0, targets=(Q, V)),
                dict(rank=8, alpha=16.0, targets=(Q,), rslora=True),
                dict(rank=2, alpha=4.0, targets=(Q, K, V, O))]
    stacks, trainables = [], []
    for seed, s in enumerate(settings):
        config = tiny_config(**{f"method.lora.{k}": v for k, v in s.items()})
        stack, trainable = adapter(config, base, seed)
        stacks.append(stack)
        trainables.append(trainable)
    return base, AdapterSet(("a", "b", "c"), tuple(stacks), tuple(trainables))


def batch(vocab: int, rows: int = 6, width: int = 12):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(rows, width)).astype(np.int32)
    mask = (np.arange(width)[None] < rng.integers(3, width + 1, size=(rows, 1))).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def alone(stack, base, trainable, *args, **kwargs):
    frozen = stack.frozen(base.params, trainable)
    return stack.adapt(base.model.apply)(frozen, trainable, *args, **kwargs)


def test_a_mixed_batch_gives_every_row_its_adapters_logits(bert_set):
    base, adapters = bert_set
    ids, mask = batch(1000)
    which = np.array([0, 1, 2, 2, 1, 0])
    mixed = adapters.apply(base.model.apply, adapters.frozen(base.params), ids,
                           attention_mask=mask, adapter_ids=which).logits
    for i, (stack, trainable) in enumerate(zip(adapters.stacks, adapters.trainables)):
        own = alone(stack, base, trainable, ids, attention_mask=mask).logits
        rows = which == i
        np.testing.assert_allclose(mixed[rows], own[rows], atol=1e-5, rtol=1e-5)
    # The adapters do differ, so a row through the wrong one would fail.
    a = alone(adapters.stacks[0], base, adapters.trainables[0], ids, attention_mask=mask).logits
    b = alone(adapters.stacks[1], base, adapters.trainables[1], ids, attention_mask=mask).logits
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2


def test_a_mixed_batch_on_gpt2_slices_of_the_fused_projection():
    config = load_config("configs/e2e.py:model=tiny")
    base = setup.base(config)
    stacks, trainables = [], []
    for seed, (rank, targets, parts) in enumerate([
            (4, ("attn/c_attn",), {"attn/c_attn": (True, False, True)}),
            (2, ("attn/c_attn", "attn/c_proj"), {"attn/c_attn": (True, False, True)}),
            (8, ("attn/c_proj",), {})]):
        c = load_config("configs/e2e.py:model=tiny")
        c.method.lora.rank, c.method.lora.targets = rank, targets
        c.method.lora.split_outputs = parts
        stack, trainable = adapter(c, base, seed)
        stacks.append(stack)
        trainables.append(trainable)
    adapters = AdapterSet(("x", "y", "z"), tuple(stacks), tuple(trainables))
    ids, mask = batch(90)
    which = np.array([2, 0, 1, 1, 0, 2])
    mixed = adapters.apply(base.model.apply, adapters.frozen(base.params), ids,
                           attention_mask=mask, adapter_ids=which).logits
    for i, (stack, trainable) in enumerate(zip(stacks, trainables)):
        own = alone(stack, base, trainable, ids, attention_mask=mask).logits
        np.testing.assert_allclose(mixed[which == i], own[which == i], atol=1e-5, rtol=1e-5)


def test_an_adapter_set_refuses_what_it_cannot_mix(bert_set):
    base, adapters = bert_set
    dora = tiny_config(**{"method.use": ("dora",)})
    stack, trainable = adapter(dora, base, 0)
    with pytest.raises(ValueError, match="plain LoRA"):
        AdapterSet(("lora", "dora"), (adapters.stacks[0], stack),
                   (adapters.trainables[0], trainable))
    with pytest.raises(ValueError, match="repeat"):
        AdapterSet(("a", "a"), adapters.stacks[:2], adapters.trainables[:2])
    with pytest.raises(KeyError, match="the set holds"):
        adapters.merge(base.params, "nope")


def test_merged_params_know_what_they_hold(bert_set):
    """Merging an adapter twice (its update added twice) and unmerging or switching from an
    adapter that is not merged (a third model) raise; a right switch records the new one."""
    from lora_jax.adapter_set import MergedParams

    base, adapters = bert_set
    merged = adapters.merge(base.params, "a")
    assert isinstance(merged, MergedParams) and merged.merged == ("a",)
    with pytest.raises(ValueError, match=r"already hold adapter\(s\) \['a'\] merged"):
        adapters.merge(merged, "a")
    with pytest.raises(ValueError, match="already hold"):
        adapters.merge(merged, "b")
    with pytest.raises(ValueError, match=r"already have \['a'\] merged in them"):
        adapters.stacks[0].merge(merged, adapters.trainables[0])  # the stack's own merge too
    with pytest.raises(ValueError, match=r"adapter 'b' is not merged into these params \(they "
                                         r"hold \['a'\]\)"):
        adapters.switch(merged, "b", "c")
    with pytest.raises(ValueError, match="'c' is not merged"):
        adapters.unmerge(merged, "c")
    with pytest.raises(ValueError, match="no record of what is merged"):
        adapters.unmerge(dict(merged), "a")
    switched = adapters.switch(merged, "a", "b")
    assert switched.merged == ("b",)
    # The record travels through JAX: a jitted identity keeps it.
    assert jax.jit(lambda p: p)(switched).merged == ("b",)
    # Declared by hand (e.g. params read back from disk), it is checked the same way.
    by_hand = adapters.unmerge(MergedParams(dict(merged), ("a",)), "a")
    for x, y in zip(jax.tree_util.tree_leaves(by_hand),
                    jax.tree_util.tree_leaves(adapters.unmerge(merged, "a"))):
        np.testing.assert_array_equal(x, y)


def kernels(params, adapters) -> dict:
    """The kernels no adapter trains in full (the heads are replaced, not merged)."""
    heads = {p for t in adapters.trainables for p in traverse_util.flatten_dict(t["params"])}
    return {p: np.asarray(v, np.float32) for p, v in traverse_util.flatten_dict(params).items()
            if p[-1] == "kernel" and p not in heads}


def round_trip_errors(adapters, params) -> dict:
    """Largest errors, relative to the largest |W| of the merged models, of switching a -> b
    (against merging b directly) and of merging then unmerging a (against the base)."""
    direct = kernels(adapters.merge(params, "b"), adapters)
    merged_a = adapters.merge(params, "a")
    scale = max(np.abs(v).max() for v in (*direct.values(), *kernels(merged_a, adapters).values()))
    switched = kernels(adapters.switch(merged_a, "a", "b"), adapters)
    back = kernels(adapters.unmerge(merged_a, "a"), adapters)
    base = kernels(params, adapters)
    return {"switch": max(np.abs(switched[p] - direct[p]).max() for p in direct) / scale,
            "unmerge": max(np.abs(back[p] - base[p]).max() for p in base) / scale}


def test_merge_switch_and_unmerge_round_trip_in_fp32_and_bf16(bert_set):
    base, adapters = bert_set
    fp32 = round_trip_errors(adapters, base.params)
    bf16 = round_trip_errors(adapters, jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.bfloat16), base.params))
    print(f"round-trip error / max|W|: fp32 {fp32}, bf16 {bf16}")
    # fp32: a few roundings of W + s B A; bf16: stored with 8 significant bits, each merge or
    # unmerge rounds once more (at most half a unit in the last place of |W| <= max|W|).
    assert fp32["switch"] < 1e-6 and fp32["unmerge"] < 1e-6
    assert bf16["switch"] <= 3 * 2.0 ** -8 and bf16["unmerge"] <= 2 * 2.0 ** -8
    assert bf16["switch"] > fp32["switch"]  # bf16 does lose what fp32 keeps
    # Switched weights run as adapter b: the merged model gives b's logits.
    ids, mask = batch(1000)
    switched = adapters.switch(adapters.merge(base.params, "a"), "a", "b")
    got = base.model.apply({"params": switched}, ids, attention_mask=mask).logits
    want = alone(adapters.stacks[1], base, adapters.trainables[1], ids,
                 attention_mask=mask).logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


ON_UPDATES = ["cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
              "magnitude_prune_svd"]
FACTORWISE = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.mark.parametrize("combination,sign_method",
                         [(c, "total") for c in ON_UPDATES + FACTORWISE]
                         + [("ties_svd", "frequency"), ("dare_ties", "frequency")])
def test_weighted_adapters_match_peft_add_weighted_adapter(combination, sign_method, roberta_dir,
                                                          tmp_path, padded_batch, monkeypatch):
    """Two adapters of other targets combined with weights 0.7 and -0.4 (density 0.5 where the
    merge prunes): our new adapter gives the logits of PEFT's add_weighted_adapter (same
    combination) on torch. The adapters' ranks differ (4 and 2) except for PEFT's factor-wise
    merges, which need one rank (4 and 4). DARE's random masks are ours: PEFT's torch.bernoulli
    is replaced by one that returns them, in the order PEFT asks for them."""
    import peft
    import torch
    import transformers

    from lora_jax.interop.hub import load_pretrained
    from lora_jax.methods.lora_peft import export_peft
    from lora_jax.methods import lora
    from lora_jax.methods.base import MethodStack

    model, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    second_rank = 4 if combination in FACTORWISE else 2
    specs = [lora.LoraSpec(targets=(r"/query/kernel", r"/value/kernel"), rank=4, alpha=8.0),
             lora.LoraSpec(targets=(r"/query/kernel",), rank=second_rank, alpha=3.0)]
    trainables = [trained_like(lora.split(s, params, jax.random.key(i))[1], i + 1)
                  for i, s in enumerate(specs)]
    adapters = AdapterSet(("a", "b"), tuple(MethodStack((lora.LoRA(s),)) for s in specs),
                          tuple(trainables))
    density, key = 0.5, jax.random.key(7)
    combined = adapters.weighted(["a", "b"], [0.7, -0.4], "w", combination, density=density,
                                 majority_sign_method=sign_method, key=key)
    ids, mask = padded_batch(101, pad_id=1)
    ours = np.asarray(combined.apply(model.apply, combined.frozen(params), ids,
                                     attention_mask=mask, adapter_ids=[2] * len(ids)).logits)

    # Our masks in PEFT's order: per module (a's, in model order, b's among them), per part
    # (A then B for the factor-wise merges; dW for the others), per adapter adapting it.
    queue = []
    modules = list(lora.adapter_modules(trainables[0]))
    for number, module in enumerate(modules):
        members = [t for t in trainables if module in lora.adapter_modules(t)]
        factors = [lora.adapter_modules(t)[module] for t in members]
        shapes = ([[f[lora.LORA_A].shape for f in factors], [f[lora.LORA_B].shape for f in factors]]
                  if combination in FACTORWISE else
                  [[(f[lora.LORA_B].shape[0], f[lora.LORA_A].shape[1]) for f in factors]])
        for part, part_shapes in zip((0, 1) if combination in FACTORWISE else (2,), shapes):
            part_key = jax.random.fold_in(jax.random.fold_in(key, number), part)
            queue += [np.asarray(jax.random.bernoulli(jax.random.fold_in(part_key, i), density,
                                                      shape), np.float32)
                      for i, shape in enumerate(part_shapes)]

    def our_masks(probabilities):
        drawn = queue.pop(0)
        assert drawn.shape == tuple(probabilities.shape)
        return torch.from_numpy(drawn)

    monkeypatch.setattr(torch, "bernoulli", our_masks)
    for name, spec, trainable in zip("ab", specs, trainables):
        export_peft(tmp_path / name, spec, trainable, model_type="roberta", task=None)
    peft_model = peft.PeftModel.from_pretrained(
        transformers.RobertaForSequenceClassification.from_pretrained(roberta_dir),
        tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "w", combination_type=combination,
                                    density=density, majority_sign_method=sign_method)
    if combination.startswith("dare"):
        assert queue == []  # PEFT drew exactly our masks
    peft_model.set_adapter("w")
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=torch.from_numpy(ids),
                                   attention_mask=torch.from_numpy(mask)).logits.numpy()
    base = np.asarray(model.apply({"params": params}, ids, attention_mask=mask).logits)
    assert np.abs(theirs - base).max() > 1e-2  # the combination matters
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # The new adapter's rank: the sum for 'cat', the largest for the SVD ones, the common rank
    # of the factor-wise ones, as PEFT's.
    assert combined.stacks[2].methods[0].spec.rank == (6 if combination == "cat" else 4)
    assert peft_model.peft_config["w"].r == combined.stacks[2].methods[0].spec.rank


def test_weighted_refuses_what_it_cannot_merge(bert_set):
    _, adapters = bert_set
    names = list(adapters.names[:2])
    ranks = {s.methods[0].spec.rank for s in adapters.stacks[:2]}
    with pytest.raises(ValueError, match="combination must be one of"):
        adapters.weighted(names, [1.0, 1.0], "x", "average")
    with pytest.raises(ValueError, match="density"):
        adapters.weighted(names, [1.0, 1.0], "x", "ties_svd")
    with pytest.raises(ValueError, match="density must be >= 0"):
        adapters.weighted(names, [1.0, 1.0], "x", "ties_svd", density=-0.1)
    with pytest.raises(ValueError, match="give key"):
        adapters.weighted(names, [1.0, 1.0], "x", "dare_linear_svd", density=0.5)
    assert ranks == {4, 8}
    headless = AdapterSet(adapters.names, adapters.stacks, tuple(
        {k: v for k, v in t.items() if k != "params"} for t in adapters.trainables))
    with pytest.raises(ValueError, match="needs one rank; these have ranks \\[4, 8\\]: use "
                                         "ties_svd"):
        headless.weighted(names, [1.0, 1.0], "x", "ties", density=0.5)
    with pytest.raises(ValueError, match="linear merges the adapters' factors.*use svd"):
        headless.weighted(names, [1.0, 1.0], "x", "linear")


def test_evaluate_all_gives_each_adapter_its_own_evaluation(bert_set):
    """Three adapters evaluated on SST-2's dev examples in one pass of mixed batches: each gets
    the metrics (and loss) its own evaluation gives."""
    from lora_jax.adapter_set import evaluate_all
    from lora_jax.training import evaluation, sharding, steps

    base, adapters = bert_set
    config = tiny_config()
    task = setup.build(config, base_model=base).task(with_train=False)
    together = evaluate_all(adapters, task, base.model.apply, adapters.frozen(base.params), 16)
    mesh = sharding.make_mesh(1, 1)
    for name, stack, trainable in zip(adapters.names, adapters.stacks, adapters.trainables):
        forward = steps.make_forward(stack.adapt(base.model.apply))
        eval_step = steps.make_eval_step(forward, task.kind, sharding.replicated(mesh))
        alone = evaluation.evaluate(task, eval_step, stack.frozen(base.params, trainable),
                                    trainable, mesh, 16)
        assert together[name]["accuracy"] == alone["accuracy"]
        np.testing.assert_allclose(together[name]["loss"], alone["loss"], rtol=1e-5)
    assert len({m["loss"] for m in together.values()}) == 3


@pytest.mark.parametrize("ids", [[0, 1, 3, 1, 0, 2], [0, -1, 1, 1, 0, 2]])
def test_an_adapter_id_out_of_range_is_refused(bert_set, ids):
    """A set of three: id 3 or -1 names no adapter (it was clamped to the last one)."""
    base, adapters = bert_set
    x, mask = batch(1000)
    bad = [i for i in ids if not 0 <= i < 3]
    with pytest.raises(ValueError, match=rf"adapter ids \[{bad[0]}\] are out of range: the set "
                                         r"holds 3 adapters"):
        adapters.apply(base.model.apply, adapters.frozen(base.params), x, attention_mask=mask,
                       adapter_ids=ids)


def test_traced_adapter_ids_are_checked_under_checked(bert_set):
    """Under jit the ids are traced: `checked` with check_ids=True raises for an out-of-range
    one and computes the same logits as the unchecked call for valid ones."""
    import jax
    from jax.experimental import checkify

    from lora_jax.adapter_set import checked

    base, adapters = bert_set
    x, mask = batch(1000)
    frozen = adapters.frozen(base.params)
    run = checked(jax.jit(lambda ids: adapters.apply(
        base.model.apply, frozen, x, attention_mask=mask, adapter_ids=ids,
        check_ids=True).logits))
    good = jnp.array([0, 1, 2, 2, 1, 0])
    want = adapters.apply(base.model.apply, frozen, x, attention_mask=mask,
                          adapter_ids=good).logits
    np.testing.assert_allclose(run(good), want, atol=1e-6)
    with pytest.raises(checkify.JaxRuntimeError, match=r"adapter ids must be in \[0, 3\)"):
        run(jnp.array([0, 1, 5, 2, 1, 0]))


def test_evaluate_all_traces_its_program_once(bert_set):
    """A second evaluation of the same set reuses the compiled program: the model is traced
    once however often the set is evaluated (it was traced on every call)."""
    from lora_jax.adapter_set import evaluate_all

    base, adapters = bert_set
    task = setup.build(tiny_config(), base_model=base).task(with_train=False)
    traces = []

    def apply(*args, **kwargs):
        traces.append(1)
        return base.model.apply(*args, **kwargs)

    frozen = adapters.frozen(base.params)
    first = evaluate_all(adapters, task, apply, frozen, 16)
    after_one = len(traces)
    second = evaluate_all(adapters, task, apply, frozen, 16)
    assert after_one >= 1 and len(traces) == after_one
    assert first == second


def test_load_reads_run_workdirs_and_export_directories(bert_set, tmp_path):
    from lora_jax import exports

    base, adapters = bert_set
    config = tiny_config()
    places = {"a": tmp_path / "run-a", "b": tmp_path / "b-export"}
    for name, place in places.items():
        i = adapters.index(name)
        target = place / "adapter" if name == "a" else place  # a workdir, an export directory
        exports.save(target, adapters.stacks[i], config.method, adapters.trainables[i],
                     **{k: v for k, v in base.info.items()})
    loaded = AdapterSet.load(places, base.params, base.family, base.info["task"])
    assert loaded.names == ("a", "b")
    for name in places:
        got = traverse_util.flatten_dict(loaded.trainables[loaded.index(name)])
        want = traverse_util.flatten_dict(adapters.trainables[adapters.index(name)])
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_allclose(got[path], want[path], atol=1e-6, err_msg=str(path))
    with pytest.raises(FileNotFoundError):
        AdapterSet.load({"x": tmp_path / "nothing"}, base.params, base.family, base.info["task"])
    # On a base of another width the error names the adapter and its directory, and what
    # does not fit (its head here).
    wider = setup.base(tiny_config(**{"model.random_init.hidden_size": 48,
                                      "model.random_init.intermediate_size": 96}))
    with pytest.raises(Exception, match=rf"adapter 'b' \({places['b']}\) does not fit this "
                                        r"base: .*classifier"):
        AdapterSet.load({"b": places["b"]}, wider.params, wider.family, wider.info["task"])


@pytest.mark.parametrize("beams", [1, 3])
def test_mixed_decoding_gives_each_prompt_its_adapters_tokens(beams):
    """Greedy and beam search over prompts that name their adapters: each prompt's tokens are
    those its adapter decodes alone."""
    from lora_jax import generate
    from lora_jax.adapter_set import decoding_apply

    config = load_config("configs/e2e.py:model=tiny")
    base = setup.base(config)
    stacks, trainables = [], []
    for seed, (rank, targets) in enumerate([(4, ("attn/c_attn",)), (2, ("attn/c_proj",)),
                                            (8, ("attn/c_attn", "attn/c_proj"))]):
        c = load_config("configs/e2e.py:model=tiny")
        c.method.lora.rank, c.method.lora.targets = rank, targets
        c.method.lora.split_outputs = {}
        stack, trainable = adapter(c, base, seed)
        stacks.append(stack)
        trainables.append(trainable)
    adapters = AdapterSet(("x", "y", "z"), tuple(stacks), tuple(trainables))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 90, size=n).tolist() for n in (3, 7, 1, 5, 4, 6)]
    which = [0, 2, 1, 0, 1, 2]

    def search(apply_fn, params):
        if beams == 1:
            return generate.greedy_search(apply_fn, params, prompts, max_new_tokens=6, eos_ids=0)
        return generate.beam_search(apply_fn, params, prompts, num_beams=beams,
                                    max_new_tokens=6, eos_ids=0)

    mixed = search(decoding_apply(adapters, base.model.apply),
                   (adapters.frozen(base.params), adapters.stacked(), np.array(which)))
    outputs = []
    for stack, trainable in zip(stacks, trainables):
        adapted = stack.adapt(base.model.apply)
        outputs.append(search(lambda p, *a, **k: adapted(p[0], p[1], *a, **k),
                              (stack.frozen(base.params, trainable), trainable)))
    assert mixed == [outputs[a][i] for i, a in enumerate(which)]
    assert outputs[0] != outputs[1]  # the adapters decode differently
