"""A run never lies: divergence stops it, resumes check what they resume, the workdir is guarded.

Tiny random BERT runs on real SST-2 rows (conftest.tiny_config), in-process unless the point is
the command line's behaviour (exit status, signals).
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from lora_jax import config_checks
from lora_jax.training import optim, sharding, steps
from lora_jax.config import base_config, load_config
from lora_jax.errors import ConfigError, IncompatibleCheckpoint, WorkdirError
from lora_jax.evaluate import load_run
from lora_jax.training.run_log import RunLog
from lora_jax.train import train
from lora_jax.training.workdir import Workdir
from conftest import REPO_ROOT, tiny_config
from test_train import (CLI_TINY, INTERRUPT_FLAGS, INTERRUPT_STEPS, assert_same_adapter,
                        finish, process_envs, records, run_cli, run_to_the_end, wait_until_past)


def tree_snapshot(path: pathlib.Path) -> dict:
    """Every file and directory under `path`, with each file's size, mtime and content hash."""
    if not path.exists():
        return {}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p.relative_to(path)) + "/"] = None
    return out


def checkpoint_leaves(workdir: pathlib.Path) -> dict[int, list[np.ndarray]]:
    """step -> every array of that checkpoint, read back with orbax."""
    out = {}
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            tree = ocp.StandardCheckpointer().restore(step_dir / "default")
            out[int(step_dir.name)] = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    return out


def all_finite_file(path: pathlib.Path) -> bool:
    return all(np.isfinite(v).all() for v in load_file(str(path)).values())


# --- 1. Divergence ------------------------------------------------------------------------------

def test_divergence_stops_the_cli_with_the_step_and_keeps_nothing_non_finite(tmp_path):
    """lr=1e6 makes the tiny run non-finite within a few steps (loss NaN from step 4 before)."""
    workdir = tmp_path / "run"
    proc = run_cli(workdir, *CLI_TINY, "--config.train.max_steps=12", "--config.optim.lr=1e6",
                   "--config.optim.warmup_steps=1", "--config.train.checkpoint_every=1",
                   "--config.train.eval_every=2")
    out = finish(proc)
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    message = out[out.index("error: training diverged at step"):]
    bad_step = int(message.split("step ")[1].split(":")[0])
    last_good = bad_step - 1
    assert f"last good checkpoint is step {last_good}" in message, message
    assert not (workdir / "adapter").exists()
    # Every checkpoint on disk is finite, and none is of the diverged step or later.
    saved = checkpoint_leaves(workdir)
    assert saved and max(saved) == last_good
    for step, leaves in saved.items():
        assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f"), step
    if (workdir / "best_adapter").exists():
        assert all_finite_file(workdir / "best_adapter" / "adapter_model.safetensors")
    evals = records(workdir, "eval")
    assert all(e["step"] < bad_step for e in evals)  # no evaluation of a non-finite state
    assert records(workdir)[-1]["step"] == bad_step  # the bad step is logged, then it stops


def test_the_step_flags_non_finite_parameters():
    tree = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    assert bool(optim.all_finite(tree))
    tree["b"][1] = np.nan
    assert not bool(optim.all_finite(tree))
    tree["b"][1] = np.inf
    assert not bool(optim.all_finite(tree))
    assert bool(optim.all_finite({}))


