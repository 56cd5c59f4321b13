"""CorDA against PEFT's `preprocess_corda` on tiny RoBERTa with a head and a tiny Llama, both
sides given the same calibration batches (single unpadded examples, as PEFT's hook needs): the
start (A0, B0 up to the sign of each triplet, and the residual base) within 1e-5 in both modes;
then from PEFT's start the same 5 AdamW steps (losses within 1e-5 relative, A and B within
1e-5), and PEFT loads our export (a rank-2r LoRA on the original base) with our logits."""

import dataclasses
import json

import jax
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda

from lora_jax import exports, methods
from lora_jax.methods import calibration, corda, lora
from lora_jax.methods.base import SettingError
from parity import token_batches
from test_initialisations import linear_case  # noqa: F401 (a fixture: RoBERTa, Llama)
from test_successors import (_our_kernel, _torch_kernel, gpt2_case, module_node,
                             steps_from_pefts_start)

RANK, ALPHA = 4, 8.0


def _calibration_batches(case, n=4, seq=10):
    """n single unpadded examples (PEFT's hook takes one example per call)."""
    flat = traverse_util.flatten_dict(case.params)
    vocab = min(v.shape[0] for k, v in flat.items() if k[-1] == "embedding" and v.shape[0] > 64)
    return [(ids[:1], mask[:1]) for ids, mask in token_batches(vocab, n, 1, seq, seed=7)]


def calibration_data(case, batches, loss=None) -> calibration.Batches:
    """The (ids, mask) `batches` as the trainer hands them to a data-driven start."""
    def forward(params, batch):
        return case.model.apply({"params": params}, batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits

    return calibration.Batches(forward, case.params, tuple(
        {"input_ids": ids, "attention_mask": mask} for ids, mask in batches), loss)


def _peft_start(case, mode, batches, covariance_file=None):
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=case.targets,
                             init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=mode,
                                                      covariance_file=covariance_file),
                             task_type=peft.TaskType.SEQ_CLS if case.task else None)
    torch.manual_seed(1)
    model = case.torch_model()

    def run_model():
        for ids, mask in batches:
            model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    preprocess_corda(model, config, run_model=run_model)
    return peft.get_peft_model(model, config)


def _ours(case, mode, batches):
    spec = lora.LoraSpec(targets=tuple(t + "/kernel" for t in case.targets), rank=RANK,
                         alpha=ALPHA)
    method = corda.CorDA(spec, mode=mode).calibrated(calibration_data(case, batches))
    return methods.MethodStack((method,), also_train=(r"^classifier/",) if case.task else ())


@pytest.mark.parametrize("mode", corda.MODES)
def test_corda_start_is_pefts(linear_case, mode, tmp_path):
    """Our covariances are PEFT's (to 1e-5 of their largest entry: the two forward passes round
    apart). From PEFT's covariances (its covariance_file) our start is, in both modes, the
    definition's: s B0 A0 C is the part of W0^T C on its r largest ('ipm') or smallest ('kpm')
    singular values (numpy's float64 SVD), and W_res = W0 - s (B0 A0)^T. In 'ipm' it is also
    PEFT's start within 1e-5 (A0, B0 up to each triplet's sign). PEFT computes the start in
    float32, which for 'kpm''s ill-conditioned smallest triplets lands up to 2.6e-5 from the
    float64 answer on these models (ours: 1.4e-8), so there 1e-5 is not asked of PEFT."""
    case = linear_case
    batches = _calibration_batches(case)
    peft_model = _peft_start(case, mode, batches, str(tmp_path / "covariance.pt"))
    theirs = torch.load(tmp_path / "covariance.pt")
    stack = _ours(case, mode, batches)
    ours = stack.methods[0].statistics
    given = {}
    for module, name in case.modules:
        c_peft = theirs[name].numpy()
        np.testing.assert_allclose(ours[module + "/kernel"], c_peft, rtol=0,
                                   atol=1e-5 * np.abs(c_peft).max(), err_msg=module)
        given[module + "/kernel"] = c_peft
    method = dataclasses.replace(stack.methods[0], statistics=given)
    frozen, trainable = methods.MethodStack((method,), also_train=stack.also_train).split(
        case.params, jax.random.key(0))
    named = dict(peft_model.named_modules())
    scale = ALPHA / RANK
    for module, name in case.modules:
        w0 = _our_kernel(case.params, module).astype(np.float64)
        fixed, _ = corda.damped_inverse(given[module + "/kernel"])
        u, sv, vt = np.linalg.svd(w0.T @ fixed, full_matrices=False)
        part = slice(None, RANK) if mode == "ipm" else slice(-RANK, None)
        expected = (u[:, part] * sv[part]) @ vt[part]
        ours = module_node(trainable["corda"], module)
        a, b = np.asarray(ours["lora_a"], np.float64), np.asarray(ours["lora_b"], np.float64)
        np.testing.assert_allclose(scale * b @ a @ fixed, expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=module)
        np.testing.assert_allclose(_our_kernel(frozen, module), w0 - scale * (b @ a).T,
                                   atol=1e-5, err_msg=module)
        moved = np.abs(_our_kernel(frozen, module) - w0).max()
        assert moved > 1e-3  # the start moved the base: more than W0 was compared
        if mode == "ipm":
            layer = named[f"base_model.model.{name}"]
            a_peft = layer.lora_A["default"].weight.detach().numpy()
            b_peft = layer.lora_B["default"].weight.detach().numpy()
            sign = np.sign(np.sum(a * a_peft, axis=1))
            np.testing.assert_allclose(a * sign[:, None], a_peft, atol=1e-5, err_msg=module)
            np.testing.assert_allclose(b * sign[None, :], b_peft, atol=1e-5, err_msg=module)
            np.testing.assert_allclose(_our_kernel(frozen, module),
                                       _torch_kernel(case, layer.base_layer), atol=1e-5,
                                       err_msg=module)


