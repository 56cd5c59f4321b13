"""Tokenizers by the name a config gives (`model.tokenizer`), without knowing any model.

    tokenizer = load("gpt2")                    # the BPE files under <data_dir>/tokenizers/gpt2
    tokenizer = load(None, checkpoint="org/m")  # the checkpoint's own
    directory("gpt2")                           # where those files are (a run fingerprints them)

A name is, in this order: a tokenizer a model family reads from the data dir (its
`tokenizers`), a packaged checkpoint's short name (its `checkpoints`), or a directory or hub id;
None takes the checkpoint's tokenizer.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import transformers

from lora_jax.data import resolve as resolve_data_dir
from lora_jax.interop import hub
from lora_jax.models import DataDirTokenizer, data_dir_tokenizer

Checkpoint = str | os.PathLike | None


def directory(name: str | None, checkpoint: Checkpoint = None,
              data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder holding the tokenizer's files (a GGUF checkpoint: the file, whose metadata
    holds it).

    Args:
      name: the config's model.tokenizer; None for the checkpoint's.
      checkpoint: the base checkpoint (name, directory or hub id), used when `name` is None.
      data_dir: the data root (a config's data.data_dir); None: $LORA_JAX_DATA_DIR.

    Raises:
      ValueError: neither a name nor a checkpoint (a randomly initialised model needs a name).
      FileNotFoundError: a checkpoint that is neither a directory nor a fetchable hub id.
    """
    named = data_dir_tokenizer(name) if name is not None else None
    if named is not None:
        return resolve_data_dir(data_dir) / named.folder
    source = checkpoint if name is None else name
    if source is None:
        raise ValueError("a randomly initialised model needs config.model.tokenizer")
    return hub.resolve_checkpoint(hub.checkpoint_path(source))


def load(name: str | None, checkpoint: Checkpoint = None,
         data_dir: str | os.PathLike | None = None) -> Any:
    """A fast `transformers` tokenizer for a config's model.tokenizer (arguments as `directory`).

    Raises:
      FileNotFoundError: a data-dir tokenizer's files are missing (the message names the folder).
      RuntimeError: a data-dir tokenizer that does not encode its probe text as it should.
    """
    named = data_dir_tokenizer(name) if name is not None else None
    path = directory(name, checkpoint, data_dir)
    if named is None and hub.is_gguf(path):
        from lora_jax.interop import gguf_files  # deferred: transformers' GGUF conversion

        return gguf_files.open_gguf(path).tokenizer()
    if named is None:
        return transformers.AutoTokenizer.from_pretrained(path)
    return _load_from_data_dir(named, path)


def _load_from_data_dir(named: DataDirTokenizer, path: pathlib.Path) -> Any:
    for file in named.files:
        if not (path / file).is_file():
            raise FileNotFoundError(f"{path / file} not found; set LORA_JAX_DATA_DIR to the "
                                    f"folder that holds {named.folder}/")
    # from_pretrained on the folder works across transformers versions; the constructor does
    # not: transformers 5 renamed GPT-2's vocab_file/merges_file to vocab/merges and silently
    # builds an empty tokenizer from the old keywords. Hence also the probe below.
    tokenizer = getattr(transformers, named.transformers_class).from_pretrained(
        str(path), local_files_only=True)
    text, ids = named.probe
    if tokenizer(text)["input_ids"] != list(ids) or tokenizer.eos_token_id != named.eos_id:
        raise RuntimeError(f"the tokenizer loaded from {path} does not encode as "
                           f"{named.transformers_class} should")
    return tokenizer
