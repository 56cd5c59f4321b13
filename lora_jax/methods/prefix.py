"""Prefix- and infix-token baselines of the LoRA paper (its Section 5.1): PreEmbed and PreLayer.

Both insert l_p "prefix" tokens before the prompt and l_i "infix" tokens after it (between the
MR and the reference on E2E). The inserted tokens are virtual: ids vocab_size + j, j < l_p + l_i,
which no tokenizer produces, so every later stage (bucketing, packing, masks, positions, the
KV-cached decoder) treats them as ordinary tokens of the row and the positions after them shift
as they would for real tokens.

    preembed   the virtual tokens' input embeddings are trained: |Theta| = d (l_p + l_i)
    prelayer   the activations at the virtual positions are trained, one vector per
               Transformer layer: |Theta| = L d (l_p + l_i). The paper says "the activations
               after every Transformer layer"; in a causal model the last layer's output at a
               virtual position reaches no later token, and the first layer reads an input there,
               so the L trained vectors are each block's input at those positions (the embedding
               output for block 0, block l's output for block l + 1). That keeps every trained
               scalar in use and the count as the paper's formula.

The paper uses them on GPT-2 and GPT-3 only; here too: they change language-model examples
(prompt, then completion), and an encoder example is refused. The virtual tokens start as the
embeddings of randomly drawn vocabulary tokens (prelayer: the same vectors at every layer), a
choice Li & Liang found better than random vectors; they cannot be merged into weights.

PEFT's prompt tuning is PreEmbed with l_i = 0; tests/test_prefix.py trains both from the same
start and compares them step by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.interop import peft_adapters as pa
from lora_jax.json_files import read_json_object
from lora_jax.methods.base import Method, Params, PeftCodec, Registration
from lora_jax.models import family as model_family
from lora_jax.models import scan


@dataclasses.dataclass(frozen=True)
class VirtualTokens(Method):
    """PreEmbed (`layers=False`) or PreLayer (`layers=True`); see the module docstring.

    Attributes:
      name: 'preembed' or 'prelayer'.
      prefix: l_p, tokens before the prompt.
      infix: l_i, tokens after the prompt.
      layers: train each block's input at the virtual positions (PreLayer).
      family: the model family (its word embedding and blocks).
    """

    name: str = "preembed"
    prefix: int = 8
    infix: int = 0
    layers: bool = False
    family: Any = None

    def __post_init__(self):
        if self.prefix < 0 or self.infix < 0 or self.prefix + self.infix == 0:
            raise ValueError(f"{self.name}: prefix={self.prefix} and infix={self.infix} must be "
                             ">= 0 and insert at least one token")

    @property
    def count(self) -> int:
        return self.prefix + self.infix

    def _embedding(self, params: Params):
        path = tuple(self.family.word_embedding.split("/"))
        flat = traverse_util.flatten_dict(params)
        hits = [p for p in flat if p[-1] == "embedding" and p[-1 - len(path):-1] == path]
        if len(hits) != 1:
            raise ValueError(f"{self.name}: no single word embedding {'/'.join(path)} in params")
        return flat[hits[0]]

    def init(self, params: Params, key: jax.Array) -> dict:
        table = self._embedding(params)
        tokens = jax.random.randint(key, (self.count,), 0, table.shape[0])
        start = jnp.asarray(table[tokens], jnp.float32)
        if not self.layers:
            return {"embeddings": start}
        blocks = len(self.family.blocks(params))
        return {"activations": jnp.broadcast_to(start, (blocks, *start.shape))}

    # --- The input ---------------------------------------------------------------------------

    def virtual_ids(self, vocab_size: int) -> tuple[list[int], list[int]]:
        ids = list(range(vocab_size, vocab_size + self.count))
        return ids[:self.prefix], ids[self.prefix:]

    def prepare_example(self, example: dict, max_len: int, vocab_size: int) -> dict:
        """[prefix] + prompt + [infix] + completion, cut to max_len; no loss at virtual tokens.

        Raises:
          ValueError: not a language-model example (no loss_mask: an encoder's).
        """
        if "loss_mask" not in example:
            raise ValueError(f"{self.name} inserts tokens into language-model examples (GPT-2, "
                             "as in the paper); this task's examples are not")
        ids, mask = list(example["input_ids"]), list(example["loss_mask"])
        prompt = next((i for i, m in enumerate(mask) if m), len(mask))
        prefix, infix = self.virtual_ids(vocab_size)
        ids = prefix + ids[:prompt] + infix + ids[prompt:]
        mask = [0] * len(prefix) + mask[:prompt] + [0] * len(infix) + mask[prompt:]
        return {**example, "input_ids": ids[:max_len], "loss_mask": mask[:max_len]}

    def prepare_prompt(self, ids: Sequence[int], vocab_size: int) -> list[int]:
        prefix, infix = self.virtual_ids(vocab_size)
        return prefix + list(ids) + infix

    # --- The forward pass --------------------------------------------------------------------

    @contextlib.contextmanager
    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        del rng
        embedding_path = tuple(self.family.word_embedding.split("/"))
        current = {}  # this call's virtual positions, seen at the embedding, used by the blocks

        def hook(next_fun, args, kwargs, context):
            module, path = context.module, tuple(context.module.path)
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if isinstance(module, nn.Embed) and path[-len(embedding_path):] == embedding_path:
                ids = args[0]
                vocab = module.num_embeddings
                virtual = ids >= vocab
                index = jnp.clip(ids - vocab, 0, self.count - 1)
                current.update(virtual=virtual[..., None], index=index)
                h = next_fun(jnp.where(virtual, 0, ids), *args[1:], **kwargs)
                if not self.layers:
                    h = jnp.where(current["virtual"], added["embeddings"][index].astype(h.dtype), h)
                return h
            blocks = scan.block_paths(path) or (path,)
            if self.layers and "virtual" in current and path and \
                    re.fullmatch(self.family.block, blocks[0][-1]):
                # Each block's row, read here: inside insert a constant index would make each
                # scanned block a program of its own (`scan.per_block`).
                rows = {p: added["activations"][int(re.fullmatch(self.family.block, p[-1])[1])]
                        for p in blocks}

                def insert(block, x):
                    learned = rows[block][current["index"]]
                    return jnp.where(current["virtual"], learned.astype(x.dtype), x)

                x = scan.per_block(path, insert, args[0])
                return next_fun(x, *args[1:], **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(hook):
            yield

    def describe(self) -> str:
        return f"{self.name}(l_p={self.prefix}, l_i={self.infix})"


def _registration(name: str, layers: bool) -> Registration:
    def defaults() -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"prefix": 8, "infix": 0})

    def build(c: Any, family: Any) -> VirtualTokens:
        return VirtualTokens(name=name, prefix=c.prefix, infix=c.infix, layers=layers,
                             family=family)

    def related(c: Any) -> list[str]:
        if c.prefix + c.infix == 0:
            return ["infix = 0: with prefix 0 no token is inserted; prefix + infix must be >= 1"]
        return []

    # PEFT's prompt tuning is PreEmbed's special case; PreLayer has no PEFT twin.
    codec = None if layers else PromptTuning(name)
    return Registration(defaults, {"prefix": rules.integer(0), "infix": rules.integer(0)}, build,
                        peft=None if codec is None else lambda: codec, inserts_tokens=True,
                        related=related)


# --- In PEFT's format: prompt tuning --------------------------------------------------------------

PROMPT_KEY = "prompt_embeddings"  # PEFT's key for prompt tuning's virtual-token embeddings


@dataclasses.dataclass(frozen=True)
class PromptTuning(PeftCodec):
    """PreEmbed with prefix tokens only, nothing else trained: PEFT's prompt tuning, which
    `peft.PeftModel.from_pretrained` loads (`PeftModel` prepends the embeddings to the input's).

    Attributes:
      name: the registered method a prompt-tuning adapter is read as.
    """

    name: str
    peft_types = ("PROMPT_TUNING",)

    def writes(self, method: Method, trainable: Params) -> bool:
        return (not method.layers and method.infix == 0
                and not jax.tree_util.tree_leaves(trainable.get("params", {})))

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, *, model_type: str, task: str | None,
             base_model_name_or_path: str | None = None) -> pathlib.Path:
        family = model_family(model_type)
        family.check_task(task)
        embeddings = np.asarray(jax.device_get(trainable[method.name]["embeddings"]), np.float32)
        config = {"peft_type": "PROMPT_TUNING", "task_type": family.peft_task_types[task],
                  "num_virtual_tokens": int(embeddings.shape[0]),
                  "token_dim": int(embeddings.shape[1]), "num_transformer_submodules": 1,
                  "prompt_tuning_init": "RANDOM",
                  "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
        return pa.write_adapter_dir(pathlib.Path(directory), config, {PROMPT_KEY: embeddings},
                                    metadata={"format": "pt"})

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        """Raises FileFormatError: embeddings of another width than the model's."""
        embeddings = read_prompt_tuning(directory)
        if embeddings.shape[1] != family.hidden_size(params):
            raise FileFormatError(f"{directory}: prompt embeddings of width {embeddings.shape[1]}"
                                  f" for a model of width {family.hidden_size(params)}")
        method = VirtualTokens(name=self.name, prefix=embeddings.shape[0], infix=0,
                               family=family)
        return method, {"params": {}, method.name: {"embeddings": jnp.asarray(embeddings)}}


def read_prompt_tuning(directory: pathlib.Path) -> np.ndarray:
    """The (num_virtual_tokens, token_dim) embeddings of a PEFT prompt-tuning adapter.

    Raises:
      FileFormatError: not a prompt-tuning adapter, or its tensor disagrees with its config.
    """
    config = read_json_object(directory / pa.CONFIG_NAME, what="PEFT adapter config",
                              required=("peft_type", "num_virtual_tokens"))
    if config["peft_type"] != "PROMPT_TUNING":
        raise FileFormatError(f"{directory / pa.CONFIG_NAME}: peft_type {config['peft_type']!r}, "
                              "not 'PROMPT_TUNING'")
    tensors = hub.read_safetensors(directory / pa.WEIGHTS_NAME)
    if set(tensors) != {PROMPT_KEY}:
        raise FileFormatError(f"{directory / pa.WEIGHTS_NAME} holds {sorted(tensors)}; a prompt-"
                              f"tuning adapter holds {PROMPT_KEY!r} alone")
    embeddings = np.asarray(tensors[PROMPT_KEY], np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != config["num_virtual_tokens"]:
        raise FileFormatError(f"{directory / pa.WEIGHTS_NAME}: {PROMPT_KEY} is {embeddings.shape}, "
                              f"but the config has {config['num_virtual_tokens']} virtual tokens")
    if not np.isfinite(embeddings).all():
        raise FileFormatError(f"{directory / pa.WEIGHTS_NAME} holds non-finite values")
    return embeddings



PREEMBED = _registration("preembed", layers=False)
PRELAYER = _registration("prelayer", layers=True)
