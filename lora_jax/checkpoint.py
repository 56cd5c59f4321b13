"""Adapter-only training checkpoints with orbax.

A checkpoint holds what changes during training: the trainable tree, the optimizer state, the
step, the data position and the base PRNG key. The frozen weights are never written (they are
the pretrained checkpoint, read again at start-up), so a checkpoint is about 4 bytes per
trainable parameter plus the optimizer state.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class Checkpoints:
    """Saves every `every` steps, keeps the last `keep`, restores the newest readable one."""

    def __init__(self, directory: str | pathlib.Path, every: int, keep: int):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=False
        )
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Writes `state` at `step` if the interval says so (or `force`). Returns whether it did."""
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self._manager.wait_until_finished()
        return saved

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """The newest checkpoint that restores cleanly, as (step, state); None if there is none.

        A corrupt or partial newest checkpoint (a crash while writing, a damaged file) is
        skipped with a warning and the one before it is used.

        Args:
          abstract_state: the state's structure, as `jax.ShapeDtypeStruct`s with shardings.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as error:  # orbax raises many kinds for damaged files
                logger.warning("checkpoint at step %d in %s is unreadable (%s: %s); "
                               "falling back to the previous one",
                               step, self.directory, type(error).__name__, error)
                self._set_aside(step)
                continue
            return step, state
        return None

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable step out of orbax's way (kept for inspection, not deleted),
        so that training can write that step again."""
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(path.with_name(f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"))
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays: the target of a restore."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def directory_bytes(path: str | pathlib.Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
