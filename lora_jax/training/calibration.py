"""The data-driven starts' calibration in a run: the batches a start needs (CorDA's, LoRA-GA's and
EVA's `calibration_batches`, PreLayer's one) are the run's own first training batches (epoch 0
at the run's seed: the ones steps 1..n then train on), taken before step 1 with the base model.

What a start takes from them (`MethodStack.calibration_state`) is kept in the workdir with a
record of which batches they were, written once: a resumed run reads it back and never takes
them again.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy

from lora_jax import losses
from lora_jax.data import tasks
from lora_jax.errors import ConfigError
from lora_jax.methods import MethodStack
from lora_jax.methods import calibration as method_calibration
from lora_jax.training import steps

STATE, RECORD = "calibration.safetensors", "calibration.json"


def first_batches(config: ml_collections.ConfigDict, tokenizer: Any, stack: MethodStack,
                  vocab_size: int, count: int) -> tuple[str, list[dict]]:
    """(the task's kind, the run's first `count` training batches).

    Raises:
      ConfigError: the training data make fewer batches than that.
    """
    data = config.data
    task = tasks.build_task(data, tokenizer).prepared(
        lambda e: stack.prepare_example(e, data.max_len, vocab_size))
    batches = task.train_batches(data.batch_size, config.seed, 0)
    if len(batches) < count:
        needs = ", ".join(f"config.method.{m.name}" for m in stack.methods if m.calibration())
        raise ConfigError(f"{needs} needs {count} calibration batches of "
                          f"config.data.batch_size = {data.batch_size}, but the training data "
                          f"({len(task.train)} examples) make {len(batches)}")
    return task.kind, batches[:count]


def calibrate(stack: MethodStack, config: ml_collections.ConfigDict, base: Any,
              directory: str | pathlib.Path | None) -> MethodStack:
    """`stack` with its starts calibrated: read from `directory` where a run took them before,
    else taken from the run's first batches (and written there, by the first process).

    Raises:
      ConfigError: scanned blocks where a start reads the layers inside them, too little
        training data, or a kept calibration of other batches than this run's.
    """
    count = stack.calibration()
    if count == 0:
        return stack
    record = {"batches": count, "epoch": 0, "seed": config.seed,
              "batch_size": config.data.batch_size, "steps": [1, count],
              # What decides the batches besides the seed and size.
              "data": {k: config.data.get(k) for k in ("task", "max_len", "max_train_examples")},
              "methods": {m.name: json.loads(config.method[m.name].to_json_best_effort())
                          for m in stack.methods if m.calibration()}}
    directory = pathlib.Path(directory) if directory is not None else None
    if directory is not None and (directory / RECORD).is_file():
        kept = json.loads((directory / RECORD).read_text())
        if {k: kept.get(k) for k in record} != record:
            differ = sorted(k for k in record if kept.get(k) != record[k])
            raise ConfigError(f"{directory / RECORD} records a calibration of another run "
                              f"(its {', '.join(differ)} differ from this run's); use a new "
                              "--workdir")
        return stack.with_calibration(safetensors.numpy.load_file(str(directory / STATE)))
    inside = [m.name for m in stack.methods
              if m.calibration() and m.calibration_reads_inside_blocks]
    if config.model.scan_layers and inside:
        raise ConfigError(f"config.model.scan_layers = True: {', '.join(inside)}'s data-driven "
                          "start reads each layer's inputs, which scanned blocks do not expose; "
                          "set it False")
    kind, batches = first_batches(config, base.tokenizer, stack,
                                  base.family.vocab_size(base.params), count)

    def forward(params, batch):
        return base.model.apply({"params": params}, batch["input_ids"],
                                **steps.model_inputs(batch), deterministic=True).logits

    def loss(logits, batch):
        return losses.mean_loss(kind, logits, batch, config.optim.label_smoothing)

    def hidden_states(params, batch):
        return base.model.apply({"params": params}, batch["input_ids"],
                                **steps.model_inputs(batch), deterministic=True,
                                output_hidden_states=True).hidden_states

    stack = stack.calibrated(method_calibration.Batches(forward, base.params, batches, loss,
                                                        hidden_states))
    if directory is not None and jax.process_index() == 0:
        state = {k: np.ascontiguousarray(v, np.float32)
                 for k, v in stack.calibration_state().items()}
        safetensors.numpy.save_file(state, str(directory / STATE))
        (directory / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return stack
