"""LoRA's successors (DoRA, PiSSA, LoRA+, VeRA) against PEFT on torch, on tiny GPT-2 and RoBERTa.

For each method and family: PEFT makes the adapter (its random initial values are carried over
through PEFT's own saved file, read by `exports.load`), both sides take the same 5 AdamW steps
(per-step losses within 1e-5 relative, final trainable values within 1e-5), PEFT loads our export
and gives our logits (1e-4), and our merge equals PEFT's `merge_and_unload` kernel by kernel.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import traverse_util

from lora_jax import methods
from lora_jax import exports
from lora_jax.interop.hub import load_pretrained
from lora_jax.methods import adalora, dora, lora, lora_plus, pissa, vera
from lora_jax.models import family as model_family
from lora_jax.models.encoder import sequence_classification_loss
from lora_jax.models.gpt2 import lm_loss
from lora_jax.training import optim
from conftest import save_tiny_hf_gpt2
from parity import (ADAM_EPS, LR, STEPS, WEIGHT_DECAY, jax_steps, save_tiny_roberta, token_batches,
                    torch_steps)


@dataclasses.dataclass
class Case:
    """A tiny model on both sides, with its batches and losses."""

    model_type: str
    task: str | None
    model: Any
    params: Any
    torch_model: Callable[[], torch.nn.Module]
    batches: list
    targets: list[str]  # PEFT target_modules
    modules: list[tuple[str, str]]  # (our module path, torch module name) of the adapted layers
    torch_kernel_transposed: bool  # torch stores (d_out, d_in) (Linear) rather than (d_in, d_out)

    @property
    def family(self):
        return model_family(self.model_type)

    def torch_loss(self, torch_model, batch):
        if self.task is None:
            ids, mask = (torch.from_numpy(b) for b in batch)
            return torch_model(input_ids=ids, attention_mask=mask,
                               labels=ids.masked_fill(mask == 0, -100)).loss
        ids, mask, labels = (torch.from_numpy(b) for b in batch)
        return torch_model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def jax_loss(self, apply, regularizer=None):
        def loss_fn(frozen, trainable, batch, rng):
            logits = apply(frozen, trainable, batch[0], attention_mask=batch[1],
                           method_rng=rng).logits
            extra = 0.0 if regularizer is None else regularizer(trainable)
            if self.task is None:
                return lm_loss(logits, batch[0], batch[1]) + extra
            return sequence_classification_loss(logits, batch[2], num_labels=3) + extra
        return loss_fn

    def torch_logits(self, torch_model):
        torch_model.eval()
        ids, mask = (torch.from_numpy(b) for b in self.batches[0][:2])
        with torch.no_grad():
            return torch_model(input_ids=ids, attention_mask=mask).logits.numpy()

    def jax_logits(self, apply, frozen, trainable):
        ids, mask = (jnp.asarray(b) for b in self.batches[0][:2])
        return np.asarray(apply(frozen, trainable, ids, attention_mask=mask).logits)


def gpt2_case(directory) -> Case:
    config = save_tiny_hf_gpt2(directory)
    model, params, _ = load_pretrained(directory)
    return Case("gpt2", None, model, params,
                lambda: transformers.GPT2LMHeadModel.from_pretrained(directory),
                token_batches(config.vocab_size, STEPS, batch=3, seq=16, seed=0),
                ["c_attn"],
                [(f"h_{i}/attn/c_attn", f"transformer.h.{i}.attn.c_attn") for i in range(2)],
                torch_kernel_transposed=False)


def roberta_case(directory) -> Case:
    config = save_tiny_roberta(directory)
    model, params, _ = load_pretrained(directory, task="classification", num_labels=3)
    batches = [(ids, mask, np.random.default_rng(i).integers(0, 3, ids.shape[0]))
               for i, (ids, mask) in enumerate(token_batches(config.vocab_size, STEPS, 4, 12, 1))]
    return Case("roberta", "classification", model, params,
                lambda: transformers.RobertaForSequenceClassification.from_pretrained(directory),
                batches, ["query", "value"],
                [(f"roberta/encoder/layer_{i}/attention/self/{m}",
                  f"roberta.encoder.layer.{i}.attention.self.{m}")
                 for i in range(2) for m in ("query", "value")],
                torch_kernel_transposed=True)


@pytest.fixture(params=["gpt2", "roberta"])
def case(request, tmp_path_factory) -> Case:
    directory = tmp_path_factory.mktemp(request.param)
    return gpt2_case(directory) if request.param == "gpt2" else roberta_case(directory)


def _peft_config(case: Case, kind: str, **kwargs):
    task_type = peft.TaskType.SEQ_CLS if case.task else None
    common = dict(target_modules=case.targets, fan_in_fan_out=case.model_type == "gpt2",
                  task_type=task_type)
    if kind == "vera":
        return peft.VeraConfig(r=8, **common, **kwargs)
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **common, **kwargs)


def _assert_trees_close(got, expected, atol=1e-5):
    got, expected = (traverse_util.flatten_dict(jax.device_get(t)) for t in (got, expected))
    assert got.keys() == expected.keys()
    for path in got:
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(expected[path]), rtol=0,
                                   atol=atol, err_msg="/".join(path))


def with_pefts_bases(case: Case, frozen, peft_model) -> dict:
    """`frozen` with each adapted kernel replaced by PEFT's base kernel (the residual PEFT's
    start left there)."""
    flat = traverse_util.flatten_dict(frozen)
    named = dict(peft_model.named_modules())
    for module, name in case.modules:
        flat[tuple(module.split("/")) + ("kernel",)] = jnp.asarray(
            _torch_kernel(case, named[f"base_model.model.{name}"].base_layer))
    return traverse_util.unflatten_dict(flat)


def module_node(tree: dict, module: str) -> Any:
    """The node of a nested params tree at a module path such as 'h/0/attn/c_attn'."""
    for part in module.split("/"):
        tree = tree[part]
    return tree


def _our_kernel(params, module: str) -> np.ndarray:
    flat = traverse_util.flatten_dict(params)
    return np.asarray(flat[tuple(module.split("/")) + ("kernel",)])


def _torch_kernel(case: Case, layer) -> np.ndarray:
    weight = layer.weight.detach().numpy()
    return weight.T if case.torch_kernel_transposed else weight


def check_against_peft(case: Case, tmp_path, peft_config, method_type, *, rename=None,
                       torch_optimizer=None, tx_of=None, merges=True, peft_base=False,
                       after_step=None, compare=None, peft_dtype=None):
    """The whole parity protocol (module docstring) for one method on one case.

    rename: (stack, trainable) -> (stack, trainable): turns what PEFT's file reads as into the
      method under test (LoRA+ is saved as plain LoRA).
    torch_optimizer: peft_model -> its torch optimizer (default AdamW on what requires grad).
    tx_of: stack, trainable -> our optax transformation (default AdamW).
    after_step: (peft_model, i) -> None, run after torch's step i.
    compare: (ours, read from PEFT's file, peft_model) -> None, in place of comparing the first
      two trees (AdaLoRA's file drops the removed triplets).
    peft_base: train against PEFT's base kernels (PiSSA's residual: two SVDs agree to float32
      rounding only, `test_pissa_matches_peft` checks how closely; Adam's normalised steps would
      magnify the difference where a gradient is near zero).
    peft_dtype: PEFT trains in this dtype (torch.float64: the exact answer to the float32 steps,
      from the same float32 start), where two float32 runs round apart by about the tolerance
      (LoHa: `test_lycoris`).
    """
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(case.torch_model(), peft_config)
    peft_model.save_pretrained(tmp_path / "peft_initial")
    if peft_dtype is not None:
        peft_model.to(peft_dtype)
    stack, trainable = exports.load(tmp_path / "peft_initial", case.params, case.family, case.task)
    if rename:
        stack, trainable = rename(stack, trainable)
    assert type(stack.methods[0]) is method_type
    frozen = stack.frozen(case.params, trainable)
    if peft_base:
        frozen = with_pefts_bases(case, frozen, peft_model)
    apply = stack.adapt(case.model.apply)
    # At step 0 the adapted model is the base, on both sides (PiSSA: W_res + s B0 A0 = W0).
    base_logits = case.jax_logits(lambda f, t, *a, **k: case.model.apply({"params": f}, *a, **k),
                                  case.params, {})
    np.testing.assert_allclose(case.jax_logits(apply, frozen, trainable), base_logits,
                               atol=1e-5)

    optimizer = torch_optimizer(peft_model) if torch_optimizer else None
    torch_losses = torch_steps(peft_model, lambda b: case.torch_loss(peft_model, b), case.batches,
                               optimizer=optimizer,
                               after_step=after_step and (lambda i: after_step(peft_model, i)))
    tx = tx_of(stack, trainable) if tx_of else None
    jax_losses, trainable = jax_steps(case.jax_loss(apply, stack.regularizer), frozen, trainable,
                                      [tuple(map(jnp.asarray, b)) for b in case.batches], tx=tx)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert torch_losses[-1] < torch_losses[0]

    # Ours reads PEFT's trained adapter as what we trained.
    peft_model.save_pretrained(tmp_path / "peft_trained")
    _, expected = exports.load(tmp_path / "peft_trained", case.params, case.family, case.task)
    if rename:
        _, expected = rename(stack, expected)
    (compare or (lambda got, want, _: _assert_trees_close(got, want)))(trainable, expected,
                                                                         peft_model)

    # PEFT reads our export and computes our logits.
    ours = case.jax_logits(apply, frozen, trainable)
    exports.save(tmp_path / "ours", stack, {}, trainable, frozen=frozen,
                 model_type=case.model_type, task=case.task)
    loaded = peft.PeftModel.from_pretrained(case.torch_model(), tmp_path / "ours")
    np.testing.assert_allclose(case.torch_logits(loaded), ours, atol=1e-4)
    np.testing.assert_allclose(case.torch_logits(peft_model), ours, atol=1e-4)

    if merges:  # our merge is PEFT's, kernel by kernel
        merged = stack.merge(frozen, trainable)
        # merge_adapter is merge_and_unload without the unloading, which PEFT's VeRA fails at
        # when a classifier head is a module to save.
        peft_model.merge_adapter()
        named = dict(peft_model.named_modules())
        for module, name in case.modules:
            np.testing.assert_allclose(
                _our_kernel(merged, module),
                _torch_kernel(case, named[f"base_model.model.{name}"].base_layer), atol=1e-5,
                err_msg=module)
        np.testing.assert_allclose(
            case.jax_logits(lambda f, t, *a, **k: case.model.apply({"params": f}, *a, **k),
                            merged, {}), ours, atol=1e-4)
    return stack, frozen, trainable


# --- DoRA -----------------------------------------------------------------------------------------

def test_dora_matches_peft(case, tmp_path):
    stack, frozen, trainable = check_against_peft(case, tmp_path,
                                                  _peft_config(case, "lora", use_dora=True),
                                                  dora.DoRA)
    # The magnitudes moved, so the test exercised more than LoRA.
    fresh = stack.split(case.params, jax.random.key(0))[1]
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(fresh["dora"]), jax.tree_util.tree_leaves(trainable["dora"]))]
    assert max(moved) > 1e-3


def test_dora_init_is_the_base_norm_and_split_outputs_keep_k():
    """Magnitudes start at ||W0|| per output unit; on GPT-2's fused c_attn adapted on q and v, k's
    outputs are exactly W0's whatever the adapters hold."""
    from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    ids = jnp.arange(8)[None] % 50
    params = model.init(jax.random.key(0), ids)["params"]
    spec = lora.LoraSpec(targets=(r"attn/c_attn",), rank=2, alpha=4.0,
                         split_outputs={r"attn/c_attn": (True, False, True)})
    stack = methods.MethodStack((dora.DoRA(spec),))
    frozen, trainable = stack.split(params, jax.random.key(1))
    adapter = trainable["dora"]["h_0"]["attn"]["c_attn"]
    kernel = params["h_0"]["attn"]["c_attn"]["kernel"]
    norms = np.linalg.norm(np.asarray(kernel), axis=0).reshape(3, 16)
    np.testing.assert_allclose(adapter["magnitude"], norms[[0, 2]], rtol=1e-6)

    adapter = jax.tree_util.tree_map(lambda x: x + 0.1, adapter)  # B != 0, m != ||W0||
    trainable["dora"]["h_0"]["attn"]["c_attn"] = adapter
    merged = stack.merge(frozen, trainable)["h_0"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_array_equal(np.asarray(merged)[:, 16:32], np.asarray(kernel)[:, 16:32])
    assert not np.allclose(np.asarray(merged)[:, :16], np.asarray(kernel)[:, :16])
    # The merged kernel's columns have exactly the trained magnitudes.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(merged), axis=0).reshape(3, 16)[[0, 2]],
                               adapter["magnitude"], rtol=1e-5)
    out = stack.adapt(model.apply)(frozen, trainable, ids).logits
    merged_out = model.apply({"params": stack.merge(frozen, trainable)}, ids).logits
    np.testing.assert_allclose(out, merged_out, atol=1e-5)


# --- PiSSA ----------------------------------------------------------------------------------------

def test_pissa_matches_peft(case, tmp_path):
    stack, frozen, trainable = check_against_peft(
        case, tmp_path, _peft_config(case, "lora", init_lora_weights="pissa"), pissa.PiSSA,
        peft_base=True)
    # Our own initialisation is PEFT's up to the sign of each singular pair, and so is W_res.
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(case.torch_model(), _peft_config(
        case, "lora", init_lora_weights="pissa"))
    fresh_frozen, fresh = stack.split(case.params, jax.random.key(0))
    named = dict(peft_model.named_modules())
    for module, name in case.modules:
        layer = named[f"base_model.model.{name}"]
        a_peft = layer.lora_A["default"].weight.detach().numpy()
        b_peft = layer.lora_B["default"].weight.detach().numpy()
        node = fresh["pissa"]
        for part in module.split("/"):
            node = node[part]
        sign = np.sign(np.sum(np.asarray(node["lora_a"]) * a_peft, axis=1))
        np.testing.assert_allclose(np.asarray(node["lora_a"]) * sign[:, None], a_peft, atol=1e-5)
        np.testing.assert_allclose(np.asarray(node["lora_b"]) * sign[None, :], b_peft, atol=1e-5)
        np.testing.assert_allclose(_our_kernel(fresh_frozen, module),
                                   _torch_kernel(case, layer.base_layer), atol=1e-5)


def test_pissa_trains_from_the_command_line(tmp_path):
    """The README's setting, configs/glue.py:method=pissa, through the trainer's command line,
    whose config is locked: PiSSA's builder once set a field on it and died (issue 27)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from test_train import CLI_TINY

    proc = subprocess.run(
        [sys.executable, "-m", "lora_jax.train", "--config",
         str(REPO_ROOT / "configs/glue.py") + ":task=sst2,model=tiny,method=pissa",
         "--workdir", str(tmp_path / "run"), *CLI_TINY, "--config.train.max_steps=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_pissa_export_is_a_lora_on_the_original_base(tmp_path):
    """The export is PEFT's conversion: a rank-2r plain LoRA that, on the untouched base, gives
    the trained function; read back it is a LoRA (not PiSSA) on the original weights."""
    case = gpt2_case(tmp_path / "base")
    stack = methods.MethodStack((pissa.PiSSA(lora.LoraSpec(targets=(r"attn/c_attn",), rank=3,
                                                           alpha=6.0)),))
    frozen, trainable = stack.split(case.params, jax.random.key(0))
    trainable = jax.tree_util.tree_map(lambda x: x * 1.1, trainable)  # "trained"
    apply = stack.adapt(case.model.apply)
    exports.save(tmp_path / "out", stack, {}, trainable, frozen=frozen, model_type="gpt2",
                 task=None)
    loaded, tree = exports.load(tmp_path / "out", case.params, case.family, None)
    assert type(loaded.methods[0]) is lora.LoRA and loaded.methods[0].spec.rank == 6
    np.testing.assert_allclose(
        case.jax_logits(loaded.adapt(case.model.apply), loaded.frozen(case.params, tree), tree),
        case.jax_logits(apply, frozen, trainable), atol=1e-5)
    # The frozen tree of the loaded LoRA is the original base, bit for bit.
    np.testing.assert_array_equal(_our_kernel(loaded.frozen(case.params, tree), "h_0/attn/c_attn"),
                                  _our_kernel(case.params, "h_0/attn/c_attn"))


# --- LoRA+ ----------------------------------------------------------------------------------------

RATIO = 4.0


def _as_lora_plus(peft_groups: bool):
    def rename(stack, trainable):
        method = lora_plus.LoraPlus(stack.methods[0].spec, lr_ratio=RATIO,
                                    peft_groups=peft_groups)
        trainable = {"params": trainable["params"],
                     method.name: trainable.get("lora", trainable.get(method.name))}
        return methods.MethodStack((method,)), trainable
    return rename


def test_lora_plus_matches_peft_optimizer(case, tmp_path):
    """PEFT's create_loraplus_optimizer against our update multipliers. On GPT-2 only A and B
    train, where the paper and PEFT agree; on RoBERTa the head trains too, and PEFT also gives its
    bias B's learning rate (and no weight decay): `peft_groups=True`, weight decay 0 on both."""
    from peft.optimizers import create_loraplus_optimizer

    weight_decay = WEIGHT_DECAY if case.task is None else 0.0
    check_against_peft(
        case, tmp_path, _peft_config(case, "lora"), lora_plus.LoraPlus,
        rename=_as_lora_plus(peft_groups=case.task is not None),
        torch_optimizer=lambda m: create_loraplus_optimizer(
            m, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
            loraplus_weight_decay=weight_decay),
        tx_of=lambda stack, trainable: optax.chain(
            optim.adamw(LR, weight_decay=weight_decay),
            optim.scale_updates(stack.update_scales(trainable))))


def test_lora_plus_scales_only_b_by_default():
    spec = lora.LoraSpec(targets=(r"/kernel",), rank=2)
    method = lora_plus.LoraPlus(spec, lr_ratio=8.0)
    trainable = {"params": {"head": {"bias": jnp.zeros(3), "kernel": jnp.zeros((2, 3))}},
                 "lora_plus": {"dense": {"lora_a": jnp.zeros((2, 4)), "lora_b": jnp.zeros((3, 2))}}}
    scales = methods.MethodStack((method,)).update_scales(trainable)
    assert scales == {"params": {"head": {"bias": 1.0, "kernel": 1.0}},
                      "lora_plus": {"dense": {"lora_a": 1.0, "lora_b": 8.0}}}
    peft_like = lora_plus.LoraPlus(spec, lr_ratio=8.0, peft_groups=True)
    assert methods.MethodStack((peft_like,)).update_scales(trainable)["params"]["head"] == {
        "bias": 8.0, "kernel": 1.0}


# --- VeRA -----------------------------------------------------------------------------------------

def test_vera_matches_peft(case, tmp_path):
    stack, frozen, trainable = check_against_peft(case, tmp_path, _peft_config(case, "vera"),
                                                  vera.VeRA)
    # The checkpointed tree holds the vectors only: r + d_out per adapted layer (and the head).
    method = stack.methods[0]
    flat = traverse_util.flatten_dict(case.params)
    expected = sum(method.rank + flat[tuple(m.split("/")) + ("kernel",)].shape[1]
                   for m, _ in case.modules)
    assert methods.count_params(trainable["vera"]) == expected


def test_vera_projections_come_from_the_seed_not_the_checkpoint():
    """Our own VeRA derives the shared matrices from projection_seed, the same in every run and
    on resume; another seed gives others; they sit in the frozen tree, once, not per layer."""
    from lora_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    make = lambda seed: methods.MethodStack((vera.VeRA((r"c_attn", r"mlp/c_fc"), rank=4,  # noqa
                                                       projection_seed=seed),))
    frozen, trainable = make(3).split(params, jax.random.key(0))
    again, _ = make(3).split(params, jax.random.key(1))
    other, _ = make(4).split(params, jax.random.key(0))
    np.testing.assert_array_equal(frozen["vera"]["vera_a"], again["vera"]["vera_a"])
    assert not np.allclose(frozen["vera"]["vera_a"], other["vera"]["vera_a"])
    # Shared shapes: the largest fan-in (16) and fan-out (64, c_fc) among the targets.
    assert frozen["vera"]["vera_a"].shape == (4, 16) and frozen["vera"]["vera_b"].shape == (64, 4)
    assert set(trainable["vera"]["h_0"]["attn"]["c_attn"]) == {"lambda_b", "lambda_d"}
    # Bounds of kaiming-uniform(a=sqrt 5): 1 / sqrt(fan_in).
    assert np.abs(frozen["vera"]["vera_a"]).max() <= 1 / np.sqrt(16)
    assert np.abs(frozen["vera"]["vera_b"]).max() <= 1 / np.sqrt(4)


def test_vera_refuses_peft_files_without_projections(tmp_path):
    case = gpt2_case(tmp_path / "base")
    peft_model = peft.get_peft_model(case.torch_model(),
                                     _peft_config(case, "vera", save_projection=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(Exception, match="save_projection"):
        exports.load(tmp_path / "adapter", case.params, case.family, None)


# --- AdaLoRA --------------------------------------------------------------------------------------

def test_adalora_matches_peft_through_every_phase(case, tmp_path):
    """5 steps with tinit=0, tfinal=2, T=5: step 0 scores only, steps 1-2 mask on the cubic
    budget, step 3 sets the final mask, step 4 applies it; the orthogonality penalty as PEFT's
    ('code'). Then the ranks kept are the target's on average, and the export holds them alone."""
    settings = dict(init_r=6, target_r=3, tinit=0, tfinal=2, deltaT=1, total_step=STEPS,
                    lora_alpha=8, orth_reg_weight=0.5)
    # CAUSAL_LM, not None, on GPT-2: a bare PeftModel calls the HF model directly and skips
    # AdaLoraModel.forward, where PEFT adds the orthogonality penalty.
    task_type = peft.TaskType.SEQ_CLS if case.task else peft.TaskType.CAUSAL_LM
    peft_config = peft.AdaLoraConfig(target_modules=case.targets, task_type=task_type,
                                     fan_in_fan_out=case.model_type == "gpt2", **settings)

    def compare(ours, from_file, peft_model):
        # The file holds the kept triplets (the removed ones read back as zeros) ...
        flat = traverse_util.flatten_dict(jax.device_get(ours))
        for path in list(flat):
            if path[0] == "adalora" and path[-1] == adalora.LORA_E:
                keep = flat[path] != 0
                flat[path[:-1] + (adalora.LORA_A,)] = flat[path[:-1] + (adalora.LORA_A,)] * keep[:, None]
                flat[path[:-1] + (adalora.LORA_B,)] = flat[path[:-1] + (adalora.LORA_B,)] * keep
        _assert_trees_close(traverse_util.unflatten_dict(flat), from_file)
        # ... and every triplet, removed ones included, follows PEFT's in memory.
        named = dict(peft_model.named_modules())
        for module, name in case.modules:
            layer = named[f"base_model.model.{name}"]
            node = ours["adalora"]
            for part in module.split("/"):
                node = node[part]
            for leaf, torch_leaf in ((adalora.LORA_A, layer.lora_A), (adalora.LORA_B, layer.lora_B),
                                     (adalora.LORA_E, layer.lora_E)):
                np.testing.assert_allclose(np.asarray(node[leaf]),
                                           torch_leaf["default"].detach().numpy().reshape(
                                               node[leaf].shape), rtol=0, atol=1e-5,
                                           err_msg=f"{module}/{leaf}")

    stack, frozen, trainable = check_against_peft(
        case, tmp_path, peft_config, adalora.AdaLoRA,
        tx_of=lambda stack, trainable: stack.optimizer(optim.adamw(LR, weight_decay=WEIGHT_DECAY),
                                                       STEPS),
        after_step=lambda peft_model, i: peft_model.base_model.update_and_allocate(i),
        compare=compare)
    kept = adalora.kept(trainable["adalora"])
    assert sum(int(k.sum()) for k in kept.values()) == 3 * len(case.modules)
    assert len({int(k.sum()) for k in kept.values()}) > 1  # the budget was spread unevenly


def test_adalora_budget_schedule_is_peft_s():
    from peft.tuners.adalora.layer import RankAllocator

    method = adalora.AdaLoRA((r"x",), init_rank=12, target_rank=4, tinit=3, tfinal=5, delta_t=2)
    budgets, recompute = method.schedule(40, modules=7)

    class Config:  # the fields RankAllocator.budget_schedule reads
        tinit, tfinal, total_step, deltaT = 3, 5, 40, 2

    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config, allocator.init_bgt, allocator.target_bgt = Config, 12 * 7, 4 * 7
    for t in range(41):
        budget, mask = allocator.budget_schedule(t)
        assert budgets[t] == budget, t
        if t < 40 - 5:
            assert recompute[t] == mask, t
    # At T - tfinal PEFT's update_and_allocate forces the final mask (force_mask=True), which
    # budget_schedule alone does not say; after it, PEFT re-applies that fixed mask, not a new one.
    assert recompute[35] and allocator.budget_schedule(35) == (4 * 7, False)
    assert not recompute[36:].any()


@pytest.mark.parametrize("form, expected", [("paper", 3.0 ** 2 + 3.0 ** 2), ("code", 3.0)])
def test_adalora_orthogonality_penalty_forms(form, expected):
    """One module at r=1 with A A^T = B^T B = 4, so both excesses are 3: the paper sums the
    squared Frobenius norms (9 + 9), the code averages the plain ones over A and B ((3 + 3) / 2)."""
    method = adalora.AdaLoRA((r"x",), init_rank=1, target_rank=1, orth_reg_weight=1.0,
                             orth_form=form)
    added = {"m": {"lora_a": jnp.array([[2.0, 0.0]]), "lora_e": jnp.zeros(1),
                   "lora_b": jnp.array([[0.0], [2.0]])}}
    assert float(method.regularizer(added)) == pytest.approx(expected)


def exports_both_ways(case: Case, tmp_path, stack, apply, frozen, trained, peft_model):
    """PEFT loads our export of the trained `stack` and gives our logits; we load PEFT's trained
    `peft_model` (its file) and give our logits too (both within 1e-4).

    Returns:
      (our logits, the stack read from PEFT's file).
    """
    ours = case.jax_logits(apply, frozen, trained)
    exports.save(tmp_path / "ours", stack, {}, trained, frozen=frozen,
                 model_type=case.model_type, task=case.task)
    loaded = peft.PeftModel.from_pretrained(case.torch_model(), tmp_path / "ours")
    np.testing.assert_allclose(case.torch_logits(loaded), ours, atol=1e-4)
    peft_model.save_pretrained(tmp_path / "peft_trained")
    back, tree = exports.load(tmp_path / "peft_trained", case.params, case.family, case.task)
    np.testing.assert_allclose(
        case.jax_logits(back.adapt(case.model.apply), back.frozen(case.params, tree), tree),
        ours, atol=1e-4)
    return ours, back


def steps_from_pefts_start(case: Case, tmp_path, peft_model, stack, name: str,
                           peft_dtype=None, eps: float = ADAM_EPS):
    """For a data-driven start, whose PEFT file cannot be read back (its moved base needs the
    calibration data): PEFT's start, read as the plain LoRA tensors it holds, becomes method
    `name`'s trainable start in `stack` (calibrated), trained against PEFT's moved base; both
    sides take 5 AdamW steps, losses within 1e-5 relative and A, B within 1e-5. `peft_dtype`:
    PEFT takes its steps in this dtype, after its start is read (as `check_against_peft`);
    `eps`: both sides' AdamW epsilon.

    Returns:
      (the adapted apply, the frozen tree trained against, the trained tree).
    """
    import json

    peft_model.save_pretrained(tmp_path / "start")
    config_path = tmp_path / "start" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "init_lora_weights": True}))
    _, start = exports.load(tmp_path / "start", case.params, case.family, case.task)
    trainable = {"params": start["params"], name: start["lora"]}
    frozen = with_pefts_bases(case, stack.frozen(case.params, trainable), peft_model)
    named = dict(peft_model.named_modules())
    apply = stack.adapt(case.model.apply)
    if peft_dtype is not None:
        peft_model.to(peft_dtype)
    torch_losses = torch_steps(peft_model, lambda b: case.torch_loss(peft_model, b), case.batches,
                               eps=eps)
    jax_losses, trained = jax_steps(case.jax_loss(apply), frozen, trainable,
                                    [tuple(map(jnp.asarray, b)) for b in case.batches], eps=eps)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert torch_losses[-1] < torch_losses[0]
    flat = traverse_util.flatten_dict(trained[name])
    for module, torch_name in case.modules:
        layer = named[f"base_model.model.{torch_name}"]
        for leaf, torch_leaf in (("lora_a", layer.lora_A), ("lora_b", layer.lora_B)):
            np.testing.assert_allclose(flat[tuple(module.split("/")) + (leaf,)],
                                       torch_leaf["default"].weight.detach(), atol=1e-5,
                                       err_msg=module)
    return apply, frozen, trained