def test_a_non_finite_evaluation_is_never_best(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.start(0)
    assert log.eval(2, {"accuracy": float("nan")}, "accuracy", True)["step"] is None
    assert log.eval(4, {"accuracy": 0.6}, "accuracy", True)["step"] == 4
    assert log.eval(6, {"accuracy": float("nan")}, "accuracy", True)["step"] == 4
    assert log.eval(8, {"accuracy": float("inf")}, "accuracy", True)["step"] == 4
    lm = RunLog(tmp_path / "lm", enabled=True)
    lm.start(0)
    assert lm.eval(2, {"loss": 3.0}, "loss", False)["step"] == 2
    assert lm.eval(4, {"loss": float("nan")}, "loss", False)["step"] == 2
    assert log.best()["step"] == 4 and lm.best()["step"] == 2  # read back from metrics.jsonl
    log.close()
    lm.close()


def test_each_start_records_where_the_run_runs_and_a_resume_elsewhere_is_kept(tmp_path,
                                                                              monkeypatch, capsys):
    """metrics.jsonl holds an 'environment' record at each start; a run resumed on another
    machine has two, one from before the checkpoint it resumed from and one after, and says
    that it resumes elsewhere."""
    from lora_jax.training import environment

    here = environment.describe()
    assert here["jax"] == jax.__version__ and here["devices"].endswith("cpu") and here["cpu"]
    log = RunLog(tmp_path, enabled=True)
    log.start(0)
    log.train([(s, 1.0, 0.1) for s in range(1, 7)], 100.0, total=10)
    log.close()
    assert log.environments() == [here]
    assert "another environment" not in capsys.readouterr().out

    # Another machine's extensions, whatever this one's are (this one may have exactly AVX2).
    other = "sse4_2 avx avx2 fma" if here["cpu_features"] != "sse4_2 avx avx2 fma" else "sse4_2 avx"
    elsewhere = {**here, "cpu_features": other}
    monkeypatch.setattr(environment, "describe", lambda: elsewhere)
    for _ in range(2):  # resumed from step 4 twice on the other machine: described once
        log = RunLog(tmp_path, enabled=True)
        log.start(4)
        log.close()
    assert log.environments() == [here, elsewhere]
    said = capsys.readouterr().out
    assert said.count("note: resuming at step 4 on another environment") == 1  # the first time
    assert f"cpu_features: {here['cpu_features']!r} != {other!r}" in said
    lines = [json.loads(line) for line in log.metrics_path.read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [
        (0, "environment"), *((s, "train") for s in range(1, 5)), (4, "environment"),
        (4, "environment")]
    assert RunLog(tmp_path / "silent", enabled=False).environments() == []  # not process 0


def test_losses_and_flags_are_fetched_only_when_the_loop_syncs_anyway(tmp_path, monkeypatch):
    """No host sync per step: device values are read at log, eval and checkpoint steps only."""
    steps_run, fetched_at = [0], []
    build = steps.build_train_step

    def counting_build(*args, **kwargs):
        step = build(*args, **kwargs)

        def counted(*a):
            steps_run[0] += 1
            return step(*a)

        return counted

    first_replica = sharding.first_replica

    def recording_first_replica(x):
        fetched_at.append(steps_run[0])
        return first_replica(x)

    monkeypatch.setattr(steps, "build_train_step", counting_build)
    monkeypatch.setattr(sharding, "first_replica", recording_first_replica)
    train(tiny_config(**{"train.log_every": 5, "train.eval_every": 10,
                         "train.checkpoint_every": 10, "train.max_steps": 10}), tmp_path)
    assert steps_run[0] == 10
    assert set(fetched_at) == {5, 10}


# --- 2. A run knows what it ran on ---------------------------------------------------------------

def sst2_copy(root: pathlib.Path, data_dir: pathlib.Path, extra_row: str | None = None):
    """A data dir holding only SST-2 (copied outside the project), optionally with one more row."""
    target = root / "glue" / "SST-2"
    target.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(data_dir / "glue" / "SST-2" / name, target / name)
    if extra_row:
        with (target / "train.tsv").open("a") as f:
            f.write(extra_row)
    return root


def test_inputs_record_resolved_paths_and_fingerprints(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(data_dir))
    train(tiny_config(**{"train.max_steps": 2}), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["data"]["data_dir"] is None
    record = json.loads((tmp_path / "inputs.json").read_text())
    assert record["data"]["dir"] == str(data_dir.absolute())
    train_tsv = data_dir / "glue" / "SST-2" / "train.tsv"
    assert record["data"]["files"]["glue/SST-2/train.tsv"] == {
        "bytes": train_tsv.stat().st_size,
        "sha256": hashlib.sha256(train_tsv.read_bytes()).hexdigest()}
    assert "glue/SST-2/dev.tsv" in record["data"]["files"]
    assert record["base"] == {"random_init": True, "files": {}}
    assert "tokenizer.json" in record["tokenizer"]["files"]  # minilm's tokenizer


def test_resume_on_other_data_is_refused_by_environment_and_by_field(tmp_path, data_dir,
                                                                     monkeypatch):
    same = sst2_copy(tmp_path / "same", data_dir)
    other = sst2_copy(tmp_path / "other", data_dir, extra_row="a new sentence\t1\n")
    workdir = tmp_path / "run"
    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(data_dir))
    config = tiny_config(**{"train.max_steps": 4, "train.checkpoint_every": 2})
    train(config, workdir)
    before = tree_snapshot(workdir)

    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(other))
    with pytest.raises(WorkdirError, match="glue/SST-2/train.tsv") as env_error:
        train(config, workdir)
    assert str(other) in str(env_error.value) and str(data_dir) in str(env_error.value)
    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(data_dir))
    with pytest.raises(WorkdirError, match="glue/SST-2/train.tsv"):
        train(tiny_config(**{"train.max_steps": 4, "train.checkpoint_every": 2,
                             "data.data_dir": str(other)}), workdir)
    assert tree_snapshot(workdir) == before  # refused before writing anything

    # The same files elsewhere are the same inputs: the finished run resumes (and is done).
    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(same))
    train(config, workdir)
    assert json.loads((workdir / "inputs.json").read_text())["data"]["dir"] == str(same)

    # evaluate checks the same record.
    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(other))
    (other / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nshort\t1\n")
    with pytest.raises(WorkdirError, match="glue/SST-2/dev.tsv"):
        load_run(workdir)


def save_tiny_bert(directory: pathlib.Path, seed: int) -> pathlib.Path:
    import torch
    import transformers

    from lora_jax.config import TINY_MODELS

    fields = {k: v for k, v in TINY_MODELS["bert"].items() if k != "model_type"}
    torch.manual_seed(seed)
    transformers.BertForSequenceClassification(
        transformers.BertConfig(**fields, num_labels=2)).save_pretrained(directory)
    return directory


def test_resume_on_another_base_checkpoint_is_refused(tmp_path):
    base = save_tiny_bert(tmp_path / "base", seed=0)
    config = tiny_config(**{"model.name": str(base), "train.max_steps": 2})
    train(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert set(record["base"]["files"]) == {"model.safetensors", "config.json"}
    save_tiny_bert(base, seed=1)  # other weights under the same name
    with pytest.raises(WorkdirError, match="base file model.safetensors"):
        train(config, tmp_path / "run")
    with pytest.raises(WorkdirError, match="base file model.safetensors"):
        load_run(tmp_path / "run")


def test_a_changed_config_is_refused_naming_each_field_old_and_new(tmp_path):
    train(tiny_config(**{"train.max_steps": 2}), tmp_path)
    with pytest.raises(WorkdirError) as error:
        train(tiny_config(**{"train.max_steps": 2, "optim.lr": 1e-3, "method.lora.rank": 4}), tmp_path)
    assert "optim.lr: 0.0005 -> 0.001" in str(error.value)
    assert "method.lora.rank: 8 -> 4" in str(error.value)


# --- 3. Unreadable is not incompatible ----------------------------------------------------------

def test_an_incompatible_checkpoint_is_refused_and_nothing_renamed(tmp_path):
    train(tiny_config(), tmp_path)
    (tmp_path / "config.json").unlink()
    before = tree_snapshot(tmp_path)
    with pytest.raises(IncompatibleCheckpoint,
                       match=r"trainable/lora/.*/lora_a is \(8, 32\) float32 in the checkpoint "
                             r"but \(4, 32\) float32"):
        train(tiny_config(**{"method.lora.rank": 4}), tmp_path)
    assert tree_snapshot(tmp_path) == before
    assert not list((tmp_path / "checkpoints").glob("*unreadable*"))


def test_a_fresh_start_in_an_old_workdir_keeps_the_earlier_records_aside(tmp_path):
    train(tiny_config(**{"optim.lr": 1e-3}), tmp_path)
    earlier_metrics = (tmp_path / "metrics.jsonl").read_text()
    # The earlier run's config and checkpoints are gone: the next run starts at step 0.
    (tmp_path / "config.json").unlink()
    shutil.rmtree(tmp_path / "checkpoints")
    result = train(tiny_config(), tmp_path)
    (aside,) = (tmp_path / "earlier").iterdir()
    assert (aside / "metrics.jsonl").read_text() == earlier_metrics
    assert {p.name for p in aside.iterdir()} >= {"metrics.jsonl", "adapter", "best_adapter",
                                                 "tensorboard"}
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 9))  # one run's records
    evals = records(tmp_path, "eval")
    best = max(evals, key=lambda r: r["accuracy"])
    assert result["best"]["step"] == best["step"] and len(evals) == 2


