"""GGUF checkpoints in (llama.cpp's single-file format): config, tokenizer and tensors by HF key.

The container is read by `gguf.GGUFReader`, the reference reader from llama.cpp's gguf-py; the
config and tokenizer come from transformers' own GGUF support, so they are the ones
`AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` would build. The tensors keep their
stored bytes (memory-mapped views of the file, never a float32 copy of the whole model) and are
renamed to the keys of the Hugging Face state dict that `hub.params_from_state_dict` reads.

Two things llama.cpp's converter does to the weights are undone here, so each tensor means what HF's
does:
  - Llama (and Mistral, written as 'llama'): the rows of q_proj and k_proj are permuted for
    llama.cpp's rotary layout. The permutation moves whole rows, and a quantized row's blocks run
    along d_in, so the stored rows are reordered byte for byte, quantized or not.
  - GPT-2: HF's Conv1D weights, (d_in, d_out), are stored transposed, (d_out, d_in); those tensors
    are flagged `transposed` and `dequantized` transposes them back.

Example:
  checkpoint = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
  q = dequantized(checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"])  # (576, 576) f32
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from typing import TYPE_CHECKING, NamedTuple

import gguf
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from lora_jax.errors import FileFormatError
from lora_jax.models import FAMILIES
from lora_jax.models import family as model_family

if TYPE_CHECKING:  # transformers costs half a second to import: deferred to the calls needing it
    import transformers

logger = logging.getLogger(__name__)

# The model types a GGUF file may load as (a GgufCheckpoint's `architecture`): the families that
# name what llama.cpp writes as their general.architecture (`ModelFamily.gguf_architecture`;
# Mistral models are written as 'llama', and transformers tells them apart by general.name).
SUPPORTED_ARCHITECTURES = tuple(t for t, f in FAMILIES.items() if f.gguf_architecture)
_FILE_ARCHITECTURES = tuple(dict.fromkeys(f.gguf_architecture for f in FAMILIES.values()
                                          if f.gguf_architecture))
SUPPORTED_KINDS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q4_K", "Q5_K", "Q6_K")
# Kinds stored as plain values; the reader maps BF16 as bytes, since numpy has no bfloat16.
_VALUE_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file, under its Hugging Face key.

    Attributes:
      hf_key: e.g. 'model.layers.0.self_attn.q_proj.weight'.
      kind: the GGML type name, one of `SUPPORTED_KINDS`.
      shape: the HF (torch) shape, e.g. (d_out, d_in) for a Linear weight.
      raw: the stored data, rows in HF order (q/k already un-permuted): for F32/F16/BF16 an array
        of that type, for block kinds uint8 (rows, bytes_per_row). Usually a read-only view of the
        file's memory map. Its rows are those of `stored_shape`.
      gguf_name: the tensor's name in the file, e.g. 'blk.0.attn_q.weight'.
      transposed: the file stores the transpose of the HF weight (GPT-2's Conv1D weights).
    """

    hf_key: str
    kind: str
    shape: tuple[int, ...]
    raw: np.ndarray
    gguf_name: str = ""
    transposed: bool = False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the values `raw` holds: `shape`, or its reverse when `transposed`."""
        return self.shape[::-1] if self.transposed else self.shape


@dataclasses.dataclass(frozen=True)
class GgufCheckpoint:
    """An opened GGUF file (see `open_gguf`).

    Attributes:
      path: the file.
      architecture: the model type, one of `SUPPORTED_ARCHITECTURES`.
      hf_config: the transformers config built from the file's metadata.
      tensors: HF key -> tensor.
      chat_template: the file's `tokenizer.chat_template`, if any.
      has_tokenizer: whether the metadata holds a tokenizer (`tokenizer.ggml.tokens`).
    """

    path: pathlib.Path
    architecture: str
    hf_config: transformers.PretrainedConfig
    tensors: dict[str, GgufTensor]
    chat_template: str | None
    has_tokenizer: bool

    def tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        """The tokenizer the file's metadata describes, built by transformers.

        Raises:
          FileFormatError: the metadata holds no tokenizer.
        """
        if not self.has_tokenizer:
            raise FileFormatError(
                f"{self.path} has no tokenizer in its metadata (no tokenizer.ggml.tokens): the "
                "tokenizer is missing; load it from the original model instead")
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(self.path.parent),
                                                          gguf_file=self.path.name)


def open_gguf(path: str | os.PathLike) -> GgufCheckpoint:
    """Reads a GGUF file's config, tokenizer metadata and tensor table (tensor data stays mapped).

    A run asks for one file several times (weights, tokenizer, the heads it lacks) and reading
    SmolLM2's table and config takes seconds: the last few files read are kept, by path, size
    and modification time, so a changed file is read again.

    Raises:
      FileNotFoundError: no such file.
      FileFormatError: not a GGUF file, truncated or damaged, an unsupported architecture, a tensor
        of an unsupported kind, or tensors that do not fit the config (each message names the file).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _open(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open(path: pathlib.Path, size: int, mtime_ns: int) -> GgufCheckpoint:
    reader = _reader(path)
    file_architecture = _file_architecture(reader, path)
    hf_config = _hf_config(reader, path)
    return GgufCheckpoint(
        path=path,
        architecture=hf_config.model_type,
        hf_config=hf_config,
        tensors=_tensors(reader, path, file_architecture, hf_config),
        chat_template=_string_field(reader, "tokenizer.chat_template"),
        has_tokenizer="tokenizer.ggml.tokens" in reader.fields,
    )


def dequantized(tensor: GgufTensor) -> np.ndarray:
    """A tensor's values, float32 in HF layout, as `gguf.quants.dequantize` computes them (an F32
    tensor's may be a read-only view of the file)."""
    raw = tensor.raw.view(np.uint8) if tensor.kind == "BF16" else tensor.raw  # gguf reads bytes
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[tensor.kind])
    values = values.reshape(tensor.stored_shape)
    return values.T if tensor.transposed else values


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rotary permutation of q_proj/k_proj rows (a new array, HF's order).

    llama.cpp regroups each head's rows from HF's rotate-half order [first halves; second halves]
    into interleaved pairs. Rows move whole, so `rows` may be values or a quantized tensor's bytes.

    Args:
      rows: (n_head * head_dim, ...) in llama.cpp's order.
      n_head: the heads the rows belong to (num_key_value_heads for k_proj).
    """
    half = rows.shape[0] // n_head // 2
    grouped = rows.reshape(n_head, half, 2, *rows.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(rows.shape)


def _reader(path: pathlib.Path) -> gguf.GGUFReader:
    """The file opened by GGUFReader, its failures turned into errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as file:
        magic = file.read(4)
    # Checked first only to word the error: GGUFReader rejects such a file too.
    if magic != b"GGUF":
        raise FileFormatError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as error:
        # A cut file shows as short reads (failed views and reshapes) anywhere in it.
        raise FileFormatError(f"{path} is truncated or damaged: gguf's reader failed ({error}); "
                              "download or convert it again") from None
    if reader.byte_order != "I":  # the blocks' fp16 and uint32 fields would be byte-swapped
        raise FileFormatError(f"{path} was written for the other byte order than this machine's")
    return reader


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else str(field.contents())


def _file_architecture(reader: gguf.GGUFReader, path: pathlib.Path) -> str:
    """general.architecture, checked to be one we load."""
    architecture = _string_field(reader, "general.architecture")
    if architecture is None:
        raise FileFormatError(f"{path} has no general.architecture in its metadata")
    if architecture not in _FILE_ARCHITECTURES:
        raise FileFormatError(
            f"{path} holds a GGUF model of architecture {architecture!r}, which lora_jax does not "
            f"load; supported: {', '.join(_FILE_ARCHITECTURES)} (Mistral is written as 'llama')")
    return architecture


def _hf_config(reader: gguf.GGUFReader, path: pathlib.Path) -> transformers.PretrainedConfig:
    """The transformers config transformers builds from the file's metadata."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as error:
        raise FileFormatError(f"{path}: transformers could not build a config from its metadata "
                              f"({error})") from None
    # llama.cpp writes output.weight only when the LM head is not the embedding.
    config.tie_word_embeddings = all(t.name != "output.weight" for t in reader.tensors)
    if getattr(config, "n_ctx", None) and hasattr(config, "n_positions"):
        # transformers maps GPT-2's context_length to n_ctx, which HF's GPT-2 does not read: its
        # position table has n_positions rows (1024 by default), the rows position_embd holds.
        config.n_positions = config.n_ctx
    return config


class _Target(NamedTuple):
    """Where a GGUF tensor goes in the HF model."""

    key: str
    shape: tuple[int, ...]
    transposed: bool  # the HF parameter is a Conv1D weight, (d_in, d_out)


def _targets(hf_config: transformers.PretrainedConfig,
             file_architecture: str) -> dict[str, _Target]:
    """GGUF tensor name -> its HF parameter, by gguf's own name map over the HF names of our
    model's parameters (`hub.hf_keys`; shapes from `jax.eval_shape`, no memory allocated), so
    reading a GGUF file needs neither torch nor a transformers model."""
    from lora_jax.interop import hub  # deferred: hub imports this module's reader lazily too

    model = hub.model_from_hf_config(hf_config)
    family = model_family(hf_config.model_type)
    shapes = traverse_util.flatten_dict(
        jax.eval_shape(functools.partial(hub.init_params, model), jax.random.key(0)))
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[file_architecture]
    name_map = gguf.get_tensor_name_map(arch, hf_config.num_hidden_layers)
    targets = {}
    for path, leaf in shapes.items():
        conv1d = path[-1] == "kernel" and not family.transposed_kernels
        shape = tuple(leaf.shape) if conv1d or path[-1] != "kernel" else tuple(leaf.shape[::-1])
        # The key in HF's LM state dict: our module name under the model PEFT wraps.
        module = family.peft_root + hub.hf_module_name("/".join(path[:-1]))
        leaf_name = hub.LEAF_NAMES[path[-1]][0]
        gguf_name = name_map.get_name(module)
        if gguf_name is not None:
            targets.setdefault(f"{gguf_name}.{leaf_name}",
                               _Target(f"{module}.{leaf_name}", shape, conv1d))
    return targets


def _tensors(reader: gguf.GGUFReader, path: pathlib.Path, file_architecture: str,
             hf_config: transformers.PretrainedConfig) -> dict[str, GgufTensor]:
    """Every tensor the HF model has a place for, by HF key (others are skipped, with a warning)."""
    targets = _targets(hf_config, file_architecture)
    tensors, skipped = {}, []
    for tensor in reader.tensors:
        target = targets.get(tensor.name)
        if target is None:
            skipped.append(tensor.name)
            continue
        tensors[target.key] = _tensor(tensor, target, path, file_architecture, hf_config)
    if skipped:
        logger.warning("%s: tensors with no place in the transformers %s model, not loaded: %s",
                       path, hf_config.model_type, skipped)
    return tensors


def _tensor(tensor: gguf.ReaderTensor, target: _Target, path: pathlib.Path, file_architecture: str,
            hf_config: transformers.PretrainedConfig) -> GgufTensor:
    """One reader tensor as a GgufTensor: kind checked, rows un-permuted, shape checked."""
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_KINDS:
        raise FileFormatError(
            f"{path}: tensor {tensor.name} ({target.key}) is stored as {kind}, which lora_jax "
            f"cannot read; supported: {', '.join(SUPPORTED_KINDS)}")
    stored_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists d_in first
    raw = tensor.data.view(_VALUE_TYPES[kind]) if kind == "BF16" else tensor.data
    heads = _permuted_heads(tensor.name, file_architecture, hf_config)
    if heads is not None:
        if stored_shape[0] % (2 * heads):
            raise FileFormatError(f"{path}: tensor {tensor.name} has {stored_shape[0]} rows, not "
                                  f"a whole number of rotary pairs for {heads} heads")
        raw = unpermute_rows(raw, heads)
    shape = stored_shape[::-1] if target.transposed else stored_shape
    if shape != target.shape:
        raise FileFormatError(
            f"{path}: tensor {tensor.name} holds {shape} values for {target.key}, but the config "
            f"in its metadata makes that {target.shape}")
    return GgufTensor(target.key, kind, shape, raw, tensor.name, target.transposed)


def _permuted_heads(name: str, file_architecture: str,
                    hf_config: transformers.PretrainedConfig) -> int | None:
    """For a q/k tensor llama.cpp permuted, the heads its rows belong to; else None."""
    if not model_family(hf_config.model_type).gguf_permuted_rows:
        return None
    # llama.cpp's tensor names: blk.{i}.attn_q.weight, blk.{i}.attn_k.bias, ...
    role = name.split(".")[-2]
    if role == "attn_q":
        return hf_config.num_attention_heads
    if role == "attn_k":
        return hf_config.num_key_value_heads
    return None
