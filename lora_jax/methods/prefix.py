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
(prompt, then completion), and an encoder example is refused. They cannot be merged into
weights.

Where they start. PreEmbed's vectors start as the embeddings of randomly drawn vocabulary
tokens, as prompt tuning's do. PreLayer's start (`start`) is, by default, Li & Liang's
"activations of real words": each block's input at real tokens as the base model computes it,
read from the run's first training row before step 1 (`calibrated`, kept in the workdir like
the other data-driven starts): the prefix's j-th vector is the row's j-th token's, the infix's
are those of the prompt's last l_i tokens, the ones before the completion. A pretrained
decoder needs this: its block inputs grow with depth (SmolLM2-135M: median norm 46 at block 1,
632 at block 29, against 3 for an embedding) and position 0 carries a massive activation (an
attention sink, norm ~25,000) that a prefix replaces; started from embeddings at every block
(`start = 'embeddings'`, kept to show it), PreLayer's first loss there is 16.9 against the
base's 4.1. With the row's activations the prefix is the model reading the row's first l_p
tokens twice (`tests/test_prefix.py` checks that exactly).

PEFT's prompt tuning is PreEmbed with l_i = 0; tests/test_prefix.py trains both from the same
start and compares them step by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
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
from lora_jax.methods.base import Method, Params, PeftCodec, Registration, SettingError
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
      start: PreLayer's start, one of `STARTS` (see the module docstring); PreEmbed's is
        'embeddings'.
      activations: PreLayer's 'activations' start, (blocks, l_p + l_i, d), set by
        `calibrated` (or `with_calibration` from a run's workdir).
    """

    name: str = "preembed"
    prefix: int = 8
    infix: int = 0
    layers: bool = False
    family: Any = None
    start: str = "embeddings"
    activations: Any = dataclasses.field(default=None, compare=False, repr=False)

    # The start reads hidden states, which a scanned model returns too.
    calibration_reads_inside_blocks = False

    def __post_init__(self):
        if self.prefix < 0 or self.infix < 0 or self.prefix + self.infix == 0:
            raise ValueError(f"{self.name}: prefix={self.prefix} and infix={self.infix} must be "
                             ">= 0 and insert at least one token")
        allowed = STARTS if self.layers else ("embeddings",)
        if self.start not in allowed:
            raise ValueError(f"{self.name}: start {self.start!r} is not one of {allowed}")

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
        """Raises a `SettingError` for an 'activations' start not calibrated, or calibrated on
        another model (other blocks or width)."""
        table = self._embedding(params)
        if self.start == "activations":
            shape = (len(self.family.blocks(params)), self.count, table.shape[1])
            if self.activations is None and (isinstance(table, jax.core.Tracer)
                                             or isinstance(key, jax.core.Tracer)):
                # Evaluated in shapes: the config checks before any batch is read, an export's
                # check of its tensors (`exports.load`, whose params are concrete).
                return {"activations": jnp.zeros(shape, jnp.float32)}
            if self.activations is None:
                raise SettingError("start", f"{self.name}: start 'activations' is the base "
                                   "model's block inputs at real tokens: calibrate it on a "
                                   "batch of the task first (`calibrated`; the trainer does), "
                                   "or set start = 'embeddings'", self.name)
            if tuple(np.shape(self.activations)) != shape:
                raise SettingError("start", f"{self.name}: activations of shape "
                                   f"{tuple(np.shape(self.activations))} for a model that needs "
                                   f"{shape} (blocks, l_p + l_i, width)", self.name)
            return {"activations": jnp.asarray(self.activations, jnp.float32)}
        tokens = jax.random.randint(key, (self.count,), 0, table.shape[0])
        start = jnp.asarray(table[tokens], jnp.float32)
        if not self.layers:
            return {"embeddings": start}
        blocks = len(self.family.blocks(params))
        return {"activations": jnp.broadcast_to(start, (blocks, *start.shape))}

    # --- PreLayer's start from real tokens ----------------------------------------------------

    def calibration(self) -> int:
        return 1 if self.start == "activations" and self.activations is None else 0

    def calibrated(self, data: Any) -> "VirtualTokens":
        """With the block inputs of the first row of `data`'s first batch
        (`methods.calibration.Batches`) at real tokens: the row's first l_p tokens for the
        prefix, its prompt's last l_i for the infix.

        Raises:
          ValueError: `data` gives no hidden states.
          SettingError: the row's prompt is shorter than l_p or l_i.
        """
        if data.hidden_states is None:
            raise ValueError(f"{self.name}: start 'activations' reads the base model's hidden "
                             "states, which these calibration batches do not give")
        ids, prompt = self._first_row(data.batches[0], self.family.vocab_size(data.params))
        if prompt < max(self.prefix, self.infix):
            raise SettingError("start", f"{self.name}: the run's first training row has a "
                               f"prompt of {prompt} tokens; start 'activations' takes the "
                               f"prefix's {self.prefix} and the infix's {self.infix} vectors "
                               "from it (start = 'embeddings' does not)", self.name)
        row = {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None]}
        states = jax.jit(data.hidden_states)(data.params, row)
        positions = [*range(self.prefix), *range(prompt - self.infix, prompt)]
        blocks = len(self.family.blocks(data.params))  # block b reads hidden state b
        return self.with_calibration({"activations": np.stack(
            [np.asarray(states[b][0, positions], np.float32) for b in range(blocks)])})

    @staticmethod
    def _first_row(batch: dict, vocab_size: int) -> tuple[np.ndarray, int]:
        """(the real token ids of the batch's first example, its prompt's length): the virtual
        tokens the batch was prepared with taken out, the prompt ending at the first token
        with a loss (the whole row where the batch marks none)."""
        keep = np.asarray(batch["attention_mask"][0]) > 0
        if "segment_ids" in batch:  # a packed row: its first example
            segments = np.asarray(batch["segment_ids"][0])
            keep &= segments == segments[0]
        ids = np.asarray(batch["input_ids"][0])[keep]
        loss = np.asarray(batch["loss_mask"][0])[keep] if "loss_mask" in batch else \
            np.zeros_like(ids)
        real = ids < vocab_size
        ids, loss = ids[real], loss[real]
        return ids, int(np.argmax(loss > 0)) if loss.any() else len(ids)

    def calibration_state(self) -> dict[str, Any]:
        return {} if self.activations is None else {"activations": self.activations}

    def with_calibration(self, state: Mapping[str, Any]) -> "VirtualTokens":
        return dataclasses.replace(self, activations=np.asarray(state["activations"],
                                                                np.float32))

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
        start = f", start={self.start}" if self.layers else ""
        return f"{self.name}(l_p={self.prefix}, l_i={self.infix}{start})"


STARTS = ("activations", "embeddings")  # PreLayer's; see the module docstring


def _registration(name: str, layers: bool) -> Registration:
    def defaults() -> ml_collections.ConfigDict:
        section = {"prefix": 8, "infix": 0}
        return ml_collections.ConfigDict({**section, "start": STARTS[0]} if layers else section)

    def build(c: Any, family: Any) -> VirtualTokens:
        return VirtualTokens(name=name, prefix=c.prefix, infix=c.infix, layers=layers,
                             family=family, start=c.start if layers else "embeddings")

    def related(c: Any) -> list[str]:
        if c.prefix + c.infix == 0:
            return ["infix = 0: with prefix 0 no token is inserted; prefix + infix must be >= 1"]
        return []

    # PEFT's prompt tuning is PreEmbed's special case; PreLayer has no PEFT twin.
    codec = None if layers else PromptTuning(name)
    settings = {"prefix": rules.integer(0), "infix": rules.integer(0)}
    if layers:
        settings["start"] = rules.one_of(*STARTS)
    return Registration(defaults, settings, build,
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