# --- 4. Validate before writing anything ---------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("train.eval_every", 0, "integer >= 1"),
    ("train.checkpoint_every", 0, "integer >= 1"),
    ("data.batch_size", 0, "integer >= 1"),
    ("model.dtype", "float16", "'float32', 'bfloat16'"),
    ("data.task", "foo", "'sst2'"),
    ("method.lora.targets", ("(",), "not a valid regular expression"),
    ("data.max_train_examples", -1, "integer >= 0"),
    ("optim.lr", float("nan"), "finite number"),
    ("method.lora.dropout", 1.0, "[0, 1)"),
    ("mesh.data", 0, ">= 1 or -1"),
])
def test_bad_values_are_named_before_the_workdir_is_touched(tmp_path, field, value, allowed):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as error:
        train(tiny_config(**{field: value}), workdir)
    message = str(error.value)
    assert f"config.{field} = {value!r}" in message and allowed in message, message
    assert not workdir.exists()


# Method settings a builder used to refuse with a traceback, after the config checks passed
# (issue 27, finding 7): the tiny BERT has 2 blocks and kernels of 32 x 32 (64 in the FFN).
@pytest.mark.parametrize("overrides, field, allowed", [
    ({"method.use": ("dora",), "method.dora.targets": ("no_such",)}, "method.dora.targets",
     "'no_such' matches no kernel; the kernels are bert/encoder/layer_*/attention/"),
    ({"method.use": ("adalora",), "method.adalora.target_rank": 16}, "method.adalora.target_rank",
     "must be <= init_rank (12)"),
    ({"method.use": ("adalora",), "method.adalora.init_rank": 40},
     "method.adalora.init_rank", "exceeds min(d_in, d_out) = 32"),
    ({"method.use": ("adalora",), "method.adalora.tinit": 8}, "method.adalora.tinit",
     "needs tinit < total_step - tfinal, got tinit=8, tfinal=0, total_step=8"),
    ({"method.use": ("adapter_d",), "method.adapter_d.drop_lowest": 2},
     "method.adapter_d.drop_lowest", "drop all 2 blocks"),
    ({"method.use": ("adapter_d",), "method.adapter_d.drop_layers": (1,)},
     "method.adapter_d.drop_layers", "drop_lowest=1 and drop_layers=(1,) drop all 2 blocks"),
    ({"method.use": ("adapter_d",), "method.adapter_d.drop_layers": (5,)},
     "method.adapter_d.drop_layers", "block indices must be < 2"),
    ({"method.use": ("top_layers",), "method.top_layers.count": 3}, "method.top_layers.count",
     "must be in [1, 2]"),
    ({"method.lora.rank": 40}, "method.lora.rank", "must be in [1, min(d_in, d_out)] = [1, 32]"),
    ({"method.lora.rank_pattern": {"query": 40}}, "method.lora.rank_pattern", "[1, 32]"),
    ({"method.also_train": ("no_such",)}, "method.also_train", "'no_such' matches no parameter"),
    ({"method.use": ("pissa",), "method.also_train": ("classifier", "query")},
     "method.pissa.targets", "trained in full"),
    ({"method.use": ("pissa",), "method.pissa.rslora": True,
      "method.pissa.alpha_pattern": {"query": 4.0}}, "method.pissa.rslora",
     "set rslora False or clear them"),
], ids=["dora-targets", "adalora-target_rank", "adalora-init_rank", "adalora-tinit",
        "adapter_d-drop_lowest", "adapter_d-every-block", "adapter_d-no-such-block",
        "top_layers-count", "lora-rank", "lora-rank_pattern", "also_train", "pissa-also_train",
        "pissa-rslora"])