def test_corda_trains_as_peft_from_its_start(linear_case, tmp_path):
    case = linear_case
    batches = _calibration_batches(case)
    stack = _ours(case, "ipm", batches)
    apply, frozen, trained = steps_from_pefts_start(
        case, tmp_path, _peft_start(case, "ipm", batches), stack, "corda")
    ours = case.jax_logits(apply, frozen, trained)
    exports.save(tmp_path / "ours", stack, {}, trained, frozen=stack.frozen(case.params, trained),
                 model_type=case.model_type, task=case.task)
    loaded = peft.PeftModel.from_pretrained(case.torch_model(), tmp_path / "ours")
    np.testing.assert_allclose(case.torch_logits(loaded), ours, atol=1e-4)


def test_corda_without_calibration_is_refused(tmp_path):
    case = gpt2_case(tmp_path / "base")
    stack = methods.MethodStack((corda.CorDA(lora.LoraSpec(targets=(r"attn/c_attn",), rank=2)),))
    with pytest.raises(SettingError, match=r"corda has no input covariance for "
                                           r"h_0/attn/c_attn/kernel: calibrate it"):
        stack.split(case.params, jax.random.key(0))


def _train(workdir, *flags):
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from test_train import CLI_TINY

    return subprocess.run(
        [sys.executable, "-m", "lora_jax.train", "--config",
         str(REPO_ROOT / "configs/glue.py") + ":task=sst2,model=tiny,method=corda",
         "--workdir", str(workdir), *CLI_TINY, "--config.train.checkpoint_every=2", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_trainer_calibrates_on_the_runs_first_batches_once(tmp_path):
    """configs/glue.py:method=corda through the trainer: the covariances are taken over the
    run's first 8 training batches and kept in the workdir with a record of them; a resumed run
    reads them back (the file is not written again) and the export is PEFT's LoRA."""
    import safetensors.numpy

    from lora_jax.training import calibration

    run = tmp_path / "run"
    proc = _train(run, "--config.train.max_steps=4")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run / calibration.RECORD).read_text())
    assert {k: record[k] for k in ("batches", "epoch", "seed", "batch_size", "steps")} == {
        "batches": 8, "epoch": 0, "seed": 0, "batch_size": 16, "steps": [1, 8]}
    assert record["methods"]["corda"]["mode"] == "ipm" and record["data"]["task"] == "sst2"
    state = safetensors.numpy.load_file(str(run / calibration.STATE))
    assert sorted(state) == [f"corda/bert/encoder/layer_{i}/attention/self/{m}/kernel"
                             for i in range(2) for m in ("query", "value")]
    written = (run / calibration.STATE).stat().st_mtime_ns
    proc = _train(run, "--config.train.max_steps=4")  # resumes from the last checkpoint
    assert proc.returncode == 0, proc.stderr
    assert (run / calibration.STATE).stat().st_mtime_ns == written
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_too_little_data_for_the_calibration_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "--config.train.max_steps=2", "--config.method.corda.calibration_batches=17")
    assert proc.returncode != 0
    assert ("config.method.corda needs 17 calibration batches of config.data.batch_size = 16, "
            "but the training data (256 examples) make 16") in proc.stderr
    from lora_jax.training import calibration

    assert not (run / calibration.STATE).exists() and not (run / "checkpoints").exists()
