"""Adapter-only training checkpoints with orbax.

A checkpoint holds what changes during training: the trainable tree, the optimizer state, the
step, the data position and the base PRNG key. The frozen weights are never written (they are
the pretrained checkpoint, read again at start-up), so a checkpoint is about 4 bytes per
trainable parameter plus the optimizer state.

Restoring tells two failures apart. A checkpoint orbax cannot read (a crash while writing, a
damaged file) is *unreadable*: the one before it is used, and the unreadable one is renamed
aside once the run starts. A checkpoint that reads fine but whose tree, shapes or dtypes differ
from the run's state is *incompatible*: it belongs to another experiment, so the run is refused
and nothing is renamed.
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.errors import DivergenceError, IncompatibleCheckpoint

logger = logging.getLogger(__name__)


def _manager(directory: pathlib.Path, every: int, keep: int, create: bool):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep or None, create=create,
        enable_async_checkpointing=False)
    # A registered handler lets `item_metadata` read a step's tree without restoring it.
    return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                                 options=options)


class Checkpoints:
    """Saves every `every` steps, keeps the last `keep` (0: all), restores the newest readable
    one. Nothing is written until `start_writing`."""

    def __init__(self, directory: str | pathlib.Path, every: int, keep: int):
        self.directory = pathlib.Path(directory).absolute()
        self._every, self._keep = every, keep
        self._manager = _manager(self.directory, every, keep, create=False)
        self._writing = False
        self.unreadable: list[int] = []

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """The newest checkpoint that restores cleanly, as (step, state); None if there is none.

        An unreadable newest checkpoint is skipped with a warning and the one before it is used;
        its step is listed in `self.unreadable` (set aside by `start_writing`).

        Args:
          abstract_state: the state's structure, as `jax.ShapeDtypeStruct`s with shardings.

        Raises:
          IncompatibleCheckpoint: a readable checkpoint of another tree, shape or dtype; the
            message names the first leaf that differs.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                metadata = self._manager.item_metadata(step)
                if metadata is None:
                    raise ValueError("no tree metadata")
            except Exception as error:  # orbax raises many kinds for damaged files
                self._skip(step, error)
                continue
            difference = first_difference(metadata.tree, abstract_state)
            if difference:
                raise IncompatibleCheckpoint(
                    f"checkpoint {self.directory / str(step)} belongs to another experiment: "
                    f"{difference}. Nothing was changed; use a new --workdir (or restore this "
                    "run's config.json).")
            try:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as error:
                self._skip(step, error)
                continue
            return step, state
        return None

    def _skip(self, step: int, error: Exception) -> None:
        logger.warning("checkpoint at step %d in %s is unreadable (%s: %s); falling back to the "
                       "previous one", step, self.directory, type(error).__name__, error)
        self.unreadable.append(step)

    def start_writing(self) -> None:
        """Creates the directory and sets the unreadable steps aside (renamed, kept for
        inspection), so that training can write those steps again."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in self.unreadable:
                path = self.directory / str(step)
                path.rename(path.with_name(f"{step}.unreadable-{stamp}"))
        self._manager.close()
        self._manager = _manager(self.directory, self._every, self._keep, create=True)
        self._writing = True

    def should_save(self, step: int) -> bool:
        """Whether `step` is on the save interval (a multiple of `every`)."""
        return step % self._every == 0

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Writes `state` at `step` if the interval says so (or `force`). Returns whether it did."""
        if not self._writing:
            raise RuntimeError("Checkpoints.save before start_writing")
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        self._manager.wait_until_finished()
        return saved

    def latest_step(self) -> int | None:
        """The newest step on disk (None: none yet)."""
        return self._manager.latest_step()

    def close(self) -> None:
        self._manager.close()


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey (namedtuples), SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaves(tree: Any) -> dict[str, Any]:
    """'/'-joined path -> leaf. Orbax's metadata writes namedtuples as dicts and tuples as lists,
    so paths are compared by their names alone."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def first_difference(saved: Any, expected: Any) -> str | None:
    """The first leaf where a checkpoint's tree metadata and the run's abstract state disagree,
    described; None when tree, shapes and dtypes all agree. Leaves under 'trainable' come first:
    they name the adapter that differs, which the optimizer state's moments only echo."""
    saved, expected = _leaves(saved), _leaves(expected)
    order = sorted(expected, key=lambda p: not p.startswith("trainable/"))  # stable
    for path in order:
        want = expected[path]
        if path not in saved:
            return f"the run has {path} {tuple(want.shape)} {want.dtype}, the checkpoint has not"
        have = saved[path]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            return (f"{path} is {tuple(have.shape)} {have.dtype} in the checkpoint but "
                    f"{tuple(want.shape)} {want.dtype} in the run")
    extra = [p for p in saved if p not in expected]
    if extra:
        return f"the checkpoint has {extra[0]}, the run has not"
    return None


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays: the target of a restore."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def directory_bytes(path: str | pathlib.Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def divergence_error(step: int, loss: float, params_finite: bool,
                     checkpoints: Checkpoints) -> DivergenceError:
    """The error that stops a diverged run: what went non-finite, at which step, and where the
    last good state is (nothing non-finite is ever checkpointed, so the newest one is good)."""
    what = (f"the loss is {loss}" if not np.isfinite(loss)
            else f"the trainable parameters hold NaN or inf (loss {loss})")
    last = checkpoints.latest_step()
    where = (f"the last good checkpoint is step {last} in {checkpoints.directory}"
             if last is not None else "no checkpoint was written before it")
    return DivergenceError(
        f"training diverged at step {step}: {what}. The run stops here; nothing non-finite was "
        f"checkpointed, exported or chosen as best, and {where}. Lower optim.lr, set "
        "optim.clip_norm or raise optim.warmup_steps, in a new --workdir.")