def test_method_settings_the_model_refuses_are_named_before_anything_is_written(
        tmp_path, overrides, field, allowed):
    workdir = tmp_path / "parent" / "run"
    with pytest.raises(ConfigError) as error:
        train(tiny_config(**overrides), workdir)
    lines = str(error.value).splitlines()
    value = tiny_config(**overrides)
    for part in field.split("."):
        value = value[part]
    value = value.to_dict() if hasattr(value, "to_dict") else value
    assert lines[0] == "invalid config:" and len(lines) == 2, lines
    assert lines[1].startswith(f"  config.{field} = {value!r}: ") and allowed in lines[1], lines
    assert not (tmp_path / "parent").exists()


def test_related_fields_are_checked_together():
    with pytest.raises(ConfigError, match="model.num_labels = 2: stsb has 1"):
        config_checks.check_config(tiny_config(**{"data.task": "stsb"}), device_count=1)
    with pytest.raises(ConfigError, match="data.max_len = 1024: must be <= the largest"):
        config_checks.check_config(tiny_config(**{"data.max_len": 1024}), device_count=1)
    with pytest.raises(ConfigError, match="split evenly over the 8 devices"):
        config_checks.check_config(tiny_config(**{"data.batch_size": 12}), device_count=8)
    with pytest.raises(ConfigError, match="grad_accum = 3: must divide"):
        config_checks.check_config(tiny_config(**{"optim.grad_accum": 3}), device_count=1)


