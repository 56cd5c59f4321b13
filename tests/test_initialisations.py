"""LoRA's weight-driven starts beside PiSSA: OLoRA (QR of W0) against PEFT, MiLoRA (W0's minor
singular triplets, which PEFT lacks) against its formula.

OLoRA follows `test_successors`' protocol on tiny RoBERTa with a head and a tiny Llama: PEFT's
start read from its file, the same 5 AdamW steps, PEFT's trained file read back, PEFT loading our
export, our merge equal to PEFT's; on GPT-2's Conv1D too, which PEFT factors as the paper does since
0.22.
"""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from lora_jax import exports, methods
from lora_jax.interop.hub import load_pretrained
from lora_jax.methods import lora, milora, olora
from lora_jax.methods.base import SettingError
from parity import STEPS, token_batches
from test_llama import BASE, save_hf
from test_successors import (Case, _our_kernel, _peft_config, _torch_kernel, check_against_peft,
                             gpt2_case, module_node, roberta_case)


def llama_case(directory) -> Case:
    config = transformers.LlamaConfig(**BASE)
    save_hf(config, directory)
    model, params, _ = load_pretrained(directory)
    return Case("llama", None, model, params,
                lambda: transformers.LlamaForCausalLM.from_pretrained(directory),
                token_batches(BASE["vocab_size"], STEPS, batch=3, seq=16, seed=0),
                ["q_proj", "v_proj"],
                [(f"model/layers_{i}/self_attn/{m}", f"model.layers.{i}.self_attn.{m}")
                 for i in range(2) for m in ("q_proj", "v_proj")],
                torch_kernel_transposed=True)


@pytest.fixture(params=["roberta", "llama"])
def linear_case(request, tmp_path_factory) -> Case:
    directory = tmp_path_factory.mktemp(request.param)
    return roberta_case(directory) if request.param == "roberta" else llama_case(directory)


def _stack(method_type, targets, rank=3, alpha=6.0, also_train=()):
    return methods.MethodStack((method_type(lora.LoraSpec(targets=targets, rank=rank,
                                                          alpha=alpha)),), also_train=also_train)


def _check_olora_against_peft(case, tmp_path):
    stack, _, _ = check_against_peft(case, tmp_path, _peft_config(case, "lora",
                                                                  init_lora_weights="olora"),
                                     olora.OLoRA, peft_base=True)
    # Our own start is PEFT's: A0 = R_r, B0 = Q_r and W_res, within 1e-5.
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(case.torch_model(),
                                     _peft_config(case, "lora", init_lora_weights="olora"))
    fresh_frozen, fresh = stack.split(case.params, jax.random.key(0))
    named = dict(peft_model.named_modules())
    for module, name in case.modules:
        layer = named[f"base_model.model.{name}"]
        ours = module_node(fresh["olora"], module)
        np.testing.assert_allclose(ours["lora_a"], layer.lora_A["default"].weight.detach(),
                                   atol=1e-5)
        np.testing.assert_allclose(ours["lora_b"], layer.lora_B["default"].weight.detach(),
                                   atol=1e-5)
        np.testing.assert_allclose(_our_kernel(fresh_frozen, module),
                                   _torch_kernel(case, layer.base_layer), atol=1e-5)
        # The base moved: the test compared more than W0 with itself.
        moved = _our_kernel(fresh_frozen, module) - _our_kernel(case.params, module)
        assert np.abs(moved).max() > 1e-2


def test_olora_matches_peft(linear_case, tmp_path):
    _check_olora_against_peft(linear_case, tmp_path)


def test_olora_on_gpt2_matches_peft(tmp_path):
    """GPT-2's Conv1D stores the kernel itself (d_in, d_out); PEFT (from 0.22) factors W0^T there
    as the paper does and as we do, so the whole protocol holds on its fused c_attn (d_out = 3
    d_in, a shape PEFT's earlier factorisation of the stored kernel could not fit). PEFT's files
    from before 0.22: `test_peft_adapters::test_olora_adapter_gives_peft_logits`."""
    _check_olora_against_peft(gpt2_case(tmp_path / "base"), tmp_path)


