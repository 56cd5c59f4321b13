"""LoRA-FA against PEFT's `create_lorafa_optimizer` on tiny GPT-2, tiny RoBERTa with a head and a
tiny Llama: PEFT's adapters take our frozen A, both sides take the same 5 steps (losses within
1e-5 relative, B within 1e-5), PEFT loads our export and gives our logits (1e-4), and PEFT's
trained adapter, read here, gives ours.

PEFT's optimizer steps in transformers' AdamW form (eps on the uncorrected second moment, weight
decay after the step); our side takes the same form (`parity.transformers_adamw`, PEFT's eps
1e-6, no weight decay), so what is compared is the frozen A and the gradient correction: the run's
AdamW is optax's, whose eps placement differs where a gradient is near eps. PEFT computes the
correction under bf16 autocast where bf16 is available; the test turns that off (float32 on both
sides).
"""

import re

import jax
import numpy as np
import peft
import peft.optimizers.lorafa as peft_lorafa
import pytest
import torch

from lora_jax import exports, methods
from lora_jax.methods import lora, lora_fa
from parity import LR, jax_steps, torch_steps, transformers_adamw
from test_initialisations import llama_case
from test_successors import (_peft_config, exports_both_ways, gpt2_case, module_node,
                             roberta_case)

RANK, ALPHA = 4, 8.0  # `_peft_config`'s


@pytest.fixture(params=["gpt2", "roberta", "llama"])
def case(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return {"gpt2": gpt2_case, "roberta": roberta_case, "llama": llama_case}[request.param](
        directory)


def _stack(case, **settings) -> methods.MethodStack:
    spec = lora.LoraSpec(targets=tuple(re.escape(m) + "/kernel" for m, _ in case.modules),
                         rank=RANK, alpha=ALPHA)
    return methods.MethodStack((lora_fa.LoraFA(spec, **settings),),
                               also_train=(r"^classifier/",) if case.task else ())


def test_lora_fa_matches_peft(case, tmp_path, monkeypatch):
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    stack = _stack(case)
    frozen, trainable = stack.split(case.params, jax.random.key(0))
    # Only B is trained; A sits in the frozen tree.
    leaves = jax.tree_util.tree_leaves_with_path(trainable["lora_fa"])
    assert leaves and all(path[-1].key == lora.LORA_B for path, _ in leaves)
    assert stack.low_rank_params(trainable) == sum(int(x.size) for _, x in leaves)

    torch.manual_seed(1)
    peft_model = peft.get_peft_model(case.torch_model(), _peft_config(case, "lora"))
    named = dict(peft_model.named_modules())
    with torch.no_grad():
        for module, name in case.modules:
            a = np.asarray(module_node(frozen["lora_fa"]["a"], module)["lora_a"])
            named[f"base_model.model.{name}"].lora_A["default"].weight.copy_(torch.from_numpy(a))
    if case.task:  # PEFT's fresh head, trained in full on both sides
        peft_model.save_pretrained(tmp_path / "peft_initial")
        trainable["params"] = exports.load(tmp_path / "peft_initial", case.params, case.family,
                                           case.task)[1]["params"]
    apply = stack.adapt(case.model.apply)

    optimizer = peft.optimizers.create_lorafa_optimizer(peft_model, r=RANK, lora_alpha=ALPHA,
                                                        lr=LR, weight_decay=0.0)
    torch_losses = torch_steps(peft_model, lambda b: case.torch_loss(peft_model, b), case.batches,
                               optimizer=optimizer)
    batches = [tuple(map(np.asarray, b)) for b in case.batches]
    tx = transformers_adamw(LR)
    start = jax.tree_util.tree_map(np.asarray, trainable)  # the steps donate their input
    jax_losses, trained = jax_steps(case.jax_loss(apply), frozen, trainable, batches, tx=tx)
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert torch_losses[-1] < torch_losses[0]
    def layer_b(name):
        return named[f"base_model.model.{name}"].lora_B["default"].weight.detach().numpy()

    for module, name in case.modules:
        layer = named[f"base_model.model.{name}"]
        np.testing.assert_allclose(module_node(trained["lora_fa"], module)["lora_b"], layer_b(name),
                                   atol=1e-5)
        np.testing.assert_allclose(module_node(frozen["lora_fa"]["a"], module)["lora_a"],
                                   layer.lora_A["default"].weight.detach(), atol=0)  # frozen

    # Without the correction the steps are another method's: the comparison above can fail.
    plain = _stack(case, gradient_correction=False)
    _, uncorrected = jax_steps(case.jax_loss(plain.adapt(case.model.apply)), frozen,
                               jax.tree_util.tree_map(jax.numpy.asarray, start), batches, tx=tx)
    gap = max(float(np.abs(np.asarray(module_node(uncorrected["lora_fa"], m)["lora_b"])
                           - layer_b(n)).max()) for m, n in case.modules)
    assert gap > 100 * 1e-5, gap  # a hundred times the tolerance the corrected B meets

    ours, back = exports_both_ways(case, tmp_path, stack, apply, frozen, trained, peft_model)
    assert type(back.methods[0]) is lora.LoRA  # PEFT's file does not say LoRA-FA: a LoRA
    merged = stack.merge(frozen, trained)
    np.testing.assert_allclose(
        case.jax_logits(lambda f, t, *a, **k: case.model.apply({"params": f}, *a, **k),
                        merged, {}), ours, atol=1e-4)


def test_a_is_drawn_from_its_seed_and_a_resumed_run_rederives_it(tmp_path):
    """A depends on `a_seed` alone (not the run's key): the frozen tree of a fresh split and of a
    stack rebuilt for a loaded trainable tree hold the same A."""
    case = gpt2_case(tmp_path / "base")
    stack = _stack(case)
    frozen, trainable = stack.split(case.params, jax.random.key(0))
    again = stack.frozen(case.params, trainable)
    other_key = stack.split(case.params, jax.random.key(5))[0]
    other_seed = _stack(case, a_seed=1).split(case.params, jax.random.key(0))[0]
    a = jax.tree_util.tree_leaves(frozen["lora_fa"])
    for tree, same in ((again, True), (other_key, True), (other_seed, False)):
        for x, y in zip(a, jax.tree_util.tree_leaves(tree["lora_fa"])):
            assert np.array_equal(x, y) == same
