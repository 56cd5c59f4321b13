"""What a run reads, pinned down: resolved paths and a fingerprint of every file.

A config names its data and base model indirectly (`data.data_dir` None means
$LORA_JAX_DATA_DIR, `model.name` may be a hub id), so the config alone does not say what a run
ran on. `run_inputs` records, per role, the directory actually used and each file read with its
size and SHA-256:

    {"data": {"dir": "/.../shared/data", "files": {"glue/SST-2/train.tsv": {"bytes": ..., "sha256": ...}, ...}},
     "base": {"dir": "/.../model", "files": {"model.safetensors": {...}, "config.json": {...}}},
     "tokenizer": {"dir": ..., "files": {...}}}

The trainer writes it to the workdir as `inputs.json` and refuses to resume (`evaluate` to
evaluate) when a file's content differs: a moved directory with the same files is the same
input, another file under the same name is not.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import ml_collections

from lora_jax.data import tasks, tokenizers
from lora_jax.interop import hub

FILE_NAME = "inputs.json"
# Files a Hugging Face tokenizer may be read from; those present are fingerprinted.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model")
TRAIN_SPLITS = ("train", "dev")


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """{'bytes': size, 'sha256': hex digest} of one file's content."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": digest}


def _record(directory: pathlib.Path, files: list[pathlib.Path]) -> dict[str, Any]:
    return {"dir": str(directory.absolute()),
            "files": {str(f.relative_to(directory)): file_fingerprint(f) for f in files}}


def data_inputs(data: ml_collections.ConfigDict, splits=TRAIN_SPLITS) -> dict[str, Any]:
    """The data files a config's `data` section reads for `splits` (hub datasets are named, not
    fingerprinted: they are not files here)."""
    inputs = tasks.task_entry(data.task).inputs(data, splits)
    if inputs.hub is not None:
        return {"hub": inputs.hub, "files": {}}
    folders = [str(f) for f in inputs.files if f.is_dir()]
    if folders:  # "not found" would be wrong: the path exists, as a directory
        raise FileNotFoundError(f"{', '.join(folders)} is a directory, where a data file is "
                                "expected")
    missing = [str(f) for f in inputs.files if not f.is_file()]
    if missing:
        raise FileNotFoundError(inputs.missing.format(", ".join(missing)))
    return _record(inputs.root, inputs.files)


def base_inputs(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The base checkpoint's weights and config (random weights: none, the seed makes them)."""
    if not model.name:
        return {"random_init": True, "files": {}}
    directory = hub.resolve_checkpoint(hub.checkpoint_path(model.name))
    if hub.is_gguf(directory):  # one file: weights, config and tokenizer
        return _record(directory.parent, [directory])
    files = [*hub.weight_files(directory), directory / "config.json"]
    return _record(directory, [f for f in files if f.is_file()])


def tokenizer_inputs(model: ml_collections.ConfigDict, data_dir: str | None) -> dict[str, Any]:
    """The tokenizer files (a data-dir tokenizer's, e.g. GPT-2's BPE files, or a checkpoint's)."""
    # `or`: an empty model.tokenizer has always meant the checkpoint's here.
    directory = tokenizers.directory(model.tokenizer or None, model.name, data_dir)
    if hub.is_gguf(directory):
        return _record(directory.parent, [directory])
    return _record(directory, [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()])


def run_inputs(config: ml_collections.ConfigDict, splits=TRAIN_SPLITS) -> dict[str, Any]:
    """The record of everything a run with `config` reads (see the module docstring)."""
    return {"data": data_inputs(config.data, splits),
            "base": base_inputs(config.model),
            "tokenizer": tokenizer_inputs(config.model, config.data.data_dir)}


def _describe(entry: dict | None, directory: str | None) -> str:
    if entry is None:
        return "absent"
    where = f" in {directory}" if directory else ""
    return f"{entry['bytes']:,} bytes, sha256 {entry['sha256'][:12]}{where}"


def differences(recorded: dict[str, Any], current: dict[str, Any], *,
                only_common_files: bool = False) -> list[str]:
    """What differs between two `run_inputs` records, one line per file (empty: the same).

    Args:
      recorded: the run's record.
      current: what would be read now.
      only_common_files: compare only files both read (evaluation reads a subset of the data).
    """
    lines = []
    for role in ("data", "base", "tokenizer"):
        old, new = recorded.get(role, {}), current.get(role, {})
        for key in ("hub", "random_init"):
            if old.get(key) != new.get(key):
                lines.append(f"{role}: {key} was {old.get(key)!r}, now {new.get(key)!r}")
        old_files, new_files = old.get("files", {}), new.get("files", {})
        names = sorted(old_files.keys() & new_files.keys() if only_common_files
                       else old_files.keys() | new_files.keys())
        for name in names:
            if old_files.get(name) != new_files.get(name):
                lines.append(f"{role} file {name}: the run read "
                             f"{_describe(old_files.get(name), old.get('dir'))}; now "
                             f"{_describe(new_files.get(name), new.get('dir'))}")
    return lines
