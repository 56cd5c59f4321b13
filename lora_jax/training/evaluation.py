"""The evaluation loop: a task's dev metrics over every dev example, on the mesh."""

from __future__ import annotations

import jax
import numpy as np

from lora_jax.training import sharding
from lora_jax.data.tasks import Task


def evaluate(task: Task, eval_step, frozen, trainable, mesh, batch_size: int) -> dict[str, float]:
    """The task's dev metrics (and mean loss) over every dev example, padding rows excluded."""
    total_loss, total_weight, preds, labels = 0.0, 0.0, [], []
    for host_batch in task.eval_batches(batch_size):
        batch = sharding.global_batch(host_batch, mesh)
        batch = jax.tree_util.tree_map(lambda x: x[0], batch)  # no accumulation in eval
        loss, weight, p = eval_step(frozen, trainable, batch)
        total_loss += float(sharding.first_replica(loss))
        total_weight += float(sharding.first_replica(weight))
        real = host_batch["example_mask"].astype(bool)
        preds.append(sharding.first_replica(p)[real])
        labels.append(host_batch.get("labels", np.zeros(len(real)))[real])
    return task.metrics(np.concatenate(preds), np.concatenate(labels),
                        total_loss / max(total_weight, 1.0))