def test_every_config_field_has_a_rule_and_the_shipped_configs_pass():
    names = set(config_checks._leaves(base_config()))
    e2e = load_config(str(REPO_ROOT / "configs/e2e.py") + ":model=tiny")
    names |= set(config_checks._leaves(e2e))
    assert names == set(config_checks.rules())
    for arg in ("configs/glue.py:task=stsb,model=roberta-large", "configs/e2e.py:model=gpt2-xl",
                "configs/quickstart.py", "configs/glue.py:task=rte,model=minilm"):
        config_checks.check_config(load_config(str(REPO_ROOT / arg)), device_count=1)
    config = base_config()
    config.unlock()
    config.train.new_field = 1
    with pytest.raises(ConfigError, match="config.train.new_field: no such field"):
        config_checks.check_config(config, device_count=1)


def test_keep_checkpoints_zero_keeps_them_all(tmp_path):
    train(tiny_config(**{"train.keep_checkpoints": 0}), tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6, 8]


def test_a_run_failing_before_its_first_step_leaves_the_workdir_as_found(tmp_path):
    # A new workdir (and its missing parent) is not left behind ...
    fresh = tmp_path / "parent" / "run"
    with pytest.raises(ValueError, match="'no_such_module' matches no kernel"):
        train(tiny_config(**{"method.lora.targets": ("no_such_module",)}), fresh)
    assert not (tmp_path / "parent").exists()
    # ... and an existing one is unchanged, byte for byte, when the data are not there.
    workdir = tmp_path / "done"
    train(tiny_config(**{"train.max_steps": 2}), workdir)
    before = tree_snapshot(workdir)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        train(tiny_config(**{"train.max_steps": 2, "data.data_dir": str(tmp_path / "no_such_dir")}),
              workdir)
    assert tree_snapshot(workdir) == before


# --- 5. One trainer per workdir -----------------------------------------------------------------

def test_a_second_trainer_fails_at_once_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with Workdir(workdir):
        with pytest.raises(WorkdirError, match=f"in use by another trainer \\(pid {os.getpid()}"):
            train(tiny_config(), workdir)
        proc = run_cli(workdir, *CLI_TINY)
        out = finish(proc, timeout=120)
        assert proc.returncode == 1 and f"pid {os.getpid()}" in out, out
        assert {p.name for p in workdir.iterdir()} == {".trainer.lock"}
    assert not workdir.exists()  # the holder created it for its lock, and removed it unused


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".trainer.lock").write_text("999999 on some-host\n")  # nobody holds its flock
    with caplog.at_level("WARNING"):
        train(tiny_config(**{"train.max_steps": 2}), tmp_path)
    assert "took over the lock left by pid 999999" in caplog.text
    assert not (tmp_path / ".trainer.lock").exists()  # released at the end


# --- 7. Preemption ------------------------------------------------------------------------------

