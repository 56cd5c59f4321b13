"""JAX's persistent compilation cache for runs: a study's runs with the same shapes compile once.

`config.train.compilation_cache` names the directory: 'auto' (the default) is JAX's own
`$JAX_COMPILATION_CACHE_DIR` where the user set it (one cache for every run on the machine), else
`.jax_compilation_cache` beside the workdir, so every run of a sweep (whose workdirs share a
parent) reads and writes one cache; '' turns it off; anything else is a path. The trainer points
JAX at it once the workdir is committed (nothing is written before), which is before the train
and eval steps compile; programs that compile in under a second are not cached (JAX's
`jax_persistent_cache_min_compile_time_secs`).
"""

from __future__ import annotations

import os
import pathlib

import jax
from jax.experimental.compilation_cache import compilation_cache

AUTO = "auto"
DIRECTORY_NAME = ".jax_compilation_cache"
JAX_VARIABLE = "JAX_COMPILATION_CACHE_DIR"  # JAX's own setting, which 'auto' must not override


def cache_directory(setting: str, workdir: pathlib.Path) -> pathlib.Path | None:
    """The directory `setting` names for a run in `workdir` (None: no cache)."""
    if not setting:
        return None
    if setting == AUTO:
        if os.environ.get(JAX_VARIABLE):
            return pathlib.Path(os.environ[JAX_VARIABLE]).expanduser().resolve()
        return workdir.resolve().parent / DIRECTORY_NAME
    return pathlib.Path(setting).expanduser().resolve()


def use(setting: str, workdir: pathlib.Path) -> pathlib.Path | None:
    """Points JAX's persistent cache at `cache_directory(setting, workdir)` (or turns it off) for
    the compiles that follow in this process; returns the directory."""
    directory = cache_directory(setting, workdir)
    current = jax.config.jax_compilation_cache_dir
    wanted = None if directory is None else str(directory)
    if current != wanted:
        compilation_cache.reset_cache()  # JAX reads the directory once; a new one needs a reset
        jax.config.update("jax_compilation_cache_dir", wanted)
    return directory