def test_milora_starts_from_the_minor_singular_part(tmp_path):
    """s B0 A0 is the part of W0^T on its r smallest singular values (numpy's SVD in float64),
    the frozen base the rest; on GPT-2's fused c_attn adapted on q and v, each part's own."""
    case = gpt2_case(tmp_path / "base")
    rank, alpha = 3, 12.0
    spec = lora.LoraSpec(targets=(r"attn/c_attn", r"attn/c_proj"), rank=rank, alpha=alpha,
                         split_outputs={r"attn/c_attn": (True, False, True)})
    stack = methods.MethodStack((milora.MiLoRA(spec),))
    frozen, trainable = stack.split(case.params, jax.random.key(0))
    scale = alpha / rank
    for module, parts in (("h_0/attn/c_proj", 1), ("h_1/attn/c_attn", 3)):
        kernel = _our_kernel(case.params, module).astype(np.float64)
        residual = _our_kernel(frozen, module)
        adapter = module_node(trainable["milora"], module)
        a, b = np.asarray(adapter["lora_a"]), np.asarray(adapter["lora_b"])
        if parts == 1:
            a, b = a[None], b[None]
        columns = np.split(kernel, parts, axis=1)
        slots = [0] if parts == 1 else [0, 2]
        for i, slot in enumerate(slots):
            u, s, vt = np.linalg.svd(columns[slot].T, full_matrices=False)
            minor = (u[:, -rank:] * s[-rank:]) @ vt[-rank:]
            np.testing.assert_allclose(scale * b[i] @ a[i], minor, atol=1e-5)
            width = columns[slot].shape[1]
            np.testing.assert_allclose(residual[:, slot * width:(slot + 1) * width],
                                       columns[slot] - minor.T, atol=1e-5)
        if parts == 3:  # k is not adapted: its columns stay W0's, bit for bit
            width = kernel.shape[1] // 3
            np.testing.assert_array_equal(residual[:, width:2 * width],
                                          _our_kernel(case.params, module)[:, width:2 * width])
    apply = stack.adapt(case.model.apply)
    base = case.torch_logits(case.torch_model())
    np.testing.assert_allclose(case.jax_logits(apply, frozen, trainable), base, atol=1e-5)


def test_milora_exports_a_lora_peft_loads(tmp_path):
    """PEFT has no MiLoRA: the export is PiSSA's conversion, a plain LoRA on the original base,
    and PEFT gives our logits with it; read back here it is that LoRA."""
    case = roberta_case(tmp_path / "base")
    stack = _stack(milora.MiLoRA, (r"attention/self/query", r"attention/self/value"),
                   also_train=(r"^classifier/",))  # the fresh head travels with the adapter
    frozen, trainable = stack.split(case.params, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape)
                                for x, k in zip(leaves, keys)])
    apply = stack.adapt(case.model.apply)
    ours = case.jax_logits(apply, frozen, trainable)
    exports.save(tmp_path / "out", stack, {}, trainable, frozen=frozen, model_type="roberta",
                 task="classification")
    loaded = peft.PeftModel.from_pretrained(case.torch_model(), tmp_path / "out")
    np.testing.assert_allclose(case.torch_logits(loaded), ours, atol=1e-4)
    back, tree = exports.load(tmp_path / "out", case.params, case.family, "classification")
    assert type(back.methods[0]) is lora.LoRA and back.methods[0].spec.rank == 6


@pytest.mark.parametrize("method_type", [olora.OLoRA, milora.MiLoRA])
def test_a_rank_over_a_kernels_components_is_refused(tmp_path, method_type):
    case = gpt2_case(tmp_path / "base")  # width 32: c_proj has 32 components
    stack = _stack(method_type, (r"attn/c_proj",), rank=33, alpha=33.0)
    # LoRA's own check: the start has min(d_in, d_out) components to take r from.
    with pytest.raises(SettingError, match=r"rank 33 for 'h_0/attn/c_proj/kernel' must be in "
                                           r"\[1, min\(d_in, d_out\)\] = \[1, 32\]"):
        stack.split(case.params, jax.random.key(0))


# By default the runs that reach the trainer through a path of their own: LoRA-GA's gradient
# calibration, EVA's ranks set by its calibration and LoRA-FA's frozen A (CorDA's calibration:
# tests/test_corda.py); `-m slow` runs the starts and factorings whose training is their
# stack's (PiSSA's, the LyCORIS base).
DEFAULT_CLI = ("lora_ga", "lora_fa", "eva")


@pytest.mark.parametrize("method", [
    m if m in DEFAULT_CLI else pytest.param(m, marks=pytest.mark.slow)
    for m in ("olora", "milora", "corda", "lora_ga", "eva", "lora_fa", "loha", "lokr")])
def test_each_variant_trains_and_exports_from_the_command_line(tmp_path, method):
    """configs/glue.py's entry for the method (these starts, LoRA-FA: tests/test_lora_fa.py, LoHa
    and LoKr: tests/test_lycoris.py), through the trainer's command line, to a PEFT export."""
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from test_train import CLI_TINY

    proc = subprocess.run(
        [sys.executable, "-m", "lora_jax.train", "--config",
         str(REPO_ROOT / "configs/glue.py") + f":task=sst2,model=tiny,method={method}",
         "--workdir", str(tmp_path / "run"), *CLI_TINY, "--config.train.max_steps=2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert f"{method}(r=" in proc.stdout + proc.stderr
