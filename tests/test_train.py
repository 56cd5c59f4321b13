"""The trainer end to end on tiny random models and real GLUE rows: logs, resume, sharding."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.training.checkpoint import directory_bytes
from lora_jax.config import load_config
from lora_jax.train import train
from conftest import tiny_config, xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def records(workdir, split="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def run_cli(workdir, *flags, env=None, **popen):
    """Starts the CLI; its output goes to <workdir>.log (a pipe nobody reads would fill up and
    block the child). `output(proc)` reads it back."""
    cmd = [sys.executable, "-m", "lora_jax.train",
           "--config", str(REPO / "configs/glue.py") + ":task=sst2,model=tiny",
           "--workdir", str(workdir), *flags]
    log = open(f"{workdir}.{len(list(pathlib.Path(workdir).parent.glob('*.log')))}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, text=True, **popen)
    proc.log_path = log.name
    return proc


def finish(proc, timeout=300) -> str:
    """Waits for the CLI and returns everything it printed."""
    proc.wait(timeout=timeout)
    return pathlib.Path(proc.log_path).read_text()


def run_to_the_end(workdir, *flags) -> str:
    """Runs the CLI to completion, asserts it succeeded, returns its output."""
    proc = run_cli(workdir, *flags)
    out = finish(proc)
    assert proc.returncode == 0, out
    return out


def wait_until_past(workdir, step: int, timeout: float = 300) -> None:
    """Polls metrics.jsonl until the run has logged a step >= `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [r["step"] for r in records(workdir)] if (workdir / "metrics.jsonl").exists() else []
        if done and max(done) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{workdir} did not reach step {step}")


def assert_same_adapter(a_dir, b_dir) -> None:
    """Two runs' adapter/ exports hold the same tensors, bit for bit."""
    a = load_file(str(pathlib.Path(a_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(pathlib.Path(b_dir) / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def process_envs(n: int) -> list[dict]:
    """Environments for n CPU processes of one multi-host run on localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [{"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(n),
             "JAX_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=1"),
             "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"} for pid in range(n)]


CLI_TINY = ["--config.data.max_train_examples=256", "--config.data.max_eval_examples=64",
            "--config.data.max_len=32", "--config.data.batch_size=16",
            "--config.data.eval_batch_size=32", "--config.train.log_every=1",
            "--config.train.eval_every=4"]


# The interruption tests (SIGKILL here, SIGTERM in test_reliability) against one uninterrupted
# run of these flags (conftest.uninterrupted_run): checkpoints every 8 steps.
INTERRUPT_STEPS = 32
INTERRUPT_FLAGS = [*CLI_TINY, f"--config.train.max_steps={INTERRUPT_STEPS}",
                   "--config.train.checkpoint_every=8", "--config.train.eval_every=100"]


def test_tiny_run_writes_logs_checkpoints_and_export(tmp_path):
    result = train(tiny_config(), tmp_path)
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 9))
    evals = records(tmp_path, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    assert {"accuracy", "loss"} <= set(evals[-1])
    assert result["accuracy"] == evals[-1]["accuracy"]
    assert json.loads((tmp_path / "config.json").read_text())["data"]["task"] == "sst2"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "best_adapter" / "adapter_model.safetensors").is_file()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 8]  # every 2 steps, the last 2 kept
    # What compiling cost: the train and eval steps at least (compiled, or read from the tests'
    # shared persistent cache), XLA's part within the whole, and the first step after it had
    # compiled.
    [compiled] = records(tmp_path, "compile")
    assert compiled["step"] == 8 and compiled["programs_compiled"] + compiled["cache_hits"] >= 2
    assert 0 < compiled["xla_compile_s"] <= compiled["compile_s"]
    assert compiled["first_step_s"] > 0
    # Where it ran, once (it started once), and in the result.
    [where] = records(tmp_path, "environment")
    assert where["step"] == 0 and where["jax"] and where["cpu_features"] is not None
    assert result["environments"] == [{k: v for k, v in where.items()
                                       if k not in ("step", "split")}]


def test_eval_at_start_scores_the_starting_model_first(tmp_path):
    """train.eval_at_start: an evaluation at step 0, before any update (LoRA's B is 0 there: the
    base model with its fresh head), then the usual ones; training moves the score."""
    train(tiny_config(**{"train.eval_at_start": True, "train.max_steps": 4}), tmp_path)
    evals = records(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["loss"] != evals[1]["loss"]


def test_checkpoint_holds_only_the_trainable_state(tmp_path):
    train(tiny_config(), tmp_path)
    export = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    trainable = sum(v.size for v in export.values())
    size = directory_bytes(tmp_path / "checkpoints" / "8")
    # float32 adapters + head and two AdamW moments: 12 bytes a parameter, plus metadata. The
    # frozen model (tiny BERT: ~1M parameters, 4 MB) is not in it.
    print(f"checkpoint {size:,} bytes for {trainable:,} trainable parameters")
    assert 12 * trainable * 0.5 < size < 12 * trainable + 256 * 1024


def test_bad_config_field_fails_before_running(tmp_path):
    proc = run_cli(tmp_path / "run", "--config.optim.lrr=0.1")
    out = finish(proc, timeout=120)
    assert proc.returncode != 0 and "lrr" in out
    proc = run_cli(tmp_path / "run", "--config.optim.lr=fast")
    out = finish(proc, timeout=120)
    assert proc.returncode != 0 and "fast" in out
    assert not (tmp_path / "run").exists()


def test_sigkill_and_resume_gives_bit_identical_adapters(tmp_path, uninterrupted_run):
    flags = INTERRUPT_FLAGS
    interrupted = tmp_path / "interrupted"
    proc = run_cli(interrupted, *flags, start_new_session=True)
    wait_until_past(interrupted, 10)  # kill once a checkpoint exists and training is past it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "adapter").exists(), "killed too late: the run had finished"
    out = run_to_the_end(interrupted, *flags)
    assert "resumed from step" in out
    assert f"took over the lock left by pid {proc.pid}" in out  # the killed trainer's, stale

    assert_same_adapter(uninterrupted_run, interrupted)
    assert [r["step"] for r in records(interrupted)] == list(range(1, INTERRUPT_STEPS + 1))
    starts = records(interrupted, "environment")  # where each stretch of steps ran
    assert len(starts) == 2 and starts[0]["step"] == 0 and starts[1]["step"] > 0


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    train(tiny_config(), tmp_path)
    first = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for f in (tmp_path / "checkpoints" / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage")
    with caplog.at_level("WARNING"):
        train(tiny_config(), tmp_path)  # the same run again: resumes from step 6, not 8
    assert "step 8" in caplog.text and "falling back" in caplog.text
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 9))
    again = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])


def _losses_with_devices(tmp_path, name, devices, mesh_flags):
    env = {"XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}"),
           "JAX_PLATFORMS": "cpu"}
    proc = run_cli(tmp_path / name, *CLI_TINY, "--config.train.max_steps=6", *mesh_flags, env=env)
    out = finish(proc)
    assert proc.returncode == 0, out
    return [r["loss"] for r in records(tmp_path / name)]


def test_eight_devices_data_and_fsdp_match_one_device(tmp_path):
    one = _losses_with_devices(tmp_path, "one", 1, [])
    eight = _losses_with_devices(tmp_path, "eight", 8,
                                 ["--config.mesh.data=4", "--config.mesh.fsdp=2"])
    assert len(one) == 6
    np.testing.assert_allclose(eight, one, rtol=1e-5)


@pytest.mark.slow  # ~1 min: two processes compile and run; -m slow runs it
def test_two_processes_match_one(tmp_path):
    """Multi-host on localhost: 2 processes x 1 CPU device give the 1-process losses."""
    one = _losses_with_devices(tmp_path, "single", 2, [])
    procs = [run_cli(tmp_path / "multi", *CLI_TINY, "--config.train.max_steps=6", env=env)
             for env in process_envs(2)]
    for p in procs:
        out = finish(p)
        assert p.returncode == 0, out
    np.testing.assert_allclose([r["loss"] for r in records(tmp_path / "multi")], one, rtol=1e-5)


def test_trained_adapter_export_loads_in_peft_with_the_same_logits(tmp_path):
    """The run's adapter/ directory on the torch model built from the same base checkpoint."""
    import jax
    import peft
    import torch
    import transformers

    from lora_jax.methods import lora
    from lora_jax.config import TINY_MODELS
    from lora_jax.interop.hub import load_pretrained
    from lora_jax.methods.lora_peft import load_peft

    fields = {k: v for k, v in TINY_MODELS["bert"].items() if k != "model_type"}
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    transformers.BertForSequenceClassification(
        transformers.BertConfig(**fields, num_labels=2)).save_pretrained(base_dir)
    train(tiny_config(**{"model.name": str(base_dir), "model.tokenizer": "minilm",
                         "train.max_steps": 4}), tmp_path / "run")

    model, params, _ = load_pretrained(base_dir, task="classification", num_labels=2)
    spec, trainable = load_peft(tmp_path / "run" / "adapter", params, model_type="bert",
                                task="classification")
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree_util.tree_leaves(trainable["lora"])
               if x.ndim == 2 and x.shape[1] == spec.rank)  # B moved off zero: a real test
    frozen, _ = lora.split(spec, params, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = mask[2, 5:] = 0
    ours = lora.adapt(model.apply, spec)(frozen, trainable, ids, attention_mask=mask).logits

    base = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids),
                            attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_tiny_e2e_language_model_run(tmp_path):
    """GPT-2 with the paper's q,v split on real E2E rows: trains and reports dev perplexity."""
    c = load_config(str(REPO / "configs/e2e.py") + ":model=tiny")
    c.data.max_train_examples, c.data.max_eval_examples = 64, 16
    c.data.max_len, c.data.batch_size, c.data.eval_batch_size = 128, 8, 8
    c.train.max_steps, c.train.eval_every, c.train.log_every = 4, 4, 1
    c.optim.warmup_steps = 2
    result = train(c, tmp_path)
    assert np.isfinite(result["loss"]) and result["perplexity"] == pytest.approx(
        np.exp(result["loss"]))
    assert len(records(tmp_path)) == 4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8  # q,v as one rank-2r adapter


def test_runs_beside_each_other_share_the_compilation_cache(tmp_path, monkeypatch):
    """'auto' puts JAX's persistent cache beside the workdir: a second run of the same shapes
    in a sibling workdir reads its programs from there instead of compiling them; '' writes no
    cache; where the user set JAX's own $JAX_COMPILATION_CACHE_DIR, 'auto' uses that. (Tiny
    programs compile in under JAX's 1 s threshold, so the test lowers it.)"""
    import jax

    from lora_jax.training import compile_cache

    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    monkeypatch.delenv(compile_cache.JAX_VARIABLE, raising=False)
    try:
        config = tiny_config(**{"train.max_steps": 2})
        train(config, tmp_path / "study" / "first")
        train(config, tmp_path / "study" / "second")
        [first] = records(tmp_path / "study" / "first", "compile")
        [second] = records(tmp_path / "study" / "second", "compile")
        assert (tmp_path / "study" / compile_cache.DIRECTORY_NAME).is_dir()
        assert second["cache_hits"] > 0
        assert second["programs_compiled"] < first["programs_compiled"]
        off = tiny_config(**{"train.max_steps": 2, "train.compilation_cache": ""})
        train(off, tmp_path / "alone" / "run")
        assert [p.name for p in (tmp_path / "alone").iterdir()] == ["run"]
        monkeypatch.setenv(compile_cache.JAX_VARIABLE, str(tmp_path / "users_cache"))
        train(config, tmp_path / "elsewhere" / "run")
        assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["run"]
        assert any((tmp_path / "users_cache").iterdir())
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
        compile_cache.use(before or "", tmp_path)  # the session's cache again, for what follows