def test_sigterm_checkpoints_the_current_step_and_the_resume_is_bit_identical(
        tmp_path, uninterrupted_run):
    interrupted = tmp_path / "interrupted"
    proc = run_cli(interrupted, *INTERRUPT_FLAGS)
    wait_until_past(interrupted, 9)  # signal between two regular checkpoints (8 and 16)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 143, out
    stopped = int(out.split("SIGTERM at step ")[1].split(":")[0])
    assert stopped < INTERRUPT_STEPS, "signalled too late: the run had finished"
    steps = sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == stopped  # the current step, not only the last regular checkpoint
    assert not (interrupted / "adapter").exists()

    out = run_to_the_end(interrupted, *INTERRUPT_FLAGS)
    assert f"resumed from step {stopped}" in out
    assert_same_adapter(uninterrupted_run, interrupted)
    assert [r["step"] for r in records(interrupted)] == list(range(1, INTERRUPT_STEPS + 1))


# --- 6. Errors that name the file (the command line part; the readers are in test_file_errors) --

def train_cli_once(workdir, config_args: str, *flags, timeout: int = 300):
    """The trainer's command line on configs/glue.py:<config_args>, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "lora_jax.train", "--config",
         str(REPO_ROOT / "configs/glue.py") + ":" + config_args, "--workdir", str(workdir),
         *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_misspelt_field_prints_one_suggestion_without_a_traceback(tmp_path):
    proc = train_cli_once(tmp_path / "run", "task=sst2,model=tiny", "--config.optim.lrr=0.1",
                          timeout=120)
    assert proc.returncode == 2
    assert 'Did you mean "lr" instead of "lrr"?' in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "run").exists()


def test_a_method_setting_the_model_refuses_prints_one_error_without_a_traceback(tmp_path):
    """DoRA targets matching no kernel passed the config checks and died building (issue 27)."""
    proc = train_cli_once(tmp_path / "run", "task=sst2,model=tiny,method=dora",
                          "--config.method.dora.targets=('no_such',)")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: invalid config:"], proc.stderr
    assert "  config.method.dora.targets = ('no_such',): LoRA target pattern 'no_such' matches " \
           "no kernel" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two processes to start and connect: half a minute
def test_sigterm_to_one_process_of_a_multi_host_run_stops_all_at_one_step(tmp_path):
    """JAX's preemption service spreads the notice: every process saves the same step."""
    workdir = tmp_path / "multi"
    procs = [run_cli(workdir, *CLI_TINY, "--config.train.max_steps=400",
                     "--config.train.checkpoint_every=100", "--config.train.eval_every=1000",
                     env=env) for env in process_envs(2)]
    wait_until_past(workdir, 5)
    procs[1].send_signal(signal.SIGTERM)
    outs = [finish(p) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs
    stopped = {int(out.split("SIGTERM at step ")[1].split(":")[0]) for out in outs}
    assert len(stopped) == 1 and stopped.pop() < 400
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == max(r["step"] for r in records(workdir))


def test_a_sigterm_the_loop_never_answered_goes_to_the_previous_handler():
    """A SIGTERM after the last step was checked (during the final evaluation or export) is not
    swallowed: leaving the notice hands it to the handler that was there before, so a sweep of
    runs stops instead of starting the next run. One that the loop answered is not resent."""
    import os
    import signal

    from lora_jax.training.preemption import PreemptionNotice

    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append("sigterm"))
    try:
        with PreemptionNotice() as notice:
            os.kill(os.getpid(), signal.SIGTERM)
        assert received == ["sigterm"]
        with PreemptionNotice() as notice:
            os.kill(os.getpid(), signal.SIGTERM)
            assert notice.reached(3)
        assert received == ["sigterm"]  # answered: checkpointed and stopped, not resent
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_fields_added_since_a_run_began_do_not_block_its_resume():
    """A config.json written before a field existed lacks it: at its default it is no difference
    (the run did the default); set otherwise, or changed, it still is."""
    from lora_jax.config import base_config
    from lora_jax.training.workdir import config_differences, config_record

    config = config_record(base_config())
    old = json.loads(json.dumps(config))
    del old["data"]["path"], old["data"]["template"]
    assert config_differences(old, config) == []
    changed = json.loads(json.dumps(config))
    changed["data"]["template"] = "chat"
    assert config_differences(old, changed) == ["data.template: (absent) -> 'chat'"]
    changed = json.loads(json.dumps(config))
    changed["data"]["max_len"] = 7
    assert config_differences(old, changed) == ["data.max_len: 128 -> 7"]
