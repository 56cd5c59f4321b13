"""A run's workdir: one trainer at a time, one experiment per directory, nothing written
until the run is known to be able to start.

    with Workdir(path) as workdir:          # exclusive lock, or WorkdirError naming the holder
        workdir.check_config(config)        # refuses another experiment's workdir (fields named)
        workdir.check_inputs(inputs)        # refuses other data or another base (files named)
        ...                                 # build the model, data, state; restore
        workdir.commit(config, inputs, fresh=start == 0)
        ...                                 # train

If anything fails before `commit`, leaving the block removes what it created (the lock file; the
directory, if it did not exist), so the workdir is as it was found. `commit` writes config.json
and inputs.json and, for a run starting at step 0, moves an earlier run's records (metrics.jsonl,
exports, TensorBoard events, scores) to `earlier/<time>/`, so two experiments never share a log.

The lock is `flock` on `.trainer.lock` (one file per process of a multi-host run), which the
kernel releases when its holder dies: a lock left by a killed trainer is stale by construction
and is taken over, with a note naming the pid that left it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import shutil
import socket
import time
from typing import Any

import ml_collections

from lora_jax.training import calibration
from lora_jax.training import fingerprints as run_inputs
from lora_jax.errors import WorkdirError
from lora_jax.json_files import read_json_object

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
EARLIER = "earlier"
CHECKPOINTS = "checkpoints"
# Where the data lives is not part of the experiment: inputs.json pins what the files hold, so a
# moved data dir with the same files may resume, whichever way (field or environment) names it.
# Nor is where compiled programs are cached.
LOCATION_FIELDS = ("data.data_dir", "train.compilation_cache")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for name, sub in tree.items()
                for k, v in _flat(sub, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): tree}


def config_differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field two config dicts disagree on (location fields aside).

    A field the old record lacks and the new config holds at its default is no difference: it was
    added to lora_jax after the run began, and the default is what that run did.
    """
    old, new = _flat(old), _flat(new)
    defaults = _flat(config_record(_base_config()))
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name in LOCATION_FIELDS or old.get(name, ...) == new.get(name, ...):
            continue
        if name not in old and name in defaults and new[name] == defaults[name]:
            continue
        show = lambda d: repr(d[name]) if name in d else "(absent)"  # noqa: E731
        lines.append(f"{name}: {show(old)} -> {show(new)}")
    return lines


def _base_config() -> ml_collections.ConfigDict:
    from lora_jax.config import base_config  # deferred: config imports the methods registry

    return base_config()


def config_record(config: ml_collections.ConfigDict) -> dict:
    """The config as config.json holds it (JSON types: tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _write_json(path: pathlib.Path, value: Any) -> None:
    """Writes through a temporary file and a rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class Workdir:
    """The directory of one run (see the module docstring).

    Args:
      path: the workdir.
      process_index: this process's index; only process 0 writes records, every process locks.
    """

    def __init__(self, path: str | os.PathLike, process_index: int = 0):
        self.path = pathlib.Path(path)
        self.process_index = process_index
        self.writer = process_index == 0
        suffix = "" if process_index == 0 else f"-{process_index}"
        self.lock_path = self.path / f".trainer{suffix}.lock"
        self._fd: int | None = None
        self._created: list[pathlib.Path] = []
        self.committed = False

    # --- Lock -----------------------------------------------------------------------------------

    def __enter__(self) -> Workdir:
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first: removed in this order on an early failure
        try:
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise WorkdirError(
                    f"{self.path} is in use by another trainer (pid {holder}); two trainers on "
                    "one workdir would interleave their logs and race on checkpoints. Wait for "
                    "it, stop it, or use another --workdir.") from None
            try:  # the previous holder may have unlinked the file between our open and flock
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 200).decode(errors="replace").strip()
        if previous:
            logger.warning("%s: took over the lock left by pid %s, which no longer holds it "
                           "(killed?)", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is not None:
            self.lock_path.unlink(missing_ok=True)  # before closing: see _lock's inode check
            os.close(self._fd)
            self._fd = None

    def _remove_created(self) -> None:
        for directory in self._created:
            try:
                directory.rmdir()  # only if empty: never removes anything of the user's
            except OSError:
                break

    def __exit__(self, *exc) -> None:
        self._unlock()
        if not self.committed:
            self._remove_created()

    # --- Checks (read only) ---------------------------------------------------------------------

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Refuses a workdir whose config.json records another experiment.

        Raises:
          WorkdirError: the fields that differ, each with its old and new value.
          FileFormatError: config.json is not valid JSON.
        """
        path = self.path / CONFIG_NAME
        if not path.exists():
            return
        recorded = read_json_object(path, what="run config (written by lora_jax.train)")
        differences = config_differences(recorded, config_record(config))
        if differences:
            raise WorkdirError(
                f"{self.path} holds a run with a different config ({path}); resuming it with "
                "this one would mix two experiments. Use a new --workdir. Differences (recorded "
                "-> given):\n  " + "\n  ".join(differences))

    def check_inputs(self, current: dict) -> None:
        """Refuses to go on with other data or another base checkpoint than the run recorded.

        Raises:
          WorkdirError: one line per file that differs (size, hash and directory, then and now).
        """
        path = self.path / run_inputs.FILE_NAME
        if not path.exists():
            if (self.path / CONFIG_NAME).exists():
                logger.warning("%s has no %s (a run from before inputs were recorded): its data "
                               "and base cannot be checked", self.path, run_inputs.FILE_NAME)
            return
        recorded = read_json_object(path, what="record of a run's inputs")
        differences = run_inputs.differences(recorded, current)
        if differences:
            raise WorkdirError(
                f"{self.path} holds a run on other inputs than these ({path}); going on would "
                "mix two experiments. Point the data dir or model.name back at what the run "
                "used, or use a new --workdir. Differences:\n  " + "\n  ".join(differences))

    # --- Commit ---------------------------------------------------------------------------------

    def earlier_records(self) -> list[pathlib.Path]:
        """What an earlier run left that a run starting at step 0 must not mix with its own."""
        # A data-driven start's calibration is the run's own (its config and inputs are this
        # workdir's, which the checks require), taken before this commit: it stays.
        keep = {CONFIG_NAME, run_inputs.FILE_NAME, CHECKPOINTS, EARLIER, calibration.STATE,
                calibration.RECORD}
        return sorted(p for p in self.path.iterdir()
                      if p.name not in keep and not p.name.startswith(".trainer"))

    def commit(self, config: ml_collections.ConfigDict, inputs: dict, *, fresh: bool) -> None:
        """The run starts: records its config and inputs; a fresh run (step 0) first moves an
        earlier run's records to earlier/<time>/."""
        self.committed = True
        if not self.writer:
            return
        earlier = self.earlier_records() if fresh else []
        if earlier:
            aside = self.path / EARLIER / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True, exist_ok=True)
            for path in earlier:
                shutil.move(str(path), aside / path.name)
            logger.warning("%s: this run starts at step 0; the earlier run's %s moved to %s",
                           self.path, ", ".join(p.name for p in earlier), aside)
        _write_json(self.path / CONFIG_NAME, config_record(config))
        _write_json(self.path / run_inputs.FILE_NAME, inputs)
