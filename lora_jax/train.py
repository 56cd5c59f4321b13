"""Config-driven training: config -> mesh -> state -> jitted step -> eval -> checkpoint.

    python -m lora_jax.train --config configs/quickstart.py --workdir /tmp/quickstart
    python -m lora_jax.train --config configs/glue.py:task=mrpc,model=minilm \\
        --config.optim.lr=4e-4 --workdir /tmp/mrpc

Rerunning with the same workdir resumes from its newest checkpoint. Multi-host: pass
--coordinator_address, --num_processes and --process_id (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables) to every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lora_jax.config_checks import check_config
from lora_jax.errors import RunError
from lora_jax.training import loop
from lora_jax.training.compile_clock import CompileClock
from lora_jax.training.fingerprints import run_inputs
from lora_jax.training.members import MemberGroup
from lora_jax.training.program import OneRun
from lora_jax.training.workdir import Workdir

FLAGS = flags.FLAGS


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains, evaluates and exports adapters as `config` says; resumes from `workdir`.

    Every config value is checked, the workdir locked and its records compared with this run's
    config and inputs before anything is written (see `lora_jax.training.workdir`).

    Returns:
      The final evaluation metrics, plus 'best' (the best evaluation seen and its step),
      'trained_params' (scalars in the trainable tree), 'lora_params' (those in low-rank
      matrices, as trained: a fused projection's slice counts its own size) and
      'environments' (where the steps ran).

    Raises:
      ConfigError, WorkdirError, IncompatibleCheckpoint: before anything is written.
      DivergenceError: the loss or the trainable parameters became non-finite.
      Preempted: SIGTERM arrived; the current step was checkpointed first.
    """
    return train_members([config], [workdir])[0]


def train_members(configs: Sequence[ml_collections.ConfigDict],
                  workdirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Trains N >= 1 runs, each writing its own workdir as `train` would; one run is the
    one-member case. Several runs train as one program (`members.MemberGroup`), so they must be
    able to share one (`members.groups` splits a study into such groups); they step together,
    so they evaluate, checkpoint and export at the same steps, and resume from one step.

    Returns:
      Each member's `train` result, in order.

    Raises:
      ConfigError: a config is invalid, or the configs cannot share a program.
      WorkdirError: a workdir holds another run, or the members' checkpoints are at other steps.
      DivergenceError, Preempted: as `train`.
    """
    configs, workdirs = list(configs), list(workdirs)
    if not configs or len(configs) != len(workdirs):
        raise ValueError(f"{len(configs)} configs for {len(workdirs)} workdirs: give one "
                         "workdir per config, at least one")
    for config in configs:
        check_config(config)
    with contextlib.ExitStack() as stack:
        dirs = [stack.enter_context(Workdir(w, jax.process_index())) for w in workdirs]
        inputs = []
        for run_dir, config in zip(dirs, configs):
            run_dir.check_config(config)
            inputs.append(run_inputs(config))
            run_dir.check_inputs(inputs[-1])
        clock = stack.enter_context(CompileClock())
        program = (OneRun.build(configs[0], dirs[0].path) if len(configs) == 1
                   else MemberGroup.build(configs))
        return loop.run(program, dirs, inputs, clock)


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if FLAGS.num_processes > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    try:
        result = train(FLAGS.config, FLAGS.workdir)
    except (RunError, FileNotFoundError) as error:
        # The message names the problem and the remedy; a traceback would bury it.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 1))
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items()}, default=float))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a misspelt `--config.<field>` reported in one line (its "did
    you mean" suggestion) instead of ml_collections' chained tracebacks."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}\n(see --helpfull)", file=sys.stderr)
    except (AttributeError, KeyError) as error:
        # ml_collections raises these for an unknown config field; their text carries the
        # field and the suggestion, quoted with escaped newlines.
        text = str(error.args[0] if error.args else error).strip("'\"")
        text = text.replace("\\n", "\n").replace("\\'", "'")
        print(f"error: unknown config field: {text}", file=sys.stderr)
    sys.exit(2)


def define_flags() -> None:
    """The command line; defined only when run as a program, so that importing this module
    next to another entry point (evaluate) does not clash on flag names."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the adapter export go.")
    flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        "host:port of process 0, for multi-host runs.")
    flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 1)),
                         "Number of processes in a multi-host run.")
    flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", 0)),
                         "This process's index in a multi-host run.")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
